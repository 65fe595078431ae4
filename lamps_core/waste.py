"""INFERCEPT's memory waste of each way to hold a paused request's KV cache, in byte·seconds.

With `C` the paused request's context (tokens), `M` the KV bytes per token, `C_other` the tokens of
the other running requests and `C_batch` those of the whole batch the copy stalls:

- Preserve: `W_P = T_api · C · M` (its blocks sit idle for the whole call).
- Discard, with INFERCEPT's chunked recompute: `W_D = T_fwd(C)·C·M/2 + n·T_fwd(C/n)·C_other·M`,
  `n = ceil(C / saturation_tokens)`. The recompute's own memory grows from 0 to C while it runs
  (the 1/2), and each of the `n` chunks stalls the others for one chunk's forward pass.
- Swap: `W_S = 2 · T_swap(C) · C_batch · M` (out and back in, the batch stalled each way).
- Keep (ours, for engines with a prefix cache): `W_K = p · W_D`. The blocks stay where they are
  and are given back only when memory is needed, so the call costs a Discard only if that happens
  before it returns, with probability `p` (`admission.KeepEvictionEstimate`, learned).

`min_waste_strategy` takes the argmin with ties going to preserve, then keep, then swap, then
discard: the cheaper-to-undo choice first (a preserved request resumes at once, a kept one most
likely, a swapped one needs no recompute).
"""

from __future__ import annotations

import math

from lamps_core.costs import EngineCosts
from lamps_core.policy import Strategy

# The order ties are broken in; `strategy_wastes` yields strategies in it.
TIE_ORDER: tuple[Strategy, ...] = (
    Strategy.PRESERVE,
    Strategy.KEEP,
    Strategy.SWAP,
    Strategy.DISCARD,
)


def preserve_waste(context_tokens: float, api_s: float, costs: EngineCosts) -> float:
    return api_s * context_tokens * costs.kv_bytes_per_token


def recompute_chunks(context_tokens: float, costs: EngineCosts) -> int:
    """n: how many saturation-sized chunks a recompute of `context_tokens` is split into."""
    if context_tokens <= 0:
        return 0
    return math.ceil(context_tokens / costs.saturation_tokens)


def discard_waste(context_tokens: float, other_tokens: float, costs: EngineCosts) -> float:
    n = recompute_chunks(context_tokens, costs)
    if n == 0:
        return 0.0
    m = costs.kv_bytes_per_token
    own = costs.t_fwd(context_tokens) * context_tokens * m / 2
    stall = n * costs.t_fwd(context_tokens / n) * other_tokens * m
    return own + stall


def swap_waste(context_tokens: float, batch_tokens: float, costs: EngineCosts) -> float:
    return 2 * costs.t_swap(context_tokens) * batch_tokens * costs.kv_bytes_per_token


def strategy_wastes(
    context_tokens: float,
    api_s: float,
    other_tokens: float,
    batch_tokens: float,
    costs: EngineCosts,
    *,
    allow_swap: bool = True,
    keep_evict_p: float | None = None,
) -> dict[Strategy, float]:
    """Waste of every available strategy, in tie order. Swap is left out when the engine has
    none; Keep unless `keep_evict_p` (the chance kept blocks are lost before the call returns)."""
    wastes = {Strategy.PRESERVE: preserve_waste(context_tokens, api_s, costs)}
    discard = discard_waste(context_tokens, other_tokens, costs)
    if keep_evict_p is not None:
        wastes[Strategy.KEEP] = keep_evict_p * discard
    if allow_swap:
        wastes[Strategy.SWAP] = swap_waste(context_tokens, batch_tokens, costs)
    wastes[Strategy.DISCARD] = discard
    return wastes


def argmin_strategy(wastes: dict[Strategy, float]) -> Strategy:
    """The least wasteful strategy; on ties the one earliest in `TIE_ORDER`."""
    best: Strategy | None = None
    for strategy in TIE_ORDER:
        if strategy in wastes and (best is None or wastes[strategy] < wastes[best]):
            best = strategy
    if best is None:
        raise ValueError("no strategy to choose from")
    return best


def min_waste_strategy(
    context_tokens: float,
    api_s: float,
    other_tokens: float,
    batch_tokens: float,
    costs: EngineCosts,
    *,
    allow_swap: bool = True,
    keep_evict_p: float | None = None,
) -> Strategy:
    wastes = strategy_wastes(
        context_tokens,
        api_s,
        other_tokens,
        batch_tokens,
        costs,
        allow_swap=allow_swap,
        keep_evict_p=keep_evict_p,
    )
    return argmin_strategy(wastes)
