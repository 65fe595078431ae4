"""SJF: shortest predicted remaining output first, with INFERCEPT's handling of calls.

The baseline that separates LAMPS's two ideas: it has the shortest-first ordering but ranks by
decode tokens alone, blind to how much memory a request holds and for how long its calls keep it.
A request's priority is fixed once queued, so the queue never needs re-ranking.
"""

from __future__ import annotations

from collections.abc import Mapping

from lamps_core.call_durations import ApiEstimate
from lamps_core.costs import EngineCosts
from lamps_core.policies.infercept import InferceptPolicy
from lamps_core.policy import EngineView, Priority, QueuedRequest
from lamps_core.predictors import (
    DEFAULT_API_S,
    DEFAULT_API_TOKENS,
    DEFAULT_DECODE_TOKENS,
    PredictionDefaults,
    Predictor,
    make_predictor,
)


class SjfPolicy(InferceptPolicy):
    name = "sjf"

    def __init__(
        self,
        *,
        costs: EngineCosts,
        predictor: str | Predictor = "oracle",
        noise: float | None = None,
        seed: int = 0,
        default_decode_tokens: int = DEFAULT_DECODE_TOKENS,
        default_api_s: float = DEFAULT_API_S,
        default_api_tokens: int = DEFAULT_API_TOKENS,
        swap: bool = True,
        swap_budget_tokens: int | None = None,
    ) -> None:
        super().__init__(costs=costs, swap=swap, swap_budget_tokens=swap_budget_tokens)
        defaults = PredictionDefaults(default_decode_tokens, default_api_s, default_api_tokens)
        self.predictor = make_predictor(predictor, noise=noise, seed=seed, defaults=defaults)

    def update_api_estimates(self, estimates: Mapping[str, ApiEstimate]) -> None:
        """New per-API-type mean durations for an estimates predictor (no-op for the others)."""
        self.predictor.update(estimates)

    def priority(self, request: QueuedRequest, engine: EngineView) -> Priority:
        prediction = self.predictor.predict(request.meta, request.generated_tokens)
        return (
            float(prediction.remaining_decode_tokens),
            request.arrival_time,
            request.engine_request_id,
        )
