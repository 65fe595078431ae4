"""The starvation guard: which waiting requests jump the memory-aware order.

The LAMPS artifact promotes a waiting request only after it has run once and then been passed over
N iterations, so a long multi-call request that never started can wait forever under overload,
which is where its P99 loses to INFERCEPT. This guard covers every waiting request: one is
promoted when the whole augmented request has existed longer than `max_wait_s` (its age, which
also catches a resumed segment of an old request) or when this engine request has been passed
over more than `max_passed_over` scheduler steps. Either test is off when its limit is None.

Promoted requests go to the front, first-come-first-served among themselves: once nothing but
age separates them, arrival order bounds the wait of each.
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

    def __post_init__(self) -> None:
        if self.max_wait_s is not None and not (
            math.isfinite(self.max_wait_s) and self.max_wait_s >= 0
        ):
            raise ValueError(f"max_wait_s must be None or a finite number >= 0: {self.max_wait_s}")
        if self.max_passed_over is not None and self.max_passed_over < 0:
            raise ValueError(f"max_passed_over must be None or >= 0: {self.max_passed_over}")

    def is_starving(self, request: QueuedRequest, engine: EngineView) -> bool:
        # Runs for every waiting request on every re-rank: kept to two comparisons.
        max_wait_s = self.max_wait_s
        if max_wait_s is not None and engine.now - request.arrival_time > max_wait_s:
            return True
        max_passed_over = self.max_passed_over
        return max_passed_over is not None and request.passed_over > max_passed_over


def is_starving(
    request: QueuedRequest,
    engine: EngineView,
    max_wait_s: float | None,
    max_passed_over: int | None,
) -> bool:
    return StarvationGuard(max_wait_s, max_passed_over).is_starving(request, engine)


def promoted_priority(request: QueuedRequest) -> Priority:
    """Front of the queue, by arrival of the augmented request, then id for a total order."""
    return (PROMOTED, request.arrival_time, request.engine_request_id)
