"""Admission by predicted memory, and the learned odds that a kept KV cache is evicted.

vLLM admits a waiting request whenever its prompt's blocks are free *now*; running requests then
grow, and when one cannot get a block the scheduler preempts (and later recomputes) another. On a
multi-call workload that thrashes: measured on the H100, 1,000-4,000 preemptions a run. A policy
that predicts how long each segment decodes knows each running request's peak context, so it can
admit a segment only if every admitted segment still fits at its peak:

    committed = Σ_running max(context now, predicted peak) + blocks held for preserved calls
    admit     ⇔ committed + candidate's peak ≤ (1 − margin) · total blocks

Blocks *kept* for a paused call (`Strategy.KEEP`) are not committed: they are given back the
moment memory is needed. An idle engine admits anything (a request that alone exceeds the
prediction must still run). `margin` learns from misses: every preemption (a running request that
outgrew the prediction) raises it to at least `step`, every admission lets it decay towards
`min_margin`, so wrong predictions cost a few preemptions, then headroom.

The margin may go below zero (down to `min_margin`, an overcommit): peaks are predictions, and
rarely all reached at once. Where memory is slack nothing is ever preempted, so the gate opens to
about vLLM's own greedy admission and holds back no request that fits (holding them back cost
up to 3.5x vLLM's P99 TTFT on the H100 with nothing preempted); the first preemption closes it
to a real margin again.

`KeepEvictionEstimate` is the other half of "a Discard that keeps the cache": the chance that a
kept call's blocks are given back before the call returns, learned from what happened to recent
kept calls. The waste of keeping is that chance times the waste of a Discard
(`waste.strategy_wastes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The deepest overcommit the gate drifts to while nothing is preempted (module docstring).
DEFAULT_MIN_MARGIN = -0.5


@dataclass(slots=True)
class AdmissionGate:
    """Admits a waiting segment only if every running segment still fits at its predicted peak."""

    margin: float = 0.0  # fraction of the KV cache left unpromised (negative: overcommitted)
    min_margin: float = DEFAULT_MIN_MARGIN
    max_margin: float = 0.3
    step: float = 0.02  # added per preemption (a miss), from zero at least
    decay: float = 0.995  # per admission without a miss, towards min_margin

    def __post_init__(self) -> None:
        for name in ("margin", "min_margin", "max_margin", "step"):
            value = getattr(self, name)
            low = -1.0 if name in ("margin", "min_margin") else 0.0
            if not (math.isfinite(value) and low <= value < 1.0):
                raise ValueError(f"admission {name} must be in [{low:g}, 1), got {value}")
        if not self.min_margin <= self.margin <= self.max_margin:
            raise ValueError("admission margin must lie between min_margin and max_margin")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"admission decay must be in (0, 1], got {self.decay}")

    def admits(
        self, peak_blocks: int, committed_blocks: int, total_blocks: int, *, running: int
    ) -> bool:
        if running == 0:
            return True  # never hold back the only request: the prediction may just be wrong
        return committed_blocks + peak_blocks <= (1.0 - self.margin) * total_blocks

    def admitted(self) -> None:
        self.margin = self.min_margin + (self.margin - self.min_margin) * self.decay

    def missed(self) -> None:
        """A running request was preempted: the promises were too tight. An overcommit ends at
        once; then each further miss adds `step`."""
        self.margin = min(self.max_margin, max(self.margin, 0.0) + self.step)


@dataclass(slots=True)
class KeepEvictionEstimate:
    """P(a kept call's blocks are given back before it returns), recency-weighted.

    Starts at `prior` with the weight of `prior_weight` observations; each outcome then counts
    `1 − forget` of the past, so the estimate follows a load that changes within a run."""

    prior: float = 0.5
    prior_weight: float = 4.0
    forget: float = 0.02
    _evicted: float = 0.0
    _seen: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prior <= 1.0:
            raise ValueError(f"keep eviction prior must be in [0, 1], got {self.prior}")
        if not (self.prior_weight > 0 and 0.0 < self.forget < 1.0):
            raise ValueError("keep eviction prior_weight must be > 0 and forget in (0, 1)")
        self._evicted = self.prior * self.prior_weight
        self._seen = self.prior_weight

    @property
    def probability(self) -> float:
        return self._evicted / self._seen

    def observe(self, evicted: bool) -> None:
        keep = 1.0 - self.forget
        self._evicted = self._evicted * keep + (1.0 if evicted else 0.0)
        self._seen = self._seen * keep + 1.0
