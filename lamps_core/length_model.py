"""A learned forecast of how many tokens a chat segment decodes, and whether it ends in a call.

The scheduler ranks, plans and admits by a segment's predicted decode length. A trace script
carries its own; a chat request has only its prompt. This module maps the prompt to a length:

- `SegmentContext`: what is known of a segment when it is submitted (the last user message, the
  system prompt, the tools offered and the `tool_choice` mode, earlier turns, the tool result
  it follows). Built from the OpenAI messages by `SegmentContext.from_chat`.
- `segment_features`: the context as hashed sparse features (word unigrams and bigrams of the
  user and system texts, the first words of the request, the categorical fields).
- `LengthModel`: softmax regression over `NUM_BINS` length bins of `BIN_TOKENS` tokens (the
  last bin open-ended), as in the LAMPS paper, plus a second softmax head over "no call" and
  the tools seen. Trained by `fit_length_model` (full-batch Adam with L2, numpy only).
- `OutputLengthPredictor`: what the serving layer holds: the model (or, before there is one,
  the running mean of observed lengths per tool-choice mode; before any, nothing, and the
  scheduler keeps its default), a
  bounded buffer of (features, observed length) from completed segments, `refit()` to call in
  the background, and `save` / `load` (an `.npz` file with a format version).

The point estimate is the **expected value** of the bin distribution (each bin stands for the
mean length of its training examples, capped at the segment's token budget). The scheduler's
uses of a decode length add up linearly over requests and tokens: SJF's remaining work, the
decode time in LAMPS's score, admission's promised peak. The expected total of a batch is the
sum of the expected values, whatever the shape of each distribution, while a median (the
estimate with the least absolute error) prices a prompt that usually stops early but sometimes
runs to its limit (a small model looping) as always short. (LAMPS's memory-time grows with the
square of the length; the expected value undershoots that term by half the variance.)

Nothing here imports Ray or vLLM; features are hashed with CRC-32 so they are the same in every
process (Python's `hash` of a string is not).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import threading
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lamps_core.predictors import DEFAULT_DECODE_TOKENS

FORMAT_VERSION = 1
BIN_TOKENS = 10
NUM_BINS = 50
OPEN_BIN_START = BIN_TOKENS * (NUM_BINS - 1)  # the last bin holds every length from here up
FEATURE_DIM = 1 << 13
# Texts are cut before they are featurized, so a forecast costs about the same whatever the
# prompt: the user's message keeps its start (the task: "summarize the following") and its end
# (a question after pasted text), the system prompt its start.
TEXT_END_CHARS = 300
MAX_TOOL_NAME_CHARS = 128
MIN_FEATURE_EXAMPLES = 2
MAX_TRAINED_FEATURES = 4096
MAX_TOOL_CLASSES = 32  # the tool head's classes besides "no call"; further names share OTHER_TOOL
OTHER_TOOL = "<other>"
DEFAULT_BUFFER_SIZE = 4096
DEFAULT_MIN_EXAMPLES = 64
MIN_PRIOR_COUNT = 5  # observations of a mode before its mean is trusted over the overall one
# An `auto` turn is forecast to call when the tool head finds a call likelier than none: the
# scheduler then prices its pause (the likeliest tool's duration) instead of assuming no call.
CALL_FORECAST_PROBABILITY = 0.5

ToolModeKind = Literal["none", "auto", "required", "named"]
ForecastSource = Literal["model", "prior", "default"]
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass(frozen=True, slots=True)
class SegmentContext:
    """What is known of a chat segment before it runs; never the text it will write."""

    user_text: str = ""
    system_text: str = ""
    tools: tuple[str, ...] = ()  # the tools offered to this segment
    tool_mode: ToolModeKind = "none"
    forced_tool: str | None = None  # the tool a named `tool_choice` forces
    earlier_turns: int = 0  # user messages before the last one
    segment_index: int = 0  # 0: the first segment; n: after n tool calls
    after_tool: str | None = None  # the tool whose result the conversation ends with
    after_tool_failed: bool = False

    @classmethod
    def from_chat(
        cls,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[str],
        mode: str,
        segment_index: int,
    ) -> SegmentContext:
        """The context of the segment that answers `messages` (OpenAI chat messages), offered
        `tools` under `mode` (`none`, `auto`, `required`, or a tool's name)."""
        user_texts = [_text(m) for m in messages if m.get("role") == "user"]
        system_texts = [_text(m) for m in messages if m.get("role") == "system"]
        last = messages[-1] if messages else {}
        after_tool = None
        failed = False
        if last.get("role") == "tool":
            after_tool = _name(last.get("name")) or OTHER_TOOL
            failed = _text(last).startswith("error:")  # how chat_session words a failed call
        kind: ToolModeKind = mode if mode in ("none", "auto", "required") else "named"  # type: ignore[assignment]
        return cls(
            user_text=_ends(user_texts[-1] if user_texts else ""),
            system_text=(system_texts[0] if system_texts else "")[:TEXT_END_CHARS],
            tools=tuple(_name(t) for t in tools),
            tool_mode=kind,
            forced_tool=_name(mode) if kind == "named" else None,
            earlier_turns=max(len(user_texts) - 1, 0),
            segment_index=segment_index,
            after_tool=after_tool,
            after_tool_failed=failed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentContext:
        return cls(**{**data, "tools": tuple(data.get("tools") or ())})


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _ends(text: str) -> str:
    if len(text) <= 2 * TEXT_END_CHARS:
        return text
    return f"{text[:TEXT_END_CHARS]} {text[-TEXT_END_CHARS:]}"


def _name(value: Any) -> str:
    return str(value or "")[:MAX_TOOL_NAME_CHARS]


def _bucket(n: int) -> int:
    """0, 1, 2-3, 4-7, ...: counts as coarse powers of two."""
    return n.bit_length()


def _hashed(key: str) -> int:
    return zlib.crc32(key.encode()) % FEATURE_DIM


@dataclass(frozen=True, slots=True)
class SparseFeatures:
    indices: np.ndarray  # int32, hashed feature ids (repeats add up)
    values: np.ndarray  # float32


def segment_features(context: SegmentContext) -> SparseFeatures:
    """Hashed sparse features. Categorical fields weigh 1; a text's n-grams weigh 1/sqrt(n)
    together, so a long prompt does not outvote the mode and tools."""
    keys = [
        f"mode={context.tool_mode}",
        f"seg={min(context.segment_index, 3)}",
        f"turns={min(context.earlier_turns, 4)}",
        f"ntools={min(len(context.tools), 4)}",
        f"after={context.after_tool}",
        f"after_failed={context.after_tool_failed}",
        f"mode={context.tool_mode}&seg={min(context.segment_index, 3)}",
    ]
    keys += [f"tool={t}" for t in context.tools]
    if context.forced_tool is not None:
        keys.append(f"forced={context.forced_tool}")
    user = _WORD.findall(_ends(context.user_text).lower())
    system = _WORD.findall(context.system_text[:TEXT_END_CHARS].lower())
    keys.append(f"ulen={_bucket(len(user))}")
    keys.append(f"slen={_bucket(len(system))}")
    # The first words name the task ("write a story", "list", "is it", "translate").
    keys += [f"u@{i}={w}" for i, w in enumerate(user[:3])]
    categorical = len(keys)
    user_grams = [f"u={w}" for w in user] + [f"u={a}_{b}" for a, b in itertools.pairwise(user)]
    system_grams = [f"s={w}" for w in system] + [
        f"s={a}_{b}" for a, b in itertools.pairwise(system)
    ]
    keys += user_grams + system_grams
    values = np.ones(len(keys), dtype=np.float32)
    if user_grams:
        values[categorical : categorical + len(user_grams)] = 1 / math.sqrt(len(user_grams))
    if system_grams:
        values[categorical + len(user_grams) :] = 1 / math.sqrt(len(system_grams))
    indices = np.fromiter((_hashed(k) for k in keys), dtype=np.int32, count=len(keys))
    return SparseFeatures(indices, values)


def length_bin(tokens: int) -> int:
    return min(max(tokens, 0) // BIN_TOKENS, NUM_BINS - 1)


@dataclass(frozen=True, slots=True)
class LengthExample:
    """One completed segment: its features, what it decoded, and the tool it called (if any)."""

    features: SparseFeatures
    decode_tokens: int
    tool: str | None = None


@dataclass(frozen=True, slots=True)
class LengthForecast:
    decode_tokens: int  # the point estimate (expected value), within the segment's budget
    source: ForecastSource
    call_probability: float | None = None  # the tool head's P(the segment ends in a call)
    tool: str | None = None  # the likeliest tool, should it call one


def forecast_call(forecast: LengthForecast, context: SegmentContext) -> str | None:
    """The tool an `auto` segment is forecast to call: the tool head's likeliest, when a call
    is likelier than none and that tool is offered; None otherwise, for any other mode (a
    forced call is known, not forecast) and before a model is fitted (no tool head)."""
    if context.tool_mode != "auto" or forecast.tool not in context.tools:
        return None
    return (
        forecast.tool if (forecast.call_probability or 0.0) >= CALL_FORECAST_PROBABILITY else None
    )


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    steps: int = 300
    learning_rate: float = 0.05
    l2: float = 1e-3  # on the weights (not the biases), per example-averaged loss
    min_examples: int = DEFAULT_MIN_EXAMPLES


@dataclass
class LengthModel:
    """Two softmax regressions on one set of hashed features: the length bin, and the tool
    (class 0: no call). Weights are stored for the features seen in training only."""

    columns: np.ndarray  # int32 (u,), the hashed feature ids with weights, sorted
    length_weights: np.ndarray  # float32 (u, NUM_BINS)
    length_bias: np.ndarray  # float32 (NUM_BINS,)
    bin_tokens: np.ndarray  # float32 (NUM_BINS,): the length each bin stands for
    tool_names: tuple[str, ...]  # the tool head's classes after "no call"
    tool_weights: np.ndarray  # float32 (u, 1 + len(tool_names))
    tool_bias: np.ndarray
    examples: int  # trained on
    _row_of: np.ndarray = field(init=False, repr=False)  # hashed id -> row + 1 (0: no weight)

    def __post_init__(self) -> None:
        # A model read from a file is checked whole: a bad one fails at load, not per request.
        u, tool_classes = len(self.columns), 1 + len(self.tool_names)
        shapes = (
            self.length_weights.shape,
            self.length_bias.shape,
            self.bin_tokens.shape,
            self.tool_weights.shape,
            self.tool_bias.shape,
        )
        expected = ((u, NUM_BINS), (NUM_BINS,), (NUM_BINS,), (u, tool_classes), (tool_classes,))
        if shapes != expected:
            raise ValueError(f"length model arrays have shapes {shapes}, expected {expected}")
        if u and (self.columns.min() < 0 or self.columns.max() >= FEATURE_DIM):
            raise ValueError("length model feature ids out of range")
        if not all(np.isfinite(a).all() for a in self.to_arrays().values()):
            raise ValueError("length model weights are not all finite")
        self._row_of = np.zeros(FEATURE_DIM, dtype=np.int32)
        self._row_of[self.columns] = np.arange(1, len(self.columns) + 1, dtype=np.int32)

    def _logits(self, features: SparseFeatures) -> tuple[np.ndarray, np.ndarray]:
        rows = self._row_of[features.indices]
        known = rows > 0
        rows, values = rows[known] - 1, features.values[known]
        length = self.length_bias + values @ self.length_weights[rows]
        tool = self.tool_bias + values @ self.tool_weights[rows]
        return length, tool

    def bin_probabilities(self, features: SparseFeatures) -> np.ndarray:
        return _softmax(self._logits(features)[0])

    def forecast(self, features: SparseFeatures, budget: int | None = None) -> LengthForecast:
        length_logits, tool_logits = self._logits(features)
        probabilities = _softmax(length_logits)
        tokens = self.bin_tokens if budget is None else np.minimum(self.bin_tokens, budget)
        expected = float(probabilities @ tokens)
        tool_probabilities = _softmax(tool_logits)
        likeliest = int(np.argmax(tool_probabilities[1:])) if self.tool_names else None
        return LengthForecast(
            decode_tokens=max(round(expected), 1),
            source="model",
            call_probability=float(1.0 - tool_probabilities[0]),
            tool=self.tool_names[likeliest] if likeliest is not None else None,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "columns": self.columns,
            "length_weights": self.length_weights,
            "length_bias": self.length_bias,
            "bin_tokens": self.bin_tokens,
            "tool_weights": self.tool_weights,
            "tool_bias": self.tool_bias,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def fit_length_model(
    examples: Sequence[LengthExample], settings: TrainingSettings | None = None
) -> LengthModel:
    """Both heads by full-batch Adam on the mean cross-entropy plus L2 on the weights, over
    the features common enough to learn from (`_design_matrix`)."""
    settings = settings or TrainingSettings()
    if not examples:
        raise ValueError("no examples to fit a length model on")
    lengths = np.array([e.decode_tokens for e in examples], dtype=np.int64)
    bins = np.minimum(lengths // BIN_TOKENS, NUM_BINS - 1)
    tool_names = _tool_classes(examples)
    tool_class = {name: i + 1 for i, name in enumerate(tool_names)}
    other = tool_class.get(OTHER_TOOL, 0)
    tools = np.array([0 if e.tool is None else tool_class.get(e.tool, other) for e in examples])
    columns, matrix = _design_matrix([e.features for e in examples])
    n = len(examples)
    length_targets = np.zeros((n, NUM_BINS), dtype=np.float32)
    length_targets[np.arange(n), bins] = 1.0
    tool_targets = np.zeros((n, 1 + len(tool_names)), dtype=np.float32)
    tool_targets[np.arange(n), tools] = 1.0
    [(length_weights, length_bias), (tool_weights, tool_bias)] = _fit_softmax(
        matrix, [length_targets, tool_targets], settings
    )
    return LengthModel(
        columns=columns,
        length_weights=length_weights,
        length_bias=length_bias,
        bin_tokens=_bin_tokens(lengths, bins),
        tool_names=tool_names,
        tool_weights=tool_weights,
        tool_bias=tool_bias,
        examples=n,
    )


def _tool_classes(examples: Sequence[LengthExample]) -> tuple[str, ...]:
    counts: dict[str, int] = {}
    for e in examples:
        if e.tool is not None:
            counts[e.tool] = counts.get(e.tool, 0) + 1
    names = sorted(counts, key=lambda name: (-counts[name], name))
    if len(names) > MAX_TOOL_CLASSES:
        names = [*names[: MAX_TOOL_CLASSES - 1], OTHER_TOOL]
    return tuple(names)


def _bin_tokens(lengths: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Each bin's mean training length; a bin nobody fell in stands for its middle."""
    tokens = np.arange(NUM_BINS, dtype=np.float64) * BIN_TOKENS + BIN_TOKENS / 2
    sums = np.bincount(bins, weights=lengths, minlength=NUM_BINS)
    counts = np.bincount(bins, minlength=NUM_BINS)
    seen = counts > 0
    tokens[seen] = sums[seen] / counts[seen]
    return tokens.astype(np.float32)


def _design_matrix(rows: Sequence[SparseFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """(columns, X): the hashed ids trained on and the examples over them, dense. Only ids
    that at least `MIN_FEATURE_EXAMPLES` examples have are kept (one seen once can only
    memorize its example), at most `MAX_TRAINED_FEATURES` of the most common: X stays a dense
    matrix small enough (64 MiB at most for 4,096 examples) that each step is two BLAS
    products, several times faster than numpy's scatter-gather on the sparse entries."""
    sizes = np.array([len(r.indices) for r in rows])
    row_ids = np.repeat(np.arange(len(rows)), sizes)
    indices = np.concatenate([r.indices for r in rows]).astype(np.int64)
    values = np.concatenate([r.values for r in rows]).astype(np.float32)
    present = np.unique(row_ids * FEATURE_DIM + indices) % FEATURE_DIM  # (example, id) pairs
    examples_with = np.bincount(present, minlength=FEATURE_DIM)
    common = np.flatnonzero(examples_with >= MIN_FEATURE_EXAMPLES)
    if len(common) > MAX_TRAINED_FEATURES:
        by_count = np.argsort(-examples_with[common], kind="stable")
        common = np.sort(common[by_count[:MAX_TRAINED_FEATURES]])
    local = np.full(FEATURE_DIM, -1, dtype=np.int64)
    local[common] = np.arange(len(common))
    kept = local[indices] >= 0
    matrix = np.zeros((len(rows), len(common)), dtype=np.float32)
    np.add.at(matrix, (row_ids[kept], local[indices[kept]]), values[kept])
    return common.astype(np.int32), matrix


def _fit_softmax(
    matrix: np.ndarray, targets: Sequence[np.ndarray], settings: TrainingSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One softmax regression per target block, trained together: one sparse product per
    step serves every head. Returns each head's (weights, biases)."""
    n = len(targets[0])
    blocks = np.cumsum([0] + [t.shape[1] for t in targets])
    stacked = np.concatenate(targets, axis=1)
    weights = np.zeros((matrix.shape[1], blocks[-1]), dtype=np.float32)
    # The biases start at the (smoothed) class frequencies: step 0 already predicts the mean.
    bias = np.log(stacked.mean(axis=0) + 1e-3).astype(np.float32)
    params = [weights, bias]
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, settings.steps + 1):
        logits = matrix @ weights + bias
        for lo, hi in itertools.pairwise(blocks):
            logits[:, lo:hi] = _softmax(logits[:, lo:hi])
        residual = (logits - stacked) / np.float32(n)
        gradients = [matrix.T @ residual + settings.l2 * weights, residual.sum(0)]
        for p, g, m, v in zip(params, gradients, first, second, strict=True):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            p -= (
                settings.learning_rate
                * (m / (1 - beta1**step))
                / (np.sqrt(v / (1 - beta2**step)) + eps)
            )
    return [(weights[:, lo:hi].copy(), bias[lo:hi].copy()) for lo, hi in itertools.pairwise(blocks)]


@dataclass
class _RunningMean:
    count: int = 0
    total: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def _mode_group(context: SegmentContext) -> str:
    """The prior's groups: a forced call is a few dozen tokens of JSON, a free answer is not."""
    return "forced" if context.tool_mode in ("required", "named") else context.tool_mode


class OutputLengthPredictor:
    """The serving layer's forecaster: `predict` on the request path, `observe` when a segment
    completes, `refit` in the background, `save` / `load` to survive restarts.

    Before a model is fitted (or with fewer than `min_examples` observations) it predicts the
    running mean of observed lengths of the segment's tool-choice group (forced call, `auto`,
    `none`) once that has `MIN_PRIOR_COUNT` observations, else of all segments, else
    `default_tokens` (and `predict_decode_tokens` None: nothing to tell the scheduler).
    Thread-safe: `refit` may run in a worker thread while the event loop predicts and
    observes."""

    def __init__(
        self,
        model: LengthModel | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        training: TrainingSettings | None = None,
        default_tokens: int = DEFAULT_DECODE_TOKENS,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.model = model
        self.training = training or TrainingSettings()
        self.default_tokens = default_tokens
        self._buffer: deque[LengthExample] = deque(maxlen=buffer_size)
        self._prior: dict[str, _RunningMean] = {}
        self._overall = _RunningMean()
        self._lock = threading.Lock()
        self.new_examples = 0  # observed since the last fit

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def buffer_size(self) -> int:
        return self._buffer.maxlen or 0

    def predict(self, context: SegmentContext, budget: int | None = None) -> LengthForecast:
        model = self.model  # one read: a refit may swap it meanwhile
        if model is not None:
            return model.forecast(segment_features(context), budget)
        group = self._prior.get(_mode_group(context))
        if group is not None and group.count >= MIN_PRIOR_COUNT:
            tokens, source = group.mean, "prior"
        elif self._overall.count:
            tokens, source = self._overall.mean, "prior"
        else:
            tokens, source = float(self.default_tokens), "default"
        if budget is not None:
            tokens = min(tokens, budget)
        return LengthForecast(decode_tokens=max(round(tokens), 1), source=source)  # type: ignore[arg-type]

    def predict_decode_tokens(
        self, context: SegmentContext, budget: int | None = None
    ) -> int | None:
        """The forecast for the scheduler, or None before anything was observed: then the
        policy's own default applies (`PredictionDefaults`, which a policy may configure)."""
        forecast = self.predict(context, budget)
        return None if forecast.source == "default" else forecast.decode_tokens

    def predict_call(self, context: SegmentContext) -> str | None:
        """`forecast_call` of this segment's forecast."""
        return forecast_call(self.predict(context), context)

    def observe(
        self, context: SegmentContext, decode_tokens: int, tool: str | None, truncated: bool
    ) -> bool:
        """Record a completed segment; returns whether it was kept. A segment its token budget
        cut short below the open bin says only "at least this long", which would teach the
        model the client's limit: it is left out."""
        if decode_tokens < 1 or (truncated and decode_tokens < OPEN_BIN_START):
            return False
        example = LengthExample(segment_features(context), decode_tokens, tool)
        with self._lock:
            self._buffer.append(example)
            self._prior.setdefault(_mode_group(context), _RunningMean()).add(decode_tokens)
            self._overall.add(decode_tokens)
            self.new_examples += 1
        return True

    def refit(self) -> bool:
        """Train a new model on the buffer and put it in place of the old one (if there are at
        least `training.min_examples`); returns whether it did."""
        with self._lock:
            examples = list(self._buffer)
            seen = self.new_examples
        if len(examples) < self.training.min_examples:
            return False
        model = fit_length_model(examples, self.training)
        with self._lock:
            self.model = model
            self.new_examples -= seen
        return True

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write model, buffer (hashed features only, never text) and prior to `path`,
        atomically (a reader sees the old file or the new one)."""
        with self._lock:
            examples = list(self._buffer)
            prior = {k: asdict(v) for k, v in self._prior.items()}
            overall = asdict(self._overall)
        model = self.model
        meta = {
            "format_version": FORMAT_VERSION,
            "feature_dim": FEATURE_DIM,
            "bin_tokens": BIN_TOKENS,
            "num_bins": NUM_BINS,
            "buffer_size": self.buffer_size,
            "default_tokens": self.default_tokens,
            "prior": prior,
            "overall": overall,
            "model": None
            if model is None
            else {"tool_names": list(model.tool_names), "examples": model.examples},
            "buffer_tools": [e.tool for e in examples],
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        if model is not None:
            arrays |= {f"model_{k}": v for k, v in model.to_arrays().items()}
        if examples:
            arrays |= {
                "buffer_sizes": np.array([len(e.features.indices) for e in examples], np.int32),
                "buffer_indices": np.concatenate([e.features.indices for e in examples]),
                "buffer_values": np.concatenate([e.features.values for e in examples]),
                "buffer_tokens": np.array([e.decode_tokens for e in examples], np.int32),
            }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = io.BytesIO()
        np.savez_compressed(payload, **arrays)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        partial.write_bytes(payload.getvalue())
        os.replace(partial, target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        buffer_size: int | None = None,
        training: TrainingSettings | None = None,
    ) -> OutputLengthPredictor:
        """Read what `save` wrote (keeping the newest `buffer_size` examples, default: as
        saved); ValueError if it is another format or another feature space (its weights
        would be read against the wrong features)."""
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays["meta"]))
        layout = (meta.get("format_version"), meta.get("feature_dim"), meta.get("bin_tokens"))
        if layout != (FORMAT_VERSION, FEATURE_DIM, BIN_TOKENS) or meta.get("num_bins") != NUM_BINS:
            raise ValueError(f"{path}: length model format {layout} is not this one's")
        predictor = cls(
            buffer_size=buffer_size or int(meta["buffer_size"]),
            training=training,
            default_tokens=int(meta["default_tokens"]),
        )
        if meta["model"] is not None:
            predictor.model = LengthModel(
                columns=arrays["model_columns"],
                length_weights=arrays["model_length_weights"],
                length_bias=arrays["model_length_bias"],
                bin_tokens=arrays["model_bin_tokens"],
                tool_names=tuple(meta["model"]["tool_names"]),
                tool_weights=arrays["model_tool_weights"],
                tool_bias=arrays["model_tool_bias"],
                examples=int(meta["model"]["examples"]),
            )
        if "buffer_sizes" in arrays:
            ends = np.cumsum(arrays["buffer_sizes"])
            starts = ends - arrays["buffer_sizes"]
            for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
                features = SparseFeatures(
                    arrays["buffer_indices"][start:end], arrays["buffer_values"][start:end]
                )
                tool = meta["buffer_tools"][i]
                predictor._buffer.append(
                    LengthExample(features, int(arrays["buffer_tokens"][i]), tool)
                )
        predictor._prior = {k: _RunningMean(**v) for k, v in meta["prior"].items()}
        predictor._overall = _RunningMean(**meta["overall"])
        return predictor
