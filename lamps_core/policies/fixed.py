"""First come first served with one strategy for every API call: the what-if baselines
("always preserve", "always discard") the strategy-choosing policies are measured against."""

from __future__ import annotations

from collections.abc import Sequence

from lamps_core.policies.fcfs_discard import VllmPolicy
from lamps_core.policy import EngineView, PausedCall, Strategy


class FixedStrategyPolicy(VllmPolicy):
    """vLLM's order (the augmented request's arrival), another strategy."""

    name = "fixed"

    def __init__(self, strategy: str = "preserve", demote_to: str = "discard") -> None:
        self.strategy = Strategy(strategy)
        self.demote_to = Strategy(demote_to)

    def strategy_for_call(self, call: PausedCall, engine: EngineView) -> Strategy:
        return self.strategy

    def review_paused(
        self, paused: Sequence[PausedCall], engine: EngineView, blocks_needed: int
    ) -> list[tuple[PausedCall, Strategy]]:
        # Preserved memory goes back only when others need it, longest-paused first.
        demoted: list[tuple[PausedCall, Strategy]] = []
        for call in sorted(paused, key=lambda c: c.paused_at):
            if blocks_needed <= 0:
                break
            demoted.append((call, self.demote_to))
            blocks_needed -= -(-call.context_tokens // engine.block_size)
        return demoted
