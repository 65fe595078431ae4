"""The starvation guard: which waiting requests jump the memory-aware order.

The LAMPS artifact promotes a waiting request only after it has run once and then been passed over
N iterations, so a long multi-call request that never started can wait forever under overload,
which is where its P99 loses to INFERCEPT. This guard covers every waiting request, with four
bounds, each off when its limit is None:

- `max_queued_s`: the seconds the whole augmented request has spent waiting to be scheduled, its
  earlier segments' waits plus this one's. A request with many calls comes back to the queue after
  each and, ranked behind lighter work every time, loses a little at each return; no single wait
  is long, but their sum is what puts it in the tail. This bound caps exactly that sum.
- `max_wait_s`: the request's age since it arrived (calls and decoding included).
- `max_passed_over`: scheduler steps this engine request has waited while others were scheduled.
- `max_latency_s`: a latency the request is about to miss: its age plus its predicted remaining
  service (decode and calls, `scoring.remaining_service_s`) passes the bound. A request with much
  work left is promoted early, a light one late or never: the bound aims at the tail (long
  requests that arrived into a backlog), not at every request that waited.

Promoted requests go to the front, first-come-first-served among themselves: once nothing but
age separates them, arrival order bounds the wait of each. (Ordering them by least slack instead,
arrival minus remaining service, was measured and dropped: when the engine is so overloaded that
most requests are at risk, it runs the longest requests first and the mean latency suffers.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lamps_core.policy import EngineView, Priority, QueuedRequest

# The artifact's threshold: promoted after being passed over 100 iterations.
DEFAULT_MAX_PASSED_OVER = 100

# Promoted priorities start with this, the ranked ones with RANKED, so promoted sort first.
PROMOTED = 0.0
RANKED = 1.0


@dataclass(frozen=True, slots=True)
class StarvationGuard:
    max_wait_s: float | None = None
    max_passed_over: int | None = DEFAULT_MAX_PASSED_OVER
    max_queued_s: float | None = None
    max_latency_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_wait_s", "max_queued_s", "max_latency_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be None or a finite number >= 0: {value}")
        if self.max_passed_over is not None and self.max_passed_over < 0:
            raise ValueError(f"max_passed_over must be None or >= 0: {self.max_passed_over}")

    def is_starving(
        self, request: QueuedRequest, engine: EngineView, remaining_s: float = 0.0
    ) -> bool:
        """`remaining_s`: the request's predicted remaining service, for `max_latency_s`."""
        # Runs for every waiting request on every re-rank: a bound that is off costs one test.
        if self.max_passed_over is not None and request.passed_over > self.max_passed_over:
            return True
        max_latency_s, max_queued_s = self.max_latency_s, self.max_queued_s
        if max_latency_s is not None and engine.now - request.arrival_time + remaining_s > (
            max_latency_s
        ):
            return True
        if max_queued_s is not None and (
            request.waited_before_s + engine.now - request.queued_at > max_queued_s
        ):
            return True
        return self.max_wait_s is not None and engine.now - request.arrival_time > self.max_wait_s


def promoted_priority(request: QueuedRequest) -> Priority:
    """Front of the queue, by arrival of the augmented request, then id for a total order."""
    return (PROMOTED, request.arrival_time, request.engine_request_id)
