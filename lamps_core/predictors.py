"""What a policy believes about a request's future: how much it still decodes, whether an API call
follows, how long that call lasts and how many tokens it returns.

- `OraclePredictor`: the trace's own numbers (`RequestMeta.remaining_segments`), every segment.
- `NoisyOraclePredictor`: the oracle with `N(0, p·x)` added to every duration and length `x`, the
  LAMPS evaluation's sensitivity test. Each segment's draw comes from an RNG seeded by
  (seed, request id, segment index), so it is the same whichever order requests are asked about
  and whichever segment of the request asks.
- `ToolEstimatePredictor`: call durations from what the engine refreshes from the tool workers'
  records per API type: a mean, or a learned distribution (`call_durations.CallDurationSummary`);
  lengths from the trace when it has them, every segment, optionally with the noisy oracle's
  relative error on the decode lengths only (`length_noise`: what serving has, learned durations
  and learned lengths, on a trace that carries no text to learn lengths from). With a
  distribution it also answers `remaining_call_s` for a call under way: `E[D - e | D > e]` after
  `e` seconds.

A request without a trace (chat, or no meta at all) gets `PredictionDefaults`: its current
segment decodes `RequestMeta.predicted_decode_tokens` when the serving layer forecast it (a chat
segment, from the learned output-length model of `lamps_core.length_model`), else the default,
and ends in a call when one is forced or, for an `auto` turn, forecast
(`RequestMeta.predicted_call_tool`, the same model's tool head).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from lamps_core.call_durations import ApiEstimate, CallDurationSummary
from lamps_core.request_meta import MAX_API_ESTIMATES, RequestMeta


@dataclass(frozen=True, slots=True)
class SegmentForecast:
    """One segment still ahead (or under way): decode, then maybe an API call."""

    decode_tokens: int  # tokens still to decode in it
    api_s: float | None  # duration of the call ending it; None: no call, or the forecast ends here
    api_tokens: int = 0  # tokens the call appends to the context
    api_type: str | None = None

    @property
    def has_call(self) -> bool:
        return self.api_s is not None


@dataclass(frozen=True, slots=True)
class Prediction:
    """The forecast of a request's remaining work, current segment first."""

    segments: tuple[SegmentForecast, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a prediction needs at least the current segment")

    @property
    def decode_tokens(self) -> int:
        """Tokens decoded before the next call (or to the end)."""
        return self.segments[0].decode_tokens

    @property
    def has_call(self) -> bool:
        return self.segments[0].has_call

    @property
    def api_s(self) -> float:
        """The next call's duration; 0 s when none follows."""
        return self.segments[0].api_s or 0.0

    @property
    def api_tokens(self) -> int:
        return self.segments[0].api_tokens

    @property
    def remaining_decode_tokens(self) -> int:
        """Decode tokens over every forecast segment."""
        return sum(s.decode_tokens for s in self.segments)


DEFAULT_DECODE_TOKENS = 128
DEFAULT_API_S = 1.0
DEFAULT_API_TOKENS = 32


@dataclass(frozen=True, slots=True)
class PredictionDefaults:
    """What is assumed where nothing is known (chat requests, requests without meta)."""

    decode_tokens: int = DEFAULT_DECODE_TOKENS
    api_s: float = DEFAULT_API_S
    api_tokens: int = DEFAULT_API_TOKENS

    def __post_init__(self) -> None:
        if self.decode_tokens < 1:
            raise ValueError(f"default_decode_tokens must be >= 1, got {self.decode_tokens}")
        if not (math.isfinite(self.api_s) and self.api_s >= 0):
            raise ValueError(f"default_api_s must be a finite number >= 0, got {self.api_s}")
        if self.api_tokens < 0:
            raise ValueError(f"default_api_tokens must be >= 0, got {self.api_tokens}")

    def prediction(
        self, meta: RequestMeta | None, generated_tokens: int, api_s: float | None = None
    ) -> Prediction:
        """The current segment (ending in a call when the meta says one is forced or forecast
        for an `auto` turn), and, after a call, one more segment of default length. The current
        segment's length is the serving layer's forecast when the meta has one."""
        forecast = meta.predicted_decode_tokens if meta is not None else None
        decode = max((forecast or self.decode_tokens) - generated_tokens, 1)
        if meta is None or not (meta.ends_in_api_call or meta.predicted_call_tool):
            return Prediction((SegmentForecast(decode, None),))
        call_s = self.api_s if api_s is None else api_s
        return Prediction(
            (
                SegmentForecast(decode, call_s, self.api_tokens, _call_type(meta)),
                SegmentForecast(self.decode_tokens, None),
            )
        )


class Predictor(ABC):
    """Predictions for requests; `version` changes whenever the same request would now be
    predicted differently, so callers caching predictions know to drop them."""

    version: int = 0

    def __init__(self, defaults: PredictionDefaults | None = None) -> None:
        self.defaults = defaults or PredictionDefaults()

    @abstractmethod
    def predict(self, meta: RequestMeta | None, generated_tokens: int = 0) -> Prediction:
        """The remaining work of the segment `meta` describes, which has decoded
        `generated_tokens` already (non-zero after a preemption)."""

    def update(self, estimates: Mapping[str, ApiEstimate]) -> None:  # noqa: B027 (optional hook)
        """New call durations per API type (a mean in seconds, or a learned distribution);
        ignored by predictors that do not use them."""

    def call_duration(self, meta: RequestMeta | None) -> float:
        """Predicted seconds of the API call that ends the segment `meta` describes. A segment
        can stop for a call nobody foresaw (a chat turn that chose a tool): the default then."""
        prediction = self.predict(meta)
        return prediction.api_s if prediction.has_call else self.defaults.api_s

    def remaining_call_s(self, meta: RequestMeta | None, elapsed_s: float) -> float | None:
        """Predicted seconds still to go of the call ending `meta`'s segment, which has run
        `elapsed_s`; None where the predictor has no distribution of that call's duration to
        condition on (the caller keeps its own rule: the oracle's duration is not a guess)."""
        return None


class OraclePredictor(Predictor):
    def predict(self, meta: RequestMeta | None, generated_tokens: int = 0) -> Prediction:
        if meta is None or not meta.remaining_segments:
            return self.defaults.prediction(meta, generated_tokens)
        forecasts = [
            SegmentForecast(
                seg.completion_tokens, seg.api_time, seg.api_token_length or 0, seg.api_type
            )
            for seg in meta.remaining_segments
        ]
        return Prediction(_after_generated(forecasts, generated_tokens))


class NoisyOraclePredictor(Predictor):
    def __init__(self, p: float, seed: int = 0, defaults: PredictionDefaults | None = None) -> None:
        if not (math.isfinite(p) and p >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {p}")
        super().__init__(defaults)
        self.p = p
        self.seed = seed

    def predict(self, meta: RequestMeta | None, generated_tokens: int = 0) -> Prediction:
        if meta is None or not meta.remaining_segments:
            return self.defaults.prediction(meta, generated_tokens)
        forecasts = []
        for offset, seg in enumerate(meta.remaining_segments):
            decode_noise, api_noise, tokens_noise = _draws(self.seed, meta, offset)
            decode = max(round(seg.completion_tokens * (1 + self.p * decode_noise)), 1)
            api_s = None
            api_tokens = 0
            if seg.api_time is not None:
                api_s = max(seg.api_time * (1 + self.p * api_noise), 0.0)
                returned = seg.api_token_length or 0
                api_tokens = max(round(returned * (1 + self.p * tokens_noise)), 0)
            forecasts.append(SegmentForecast(decode, api_s, api_tokens, seg.api_type))
        return Prediction(_after_generated(forecasts, generated_tokens))


class ToolEstimatePredictor(Predictor):
    """Durations from `estimates` (API type -> mean seconds, or a learned distribution), else
    `defaults.api_s` (the cold-start prior).

    A call's predicted duration is its distribution's mean, not its median: a call's waste
    (`waste.preserve_waste`) is linear in its duration, so the expected waste is the waste of the
    mean, while a median would price a tool that is usually fast and sometimes very slow as
    always fast. It is also `remaining_call_s` at 0 s elapsed, so the plan made at the pause and
    the first review of the call agree."""

    def __init__(
        self,
        estimates: Mapping[str, ApiEstimate] | None = None,
        defaults: PredictionDefaults | None = None,
        length_noise: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(defaults)
        if length_noise is not None and not (math.isfinite(length_noise) and length_noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {length_noise}")
        self.length_noise = length_noise
        self.seed = seed
        self._estimates: dict[str, float] = {}
        self._distributions: dict[str, CallDurationSummary] = {}
        if estimates:
            self.update(estimates)
        self.version = 0

    @property
    def estimates(self) -> Mapping[str, float]:
        """Mean seconds per API type (a distribution's mean where one was given)."""
        return dict(self._estimates)

    @property
    def distributions(self) -> Mapping[str, CallDurationSummary]:
        return dict(self._distributions)

    def update(self, estimates: Mapping[str, ApiEstimate]) -> None:
        if len(estimates) > MAX_API_ESTIMATES:
            raise ValueError(f"at most {MAX_API_ESTIMATES} API types, got {len(estimates)}")
        means: dict[str, float] = {}
        distributions: dict[str, CallDurationSummary] = {}
        for api_type, estimate in estimates.items():
            if isinstance(estimate, CallDurationSummary):  # validated when it was built
                distributions[api_type] = estimate
                means[api_type] = estimate.mean_s
                continue
            if isinstance(estimate, bool) or not isinstance(estimate, int | float):
                raise ValueError(f"estimate for {api_type!r} is not a duration: {estimate!r}")
            if not (math.isfinite(estimate) and estimate >= 0):
                raise ValueError(f"estimate for {api_type!r} must be finite and >= 0: {estimate}")
            means[api_type] = float(estimate)
        # Bumping the version makes callers recompute every cached score, so only on a change.
        if means != self._estimates or distributions != self._distributions:
            self._estimates = means
            self._distributions = distributions
            self.version += 1

    def duration(self, api_type: str | None) -> float:
        if api_type is None:
            return self.defaults.api_s
        return self._estimates.get(api_type, self.defaults.api_s)

    def remaining_call_s(self, meta: RequestMeta | None, elapsed_s: float) -> float | None:
        api_type = _call_type(meta)
        distribution = self._distributions.get(api_type) if api_type is not None else None
        if distribution is None:
            return None
        return distribution.expected_remaining_s(elapsed_s)

    def predict(self, meta: RequestMeta | None, generated_tokens: int = 0) -> Prediction:
        if meta is None or not meta.remaining_segments:
            # No trace (a chat request): the estimate of the tool it is forced, or forecast, to
            # call, if known.
            return self.defaults.prediction(meta, generated_tokens, self.duration(_call_type(meta)))
        forecasts = []
        for offset, seg in enumerate(meta.remaining_segments):
            decode = seg.completion_tokens
            if self.length_noise is not None:  # the noisy oracle's draw for this segment's length
                decode_noise = _draws(self.seed, meta, offset)[0]
                decode = max(round(decode * (1 + self.length_noise * decode_noise)), 1)
            has_call = seg.api_time is not None
            forecasts.append(
                SegmentForecast(
                    decode,
                    self.duration(seg.api_type) if has_call else None,
                    (seg.api_token_length or 0) if has_call else 0,
                    seg.api_type,
                )
            )
        return Prediction(_after_generated(forecasts, generated_tokens))


def _draws(seed: int, meta: RequestMeta, offset: int) -> tuple[float, float, float]:
    """The standard normal draws of segment `offset` ahead of `meta`'s: for its length, its call's
    duration, its returned tokens. Seeded by (seed, request id, segment index), so the same
    whichever order requests are asked about and whichever segment asks; always three draws in
    this order, so a segment's draws never depend on its fields."""
    rng = random.Random(f"{seed}:{meta.request_id}:{meta.segment_index + offset}")
    decode_noise, api_noise, tokens_noise = (rng.gauss(0.0, 1.0) for _ in range(3))
    return decode_noise, api_noise, tokens_noise


def _call_type(meta: RequestMeta | None) -> str | None:
    """The API type of the call ending the segment `meta` describes: the trace's, the forced
    tool, else the tool an `auto` turn is forecast to call; None when unknown."""
    if meta is None:
        return None
    if meta.remaining_segments:
        return meta.remaining_segments[0].api_type
    return meta.api_type or meta.predicted_call_tool


def _after_generated(
    forecasts: list[SegmentForecast], generated_tokens: int
) -> tuple[SegmentForecast, ...]:
    """Takes what the current segment has decoded already off its forecast."""
    first = forecasts[0]
    remaining = max(first.decode_tokens - generated_tokens, 0)
    forecasts[0] = SegmentForecast(remaining, first.api_s, first.api_tokens, first.api_type)
    return tuple(forecasts)


PREDICTOR_KINDS = ("oracle", "noisy", "estimates")


def make_predictor(
    kind: str | Predictor,
    *,
    noise: float | None = None,
    seed: int = 0,
    defaults: PredictionDefaults | None = None,
) -> Predictor:
    """The predictor a policy's options name (`predictor`, `noise`, `seed`); a ready `Predictor`
    (one the engine keeps a handle on to `update`) is used as it is."""
    if isinstance(kind, Predictor):
        if noise is not None:
            raise ValueError("option noise applies only to a named predictor, not a given object")
        return kind
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTOR_KINDS)}; got {kind!r}")
    if kind == "noisy":
        if noise is None:
            raise ValueError("predictor 'noisy' needs the option noise (p, the relative std dev)")
        return NoisyOraclePredictor(noise, seed, defaults)
    if kind == "oracle":
        if noise is not None:
            raise ValueError("option noise applies to 'noisy' and 'estimates', not 'oracle'")
        return OraclePredictor(defaults)
    # estimates: with a noise, that relative error on the trace's lengths (durations learned)
    return ToolEstimatePredictor(defaults=defaults, length_noise=noise, seed=seed)
