"""Results of `lamps bench`: per-request records, per-(policy, rate) summaries, files and plots.

Times in a `RequestResult` are seconds since the run started, on one clock. A summary comes in two
variants, always labelled:

- `drained`: the run went on until every request finished; a request that did not finish (or
  ended in an error) is counted as failed, and the latency figures cover the completed ones.
  Throughput is completed requests (and their output tokens) over the makespan, from the first
  arrival to the last completion.
- `horizon`: only what finished within `horizon_s` of the first arrival, as the INFERCEPT/MARS
  artifacts report; the rest is `unfinished`, not failed, and throughput is over `horizon_s`.
  Under overload this hides the requests a policy starves, which is why `drained` is the default
  everywhere here.

Percentiles interpolate linearly between order statistics (numpy's default). Normalized latency is
INFERCEPT's: (finish - arrival - API time) / output tokens, averaged over completed requests.

Rounds: a comparison may run every (policy, rate) several times (`lamps bench --rounds N`); each
record carries its `round`. Every round is summarized on its own (`summarize_all`), then per
policy and rate `combine_rounds` gives the median over rounds of every time and rate figure
(counts are totals), `rounds_summary` the per-round values of the headline metrics with their
median, min and max, and `round_ratios` the ratio of two policies computed *per round* (the runs
of one round are adjacent in time, so they share the machine's state) and then its median and
[min, max]. With one round everything reads as before.
matplotlib is imported only by `plot`, so the rest works where it is not installed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RESULTS_FORMAT = "lamps-bench-results/1"
Variant = Literal["drained", "horizon"]
# Slack for timestamps taken by different threads of one process.
CLOCK_SLACK_S = 1e-3


class RequestResult(BaseModel):
    """What happened to one request in one run (one policy at one rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    policy: str
    rate: float = Field(description="Offered load of the run, requests/s.")
    round: int = Field(default=0, ge=0, description="Which round of the comparison (0 first).")
    arrival: float = Field(ge=0.0, description="Seconds since the run started.")
    first_token: float | None = Field(default=None, description="When its first token came (s).")
    finish: float | None = Field(default=None, description="When its last token came; None if not.")
    output_tokens: int = Field(default=0, ge=0, description="Tokens decoded over all segments.")
    api_time: float = Field(default=0.0, ge=0.0, description="Seconds spent in its API calls.")
    segments: int = Field(default=1, ge=0, description="Segments served.")
    cached_tokens: int = Field(default=0, ge=0, description="Prompt tokens served from cache.")
    recomputed_tokens: int = Field(default=0, ge=0, description="Context re-prefilled on resume.")
    queued_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Seconds its segments waited for their first token (queue and prefill), "
        "summed: the part of its latency the scheduler's order decides.",
    )
    strategies: list[str] | None = Field(
        default=None, description="Per API call: preserve / discard / swap, when known."
    )
    error: str | None = None
    # Steady runs (`lamps bench --steady`); None in other runs and in older records.
    window: bool | None = Field(
        default=None,
        description="Whether it arrived in the measured window (steady runs): only those count.",
    )
    service_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Its unloaded time: engine time alone (prefill and batch-1 decode steps, "
        "from the engine's measured costs) plus its calls; latency / this is its slowdown.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RequestResult:
        for name in ("first_token", "finish"):
            t = getattr(self, name)
            if t is not None and t < self.arrival - CLOCK_SLACK_S:
                raise ValueError(f"{name}={t} is before arrival={self.arrival}")
        return self

    @property
    def completed(self) -> bool:
        return self.finish is not None and self.error is None

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else max(0.0, self.finish - self.arrival)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else max(0.0, self.first_token - self.arrival)

    @property
    def slowdown(self) -> float | None:
        """Latency over its unloaded time (`service_s`); None when it did not complete or no
        unloaded time is known (`meets_slo` counts those as misses)."""
        latency = self.latency
        if not self.completed or latency is None or not self.service_s:
            return None
        return latency / self.service_s

    def meets_slo(self, slo_slowdown: float) -> bool:
        """Completed within `slo_slowdown` times its unloaded time (a failure never does)."""
        slowdown = self.slowdown
        return slowdown is not None and slowdown <= slo_slowdown

    @property
    def normalized_latency(self) -> float | None:
        if self.latency is None or self.output_tokens == 0:
            return None
        return max(0.0, self.latency - self.api_time) / self.output_tokens


class Metrics(BaseModel):
    """One variant's figures for one policy at one rate (seconds, tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Variant
    label: str
    requests: int = Field(description="Requests in the run.")
    completed: int
    failed: int = Field(description="Errors, plus (drained) requests that never finished.")
    unfinished: int = Field(description="Not finished (drained: part of failed; horizon: by it).")
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    ttft_mean_s: float | None
    ttft_p99_s: float | None
    # None in results written before these were recorded.
    queued_mean_s: float | None = Field(default=None, description="Per request, all segments.")
    queued_p99_s: float | None = None
    api_mean_s: float | None = Field(
        default=None, description="Per request, in its API calls: latency no scheduler can cut."
    )
    normalized_latency_mean_s: float | None = Field(description="Seconds per output token.")
    window_s: float | None = Field(description="Makespan (drained) or the horizon (horizon).")
    throughput_rps: float | None
    throughput_tokens_per_s: float | None
    output_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    strategy_counts: dict[str, int]
    # Steady runs: slowdown (latency / unloaded time) of the completed requests, and the share
    # of all counted requests within the SLO (failed ones miss it); None elsewhere.
    slowdown_p50: float | None = None
    slowdown_p90: float | None = None
    slowdown_p99: float | None = None
    slo_slowdown: float | None = Field(default=None, description="The SLO slo_attained is for.")
    slo_attained: float | None = Field(
        default=None, description="Share of the counted requests within slo_slowdown."
    )


class PolicySummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    rate: float
    round: int | None = Field(
        default=0, description="The round summarized; None for a combination of rounds."
    )
    rounds: int = Field(default=1, ge=1, description="Rounds combined (medians, total counts).")
    requests: int
    horizon_s: float | None
    drained: Metrics
    horizon: Metrics | None

    def metrics(self, variant: Variant = "drained") -> Metrics | None:
        return self.drained if variant == "drained" else self.horizon


# --------------------------------------------------------------------------------------------
# Summaries


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100), linear between order statistics; `values` non-empty."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _p(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _metrics(
    variant: Variant,
    label: str,
    everything: Sequence[RequestResult],
    done: Sequence[RequestResult],
    failed: int,
    window: float | None,
    counted: Sequence[RequestResult],
    slo_slowdown: float | None = None,
) -> Metrics:
    latencies = [r.latency for r in done if r.latency is not None]
    slowdowns = [x for r in done if (x := r.slowdown) is not None]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    queued = [r.queued_s for r in done]
    normalized = [r.normalized_latency for r in done if r.normalized_latency is not None]
    tokens = sum(r.output_tokens for r in done)
    per_s = 1.0 / window if window else None
    strategies = Counter(s for r in counted for s in (r.strategies or []))
    return Metrics(
        variant=variant,
        label=label,
        requests=len(everything),
        completed=len(done),
        failed=failed,
        unfinished=sum(r.finish is None and r.error is None for r in everything)
        if variant == "drained"
        else len(everything) - len(done) - failed,
        latency_mean_s=_mean(latencies),
        latency_p50_s=_p(latencies, 50),
        latency_p99_s=_p(latencies, 99),
        ttft_mean_s=_mean(ttfts),
        ttft_p99_s=_p(ttfts, 99),
        queued_mean_s=_mean(queued),
        queued_p99_s=_p(queued, 99),
        api_mean_s=_mean([r.api_time for r in done]),
        normalized_latency_mean_s=_mean(normalized),
        window_s=window,
        throughput_rps=len(done) * per_s if per_s else None,
        throughput_tokens_per_s=tokens * per_s if per_s else None,
        output_tokens=tokens,
        cached_tokens=sum(r.cached_tokens for r in done),
        recomputed_tokens=sum(r.recomputed_tokens for r in done),
        strategy_counts=dict(sorted(strategies.items())),
        slowdown_p50=_p(slowdowns, 50),
        slowdown_p90=_p(slowdowns, 90),
        slowdown_p99=_p(slowdowns, 99),
        slo_slowdown=slo_slowdown if slowdowns else None,
        slo_attained=slo_attainment(everything, slo_slowdown) if slowdowns else None,
    )


def slo_attainment(results: Sequence[RequestResult], slo_slowdown: float | None) -> float | None:
    """The share of `results` that completed within `slo_slowdown` times their unloaded time
    (failed and unfinished requests miss it); None without an SLO or requests."""
    if slo_slowdown is None or not results:
        return None
    return sum(r.meets_slo(slo_slowdown) for r in results) / len(results)


def summarize(
    results: Sequence[RequestResult],
    horizon_s: float | None = None,
    slo_slowdown: float | None = None,
) -> PolicySummary:
    """Summarize the requests of one run (one policy, one rate, one round); see the module doc.
    Requests of a steady run that arrived outside its measured window (`window=False`) are left
    out; `slo_slowdown` gives the SLO of `slo_attained` (steady runs)."""
    if not results:
        raise ValueError("no results to summarize")
    counted = [r for r in results if r.window is not False]
    results = counted or list(results)  # a run with no request in its window: all of them
    runs = {(r.policy, r.rate, r.round) for r in results}
    if len(runs) != 1:
        raise ValueError(f"results of several runs {sorted(runs)}; use summarize_all")
    if horizon_s is not None and not horizon_s > 0:
        raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
    policy, rate, round_ = runs.pop()
    start = min(r.arrival for r in results)
    done = [r for r in results if r.completed]
    makespan = max((r.finish or 0.0) for r in done) - start if done else None
    drained = _metrics(
        "drained",
        "drained: every request run to the end; unfinished ones count as failed",
        results,
        done,
        len(results) - len(done),
        makespan,
        results,
        slo_slowdown,
    )
    horizon = None
    if horizon_s is not None:
        in_time = [r for r in done if (r.finish or 0.0) - start <= horizon_s]
        horizon = _metrics(
            "horizon",
            f"horizon: only requests finished within {horizon_s:g} s of the first arrival "
            "(as the artifacts report)",
            results,
            in_time,
            sum(r.error is not None for r in results),
            horizon_s,
            in_time,
        )
    return PolicySummary(
        policy=policy,
        rate=rate,
        round=round_,
        requests=len(results),
        horizon_s=horizon_s,
        drained=drained,
        horizon=horizon,
    )


def summarize_all(
    results: Iterable[RequestResult],
    horizon_s: float | None = None,
    slo_slowdown: float | None = None,
) -> list[PolicySummary]:
    """One summary per (policy, rate, round) found in `results`, sorted by policy, rate, round."""
    runs: dict[tuple[str, float, int], list[RequestResult]] = {}
    for r in results:
        runs.setdefault((r.policy, r.rate, r.round), []).append(r)
    return [summarize(runs[key], horizon_s, slo_slowdown) for key in sorted(runs)]


# --------------------------------------------------------------------------------------------
# Rounds

# The figures whose spread over rounds is reported (label, `Metrics` field).
SPREAD_METRICS: tuple[tuple[str, str], ...] = (
    ("mean lat", "latency_mean_s"),
    ("P99 lat", "latency_p99_s"),
    ("mean TTFT", "ttft_mean_s"),
    ("output tok/s", "throughput_tokens_per_s"),
)
# `Metrics` fields that count things: a combination of rounds adds them up.
_COUNT_FIELDS = frozenset(
    {
        "requests",
        "completed",
        "failed",
        "unfinished",
        "output_tokens",
        "cached_tokens",
        "recomputed_tokens",
    }
)


class Spread(BaseModel):
    """One figure over the rounds of a comparison: its value per round, median, min and max
    (rounds without a value, e.g. nothing completed, are left out of the last three)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_round: list[float | None]
    median: float | None
    min: float | None
    max: float | None


def spread(values: Sequence[float | None]) -> Spread:
    known = [v for v in values if v is not None]
    return Spread(
        per_round=list(values),
        median=statistics.median(known) if known else None,
        min=min(known, default=None),
        max=max(known, default=None),
    )


class RoundsSummary(BaseModel):
    """One policy at one rate over the rounds: the spread of `SPREAD_METRICS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    rate: float
    variant: Variant
    rounds: list[int]
    metrics: dict[str, Spread] = Field(description="Keyed by the `Metrics` field name.")


class RatioSpread(BaseModel):
    """`base` / `other` for one metric at one rate, computed per round (same round of each)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float
    base: str
    other: str
    variant: Variant
    metric: str
    ratio: Spread


def by_run(summaries: Iterable[PolicySummary]) -> dict[tuple[str, float], list[PolicySummary]]:
    """The summaries of each (policy, rate), in round order."""
    runs: dict[tuple[str, float], list[PolicySummary]] = {}
    for s in sorted(summaries, key=lambda s: (s.policy, s.rate, s.round or 0)):
        runs.setdefault((s.policy, s.rate), []).append(s)
    return runs


def _combined_metrics(metrics: Sequence[Metrics]) -> Metrics:
    values: dict[str, Any] = {}
    for name in Metrics.model_fields:
        column = [getattr(m, name) for m in metrics]
        if name == "variant":
            values[name] = column[0]
        elif name == "label":
            values[name] = f"{column[0]} [median over {len(metrics)} rounds; counts are totals]"
        elif name in _COUNT_FIELDS:
            values[name] = sum(column)
        elif name == "strategy_counts":
            values[name] = dict(sorted(sum((Counter(c) for c in column), Counter()).items()))
        else:
            values[name] = spread(column).median
    return Metrics.model_validate(values)


def combine_rounds(summaries: Sequence[PolicySummary]) -> list[PolicySummary]:
    """One summary per (policy, rate): the run itself when it had one round, else the median
    over its rounds of every time and rate figure, with counts totalled (`round=None`)."""
    out = []
    for (policy, rate), runs in by_run(summaries).items():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        horizons = [s.horizon for s in runs if s.horizon is not None]
        out.append(
            PolicySummary(
                policy=policy,
                rate=rate,
                round=None,
                rounds=len(runs),
                requests=sum(s.requests for s in runs),
                horizon_s=runs[0].horizon_s,
                drained=_combined_metrics([s.drained for s in runs]),
                horizon=_combined_metrics(horizons) if len(horizons) == len(runs) else None,
            )
        )
    return out


def rounds_summary(
    summaries: Sequence[PolicySummary], variant: Variant = "drained"
) -> list[RoundsSummary]:
    """Per (policy, rate), the per-round values of `SPREAD_METRICS` and their spread."""
    out = []
    for (policy, rate), runs in by_run(summaries).items():
        metrics = [s.metrics(variant) for s in runs]
        out.append(
            RoundsSummary(
                policy=policy,
                rate=rate,
                variant=variant,
                rounds=[s.round or 0 for s in runs],
                metrics={
                    key: spread([getattr(m, key, None) for m in metrics])
                    for _, key in SPREAD_METRICS
                },
            )
        )
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def round_ratios(
    summaries: Sequence[PolicySummary],
    base: str,
    against: Sequence[str],
    variant: Variant = "drained",
    metrics: Sequence[str] | None = None,
) -> list[RatioSpread]:
    """`base` / each of `against` per rate and metric (default: the ratio table's and
    `SPREAD_METRICS`): the ratio of the two runs of each round, then its spread over rounds (a
    round one of them lacks gives no ratio)."""
    if metrics is None:
        metrics = list(dict.fromkeys(key for _, key in (*RATIO_METRICS, *SPREAD_METRICS)))
    runs = {
        key: {s.round or 0: s.metrics(variant) for s in group}
        for key, group in by_run(summaries).items()
    }
    out = []
    for rate in sorted({rate for policy, rate in runs if policy == base}):
        mine = runs[(base, rate)]
        for other in against:
            theirs = runs.get((other, rate), {})
            for key in metrics:
                ratios = [
                    _div(getattr(m, key, None), getattr(theirs.get(r), key, None))
                    for r, m in sorted(mine.items())
                ]
                out.append(
                    RatioSpread(
                        rate=rate,
                        base=base,
                        other=other,
                        variant=variant,
                        metric=key,
                        ratio=spread(ratios),
                    )
                )
    return out


# --------------------------------------------------------------------------------------------
# Steady load: the measured window, steadiness, unloaded time


DEFAULT_WARMUP_SHARE = 0.2  # of --duration, when --warmup-s is not given
# A series is flat when its least-squares line over the second half of the measured window
# moves by at most this share of its level (the mean, or the floor below) across that half.
STEADY_TOLERANCE = 0.25
# Levels below these count as these: a queue of 0-1 requests or a nearly empty KV cache moving
# by a request or a few blocks is noise, not a trend.
QUEUE_FLOOR = 4.0
KV_FLOOR_SHARE = 0.05  # of the KV cache's blocks


class Window(BaseModel):
    """The measured window of a steady run: requests that arrive at `start_s` <= t < `end_s`
    (seconds after the run's first arrival, by the trace's arrival times) count, all of them
    run to completion; those before are the discarded warm-up, those after keep the load on
    while the counted ones finish."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_s: float = Field(ge=0.0)
    end_s: float

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if not self.end_s > self.start_s:
            raise ValueError(
                f"the window ends ({self.end_s} s) before it starts ({self.start_s} s)"
            )
        return self

    def contains(self, arrival_s: float) -> bool:
        return self.start_s <= arrival_s < self.end_s

    @property
    def second_half(self) -> tuple[float, float]:
        return (self.start_s + self.end_s) / 2, self.end_s


def steady_window(duration_s: float, warmup_s: float | None = None) -> Window:
    """[warm-up, duration): `warmup_s` defaults to `DEFAULT_WARMUP_SHARE` of `duration_s`."""
    if not duration_s > 0 or math.isinf(duration_s):
        raise ValueError(f"the duration must be a positive number of seconds, got {duration_s}")
    warmup = DEFAULT_WARMUP_SHARE * duration_s if warmup_s is None else warmup_s
    if not 0 <= warmup < duration_s:
        raise ValueError(f"the warm-up ({warmup:g} s) must be >= 0 and below the duration")
    return Window(start_s=warmup, end_s=duration_s)


def window_members(arrivals: Mapping[str, float], window: Window) -> set[str]:
    """The ids of the requests (id -> arrival s) that count in `window`."""
    return {rid for rid, t in arrivals.items() if window.contains(t)}


def unloaded_engine_s(script: Any, costs: Any) -> float:
    """What `script` (a `TraceScript`) costs the engine alone, by its measured `costs`
    (`lamps_core.costs.EngineCosts`): each segment prefills what is new to its context (the
    prompt, then each call's returned tokens, at least one token: the context before stays
    cached, as unloaded it would) and decodes its other tokens one batch-1 step each (the
    prefill step makes the first)."""
    total = 0.0
    for i, seg in enumerate(script.segments):
        before = script.segments[i - 1] if i else None
        new = seg.prompt_tokens if before is None else max(1, before.api_token_length or 0)
        total += costs.t_fwd(new) + max(0, seg.completion_tokens - 1) * costs.decode_step_s
    return total


def unloaded_time_s(script: Any, costs: Any) -> float:
    """The denominator of a request's slowdown: its engine time alone plus its calls' durations
    as the trace gives them (the same for every policy)."""
    return unloaded_engine_s(script, costs) + script.total_api_time


class EngineSeries(BaseModel):
    """The engine's state sampled during one run (seconds after the run started)."""

    model_config = ConfigDict(extra="forbid")

    t: list[float] = Field(default_factory=list)
    waiting: list[int] = Field(default_factory=list, description="Requests in vLLM's queue.")
    running: list[int] = Field(default_factory=list)
    kv_blocks_used: list[int] = Field(default_factory=list)
    kv_blocks_total: int | None = None
    preserved_blocks: list[int] | None = Field(
        default=None, description="KV blocks held by requests in calls (engine-only runs)."
    )

    def add(self, t: float, stats: Mapping[str, Any]) -> None:
        self.t.append(round(t, 3))
        self.waiting.append(int(stats.get("waiting", 0)))
        self.running.append(int(stats.get("running", 0)))
        self.kv_blocks_used.append(int(stats.get("kv_blocks_used", 0)))
        if stats.get("kv_blocks_total"):
            self.kv_blocks_total = int(stats["kv_blocks_total"])
        if stats.get("preserved_blocks") is not None:
            if self.preserved_blocks is None:
                self.preserved_blocks = [0] * (len(self.t) - 1)
            self.preserved_blocks.append(int(stats["preserved_blocks"]))
        elif self.preserved_blocks is not None:
            self.preserved_blocks.append(0)


class Trend(BaseModel):
    """One series over the second half of the measured window: its mean, the slope of its
    least-squares line (and the slope's standard error), how far that line moves across the
    half, and that move relative to the level (the mean, or the series' floor when the mean is
    below it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int
    mean: float | None
    slope_per_s: float | None
    slope_stderr: float | None = None
    change: float | None
    relative_change: float | None
    flat: bool | None = Field(
        description="|relative_change| <= STEADY_TOLERANCE, or a slope within two standard "
        "errors of 0 (noise, not a trend); None: too few samples"
    )


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of the least-squares line through the points; None below two distinct xs."""
    fit = _line(xs, ys)
    return None if fit is None else fit[0]


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float | None] | None:
    """(slope, its standard error; None below 3 points) of the least-squares line."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if len(xs) < 3:
        return slope, None
    residuals = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(residuals / (len(xs) - 2) / sxx)


def trend(
    ts: Sequence[float],
    values: Sequence[float],
    span: tuple[float, float],
    floor: float,
    tolerance: float = STEADY_TOLERANCE,
) -> Trend:
    """`values` (sampled at `ts`) over `span`: see `Trend`. Fewer than 3 samples say nothing."""
    lo, hi = span
    points = [(t, v) for t, v in zip(ts, values, strict=True) if lo <= t < hi]
    if len(points) < 3:
        return Trend(samples=len(points), mean=None, slope_per_s=None, change=None,
                     relative_change=None, flat=None)  # fmt: skip
    xs, ys = [t for t, _ in points], [float(v) for _, v in points]
    mean = statistics.fmean(ys)
    slope, stderr = _line(xs, ys) or (0.0, None)
    change = slope * (hi - lo)
    relative = change / max(mean, floor, 1e-9)
    noise = stderr is not None and abs(slope) <= 2 * stderr
    return Trend(
        samples=len(points),
        mean=mean,
        slope_per_s=slope,
        slope_stderr=stderr,
        change=change,
        relative_change=relative,
        flat=abs(relative) <= tolerance or noise,
    )


def steadiness(
    series: EngineSeries, window: Window, tolerance: float = STEADY_TOLERANCE
) -> dict[str, Any]:
    """Whether a steady run was steady: the queue length and the KV blocks in use over the
    second half of its measured window (`trend` each), and `steady`: both flat (None when
    there were too few samples to tell, e.g. a target that reports no engine state)."""
    span = window.second_half
    kv_floor = KV_FLOOR_SHARE * series.kv_blocks_total if series.kv_blocks_total else 1.0
    trends = {
        "waiting": trend(series.t, series.waiting, span, QUEUE_FLOOR, tolerance),
        "kv_blocks_used": trend(series.t, series.kv_blocks_used, span, kv_floor, tolerance),
    }
    flags = [t.flat for t in trends.values()]
    steady = None if None in flags else all(flags)
    return {
        "span_s": list(span),
        "steady": steady,
        **{name: t.model_dump() for name, t in trends.items()},
    }


# --------------------------------------------------------------------------------------------
# Goodput: the highest steady rate at which a share of requests meets a slowdown SLO


# Shares are ratios of counts, and medians of them: 0.9 may come out as 0.8999999999999999.
SHARE_EPSILON = 1e-9


def reaches(attained: float | None, share: float) -> bool:
    """Whether an SLO attainment reaches the share asked for (None: nothing ran, it does not)."""
    return attained is not None and attained >= share - SHARE_EPSILON


def certainly_missed(missed: int, requests: int, share: float) -> bool:
    """Whether `missed` misses among `requests` already put the share out of reach."""
    return missed > (1.0 - share) * requests + SHARE_EPSILON


class Bracket(BaseModel):
    """Where one policy's goodput lies among the rates tried: `met` is the highest rate that met
    the SLO below the lowest that failed it (`failed`). None: no such rate was tried (goodput
    below the lowest rate tried, or at least the highest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    met: float | None
    failed: float | None


def bracket(observed: Mapping[float, bool]) -> Bracket:
    """The bracket of one policy from its outcomes (rate -> met the SLO). A rate that met the
    SLO above one that failed it (noise) does not count: goodput is where it first fails."""
    failed = min((rate for rate, ok in observed.items() if not ok), default=None)
    met = max(
        (rate for rate, ok in observed.items() if ok and (failed is None or rate < failed)),
        default=None,
    )
    return Bracket(met=met, failed=failed)


def _round_rate(rate: float) -> float:
    return float(f"{rate:.3g}")


@dataclass
class RateSearch:
    """Bracketing, then bisection, over steady rates; every rate tried runs every policy.

    `propose()` gives the next rates to try (none: done) and `record(rate, met)` what each
    policy did there. From `start`: while some policy has met the SLO at every rate tried, the
    highest rate times `factor`; while some policy has failed at every rate tried, the lowest
    over `factor` (within `min_rate`, `max_rate`). Once every policy is bracketed (or its side
    is out of range), up to `bisect_steps` steps: each tries the geometric middle of every
    bracket still wider than `1 + precision` (middles within that of each other are tried
    once). Call `propose()` once per batch: each batch of middles is one step."""

    start: float
    policies: Sequence[str]
    factor: float = 2.0
    min_rate: float | None = None
    max_rate: float | None = None
    bisect_steps: int = 3
    precision: float = 0.05
    observed: dict[str, dict[float, bool]] = dataclass_field(default_factory=dict)
    steps: int = 0

    def __post_init__(self) -> None:
        if not self.start > 0 or math.isinf(self.start):
            raise ValueError(f"the start rate must be a positive number, got {self.start}")
        if not self.factor > 1:
            raise ValueError(f"the search factor must be > 1, got {self.factor}")
        if self.bisect_steps < 0:
            raise ValueError(f"bisect_steps must be >= 0, got {self.bisect_steps}")
        if not self.policies:
            raise ValueError("a search needs at least one policy")
        self.min_rate = self.start / self.factor**4 if self.min_rate is None else self.min_rate
        self.max_rate = self.start * self.factor**4 if self.max_rate is None else self.max_rate
        if not 0 < self.min_rate <= self.start <= self.max_rate:
            raise ValueError(
                f"need 0 < min rate ({self.min_rate:g}) <= start ({self.start:g}) "
                f"<= max rate ({self.max_rate:g})"
            )
        for policy in self.policies:
            self.observed.setdefault(policy, {})

    @property
    def tried(self) -> list[float]:
        return sorted({rate for by_rate in self.observed.values() for rate in by_rate})

    def record(self, rate: float, met: Mapping[str, bool]) -> None:
        for policy in self.policies:
            self.observed[policy][rate] = bool(met[policy])

    def brackets(self) -> dict[str, Bracket]:
        return {policy: bracket(self.observed[policy]) for policy in self.policies}

    def propose(self) -> list[float]:
        tried = self.tried
        if not tried:
            return [self.start]
        assert self.min_rate is not None and self.max_rate is not None
        out = []
        brackets = self.brackets()
        lowest, highest = tried[0], tried[-1]
        if any(b.met is None for b in brackets.values()):
            lower = _round_rate(lowest / self.factor)
            if lower >= self.min_rate * (1 - 1e-9) and lower not in tried:
                out.append(lower)
        if any(b.failed is None for b in brackets.values()):
            higher = _round_rate(highest * self.factor)
            if higher <= self.max_rate * (1 + 1e-9) and higher not in tried:
                out.append(higher)
        if out:
            return out
        if self.steps >= self.bisect_steps:
            return []
        middles: list[float] = []
        for b in brackets.values():
            if b.met is None or b.failed is None or b.failed <= b.met * (1 + self.precision):
                continue
            middle = _round_rate(math.sqrt(b.met * b.failed))
            close = any(abs(math.log(middle / m)) <= math.log1p(self.precision) for m in middles)
            if not close and middle not in tried and b.met < middle < b.failed:
                middles.append(middle)
        if middles:
            self.steps += 1
        return sorted(middles)


def goodput_summary(
    attainment: Mapping[str, Mapping[float, Sequence[float | None]]],
    share: float,
    base: str | None = None,
) -> dict[str, Any]:
    """Per policy, from its SLO attainment per rate and round (`attainment[policy][rate]`, one
    value per round; None: the round did not run), the bracket of its goodput from the median
    attainment and from each round's own; and the goodput ratios of `base` (default: the
    first policy) to each other one: from the median brackets (`ratio`, with the range the
    brackets leave, `low` = base's met / other's failed, `high` = base's failed / other's met)
    and per round (`per_round`, with median, min and max), on the `met` rates."""
    policies = list(attainment)
    base = base or policies[0]

    def met(values: Sequence[float | None]) -> bool:
        return reaches(_median(values), share)

    per_policy: dict[str, Any] = {}
    for policy, by_rate in attainment.items():
        rounds = max((len(v) for v in by_rate.values()), default=0)
        median = bracket({rate: met(values) for rate, values in by_rate.items()})
        per_round = [
            bracket(
                {
                    rate: reaches(values[r], share)
                    for rate, values in by_rate.items()
                    if r < len(values) and values[r] is not None
                }
            )
            for r in range(rounds)
        ]
        per_policy[policy] = {
            "goodput": median.met,
            "bracket": median.model_dump(),
            "per_round": [b.model_dump() for b in per_round],
            "attainment": {
                rate_key(rate): {"per_round": list(values), "median": _median(values)}
                for rate, values in sorted(by_rate.items())
            },
        }
    ratios: dict[str, Any] = {}
    mine = per_policy[base]
    for other in policies:
        if other == base:
            continue
        theirs = per_policy[other]
        a, b = mine["bracket"], theirs["bracket"]
        rounds = [
            _div(x["met"], y["met"])
            for x, y in zip(mine["per_round"], theirs["per_round"], strict=False)
        ]
        ratios[other] = {
            "ratio": _div(a["met"], b["met"]),
            "low": _div(a["met"], b["failed"]),
            "high": _div(a["failed"], b["met"]),
            "per_round": spread(rounds).model_dump(),
        }
    return {"share": share, "base": base, "policies": per_policy, "ratios": ratios}


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def goodput_table(name: str, summary: Mapping[str, Any], slo_slowdown: float) -> str:
    """A printable goodput table of one workload (`goodput_summary`'s)."""
    share = summary["share"]
    policies = summary["policies"]
    lines = [
        f"goodput, {name}: the highest steady rate (req/s) at which {share:.0%} of requests "
        f"finish within {slo_slowdown:g}x their unloaded time",
    ]
    rows = [["policy", "goodput", "bracket [met, failed)", "per round (met)"]]
    for policy, p in policies.items():
        b = p["bracket"]
        rows.append(
            [
                policy,
                _rate_cell(b["met"], below=True),
                f"[{_rate_cell(b['met'], below=True)}, {_rate_cell(b['failed'])})",
                ", ".join(_rate_cell(r["met"], below=True) for r in p["per_round"]) or "-",
            ]
        )
    lines += _aligned(rows)
    base = summary["base"]
    if summary["ratios"]:
        lines.append(f"goodput ratio {base} / other (from the brackets: [low, high]; per round)")
        rows = [["vs", "ratio", "range", "per round median [min, max]"]]
        for other, r in summary["ratios"].items():
            pr = r["per_round"]
            rows.append(
                [
                    other,
                    _num(r["ratio"]),
                    f"[{_num(r['low'])}, {_num(r['high'])}]",
                    f"{_num(pr['median'])} [{_num(pr['min'])}, {_num(pr['max'])}]",
                ]
            )
        lines += _aligned(rows)
    rates = sorted({float(k) for p in policies.values() for k in p["attainment"]})
    lines.append("share of requests within the SLO, per rate (median over rounds)")
    rows = [["policy", *(rate_key(r) for r in rates)]]
    for policy, p in policies.items():
        cells = [p["attainment"].get(rate_key(r), {}).get("median") for r in rates]
        rows.append([policy, *(("-" if c is None else f"{c:.2f}") for c in cells)])
    lines += _aligned(rows)
    return "\n".join(lines)


def _rate_cell(rate: float | None, below: bool = False) -> str:
    if rate is None:
        return "<lowest" if below else "none"
    return rate_key(rate)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def plot_attainment(
    path: str | Path, summaries: Mapping[str, Mapping[str, Any]], share: float, slo: float
) -> Path:
    """The SLO-attainment curves, one panel per workload (`{workload: goodput_summary}`), one
    line per policy: the median share meeting the SLO against the rate, bars from the lowest
    round to the highest, the target share dashed. A point of a run stopped early (a summary's
    `stopped_early`, as goodput.json has it) is drawn hollow: its share is a lower bound."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    names = list(summaries)
    fig = Figure(figsize=(5.0 * len(names), 4.2), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        policies = list(summaries[name]["policies"])
        for policy in policies:
            points = []
            for rate, a in summaries[name]["policies"][policy]["attainment"].items():
                known = [v for v in a["per_round"] if v is not None]
                if known:
                    med = statistics.median(known)
                    points.append((float(rate), med, med - min(known), max(known) - med))
            if not points:
                continue
            points.sort()
            xs, ys, low, high = (list(c) for c in zip(*points, strict=True))
            color = _color(policy, _ordered_policies(policies))
            ax.errorbar(xs, ys, yerr=[low, high] if any(low) or any(high) else None,
                        marker="o", capsize=3, label=policy, color=color)  # fmt: skip
            stopped = summaries[name].get("stopped_early", {}).get(policy, {})
            early = [
                (x, y) for x, y in zip(xs, ys, strict=True) if any(stopped.get(rate_key(x), []))
            ]
            if early:
                ex, ey = zip(*early, strict=True)
                ax.plot(ex, ey, "o", markerfacecolor="white", markeredgecolor=color, zorder=5)
        ax.axhline(share, linestyle="--", color="black", linewidth=0.8, label="target")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("steady arrival rate (requests/s)")
        ax.set_ylabel(f"share within {slo:g}x unloaded time")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left")
    fig.suptitle(f"SLO attainment ({share:.0%} within {slo:g}x: goodput)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# Files


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def write_results(
    out_dir: str | Path,
    summaries: Sequence[PolicySummary],
    config: Mapping[str, Any],
    machine: Mapping[str, Any] | str | None = None,
    ratios: Sequence[RatioSpread] = (),
) -> Path:
    """Write `out_dir/results.json`: the run's config and machine; per policy and rate both
    variants (`{"results": {policy: {rate: summary}}}`, the median over rounds when there were
    several, see `combine_rounds`); per policy and rate every round's summary and the spread
    (`{"rounds": {policy: {rate: {"per_round": [...], "spread": ...}}}}`); and `ratios`, each
    with its per-round values. `summaries` are per round (`summarize_all`). Returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    for s in combine_rounds(summaries):
        table.setdefault(s.policy, {})[rate_key(s.rate)] = s.model_dump(mode="json")
    rounds: dict[str, dict[str, Any]] = {}
    spreads = {(r.policy, r.rate): r for r in rounds_summary(summaries)}
    for (policy, rate), runs in by_run(summaries).items():
        rounds.setdefault(policy, {})[rate_key(rate)] = {
            "per_round": [s.model_dump(mode="json") for s in runs],
            "spread": spreads[(policy, rate)].model_dump(mode="json"),
        }
    body = {
        "format": RESULTS_FORMAT,
        "config": config,
        "machine": machine,
        "results": table,
        "rounds": rounds,
        "ratios": [r.model_dump(mode="json") for r in ratios],
    }
    path = out / "results.json"
    path.write_text(json.dumps(body, indent=1, default=str))
    return path


def read_results(path: str | Path) -> tuple[list[PolicySummary], dict[str, Any]]:
    """The summaries of a `results.json`, and the whole file (config, machine) as read."""
    body = json.loads(Path(path).read_text())
    if body.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a {RESULTS_FORMAT} file")
    summaries = [
        PolicySummary.model_validate(s)
        for per_rate in body["results"].values()
        for s in per_rate.values()
    ]
    return sorted(summaries, key=lambda s: (s.policy, s.rate)), body


def write_request_results(out_dir: str | Path, results: Iterable[RequestResult]) -> Path:
    """Every request's record, one JSON object a line (`requests.jsonl`), to re-plot later."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "requests.jsonl"
    with path.open("w") as f:
        for r in results:
            f.write(r.model_dump_json(exclude_none=True) + "\n")
    return path


def read_request_results(path: str | Path) -> list[RequestResult]:
    lines = Path(path).read_text().splitlines()
    return [RequestResult.model_validate_json(line) for line in lines if line.strip()]


# --------------------------------------------------------------------------------------------
# Ratio table

RATIO_METRICS: tuple[tuple[str, str], ...] = (
    ("mean lat", "latency_mean_s"),
    ("P99 lat", "latency_p99_s"),
    ("mean TTFT", "ttft_mean_s"),
    ("P99 TTFT", "ttft_p99_s"),
    ("req/s", "throughput_rps"),
)


def _ratio_cell(ratio: Spread, rounds: int) -> str:
    """One round: the ratio, as always; several: its median and [min, max] over rounds."""
    if ratio.median is None or ratio.min is None or ratio.max is None:
        return "n/a"
    if rounds == 1:
        return f"{ratio.median:.2f}"
    return f"{ratio.median:.2f} [{ratio.min:.2f}, {ratio.max:.2f}]"


def ratio_table(
    summaries: Sequence[PolicySummary],
    base: str = "lamps",
    against: Sequence[str] = ("infercept", "vllm"),
    variant: Variant = "drained",
) -> str:
    """A printable table of `base`/other ratios per rate (latency and TTFT: < 1 means `base` is
    faster; throughput: > 1 means it serves more). `summaries` are per round; with more than
    one round each cell is the median of the per-round ratios and their [min, max]."""
    rounds = max((len(runs) for runs in by_run(summaries).values()), default=1)
    ratios = {
        (r.rate, r.other, r.metric): r.ratio
        for r in round_ratios(summaries, base, against, variant, [key for _, key in RATIO_METRICS])
    }
    header = ["rate", "vs", *(name for name, _ in RATIO_METRICS)]
    rows = [header]
    for rate in sorted({s.rate for s in summaries if s.policy == base}):
        for other in against:
            cells = [_ratio_cell(ratios[(rate, other, key)], rounds) for _, key in RATIO_METRICS]
            rows.append([rate_key(rate), other, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    over = f", median [min, max] over {rounds} rounds of the per-round ratio" if rounds > 1 else ""
    lines = [
        f"{base} / other, {variant}{over} "
        f"(latency, TTFT: < 1 is better for {base}; req/s: > 1 is better)",
        *("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows),
    ]
    if len(rows) == 1:
        lines.append(f"(no runs of {base!r})")
    return "\n".join(lines)


def latency_parts_table(summaries: Sequence[PolicySummary], variant: Variant = "drained") -> str:
    """Where each policy's mean latency goes, per rate (medians over rounds): in API calls
    (no scheduler can cut it), queued for the engine, and the rest (prefill, decode, copies:
    the engine's steps), with the rest per output token. A ratio between policies can only come
    from the last three columns."""
    header = ["rate", "policy", "mean lat", "in calls", "queued", "engine", "engine/token"]
    rows = [header]
    combined = sorted(combine_rounds(summaries), key=lambda s: (s.rate, s.policy))
    for summary in combined:
        m = summary.metrics(variant)
        if m is None or m.latency_mean_s is None:
            continue
        api, queued = m.api_mean_s or 0.0, m.queued_mean_s or 0.0
        engine = m.latency_mean_s - api - queued
        tokens = m.output_tokens / m.completed if m.completed else 0
        per_token = f"{engine / tokens * 1e3:.1f} ms" if tokens else "n/a"
        rows.append(
            [
                rate_key(summary.rate),
                summary.policy,
                *(f"{v:.2f} s" for v in (m.latency_mean_s, api, queued, engine)),
                per_token,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        [
            f"where the mean latency goes, {variant} (medians over rounds)",
            *("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows),
        ]
    )


# --------------------------------------------------------------------------------------------
# Plots

_COLORS = {"lamps": "#d62728", "sjf": "#2ca02c", "infercept": "#1f77b4", "vllm": "#7f7f7f"}
_OTHER_COLORS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _ordered_policies(policies: Iterable[str]) -> list[str]:
    """The known policies first (lamps, sjf, infercept, vllm), then the others by name."""
    known = list(_COLORS)
    return sorted(set(policies), key=lambda p: (known.index(p) if p in known else len(known), p))


def _color(policy: str, policies: Sequence[str]) -> str:
    if policy in _COLORS:
        return _COLORS[policy]
    others = [p for p in policies if p not in _COLORS]
    return _OTHER_COLORS[others.index(policy) % len(_OTHER_COLORS)]


def _vs_rate(
    path: Path,
    summaries: Sequence[PolicySummary],
    variant: Variant,
    panels: Sequence[tuple[str, str, str]],
    title: str,
) -> Path:
    from matplotlib.figure import Figure

    policies = _ordered_policies(s.policy for s in summaries)
    runs = by_run(summaries)
    fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, ylabel, panel_title) in zip(axes, panels, strict=True):
        for policy in policies:
            # Several rounds: the median, with a bar from the lowest round to the highest.
            points = sorted(
                (rate, v.median, v.median - v.min, v.max - v.median)
                for (p, rate), group in runs.items()
                if p == policy
                and (v := spread([getattr(s.metrics(variant), key, None) for s in group]))
                and v.median is not None
                and v.min is not None
                and v.max is not None
            )
            if points:
                xs, ys, low, high = (list(column) for column in zip(*points, strict=True))
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[low, high] if any(low) or any(high) else None,
                    marker="o",
                    capsize=3,
                    label=policy,
                    color=_color(policy, policies),
                )
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend()
    rounds = max(len(group) for group in runs.values()) if runs else 1
    over = f"; median of {rounds} rounds, bars from the lowest to the highest" if rounds > 1 else ""
    fig.suptitle(f"{title} ({variant}{over})")
    fig.savefig(path, dpi=110)
    return path


def _cdfs(path: Path, results: Sequence[RequestResult]) -> Path:
    from matplotlib.figure import Figure

    rates = sorted({r.rate for r in results})
    policies = _ordered_policies(r.policy for r in results)
    cols = min(3, max(1, len(rates)))
    rows = math.ceil(len(rates) / cols) if rates else 1
    fig = Figure(figsize=(5.0 * cols, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, rate in zip(axes, rates, strict=False):
        for policy in policies:
            run = [r for r in results if r.rate == rate and r.policy == policy]
            done = sorted(r.latency for r in run if r.completed and r.latency is not None)
            if not run:
                continue
            ys = [(i + 1) / len(run) for i in range(len(done))]
            label = policy if len(done) == len(run) else f"{policy} ({len(done)}/{len(run)} done)"
            ax.step(done, ys, where="post", label=label, color=_color(policy, policies))
        ax.set_title(f"{rate_key(rate)} requests/s")
        ax.set_xlabel("end-to-end latency (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    for ax in axes[len(rates) :]:
        ax.set_visible(False)
    # Unfinished requests keep their policy's curve below 1 (the legend says how many finished).
    fig.suptitle("End-to-end latency CDF")
    fig.savefig(path, dpi=110)
    return path


def plot(
    out_dir: str | Path,
    summaries: Sequence[PolicySummary],
    results: Sequence[RequestResult],
    variant: Variant = "drained",
) -> list[Path]:
    """PNGs under `out_dir`: latency, TTFT and throughput vs rate per policy (from `summaries`,
    `variant`), and end-to-end latency CDFs per rate (from `results`). Returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _vs_rate(
            out / "latency_vs_rate.png",
            summaries,
            variant,
            [
                ("latency_mean_s", "mean end-to-end latency (s)", "Mean latency"),
                ("latency_p99_s", "P99 end-to-end latency (s)", "P99 latency"),
            ],
            "End-to-end latency (arrival to last token, API time included)",
        ),
        _vs_rate(
            out / "ttft_vs_rate.png",
            summaries,
            variant,
            [
                ("ttft_mean_s", "mean TTFT (s)", "Mean time to first token"),
                ("ttft_p99_s", "P99 TTFT (s)", "P99 time to first token"),
            ],
            "Time to first token",
        ),
        _vs_rate(
            out / "throughput_vs_rate.png",
            summaries,
            variant,
            [
                ("throughput_rps", "completed requests/s", "Request throughput"),
                ("throughput_tokens_per_s", "output tokens/s", "Token throughput"),
            ],
            "Throughput",
        ),
    ]
    if results:
        paths.append(_cdfs(out / "latency_cdf.png", results))
    return paths
