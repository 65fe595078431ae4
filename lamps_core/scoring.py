"""LAMPS's rank: the area under a request's memory-versus-time curve for its remaining work, in
byte·seconds, given the strategy predicted for each of its calls. Lowest runs first.

With `M` the KV bytes per token, `δ` = `costs.decode_step_s` and the prediction's segments
`i = 0..k` (the current one first), each decoding `d_i` tokens and then maybe calling an API for
`T_i` s that returns `r_i` tokens:

    C_0   = the request's context now (prompt and whatever it has generated)
    C'_i  = C_i + d_i                       context when call i starts
    C_i+1 = C'_i + r_i                      context when segment i+1 starts

    decode_i = δ · d_i · (C_i + d_i/2) · M  memory grows linearly from C_i to C'_i over d_i steps
    call_i   = T_i · C'_i · M               Preserve: holds C'_i for the whole call
             = T_fwd(C'_i) · C'_i · M       Discard: holds nothing, then re-prefills C'_i
             = 2 · T_swap(C'_i) · C'_i · M  Swap: holds nothing, pays the copy out and back in
             = p · T_fwd(C'_i) · C'_i · M   Keep: a re-prefill only if evicted (probability p)

    score = Σ_i (decode_i + call_i)

The strategy of call `i` is `min_waste_strategy(C'_i, T_i, C_other, C_other + C'_i)` (INFERCEPT's
waste, `waste.py`) with `C_other` the tokens running now: the strategy LAMPS predicts for a call
before it happens. Unlike the waste, a call's score counts only the request's own memory, because
the score ranks requests against each other.

How many segments are summed is the predictor's horizon: all remaining ones for the oracle, the
next call and the decode after it for tool estimates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lamps_core.costs import EngineCosts
from lamps_core.policy import Strategy
from lamps_core.predictors import Prediction, Predictor
from lamps_core.request_meta import RequestMeta
from lamps_core.waste import min_waste_strategy


@dataclass(frozen=True, slots=True)
class ScoredPlan:
    memory_time: float  # byte·seconds over the forecast
    next_call: Strategy | None  # the strategy predicted for the next call; None if none follows


def decode_memory_time(context_tokens: float, decode_tokens: float, costs: EngineCosts) -> float:
    return (
        costs.decode_step_s
        * decode_tokens
        * (context_tokens + decode_tokens / 2)
        * costs.kv_bytes_per_token
    )


def call_memory_time(
    context_tokens: float,
    api_s: float,
    strategy: Strategy,
    costs: EngineCosts,
    keep_evict_p: float = 1.0,
) -> float:
    m = costs.kv_bytes_per_token
    if strategy is Strategy.PRESERVE:
        return api_s * context_tokens * m
    if strategy is Strategy.DISCARD:
        return costs.t_fwd(context_tokens) * context_tokens * m
    if strategy is Strategy.KEEP:
        return keep_evict_p * costs.t_fwd(context_tokens) * context_tokens * m
    return 2 * costs.t_swap(context_tokens) * context_tokens * m


def score_remaining(
    context_tokens: int,
    prediction: Prediction,
    costs: EngineCosts,
    *,
    other_tokens: int,
    allow_swap: bool = True,
    keep_evict_p: float | None = None,
) -> ScoredPlan:
    """`keep_evict_p`: offer Keep with this chance of eviction (None: no Keep)."""
    total = 0.0
    next_call: Strategy | None = None
    context = float(context_tokens)
    for index, segment in enumerate(prediction.segments):
        total += decode_memory_time(context, segment.decode_tokens, costs)
        context += segment.decode_tokens
        if segment.api_s is None:
            break  # the request ends here, or the forecast does
        strategy = min_waste_strategy(
            context,
            segment.api_s,
            other_tokens,
            other_tokens + context,
            costs,
            allow_swap=allow_swap,
            keep_evict_p=keep_evict_p,
        )
        if index == 0:
            next_call = strategy
        total += call_memory_time(
            context, segment.api_s, strategy, costs, 1.0 if keep_evict_p is None else keep_evict_p
        )
        context += segment.api_tokens
    return ScoredPlan(total, next_call)


def remaining_service_s(prediction: Prediction, costs: EngineCosts) -> float:
    """Seconds of work a request has left if nothing made it wait: its forecast decode steps and
    API calls (prefills of the resumes are left out: they are short next to either)."""
    decode = sum(segment.decode_tokens for segment in prediction.segments)
    calls = sum(segment.api_s or 0.0 for segment in prediction.segments)
    return decode * costs.decode_step_s + calls


def committed_memory_time(
    requests: Iterable[tuple[int, int, RequestMeta | None]],
    holds: Iterable[tuple[int, float, RequestMeta | None]],
    predictor: Predictor,
    costs: EngineCosts,
    *,
    other_tokens: int,
) -> float:
    """The memory-time (byte·seconds) a replica has already promised, what the fleet router
    weighs a new request against: the score of every running and waiting request's remaining
    work (`requests`: context tokens, tokens its segment has generated, meta), plus, for every
    request paused in a call with its KV held on the device (`holds`: tokens held, seconds the
    call has run, meta), the held KV for the rest of its predicted call. A paused request's work
    after its call is counted when it resumes, as a waiting request."""
    total = sum(
        score_remaining(
            context, predictor.predict(meta, generated), costs, other_tokens=other_tokens
        ).memory_time
        for context, generated, meta in requests
    )
    for tokens, elapsed_s, meta in holds:
        remaining = predictor.remaining_call_s(meta, elapsed_s)
        if remaining is None:
            remaining = max(predictor.call_duration(meta) - elapsed_s, 0.0)
        total += tokens * remaining * costs.kv_bytes_per_token
    return total
