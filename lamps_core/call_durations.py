"""Call durations learned online per tool: a recency-weighted distribution, and what it says about
a call that has already run for a while.

A tool's durations are rarely one number: a search answers from a cache in 0.1 s or goes to the
backend for 10 s. Its mean (5 s) describes neither call, and once a call has run 1 s it is almost
surely a slow one, with ~9 s to go. So LAMPS's review of a running call asks for
`E[D - e | D > e]` over the learned distribution of `D`, given the elapsed time `e` (INFERCEPT's
observation that a call which has run long will likely run longer, made quantitative).

- `summarize_durations`: the last `window` samples (newest first, as the tool workers keep them),
  weighted `2^(-age / half_life)` so the distribution follows a tool whose latency drifts,
  compressed into `CallDurationSummary`: at most `MAX_ATOMS` equal-mass atoms. Each atom is the
  weighted mean of its slice of the distribution, so the summary's mean is the weighted mean of
  the samples (up to rounding), and a mode made of identical durations stays one value.
- `CallDurationSummary`: what crosses from the tool workers into the engine (strict, bounded),
  with `mean_s` and `expected_remaining_s(elapsed_s)`.

Pure Python (pydantic only): no Ray, vLLM or Redis here.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_ATOMS",
    "DEFAULT_HALF_LIFE_SAMPLES",
    "DEFAULT_WINDOW_SAMPLES",
    "MAX_ATOMS",
    "MAX_CALL_S",
    "OVERRUN_FACTOR",
    "ApiEstimate",
    "CallDurationSummary",
    "is_call_duration",
    "summarize_durations",
]

MAX_ATOMS = 32  # what one tool's summary may carry into the engine, with every request
DEFAULT_ATOMS = 16
DEFAULT_WINDOW_SAMPLES = 256
# At 64 samples a record weighs half the newest one; at the window's end (256) 1/16.
DEFAULT_HALF_LIFE_SAMPLES = 64.0
# No call lasts a day: a longer "duration" is a corrupted record and is not learned from.
MAX_CALL_S = 86_400.0
# A call that has outrun every duration seen has no learned remaining time; it is taken to last
# this many times as long again as it has run (1: INFERCEPT's elapsed-time estimate, so LAMPS
# without a distribution and with one agree on such a call).
OVERRUN_FACTOR = 1.0

CallSeconds = Annotated[float, Field(ge=0.0, le=MAX_CALL_S, allow_inf_nan=False)]


class CallDurationSummary(BaseModel):
    """A tool's call-duration distribution as `len(atoms_s)` equal-mass atoms, ascending."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    atoms_s: tuple[CallSeconds, ...] = Field(
        min_length=1,
        max_length=MAX_ATOMS,
        description="Equal-mass atoms of the recency-weighted distribution (s), ascending: "
        "atom k is the weighted mean of the durations between its quantiles k/n and (k+1)/n.",
    )
    max_s: CallSeconds = Field(description="The longest duration among the samples (s).")
    count: int = Field(ge=0, description="Samples it was learned from (0: the prior alone).")
    timeout_s: CallSeconds | None = Field(
        default=None, description="The tool's call limit (s): no call runs longer."
    )

    @model_validator(mode="after")
    def _ordered(self) -> CallDurationSummary:
        atoms = self.atoms_s
        if any(b < a for a, b in itertools.pairwise(atoms)):
            raise ValueError("atoms_s must be ascending")
        if self.max_s < atoms[-1]:
            raise ValueError("max_s must be at least the largest atom")
        return self

    @property
    def mean_s(self) -> float:
        return math.fsum(self.atoms_s) / len(self.atoms_s)

    def expected_remaining_s(self, elapsed_s: float) -> float:
        """`E[D - e | D > e]`: seconds still to go of a call that has run `elapsed_s`.

        Beyond the atoms but under the longest sample the rest of the tail is taken as uniform
        up to it; beyond every sample, `OVERRUN_FACTOR` times the elapsed time. The tool's
        timeout bounds the answer either way."""
        e = max(elapsed_s, 0.0)
        # Equal masses: the conditional mean is the plain mean of the atoms above `e`.
        first_above = bisect.bisect_right(self.atoms_s, e)
        above = self.atoms_s[first_above:]
        if above:
            remaining = math.fsum(above) / len(above) - e
        elif self.max_s > e:
            remaining = (self.max_s - e) / 2
        else:
            remaining = OVERRUN_FACTOR * e
        if self.timeout_s is not None:
            remaining = min(remaining, max(self.timeout_s - e, 0.0))
        return remaining


# What the engine is told per API type: a mean (seconds), or a learned distribution.
ApiEstimate = float | CallDurationSummary


def summarize_durations(
    newest_first: Sequence[float],
    *,
    atoms: int = DEFAULT_ATOMS,
    window: int = DEFAULT_WINDOW_SAMPLES,
    half_life_samples: float = DEFAULT_HALF_LIFE_SAMPLES,
    timeout_s: float | None = None,
) -> CallDurationSummary | None:
    """The recency-weighted distribution of the last `window` durations; None without any.

    A sample's weight is `2^(-age / half_life_samples)`, its age its place in `newest_first`.
    Samples that are not durations (negative, not finite, over `MAX_CALL_S`) are skipped, so a
    corrupted record cannot poison the estimate."""
    if not 1 <= atoms <= MAX_ATOMS:
        raise ValueError(f"atoms must be in 1..{MAX_ATOMS}, got {atoms}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not (math.isfinite(half_life_samples) and half_life_samples > 0):
        raise ValueError(f"half_life_samples must be finite and > 0, got {half_life_samples}")
    weighted = sorted(
        (value, 0.5 ** (age / half_life_samples))
        for age, value in enumerate(newest_first[:window])
        if is_call_duration(value)
    )
    if not weighted:
        return None
    n = min(atoms, len(weighted))
    # Prefix sums of weight and of weight·value: the integral of the quantile function up to
    # cumulative weight c is piecewise linear between them, so each slice's mean is exact.
    cum_w = [0.0]
    cum_wv = [0.0]
    for value, weight in weighted:
        cum_w.append(cum_w[-1] + weight)
        cum_wv.append(cum_wv[-1] + weight * value)
    total = cum_w[-1]

    last_index = len(weighted) - 1

    def starting_at(c: float) -> int:  # the sample just above cumulative weight c
        return min(bisect.bisect_right(cum_w, c) - 1, last_index)

    def ending_at(c: float) -> int:  # the sample just below it
        return min(max(bisect.bisect_left(cum_w, c) - 1, 0), last_index)

    def integral(c: float) -> float:
        i = starting_at(c)
        return cum_wv[i] + weighted[i][0] * (c - cum_w[i])

    lo, hi = weighted[0][0], weighted[-1][0]
    slice_w = total / n
    result: list[float] = []
    below = 0.0
    for k in range(1, n + 1):
        upto = cum_wv[-1] if k == n else integral(k * slice_w)
        first = weighted[starting_at((k - 1) * slice_w)][0]
        last = weighted[ending_at(k * slice_w)][0]
        # A slice within one value (a mode of equal durations) is that value, not a rounded
        # quotient of sums; otherwise rounding must not break the order or leave the range.
        atom = first if first == last else (upto - below) / slice_w
        below = upto
        result.append(min(max(atom, result[-1] if result else lo, lo), hi))
    return CallDurationSummary(
        atoms_s=tuple(result), max_s=hi, count=len(weighted), timeout_s=timeout_s
    )


def is_call_duration(value: float) -> bool:
    """Whether `value` can be a call's duration in seconds (what a record must be to count)."""
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= MAX_CALL_S
