"""INFERCEPT: first-come-first-served by the augmented request's arrival, with per-call min-waste
handling of the KV cache.

INFERCEPT does not know how long a call lasts, so every call starts preserved; while it runs, its
duration is estimated as the time elapsed since it started. Each review moves a preserved call to
the cheaper of discard and swap once preserving it has wasted more than that would (the break-even
passed), most wasteful first; when the next waiting request needs `blocks_needed` blocks, it frees
preserved calls, most wasteful first, until they are covered.

The helpers below (`SwapBudget`, `release_option`, `blocks_of`) are shared with SJF and LAMPS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lamps_core.costs import EngineCosts
from lamps_core.policy import (
    EngineView,
    PausedCall,
    Priority,
    QueuedRequest,
    SchedulingPolicy,
    Strategy,
)
from lamps_core.waste import discard_waste, preserve_waste, swap_waste


class SwapBudget:
    """Tokens that may still be moved to swap in this review (None: no limit). INFERCEPT sizes
    the budget so the copies hide behind the forward pass instead of stalling the batch."""

    def __init__(self, tokens: int | None) -> None:
        self.left = tokens

    def fits(self, tokens: int) -> bool:
        return self.left is None or tokens <= self.left

    def take(self, tokens: int) -> None:
        if self.left is not None:
            self.left -= tokens


def blocks_of(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size) if block_size > 0 else 0


def release_option(
    call: PausedCall,
    engine: EngineView,
    costs: EngineCosts,
    *,
    allow_swap: bool,
    budget: SwapBudget,
) -> tuple[Strategy, float]:
    """The cheapest way to give up a preserved call's blocks now, and its waste: discard, or swap
    when the engine has a swap path and the budget room for it (ties go to swap, as in
    `waste.TIE_ORDER`). The paused request is not running: the others are `running_tokens`, and
    the copy stalls them and itself."""
    tokens = call.context_tokens
    discard = discard_waste(tokens, engine.running_tokens, costs)
    if allow_swap and budget.fits(tokens):
        swap = swap_waste(tokens, engine.running_tokens + tokens, costs)
        if swap <= discard:
            return Strategy.SWAP, swap
    return Strategy.DISCARD, discard


def check_swap_budget(swap_budget_tokens: int | None) -> int | None:
    if swap_budget_tokens is not None and swap_budget_tokens < 0:
        raise ValueError(f"swap_budget_tokens must be None or >= 0, got {swap_budget_tokens}")
    return swap_budget_tokens


class InferceptPolicy(SchedulingPolicy):
    name = "infercept"

    def __init__(
        self, *, costs: EngineCosts, swap: bool = True, swap_budget_tokens: int | None = None
    ) -> None:
        """`swap`: the engine has a swap path. `swap_budget_tokens`: at most this many tokens
        moved to swap per review (None: no limit)."""
        self.costs = costs
        self.allow_swap = swap
        self.swap_budget_tokens = check_swap_budget(swap_budget_tokens)

    def priority(self, request: QueuedRequest, engine: EngineView) -> Priority:
        return (request.arrival_time, request.engine_request_id)

    def strategy_for_call(self, call: PausedCall, engine: EngineView) -> Strategy:
        return Strategy.PRESERVE  # T_api is unknown until the call has run a while

    def review_paused(
        self, paused: Sequence[PausedCall], engine: EngineView, blocks_needed: int
    ) -> list[tuple[PausedCall, Strategy]]:
        budget = SwapBudget(self.swap_budget_tokens)
        # T_api is estimated as the time the call has run so far.
        ranked = sorted(
            (
                (preserve_waste(c.context_tokens, engine.now - c.paused_at, self.costs), c)
                for c in paused
                if c.strategy is Strategy.PRESERVE
            ),
            key=lambda wc: (-wc[0], wc[1].paused_at, wc[1].engine_request_id),
        )
        moves: list[tuple[PausedCall, Strategy]] = []
        freed = 0
        for preserving, call in ranked:
            target, releasing = release_option(
                call, engine, self.costs, allow_swap=self.allow_swap, budget=budget
            )
            if preserving > releasing or freed < blocks_needed:
                if target is Strategy.SWAP:
                    budget.take(call.context_tokens)
                moves.append((call, target))
                freed += blocks_of(call.context_tokens, engine.block_size)
        return moves
