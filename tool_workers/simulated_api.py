"""A simulated external API: it waits a given or sampled time and returns filler text.

Benchmarks use it to reproduce tool-call durations and output lengths without
depending on real services; the seed makes a run reproducible.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model, model_validator

from lamps_core.api_types import AUGMENTATION_TYPES, TOOLBENCH_TOOLS
from tool_workers.tools import Tool, ToolArgs, ToolOutput

__all__ = [
    "DEFAULT_MAX_DURATION_S",
    "MAX_RETURN_TOKENS",
    "SIMULATED_API_TYPES",
    "ConstantDistribution",
    "Distribution",
    "ExponentialDistribution",
    "LognormalDistribution",
    "NormalDistribution",
    "SimulatedApi",
    "SimulatedApiArgs",
    "UniformDistribution",
    "filler_text",
    "sample_duration",
    "simulated_api_args_model",
]

DEFAULT_MAX_DURATION_S = 600.0
# The API types a simulated call may be recorded under (trace replay): the tool itself, the
# INFERCEPT augmentation types and the ToolBench-like tool classes of lamps_core.api_types. A
# fixed set, so a trace cannot create Redis keys or move a real tool's learned duration.
SIMULATED_API_TYPES: frozenset[str] = frozenset(
    {"simulated_api", *AUGMENTATION_TYPES, *(tool.name for tool in TOOLBENCH_TOOLS)}
)
MAX_RETURN_TOKENS = 32_768

# finite=no NaN/inf; ge=0: a duration cannot be negative.
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _std_field() -> Any:
    # A fresh FieldInfo per model: pydantic may adjust one in place while building a model.
    return Field(default=None, description="Standard deviation in seconds (give std or var).")


def _var_field() -> Any:
    return Field(default=None, description="Variance in seconds squared (give std or var).")


def _sigma(std: float | None, var: float | None) -> float:
    if (std is None) == (var is None):
        raise ValueError("give exactly one of std or var")
    return std if std is not None else math.sqrt(var or 0.0)


class ConstantDistribution(ToolArgs):
    name: Literal["constant"]
    mean: Seconds


class ExponentialDistribution(ToolArgs):
    name: Literal["exponential"]
    mean: PositiveSeconds


class NormalDistribution(ToolArgs):
    """Normal, truncated at 0 (negative draws become 0)."""

    # name first in every variant: constrained decoding emits keys in schema order,
    # and the tag should come before the fields it selects.
    name: Literal["normal"]
    mean: Seconds
    std: Seconds | None = _std_field()
    var: Seconds | None = _var_field()

    @model_validator(mode="after")
    def _one_spread(self) -> NormalDistribution:
        _sigma(self.std, self.var)
        return self

    @property
    def sigma(self) -> float:
        return _sigma(self.std, self.var)


class LognormalDistribution(ToolArgs):
    """Lognormal whose own mean and std (not those of its log) are given."""

    name: Literal["lognormal"]
    mean: PositiveSeconds
    std: Seconds | None = _std_field()
    var: Seconds | None = _var_field()

    @model_validator(mode="after")
    def _one_spread(self) -> LognormalDistribution:
        _sigma(self.std, self.var)
        return self

    @property
    def sigma(self) -> float:
        return _sigma(self.std, self.var)


class UniformDistribution(ToolArgs):
    """Uniform on [low, high], or centred on mean with the given std or var."""

    name: Literal["uniform"]
    low: Seconds | None = None
    high: Seconds | None = None
    mean: Seconds | None = None
    std: Seconds | None = None
    var: Seconds | None = None

    @model_validator(mode="after")
    def _bounds(self) -> UniformDistribution:
        by_bounds = self.low is not None or self.high is not None
        by_moments = self.mean is not None or self.std is not None or self.var is not None
        if by_bounds == by_moments:
            raise ValueError("give either low and high, or mean with std or var")
        if by_bounds:
            if self.low is None or self.high is None:
                raise ValueError("give both low and high")
            if self.low > self.high:
                raise ValueError("low must not exceed high")
        elif self.mean is None:
            raise ValueError("give mean with exactly one of std or var")
        else:
            _sigma(self.std, self.var)
        return self

    def bounds(self) -> tuple[float, float]:
        if self.low is not None and self.high is not None:
            return self.low, self.high
        mean = self.mean or 0.0
        sigma = _sigma(self.std, self.var)
        half_width = math.sqrt(3.0) * sigma  # a uniform of width w has std w / sqrt(12)
        return mean - half_width, mean + half_width


Distribution = Annotated[
    ConstantDistribution
    | ExponentialDistribution
    | NormalDistribution
    | UniformDistribution
    | LognormalDistribution,
    Field(discriminator="name"),
]


def sample_duration(distribution: Distribution, rng: random.Random, max_duration_s: float) -> float:
    """One draw from ``distribution``, clipped to [0, max_duration_s]."""
    match distribution:
        case ConstantDistribution(mean=mean):
            value = mean
        case ExponentialDistribution(mean=mean):
            value = rng.expovariate(1.0 / mean)
        case NormalDistribution(mean=mean):
            value = rng.gauss(mean, distribution.sigma)
        case UniformDistribution():
            low, high = distribution.bounds()
            value = rng.uniform(low, high)
        case LognormalDistribution(mean=mean):
            # Moment matching: the mean/std given are those of the durations themselves.
            s2 = math.log1p((distribution.sigma / mean) ** 2)
            value = rng.lognormvariate(math.log(mean) - s2 / 2.0, math.sqrt(s2))
        case _:
            raise TypeError(f"unknown distribution {distribution!r}")
    return min(max(value, 0.0), max_duration_s)


class SimulatedApiArgs(ToolArgs):
    """Arguments; use simulated_api_args_model() for a model with another duration cap."""

    max_duration_s: ClassVar[float] = DEFAULT_MAX_DURATION_S

    duration_s: Seconds | None = Field(
        default=None,
        le=DEFAULT_MAX_DURATION_S,
        description="Fixed time to wait in seconds (give this or distribution).",
    )
    distribution: Distribution | None = Field(
        default=None,
        description=(
            "Distribution to draw the wait from, clipped to [0, cap] (give this or duration_s)."
        ),
    )
    return_tokens: int = Field(
        default=0,
        ge=0,
        le=MAX_RETURN_TOKENS,
        description="Number of filler words to return.",
    )
    seed: int | None = Field(default=None, description="Seed for the distribution draw.")

    @model_validator(mode="after")
    def _one_duration(self) -> SimulatedApiArgs:
        if (self.duration_s is None) == (self.distribution is None):
            raise ValueError("give exactly one of duration_s or distribution")
        mean = getattr(self.distribution, "mean", None)
        if mean is not None and mean > self.max_duration_s:
            raise ValueError(
                f"distribution mean {mean:g} s exceeds the cap of {self.max_duration_s:g} s"
            )
        return self


def simulated_api_args_model(max_duration_s: float) -> type[SimulatedApiArgs]:
    """SimulatedApiArgs with duration_s capped at ``max_duration_s`` (in schema and validation)."""
    if not (max_duration_s > 0 and math.isfinite(max_duration_s)):
        raise ValueError("max_duration_s must be a positive finite number")
    if max_duration_s == DEFAULT_MAX_DURATION_S:
        return SimulatedApiArgs
    fields: dict[str, Any] = {
        "duration_s": (
            Seconds | None,
            Field(
                default=None,
                le=max_duration_s,
                description=SimulatedApiArgs.model_fields["duration_s"].description,
            ),
        )
    }
    model = create_model("SimulatedApiArgs", __base__=SimulatedApiArgs, **fields)
    model.max_duration_s = max_duration_s
    return model


_FILLER_WORDS = (
    "the", "data", "shows", "that", "result", "of", "this", "request", "is", "ready",
    "and", "the", "value", "for", "each", "item", "was", "found", "in", "our",
    "records", "as", "expected",
)  # fmt: skip


def filler_text(num_words: int) -> str:
    """``num_words`` common English words (one tokenizer token each in most vocabularies)."""
    return " ".join(_FILLER_WORDS[i % len(_FILLER_WORDS)] for i in range(num_words))


class SimulatedApi(Tool[SimulatedApiArgs]):
    name: ClassVar[str] = "simulated_api"
    description: ClassVar[str] = (
        "Simulated external API: waits for duration_s seconds, or for a time drawn from "
        "distribution, then returns return_tokens filler words."
    )

    def __init__(self, max_duration_s: float = DEFAULT_MAX_DURATION_S) -> None:
        self.max_duration_s = max_duration_s
        self.args_model = simulated_api_args_model(max_duration_s)
        # The wait can legitimately take the whole cap: let the worker's deadline sit above it.
        self.timeout_s = max_duration_s + 30.0

    def draw_duration(self, args: SimulatedApiArgs) -> float:
        if args.duration_s is not None:
            return args.duration_s
        assert args.distribution is not None  # guaranteed by the model validator
        rng = random.Random(args.seed) if args.seed is not None else random.Random()
        return sample_duration(args.distribution, rng, self.max_duration_s)

    async def __call__(self, args: SimulatedApiArgs) -> ToolOutput:
        await asyncio.sleep(self.draw_duration(args))
        return ToolOutput(output=filler_text(args.return_tokens), num_tokens=args.return_tokens)
