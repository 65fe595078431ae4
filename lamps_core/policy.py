"""The interface every scheduling policy implements, and the views of requests it decides on.

The vLLM scheduler plugin builds these views from engine requests; simulators build them from
traces. A policy answers two questions: in which order waiting requests run (`priority`, lowest
first), and what happens to a request's KV cache while its API call runs (`strategy_for_call`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from lamps_core.request_meta import RequestMeta


class Strategy(StrEnum):
    """What to do with a paused request's KV cache during its API call."""

    PRESERVE = "preserve"  # keep the blocks resident until the call returns
    DISCARD = "discard"  # free them; recompute (or hit the prefix cache) on return
    SWAP = "swap"  # copy them to host memory and back


@dataclass(slots=True)
class QueuedRequest:
    """A waiting engine request as a policy sees it."""

    engine_request_id: str
    arrival_time: float  # of the whole augmented request, wall clock
    context_tokens: int  # tokens the request holds when it runs (prompt + output so far)
    meta: RequestMeta | None  # absent for requests that did not come through our serving layer


@dataclass(slots=True)
class PausedCall:
    """A request that has just stopped for an API call."""

    engine_request_id: str
    context_tokens: int
    meta: RequestMeta | None


Priority = tuple[float, ...]


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # How often (in scheduler steps) the waiting queue is re-ranked; 0 means a request's priority
    # is fixed when it is queued, so the queue never needs re-sorting.
    rerank_every_steps: ClassVar[int] = 0

    @abstractmethod
    def priority(self, request: QueuedRequest, now: float) -> Priority:
        """Sort key of a waiting request: lower runs first."""

    @abstractmethod
    def strategy_for_call(self, call: PausedCall) -> Strategy:
        """How to hold the KV cache of `call`'s request during its API call."""
