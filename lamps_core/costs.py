"""What one engine's work costs in time and memory: the constants INFERCEPT's waste formulas and
LAMPS's memory-over-time score are written in.

The engine profiler measures these on the replica actually serving (prefill and swap timings at a
few sizes, fitted robustly by `fit_linear`; `M` from the model config) and caches them on disk as
the dict of `EngineCosts.to_dict`, so every value here is a plain number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

# INFERCEPT's chunk size for chunked recompute: the batch size (tokens) at which a forward pass
# saturates the GPU, so a recompute chunk up to it rides along with the batch almost for free.
DEFAULT_SATURATION_TOKENS = 384


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """M: the KV cache one token occupies, a key and a value vector per layer and KV head."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


# At most this many size groups enter the pairwise slopes (so a fit costs < 1 ms of Python).
_FIT_GROUPS = 32


def fit_linear(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """A robust `(intercept, slope)` of seconds against tokens, both >= 0.

    Timings taken on a serving engine have outliers: the first forward pass after start-up, a
    step that shared the CPU with something else. One such point at a small size tilts a
    least-squares line flat or negative, which makes every prefill look equally expensive. So:
    the median time of each size (sizes binned into at most `_FIT_GROUPS` groups), then the
    Theil-Sen line through those medians: the median of the pairwise slopes, the intercept the
    median residual. Time never falls with size: a negative slope becomes a flat line at the
    median time. With one distinct size there is no slope to fit: a profiling mistake, raised.
    """
    if len(points) < 2:
        raise ValueError(f"a linear fit needs at least 2 points, got {len(points)}")
    by_size: dict[float, list[float]] = {}
    for x, y in points:
        by_size.setdefault(float(x), []).append(y)
    if len(by_size) < 2:
        raise ValueError("a linear fit needs at least 2 distinct token counts")
    sizes = sorted(by_size)
    per_group = math.ceil(len(sizes) / _FIT_GROUPS)
    groups = [sizes[i : i + per_group] for i in range(0, len(sizes), per_group)]
    medians = [
        (statistics.median(group), statistics.median(y for x in group for y in by_size[x]))
        for group in groups
    ]
    slope = statistics.median(
        (y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(medians) for x2, y2 in medians[i + 1 :]
    )
    if slope <= 0.0:
        return statistics.median(y for _, y in medians), 0.0
    intercept = statistics.median(y - slope * x for x, y in medians)
    return max(intercept, 0.0), slope


@dataclass(frozen=True, slots=True)
class StepSample:
    """One engine step: what it ran and how long it took."""

    prefill_tokens: int
    decode_requests: int
    decode_context_tokens: int  # the contexts the decoding requests attend over
    seconds: float


def fit_decode_step(samples: Sequence[StepSample]) -> float | None:
    """The time of one decode iteration of the batch as it runs now, fitted over every recent
    step that decoded (mixed steps too), not only the decode-only ones: under load nearly every
    step also prefills, and the few decode-only steps left are the light ones, so their median
    stays low while real steps slow down.

    Least squares of `seconds = a + b·prefill + c·batch + e·context`, refitted once without the
    steps whose residual is over 3 median absolute deviations (a step that shared the machine),
    coefficients clipped at zero (time never falls with work); the decode step is the fit at the
    window's mean batch and context, with no prefill. None with too few steps or too little
    variety to fit (the caller keeps its last figure)."""
    import numpy as np

    rows = [s for s in samples if s.decode_requests > 0 and s.seconds > 0]
    if len(rows) < 16:
        return None
    x = np.array(
        [[1.0, s.prefill_tokens, s.decode_requests, s.decode_context_tokens] for s in rows]
    )
    y = np.array([s.seconds for s in rows])
    keep = np.ones(len(rows), dtype=bool)
    coef = np.zeros(4)
    for _ in range(2):
        if np.linalg.matrix_rank(x[keep]) < 2:
            return None
        coef, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        residual = np.abs(y - x @ coef)
        spread = float(np.median(residual[keep])) or 1e-12
        keep = residual <= 3 * 1.4826 * spread + 1e-12
    coef = np.maximum(coef, 0.0)
    decoding = x[keep] if keep.any() else x
    batch, context = decoding[:, 2].mean(), decoding[:, 3].mean()
    step = float(coef[0] + coef[2] * batch + coef[3] * context)
    if not math.isfinite(step) or step <= 0.0:
        return None
    return step


@dataclass(frozen=True, slots=True)
class EngineCosts:
    """Time and memory constants of one engine (model, GPU, parallelism).

    `t_fwd` and `t_swap` are the linear fits INFERCEPT profiles. `decode_step_s` is separate
    because one decode step of a whole batch is not the prefill of one token: prefill's slope is
    per token of a long sequence, a decode step is dominated by reading the weights once.
    """

    kv_bytes_per_token: int  # M
    fwd_intercept_s: float  # T_fwd(C) = fwd_intercept_s + fwd_slope_s · C
    fwd_slope_s: float
    swap_slope_s: float  # T_swap(C) = swap_intercept_s + swap_slope_s · C, one way
    decode_step_s: float  # wall time of one decode iteration of the batch
    swap_intercept_s: float = 0.0
    saturation_tokens: int = DEFAULT_SATURATION_TOKENS

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token must be >= 1, got {self.kv_bytes_per_token}")
        if self.saturation_tokens < 1:
            raise ValueError(f"saturation_tokens must be >= 1, got {self.saturation_tokens}")
        for name in (
            "fwd_intercept_s",
            "fwd_slope_s",
            "swap_intercept_s",
            "swap_slope_s",
            "decode_step_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def t_fwd(self, tokens: float) -> float:
        """Seconds to prefill `tokens` tokens; nothing runs (0 s) for none."""
        if tokens <= 0:
            return 0.0
        return self.fwd_intercept_s + self.fwd_slope_s * tokens

    def t_swap(self, tokens: float) -> float:
        """Seconds to copy `tokens` tokens' KV one way between GPU and host; 0 s for none."""
        if tokens <= 0:
            return 0.0
        return self.swap_intercept_s + self.swap_slope_s * tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineCosts:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown engine cost field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def coerce(cls, value: EngineCosts | Mapping[str, Any]) -> EngineCosts:
        """Costs given as an object (the profiler) or a dict (a Serve config pinning them)."""
        if isinstance(value, EngineCosts):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(f"costs must be EngineCosts or a mapping, got {type(value).__name__}")


# The INFERCEPT artifact's GPT-J 6B on one A100, fp16: T_fwd a = 0.0463 ms/token, c = 10 ms;
# per-token swap latency 40 µs from its scheduler; M = 2·28 layers·16 heads·256·2 bytes. The decode
# step is an assumption (about 30 ms for a batch of that model). For simulations and benchmarks;
# a serving engine uses its own profile.
GPTJ_6B_ARTIFACT = EngineCosts(
    kv_bytes_per_token=kv_bytes_per_token(28, 16, 256, 2),
    fwd_intercept_s=0.010,
    fwd_slope_s=0.0463e-3,
    swap_slope_s=4e-5,
    decode_step_s=0.030,
)
