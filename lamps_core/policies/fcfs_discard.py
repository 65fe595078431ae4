"""Stock vLLM's behaviour, the baseline: first come first served, every API call discards."""

from __future__ import annotations

from lamps_core.policy import (
    EngineView,
    PausedCall,
    Priority,
    QueuedRequest,
    SchedulingPolicy,
    Strategy,
)


class VllmPolicy(SchedulingPolicy):
    name = "vllm"

    def priority(self, request: QueuedRequest, engine: EngineView) -> Priority:
        # The augmented request's arrival, so a segment resumed after an API call keeps its place.
        return (request.arrival_time,)

    def strategy_for_call(self, call: PausedCall, engine: EngineView) -> Strategy:
        return Strategy.DISCARD
