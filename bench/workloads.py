"""Workloads for `lamps bench`: trace files in the INFERCEPT/MARS format, and seeded generators.

Files
-----
`read_trace` / `write_trace` use the artifacts' format unchanged: one JSON object, request id ->
list of segments `{"prompt_tokens", "completion_tokens", "api_time", "api_token_length"}` (the last
segment without the API fields), plus the optional `api_type` we allow. Arrival times are not part
of that format, so `write_trace` puts them (and the generator's parameters, `Trace.info`) in a
*sidecar file* next to the trace, `NAME.arrivals.json` for `NAME.json`, instead of a key inside
the trace: the artifacts' loaders iterate every top-level key as a request, and an extra key would
break them. The trace file itself therefore stays readable by the artifacts' own scripts.
`read_trace` picks the sidecar up when it exists; without one (an artifact file) the requests have
no arrival times and `with_poisson_arrivals(trace, rate, seed)` gives them some.

The artifacts' own files are read as they are (`read_trace`'s keywords), with the rules their
loaders follow (InferCept's `benchmarks/final_tput_bench_real.py`):

- Text instead of counts. A segment may carry `prompt`, `completion` and `api_token` strings
  instead of (or beside) `prompt_tokens`, `completion_tokens` and `api_token_length`. A number
  wins where both are given, as in the artifacts. Text is counted with `count_tokens(text)` (the
  served model's tokenizer, `lamps bench` passes it) or, without one, as
  ceil(characters / `chars_per_token`), 4.0 by default: the usual figure for English text under
  GPT- and Llama-style BPE vocabularies, and these traces are English (GSM8K, HotpotQA, ALFWorld,
  ShareGPT). A counted completion of 0 tokens (empty text) becomes 1: the engine must decode
  something.
- Contexts are cumulative. `TraceScript` requires segment i+1's `prompt_tokens` to be prompt_i +
  completion_i + api_token_length_i. A later segment's `prompt_tokens` is therefore *computed*
  that way, not read, when the file gives it no number, or when an earlier length of the same
  request was counted from text or clamped: a later `prompt` text holds the whole context so far,
  and tokenizing it on its own would disagree with the sum of its parts (token boundaries merge
  across the seams). The artifacts do the same: they use only the first segment's prompt length
  and grow the context by what is decoded and returned. A request given in numbers only must
  add up, as before.
- `api_token_length < 0` (seen in the artifacts' files) is clamped to 0 and counted.
- A call on the last segment: `last_call="drop"` (default) removes its call fields, so the
  request ends there; `"run"` keeps the call and appends a segment decoding 1 token after it, as
  the artifacts do (they resume a request whose segments ran out with one more step). A call of
  0 s returning 0 tokens is no call to the artifacts, so it is dropped in either mode.

What was converted, computed, clamped and dropped is in `Trace.info["reader"]`.
`sample_requests` takes the first n requests in file order or after a seeded shuffle, and
`with_time_scale` multiplies every call's duration (`lamps bench --sample`, `--time-scale`).

Generators
----------
Every generator takes `(n, rate, seed, *, scale=1.0, time_scale=None, max_context=None)`, draws
request contents from `random.Random(seed)` and arrivals from a separate stream seeded by `seed`,
so one seed gives the same requests at every rate of a sweep. The INFERCEPT table (LAMPS.md,
"Workloads") gives per augmentation type the API time mean and spread, the calls per request and
the context length. It does not publish how that context splits into prompt, decode and API
returns, nor per-segment decode lengths, so those are our choices, made to be plausible for each
source and to reproduce the table's means:

- `context_tokens` is read as the mean context a request ends with (prompt + every decode + every
  API return) when it makes the table's mean number of calls. Per type we pick a mean decode
  length per segment and a mean API return per call (`decode_tokens`, `return_tokens`, see
  `AUGMENTATION_TYPES`); the mean prompt is what is left, so the means add up to the table.
- API time: gamma with the table's mean and, as standard deviation, the table's second figure.
  LAMPS.md labels it "var (s)"; read as a variance (s²), the calculator's calls would have a
  standard deviation 86 times their mean, so we read it as a standard deviation in seconds, which
  gives coefficients of variation of 0.15 to 0.67 across the six types. Gamma keeps durations
  positive and right-skewed with exactly that mean and spread (a clipped normal would shift the
  mean).
- Calls per request (`multi_api`): 1 + Poisson(mean - 1): at least one call, the table's mean.
- Decode tokens per segment: gamma with shape 2 (coefficient of variation 0.71), rounded, at least
  1: LLM output lengths are long-tailed, and the spread of job sizes is what lets a size-aware
  order matter. Prompt and API-return tokens: uniform within ±50 % of the mean, rounded (prompts of
  these sources are mostly a fixed few-shot template plus a question; tool outputs vary less).
- `toolbench_like`: the multi-call ToolBench shape of ../shared/gpu/README.md: 1 + Poisson(3)
  calls (mean 4), prompt ~540 tokens, ~370 decoded tokens per request (74 per segment over a mean
  of 5 segments), 50 returned tokens per call (our choice), and each call picks one of five tool
  classes with means 4 to 20 s (average 12 s, each with a standard deviation of half its mean), so
  a per-tool duration estimate has something to learn.

Families with the statistics of two published multi-call traces on which LAMPS lost (issue 24),
and one made for where its ranking should matter; our generators (`FAMILIES`, `Population`), not
copies of those files. Call durations are in the traces' own seconds, capped at 60 s before any
time scaling, as the traces cap them; the issue read both traces with `--time-scale 0.1`, so
`--time-scale 0.1` reproduces its ~1.2 s and ~0.8 s calls. Each call is recorded under a name of
`lamps_core.api_types.API_TYPE_NAMES`, one distribution per name in all three (`CALL_KINDS`).

- `multicall`: 1 + Poisson(3.2) calls (4.2), ~12 s a call: 17 % calculator calls under 10 ms,
  15 % environment steps (0.09 s), 25 % searches (0.69 s), 43 % long calls (log-normal, median
  22 s, 13 % of them at the cap: 5.7 % of all calls); prompt ~511 tokens, ~397 output tokens a
  request (76 a segment), 40 returned a call (ours), contexts capped at 2,048 tokens.
- `onecall`: one call a request, ~8 s (71 % searches, 29 % long calls as above), 2 x 92 output
  tokens (184), prompt ~350 and 30 returned tokens (ours: the trace's figures we had were calls
  and output only).
- `longcalls`: half holders (prompt ~2,800 tokens ±15 %, 1 + Poisson(0.5) calls of ~20 s,
  INFERCEPT's image generator; 32 tokens a segment), half talkers (prompt ~120 tokens,
  1 + Poisson(1) searches of ~0.7 s, 120 tokens a segment), contexts capped at 4,000. Shortest
  output first runs holders first (~80 output tokens against ~360); memory over time (their
  ~2.9k-token contexts held through decodes, and through calls where they are preserved) runs
  talkers first. Where LAMPS and SJF should part.

`scale` multiplies every token mean (prompt, decodes, returns) and, unless `time_scale` is given,
every API duration, before drawing: a CPU run of a tiny model with a KV cache of a few thousand
tokens uses e.g. `scale=0.1` (toolbench: ~110-token contexts, ~1.2 s calls). The number of calls
is not scaled. `max_context` caps every request's final context: a longer draw is shrunk
proportionally, then loses calls from its end until it fits.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lamps_core.api_types import (
    AUGMENTATION_TYPES,
    CHARS_PER_TOKEN,
    TOOLBENCH,
    TOOLBENCH_TOOLS,
    AugmentationType,
)
from lamps_core.trace import MAX_API_TIME_S, TraceScript, TraceSegment

# The call kinds above live in lamps_core.api_types, which serving may import; this module is
# benchmark input only (no production code imports it).
SIDECAR_FORMAT = "lamps-trace-sidecar/1"
LastCall = Literal["drop", "run"]
Sample = Literal["inorder", "shuffle"]
# The artifacts' text fields, and the count each one stands for.
_TEXT_FIELDS = {
    "prompt": "prompt_tokens",
    "completion": "completion_tokens",
    "api_token": "api_token_length",
}
_CALL_FIELDS = ("api_time", "api_token_length", "api_type")
DECODE_GAMMA_SHAPE = 2.0
UNIFORM_HALF_WIDTH = 0.5


class TraceFormatError(ValueError):
    """A trace file that is not valid; the message names the file, request and segment."""


# --------------------------------------------------------------------------------------------
# The trace model


class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1)
    arrival_time: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="Seconds after the run starts; None when the file had no arrival times.",
    )
    script: TraceScript


class Trace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[TraceRequest] = Field(min_length=1)
    info: dict[str, Any] = Field(
        default_factory=dict, description="How the trace was made (generator and parameters)."
    )

    @model_validator(mode="after")
    def _ids_and_arrivals(self) -> Trace:
        seen: set[str] = set()
        for req in self.requests:
            if req.request_id in seen:
                raise ValueError(f"request id {req.request_id!r} appears twice")
            seen.add(req.request_id)
        with_arrival = sum(req.arrival_time is not None for req in self.requests)
        if 0 < with_arrival < len(self.requests):
            raise ValueError(
                f"{with_arrival} of {len(self.requests)} requests have an arrival time: "
                "give all of them one, or none"
            )
        return self

    @property
    def has_arrivals(self) -> bool:
        return self.requests[0].arrival_time is not None

    def __len__(self) -> int:
        return len(self.requests)


def trace_stats(trace: Trace) -> dict[str, float]:
    """Means of a trace, per request unless named per call: for logs and run configs."""
    scripts = [req.script for req in trace.requests]
    calls = [seg for s in scripts for seg in s.segments if seg.has_api_call]
    n = len(scripts)
    stats = {
        "requests": float(n),
        "calls_per_request": len(calls) / n,
        "api_time_per_call_s": (sum(seg.api_time or 0.0 for seg in calls) / len(calls))
        if calls
        else 0.0,
        "api_time_per_request_s": sum(s.total_api_time for s in scripts) / n,
        "prompt_tokens": sum(s.segments[0].prompt_tokens for s in scripts) / n,
        "output_tokens": sum(seg.completion_tokens for s in scripts for seg in s.segments) / n,
        "returned_tokens": sum(seg.api_token_length or 0 for seg in calls) / n,
        "context_tokens": sum(s.total_tokens for s in scripts) / n,
        "max_context_tokens": float(max(s.total_tokens for s in scripts)),
    }
    if trace.has_arrivals:
        stats["last_arrival_s"] = max(req.arrival_time or 0.0 for req in trace.requests)
    return stats


# --------------------------------------------------------------------------------------------
# Files


def sidecar_path(path: str | Path) -> Path:
    """Where the arrival times of the trace at `path` live: `x.json` -> `x.arrivals.json`."""
    path = Path(path)
    stem = path.stem if path.suffix == ".json" else path.name
    return path.with_name(f"{stem}.arrivals.json")


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` in the artifacts' format, and its arrivals and info to the sidecar file.

    A sidecar left from an earlier trace at the same path is removed when `trace` has neither
    arrivals nor info, so it cannot lend its arrivals to this one."""
    path = Path(path)
    body = {
        req.request_id: [seg.model_dump(exclude_none=True) for seg in req.script.segments]
        for req in trace.requests
    }
    path.write_text(json.dumps(body))
    side = sidecar_path(path)
    if trace.has_arrivals or trace.info:
        arrivals = (
            {req.request_id: req.arrival_time for req in trace.requests}
            if trace.has_arrivals
            else None
        )
        side.write_text(
            json.dumps(
                {"format": SIDECAR_FORMAT, "arrival_times": arrivals, "info": trace.info},
                indent=1,
                default=str,
            )
        )
    else:
        side.unlink(missing_ok=True)
    return path


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if x != "segments")
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


