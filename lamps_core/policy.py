"""The interface every scheduling policy implements, and the views of requests it decides on.

The vLLM scheduler plugin builds these views from engine requests; simulators build them from
traces. A policy answers three questions: in which order waiting requests run (`priority`,
lowest first); what happens to a request's KV cache when it stops for an API call
(`strategy_for_call`); and, while calls run, which preserved requests give their memory up
(`review_paused`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from lamps_core.call_durations import ApiEstimate
from lamps_core.costs import EngineCosts
from lamps_core.request_meta import RequestMeta


class Strategy(StrEnum):
    """What to do with a paused request's KV cache during its API call."""

    PRESERVE = "preserve"  # keep the blocks resident until the call returns
    DISCARD = "discard"  # free them; recompute (or hit the prefix cache) on return
    SWAP = "swap"  # copy them to host memory and back
    # Keep the blocks while nobody needs the memory; when memory is needed they are given back
    # (latest-returning call first) to the prefix cache, where the continuation may still find
    # them: a Discard that costs nothing unless memory runs short.
    KEEP = "keep"


@dataclass(slots=True)
class EngineView:
    """The engine as the scheduler sees it at one step."""

    now: float  # wall clock, time.time()
    running_tokens: int  # tokens held by running requests (C_batch)
    free_blocks: int
    total_blocks: int
    block_size: int
    running_requests: int = 0


@dataclass(slots=True)
class QueuedRequest:
    """A waiting engine request (one segment of an augmented request) as a policy sees it."""

    engine_request_id: str
    arrival_time: float  # of the whole augmented request, wall clock
    context_tokens: int  # tokens the request holds when it runs (prompt + output so far)
    generated_tokens: int  # tokens this segment has generated (non-zero after a preemption)
    queued_at: float  # when this engine request was queued, wall clock
    waited_before_s: float  # how long the request's earlier segments waited to be scheduled
    passed_over: int  # scheduler steps it has waited while others were scheduled
    meta: RequestMeta | None  # absent for requests that did not come through our serving layer


@dataclass(slots=True)
class PausedCall:
    """A request stopped for an API call, with what its KV cache is doing."""

    engine_request_id: str
    context_tokens: int
    paused_at: float  # wall clock
    strategy: Strategy  # what is done with its KV cache now
    meta: RequestMeta | None
    # Wall clock past which the call cannot still run (paused_at + its timeout); None: unbounded.
    deadline: float | None = None


# Compared element by element; ties end in the request id so an order is always defined.
Priority = tuple[float | str, ...]


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # How often (in scheduler steps) the waiting queue is re-ranked; 0 means a request's priority
    # is fixed when it is queued, so the queue never needs re-sorting. A policy may set it per
    # instance from its options.
    rerank_every_steps: int = 0
    # What a call whose Swap the engine refused (no swap path, host pool full) gets instead.
    swap_refused_strategy: Strategy = Strategy.DISCARD
    # Whether a swapped-out context is copied back while other requests run (the continuation
    # joins the batch a step later) rather than ahead of the forward pass that needs it.
    swap_in_async: bool = True

    @abstractmethod
    def priority(self, request: QueuedRequest, engine: EngineView) -> Priority:
        """Sort key of a waiting request: lower runs first."""

    @abstractmethod
    def strategy_for_call(self, call: PausedCall, engine: EngineView) -> Strategy:
        """How to hold the KV cache of `call`'s request when its API call starts."""

    def counters(self) -> Mapping[str, int]:
        """Counts of the policy's own decisions, for the engine's statistics."""
        return {}

    def update_api_estimates(self, estimates: Mapping[str, ApiEstimate]) -> None:  # noqa: B027
        """Mean API duration (s) per API type, learned from the tool workers' records."""

    def forget(self, engine_request_id: str) -> None:  # noqa: B027
        """The engine request left the scheduler: drop what the policy kept about it."""

    def update_costs(self, costs: EngineCosts) -> None:
        """The engine's costs were measured again; policies that use them keep the new ones."""
        if hasattr(self, "costs"):
            self.costs = costs

    def admission_tokens(self, request: QueuedRequest, engine: EngineView) -> int | None:
        """The context `request`'s segment is predicted to reach (its peak KV) if admitted now,
        for admission by predicted memory; None: admit as vLLM does (blocks free now)."""
        return None

    def admits(self, peak_blocks: int, committed_blocks: int, engine: EngineView) -> bool:
        """Whether a segment of `peak_blocks` fits beside `committed_blocks` promised to running
        requests and preserved calls. Asked only when `admission_tokens` gave a peak."""
        return True

    def on_preemption(self) -> None:  # noqa: B027
        """A running request was preempted (it outgrew the memory it was admitted with)."""

    def on_keep_outcome(self, evicted: bool) -> None:  # noqa: B027
        """A kept call's blocks were given back before it returned (`evicted`), or it found them."""

    def review_paused(
        self, paused: Sequence[PausedCall], engine: EngineView, blocks_needed: int
    ) -> list[tuple[PausedCall, Strategy]]:
        """Called while requests are paused with their KV cache preserved, and `blocks_needed`
        more blocks would let the next waiting request run (0 when none is waiting for memory).
        Returns the preserved calls to move to another strategy, and which."""
        return []