@dataclass
class ReadStats:
    """What `read_trace` changed to make an artifact file a valid trace (`Trace.info["reader"]`)."""

    counted_with: str = "numbers only"
    from_text: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TEXT_FIELDS, 0))
    completion_raised_to_1: int = 0
    prompts_computed: int = 0
    api_token_length_clamped: int = 0
    last_calls_dropped: int = 0
    last_calls_run: int = 0

    def as_info(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def changed(self) -> bool:
        return self != ReadStats()


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Reader:
    """Turns one request's raw segments into `TraceSegment`s, by the module doc's rules."""

    where: str
    count_tokens: Callable[[str], int] | None
    chars_per_token: float
    last_call: LastCall
    stats: ReadStats

    def count(self, text: str) -> int:
        if self.count_tokens is not None:
            return self.count_tokens(text)
        return math.ceil(len(text) / self.chars_per_token)

    def fail(self, request_id: str, index: int | None, message: str) -> TraceFormatError:
        at = f"request {request_id!r}" + ("" if index is None else f", segment {index}")
        return TraceFormatError(f"{self.where}: {at}: {message}")

    def lengths(self, request_id: str, index: int, seg: dict[str, Any]) -> tuple[dict, bool]:
        """The segment with every text replaced by its count; True when a count came from text
        or was clamped (later contexts of the request are then computed, not read).

        A later segment's `prompt` text is dropped uncounted: its context is computed."""
        out = dict(seg)
        derived = False
        for text_key, count_key in _TEXT_FIELDS.items():
            if text_key not in out:
                continue
            text = out.pop(text_key)
            if not isinstance(text, str):
                raise self.fail(request_id, index, f"{text_key} must be a string")
            if count_key in out or (text_key == "prompt" and index > 0):
                continue  # a number given beside the text wins, as in the artifacts
            out[count_key] = self.count(text)
            self.stats.from_text[text_key] += 1
            derived = True
            if count_key == "completion_tokens" and out[count_key] < 1:
                out[count_key] = 1
                self.stats.completion_raised_to_1 += 1
        returned = out.get("api_token_length")
        if _is_int(returned) and returned < 0:
            out["api_token_length"] = 0
            self.stats.api_token_length_clamped += 1
            derived = True
        return out, derived

    def end_last_call(self, segments: list[dict[str, Any]]) -> None:
        """Apply `last_call` to a last segment that calls an API (see the module doc)."""
        last = segments[-1]
        if not any(key in last for key in ("api_time", "api_token_length")):
            return
        empty = not last.get("api_time") and not last.get("api_token_length")
        if self.last_call == "drop" or empty:
            for key in _CALL_FIELDS:
                last.pop(key, None)
            self.stats.last_calls_dropped += 1
            return
        segments.append({"completion_tokens": 1})
        self.stats.last_calls_run += 1

    def request(self, request_id: str, raw: object) -> TraceScript:
        """One request of the file, as a valid script (or a `TraceFormatError`)."""
        if not isinstance(raw, list) or not raw:
            raise TraceFormatError(
                f"{self.where}: request {request_id!r}: expected a non-empty list of segments, "
                f"got {type(raw).__name__}"
            )
        segments: list[dict[str, Any]] = []
        derived = False
        for i, seg in enumerate(raw):
            if not isinstance(seg, dict):
                raise self.fail(request_id, i, f"expected an object, got {type(seg).__name__}")
            lengths, from_text = self.lengths(request_id, i, seg)
            if i > 0 and (derived or "prompt_tokens" not in lengths):
                lengths.pop("prompt_tokens", None)  # filled in by `cumulative`
            segments.append(lengths)
            derived = derived or from_text
        self.end_last_call(segments)
        return self.validate(request_id, self.cumulative(segments))

    def cumulative(self, segments: list[dict[str, Any]]) -> list[dict]:
        """Fill in each later segment's missing `prompt_tokens` from the one before it. Where
        that one's lengths are not numbers the gap stays, and validation names the problem."""
        for i in range(1, len(segments)):
            before = segments[i - 1]
            parts = [
                before.get("prompt_tokens"),
                before.get("completion_tokens"),
                before.get("api_token_length") or 0,
            ]
            if "prompt_tokens" in segments[i] or not all(_is_int(x) for x in parts):
                continue
            segments[i] = {"prompt_tokens": sum(parts), **segments[i]}
            self.stats.prompts_computed += 1
        return segments

    def validate(self, request_id: str, segments: list[dict[str, Any]]) -> TraceScript:
        parsed = []
        for i, seg in enumerate(segments):
            try:
                parsed.append(TraceSegment.model_validate(seg))
            except ValidationError as exc:
                raise self.fail(request_id, i, _errors(exc)) from exc
        try:
            return TraceScript(segments=parsed)
        except ValidationError as exc:  # the arithmetic between segments; the message names them
            raise self.fail(request_id, None, _errors(exc)) from exc


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise TraceFormatError(f"{path}: JSON nested too deeply to read") from exc


def _read_sidecar(path: Path, ids: Sequence[str]) -> tuple[dict[str, float] | None, dict]:
    side = sidecar_path(path)
    if not side.exists():
        return None, {}
    data = _load_json(side)
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise TraceFormatError(f"{side}: not a {SIDECAR_FORMAT} file")
    info = data.get("info")
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise TraceFormatError(f"{side}: info must be an object, got {type(info).__name__}")
    arrivals = data.get("arrival_times")
    if arrivals is None:
        return None, info
    if not isinstance(arrivals, dict) or set(arrivals) != set(ids):
        have = set(arrivals) if isinstance(arrivals, dict) else set()
        missing = sorted(set(ids) - have)[:3]
        extra = sorted(have - set(ids))[:3]
        raise TraceFormatError(
            f"{side}: arrival_times must name exactly the trace's requests "
            f"(missing e.g. {missing}, unknown e.g. {extra})"
        )
    out: dict[str, float] = {}
    for rid, t in arrivals.items():
        ok = isinstance(t, int | float) and not isinstance(t, bool)
        if not ok or not math.isfinite(t) or t < 0:
            raise TraceFormatError(f"{side}: request {rid!r}: bad arrival time {t!r}")
        out[rid] = float(t)
    return out, info


def read_trace(
    path: str | Path,
    *,
    sidecar: bool = True,
    count_tokens: Callable[[str], int] | None = None,
    chars_per_token: float = CHARS_PER_TOKEN,
    last_call: LastCall = "drop",
) -> Trace:
    """Load and validate a trace file (and its sidecar, unless `sidecar=False`).

    Artifact files are taken as they are (text segments, a call on the last segment, negative
    returned lengths): the module doc gives the rules, `Trace.info["reader"]` (a `ReadStats`,
    present when something was changed) what they changed.
    Raises `TraceFormatError` naming the file, request id and segment index of the first problem.
    """
    if not chars_per_token > 0 or math.isinf(chars_per_token):
        raise ValueError(f"chars_per_token must be a positive number, got {chars_per_token}")
    if last_call not in ("drop", "run"):
        raise ValueError(f"last_call must be 'drop' or 'run', got {last_call!r}")
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise TraceFormatError(
            f"{path}: expected a non-empty JSON object of request id -> segments"
        )
    if "" in data:
        raise TraceFormatError(f"{path}: request id '': a request id must not be empty")
    stats = ReadStats()
    reader = _Reader(str(path), count_tokens, chars_per_token, last_call, stats)
    scripts = {str(rid): reader.request(str(rid), raw) for rid, raw in data.items()}
    if any(stats.from_text.values()):
        stats.counted_with = (
            "tokenizer" if count_tokens else f"{chars_per_token:g} characters per token"
        )
    arrivals, info = _read_sidecar(path, list(scripts)) if sidecar else (None, {})
    # A file that needed nothing keeps its info as written (a round trip gives the same trace).
    changes = {"reader": stats.as_info()} if stats.changed else {}
    try:  # checked above; a guard so that nothing but a TraceFormatError leaves
        requests = [
            TraceRequest(
                request_id=rid,
                arrival_time=None if arrivals is None else arrivals[rid],
                script=script,
            )
            for rid, script in scripts.items()
        ]
        return Trace(requests=requests, info={**info, **changes})
    except ValidationError as exc:
        raise TraceFormatError(f"{path}: {_errors(exc)}") from exc


def sample_requests(trace: Trace, n: int, how: Sample = "inorder", seed: int = 0) -> Trace:
    """The first `n` requests of `trace` (all of them if it has fewer): in file order, or after a
    shuffle seeded by `seed` (its own stream, so arrivals drawn from the same seed don't move).

    A shuffled trace with arrival times keeps the file's first `n` arrival times in order: the
    load is the file's, only which request arrives when changes."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if how not in ("inorder", "shuffle"):
        raise ValueError(f"how must be 'inorder' or 'shuffle', got {how!r}")
    picked = list(trace.requests)
    if how == "shuffle":
        random.Random(f"sample:{seed}").shuffle(picked)
    picked = picked[:n]
    if how == "shuffle" and trace.has_arrivals:
        times = [req.arrival_time for req in trace.requests[: len(picked)]]
        picked = [
            req.model_copy(update={"arrival_time": t}) for req, t in zip(picked, times, strict=True)
        ]
    sample = {"how": how, "seed": seed if how == "shuffle" else None, "n": len(picked)}
    info = {**trace.info, "sample": sample, "file_requests": len(trace)}
    return Trace(requests=picked, info=info)


def with_time_scale(trace: Trace, factor: float) -> Trace:
    """The same requests with every API call's duration multiplied by `factor`."""
    if not factor >= 0 or math.isinf(factor):
        raise ValueError(f"time scale must be >= 0, got {factor}")
    longest = max(trace.requests, key=lambda req: max(_api_times(req.script)))
    if max(_api_times(longest.script)) * factor > MAX_API_TIME_S:
        raise ValueError(
            f"time scale {factor:g}: request {longest.request_id!r} would have a call longer "
            f"than {MAX_API_TIME_S:g} s"
        )

    def scaled(script: TraceScript) -> TraceScript:
        return TraceScript(
            segments=[
                seg
                if seg.api_time is None
                else seg.model_copy(update={"api_time": seg.api_time * factor})
                for seg in script.segments
            ]
        )

    requests = [req.model_copy(update={"script": scaled(req.script)}) for req in trace.requests]
    return Trace(requests=requests, info={**trace.info, "time_scale": factor})


def _api_times(script: TraceScript) -> list[float]:
    return [seg.api_time or 0.0 for seg in script.segments]


def over_length(trace: Trace, max_model_len: int) -> list[TraceRequest]:
    """The requests whose final context exceeds `max_model_len` (the engine would refuse them)."""
    return [req for req in trace.requests if req.script.total_tokens > max_model_len]


# --------------------------------------------------------------------------------------------
# Arrivals


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """`n` arrival offsets (s) of a Poisson process of `rate` requests/s, the first at 0.

    `rate=math.inf` puts every request at 0 (an offline burst)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def arrivals_before(rate: float, seed: int, until_s: float) -> int:
    """How many arrivals of `poisson_arrivals(..., rate, seed)` come before `until_s`: the
    requests a steady run of that length sends (`lamps bench --steady`). The draws do not
    depend on `n`, so these are the first requests of any longer trace of the same seed."""
    if not until_s > 0 or math.isinf(until_s):
        raise ValueError(f"until_s must be a positive number of seconds, got {until_s}")
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"a steady run needs a finite rate > 0, got {rate}")
    rng = random.Random(f"arrivals:{seed}")  # the stream of `poisson_arrivals`
    count, t = 0, 0.0
    while t < until_s:
        count += 1
        t += rng.expovariate(rate)
    return count


def with_poisson_arrivals(trace: Trace, rate: float, seed: int) -> Trace:
    """The same requests, in their order, arriving as a Poisson process (replacing any arrivals)."""
    times = poisson_arrivals(len(trace.requests), rate, seed)
    requests = [
        req.model_copy(update={"arrival_time": t})
        for req, t in zip(trace.requests, times, strict=True)
    ]
    info = {**trace.info, "rate": rate, "arrival_seed": seed}
    return Trace(requests=requests, info=info)


# --------------------------------------------------------------------------------------------
# Drawing


def _gamma(rng: random.Random, mean: float, std: float) -> float:
    if mean <= 0:
        return 0.0
    if std <= 0:
        return mean
    shape = (mean / std) ** 2
    return rng.gammavariate(shape, std * std / mean)


def _gamma_int(rng: random.Random, mean: float, shape: float, minimum: int) -> int:
    if mean <= 0:
        return minimum
    return max(minimum, round(rng.gammavariate(shape, mean / shape)))


def _uniform_int(rng: random.Random, mean: float, minimum: int) -> int:
    spread = UNIFORM_HALF_WIDTH * mean
    return max(minimum, round(rng.uniform(mean - spread, mean + spread)))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 200:  # exp(-lam) underflows Knuth's method; the normal approximation is fine there
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


@dataclass
class _Draw:
    prompt: int
    decodes: list[int]  # len(returns) + 1
    returns: list[int]
    times: list[float]
    tools: list[str]

    @property
    def total(self) -> int:
        return self.prompt + sum(self.decodes) + sum(self.returns)

    def fit(self, cap: int) -> None:
        """Shrink to at most `cap` tokens: proportionally, then by dropping trailing calls."""
        if self.total > cap:
            f = cap / self.total
            self.prompt = max(1, int(self.prompt * f))
            self.decodes = [max(1, int(d * f)) for d in self.decodes]
            self.returns = [int(r * f) for r in self.returns]
        while self.total > cap and self.returns:
            for seq in (self.decodes, self.returns, self.times, self.tools):
                seq.pop()
        if self.total > cap:  # no call left: prompt + final decode
            self.decodes[0] = min(self.decodes[0], cap - 1)
            self.prompt = min(self.prompt, cap - self.decodes[0])

    def script(self) -> TraceScript:
        segments, context = [], self.prompt
        for i, decode in enumerate(self.decodes):
            if i < len(self.returns):
                segments.append(
                    TraceSegment(
                        prompt_tokens=context,
                        completion_tokens=decode,
                        api_time=self.times[i],
                        api_token_length=self.returns[i],
                        api_type=self.tools[i],
                    )
                )
                context += decode + self.returns[i]
            else:
                segments.append(TraceSegment(prompt_tokens=context, completion_tokens=decode))
        return TraceScript(segments=segments)


def _draw(
    rng: random.Random, kind: AugmentationType, calls: int, token_scale: float, time_scale: float
) -> _Draw:
    prompt = _uniform_int(rng, kind.prompt_tokens * token_scale, minimum=1)
    decodes = [
        _gamma_int(rng, kind.decode_tokens * token_scale, DECODE_GAMMA_SHAPE, minimum=1)
        for _ in range(calls + 1)
    ]
    returns = [_uniform_int(rng, kind.return_tokens * token_scale, minimum=0) for _ in range(calls)]
    tools = [rng.choice(kind.call_tools) for _ in range(calls)]
    times = [
        min(MAX_API_TIME_S, _gamma(rng, t.mean_s * time_scale, t.std_s * time_scale)) for t in tools
    ]
    return _Draw(prompt, decodes, returns, times, [t.name for t in tools])


def _check(n: int, scale: float, time_scale: float | None, max_context: int | None) -> float:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not scale > 0 or math.isinf(scale):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if time_scale is not None and (not time_scale >= 0 or math.isinf(time_scale)):
        raise ValueError(f"time_scale must be >= 0, got {time_scale}")
    if max_context is not None and max_context < 2:
        raise ValueError(f"max_context must be >= 2 tokens, got {max_context}")
    return scale if time_scale is None else time_scale


def _generate(
    name: str,
    n: int,
    rate: float,
    seed: int,
    pick: Callable[[random.Random], AugmentationType],
    calls: Callable[[random.Random, AugmentationType], int],
    scale: float,
    time_scale: float | None,
    max_context: int | None,
    extra_info: Mapping[str, Any],
) -> Trace:
    def draw(rng: random.Random, tscale: float) -> _Draw:
        kind = pick(rng)
        return _draw(rng, kind, calls(rng, kind), scale, tscale)

    return _generate_draws(name, n, rate, seed, draw, scale, time_scale, max_context, extra_info)


def _generate_draws(
    name: str,
    n: int,
    rate: float,
    seed: int,
    draw: Callable[[random.Random, float], _Draw],
    scale: float,
    time_scale: float | None,
    max_context: int | None,
    extra_info: Mapping[str, Any],
) -> Trace:
    """`n` requests, each `draw(rng, time_scale)` from one seeded stream (so the first k
    requests are the same whatever `n`), shrunk to `max_context`, at Poisson arrivals."""
    tscale = _check(n, scale, time_scale, max_context)
    rng = random.Random(seed)
    requests = []
    for i, t in enumerate(poisson_arrivals(n, rate, seed)):
        drawn = draw(rng, tscale)
        if max_context is not None:
            drawn.fit(max_context)
        requests.append(TraceRequest(request_id=str(i), arrival_time=t, script=drawn.script()))
    info = {
        "workload": name,
        "n": n,
        "rate": rate,
        "seed": seed,
        "scale": scale,
        "time_scale": tscale,
        "max_context": max_context,
        **extra_info,
    }
    return Trace(requests=requests, info=info)


def _type(name: str) -> AugmentationType:
    try:
        return AUGMENTATION_TYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown augmentation type {name!r}; known: {', '.join(AUGMENTATION_TYPES)}"
        ) from None


def _picker(
    mix: Mapping[str, float] | None,
) -> tuple[Callable[[random.Random], AugmentationType], dict[str, float]]:
    weights = dict(mix) if mix is not None else dict.fromkeys(AUGMENTATION_TYPES, 1.0)
    kinds = [_type(name) for name in weights]
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 and not all 0, got {weights}")
    values = list(weights.values())
    if len(kinds) == 1:
        return (lambda rng: kinds[0]), weights
    return (lambda rng: rng.choices(kinds, weights=values)[0]), weights


def _multi_calls(rng: random.Random, kind: AugmentationType) -> int:
    return 1 + _poisson(rng, kind.calls_per_request - 1)


def single_api(
    kind: str | Mapping[str, float],
    n: int,
    rate: float,
    seed: int = 0,
    *,
    scale: float = 1.0,
    time_scale: float | None = None,
    max_context: int | None = None,
) -> Trace:
    """One API call per request of augmentation type `kind` (a name of `AUGMENTATION_TYPES`, or
    a mix `{name: weight}` picking a type per request). The per-segment means are the type's, so
    a request's context is prompt + 2 decodes + 1 return, less than the table's context for the
    types that make many calls."""
    if isinstance(kind, str):
        pick, weights = _picker({kind: 1.0})
        name = kind
    else:
        pick, weights = _picker(kind)
        name = "single_mix"
    return _generate(
        name,
        n,
        rate,
        seed,
        pick,
        lambda rng, k: 1,
        scale,
        time_scale,
        max_context,
        {"mix": weights, "calls": "one per request"},
    )


def multi_api(
    n: int,
    rate: float,
    seed: int = 0,
    *,
    mix: Mapping[str, float] | None = None,
    scale: float = 1.0,
    time_scale: float | None = None,
    max_context: int | None = None,
) -> Trace:
    """Requests of INFERCEPT's types mixed by `mix` (`{name: weight}`, all six evenly by default),
    each making 1 + Poisson(mean - 1) calls of its own type, as the artifacts' mixed traces
    sample whole requests from per-type traces."""
    pick, weights = _picker(mix)
    return _generate(
        "multi",
        n,
        rate,
        seed,
        pick,
        _multi_calls,
        scale,
        time_scale,
        max_context,
        {"mix": weights},
    )


def toolbench_like(
    n: int,
    rate: float,
    seed: int = 0,
    *,
    scale: float = 1.0,
    time_scale: float | None = None,
    max_context: int | None = None,
) -> Trace:
    """Multi-call requests of the ToolBench shape (see the module doc and `TOOLBENCH`)."""
    return _generate(
        "toolbench",
        n,
        rate,
        seed,
        lambda rng: TOOLBENCH,
        _multi_calls,
        scale,
        time_scale,
        max_context,
        {"tools": [t.name for t in TOOLBENCH_TOOLS]},
    )


# --------------------------------------------------------------------------------------------
# Families with the statistics of published multi-call traces (issue 24): our generators


# The published traces cap a call at 60 s (before any time scaling).
FAMILY_CALL_CAP_S = 60.0


@dataclass(frozen=True)
class CallKind:
    """How long a call recorded as `name` (one of `lamps_core.api_types.API_TYPE_NAMES`) lasts,
    in seconds before time scaling and before the 60-s cap: a gamma with this mean and standard
    deviation, or (`lognormal`) a log-normal with median `mean_s` and log-spread `std_s`, for a
    tail that reaches the cap. One name means one distribution in every family here, so the
    durations learned per name (the `estimates` predictor) carry from one family to the next."""

    name: str
    mean_s: float
    std_s: float
    lognormal: bool = False

    def draw(self, rng: random.Random) -> float:
        if self.lognormal:
            raw = rng.lognormvariate(math.log(self.mean_s), self.std_s)
        else:
            raw = _gamma(rng, self.mean_s, self.std_s)
        return min(FAMILY_CALL_CAP_S, raw)


CALL_KINDS: dict[str, CallKind] = {
    k.name: k
    for k in (
        CallKind("math", 9e-5, 6e-5),  # a calculator: INFERCEPT's figures, all under 10 ms
        CallKind("virtual_env", 0.09, 0.014),  # an environment step (INFERCEPT's)
        CallKind("qa", 0.69, 0.17),  # a search (INFERCEPT's)
        CallKind("image", 20.03, 7.8),  # a generator (INFERCEPT's Stable Diffusion)
        # A person or a slow service: median 22 s, 13 % of draws past the 60-s cap.
        CallKind("chatbot", 22.0, 0.9, lognormal=True),
    )
}


@dataclass(frozen=True)
class Population:
    """One kind of request of a family: its share, its token means (prompt uniform within
    ±`prompt_spread` of its mean; decode per segment gamma of shape 2; returns uniform within
    ±50 %), its calls (1 + Poisson(`extra_calls`), or exactly `calls` when given) and the call
    kinds they pick from, by weight."""

    name: str
    weight: float
    prompt_tokens: float
    decode_tokens: float
    return_tokens: float
    call_kinds: tuple[tuple[str, float], ...]
    extra_calls: float = 0.0
    calls: int | None = None
    prompt_spread: float = UNIFORM_HALF_WIDTH

    def draw(self, rng: random.Random, token_scale: float, time_scale: float) -> _Draw:
        calls = self.calls if self.calls is not None else 1 + _poisson(rng, self.extra_calls)
        mean = self.prompt_tokens * token_scale
        spread = self.prompt_spread * mean
        prompt = max(1, round(rng.uniform(mean - spread, mean + spread)))
        decodes = [
            _gamma_int(rng, self.decode_tokens * token_scale, DECODE_GAMMA_SHAPE, minimum=1)
            for _ in range(calls + 1)
        ]
        returns = [_uniform_int(rng, self.return_tokens * token_scale, 0) for _ in range(calls)]
        names, weights = zip(*self.call_kinds, strict=True)
        kinds = [CALL_KINDS[name] for name in rng.choices(names, weights=weights, k=calls)]
        times = [kind.draw(rng) * time_scale for kind in kinds]
        return _Draw(prompt, decodes, returns, times, [kind.name for kind in kinds])


@dataclass(frozen=True)
class Family:
    """A workload of one or more populations; `max_context` (tokens, times `scale`) caps every
    request's final context as the published traces' contexts are capped."""

    name: str
    about: str
    populations: tuple[Population, ...]
    max_context: int

    def generate(
        self,
        n: int,
        rate: float,
        seed: int = 0,
        *,
        scale: float = 1.0,
        time_scale: float | None = None,
        max_context: int | None = None,
    ) -> Trace:
        cap = max(2, round(self.max_context * scale))
        if max_context is not None:
            cap = min(cap, max_context)
        weights = [pop.weight for pop in self.populations]

        def draw(rng: random.Random, tscale: float) -> _Draw:
            (pop,) = rng.choices(self.populations, weights=weights)
            return pop.draw(rng, scale, tscale)

        info = {
            "family": self.about,
            "populations": {pop.name: pop.weight for pop in self.populations},
            "family_max_context": cap,
        }
        return _generate_draws(self.name, n, rate, seed, draw, scale, time_scale, cap, info)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # ~4.2 calls a request of ~12 s (1.2 s at --time-scale 0.1): 17 % calculator calls under
        # 10 ms, 15 % environment steps, 25 % searches, 43 % long calls (5.7 % of all calls at
        # the 60-s cap); ~511 prompt and ~397 output tokens a request, contexts to 2k.
        Family(
            "multicall",
            "multi-call trace statistics: 4.2 calls a request, ~12 s calls (17 % under 10 ms, "
            "~6 % at the 60-s cap), 511 prompt / 397 output tokens, contexts to 2k",
            (
                Population(
                    "multicall",
                    1.0,
                    prompt_tokens=511,
                    decode_tokens=397 / 5.2,
                    return_tokens=40,
                    extra_calls=3.2,
                    call_kinds=(
                        ("math", 0.17),
                        ("virtual_env", 0.15),
                        ("qa", 0.25),
                        ("chatbot", 0.43),
                    ),
                ),
            ),
            max_context=2048,
        ),
        # One call a request of ~8 s (0.8 s at --time-scale 0.1): 71 % searches, 29 % long
        # calls; ~184 output tokens over its two segments.
        Family(
            "onecall",
            "one-call trace statistics: one ~8 s call a request, 184 output tokens",
            (
                Population(
                    "onecall",
                    1.0,
                    prompt_tokens=350,
                    decode_tokens=92,
                    return_tokens=30,
                    calls=1,
                    call_kinds=(("qa", 0.71), ("chatbot", 0.29)),
                ),
            ),
            max_context=2048,
        ),
        # Where ranking by memory over time and ranking by length disagree: `holders` hold
        # ~2.9k-token contexts through ~20-s calls and decode ~80 tokens; `talkers` keep
        # ~100-600-token contexts, make short calls and decode ~360 tokens. Shortest-first by
        # output runs the holders first; by memory over time (context x time), the talkers.
        Family(
            "longcalls",
            "half holders (2.8k-token prompts, 1.5 calls of ~20 s, ~80 output tokens), half "
            "talkers (120-token prompts, 2 calls of ~0.7 s, ~360 output tokens)",
            (
                Population(
                    "holders",
                    0.5,
                    prompt_tokens=2800,
                    decode_tokens=32,
                    return_tokens=60,
                    extra_calls=0.5,
                    call_kinds=(("image", 1.0),),
                    prompt_spread=0.15,
                ),
                Population(
                    "talkers",
                    0.5,
                    prompt_tokens=120,
                    decode_tokens=120,
                    return_tokens=20,
                    extra_calls=1.0,
                    call_kinds=(("qa", 1.0),),
                ),
            ),
            max_context=4000,
        ),
    )
}


# `lamps bench --workload NAME`: each is called as f(n, rate, seed, scale=..., max_context=...).
WORKLOADS: dict[str, Callable[..., Trace]] = {
    **{name: partial(single_api, name) for name in AUGMENTATION_TYPES},
    "single_mix": partial(single_api, dict.fromkeys(AUGMENTATION_TYPES, 1.0)),
    "multi": multi_api,
    # Agent episodes: ALFWorld's many short actions and observations, 1 + Poisson(27) calls a
    # request, each turn repeating a context that grows to ~2,200 tokens (prefill-heavy; as
    # `lamps bench --sessions`, what session affinity is for).
    "alfworld": partial(multi_api, mix={"virtual_env": 1.0}),
    "toolbench": toolbench_like,
    **{name: family.generate for name, family in FAMILIES.items()},
}


def get_workload(name: str) -> Callable[..., Trace]:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
