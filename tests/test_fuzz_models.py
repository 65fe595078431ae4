"""Property-based fuzzing (hypothesis) of the models at the service's boundaries: whatever a
client or a trace file holds, parsing either succeeds or raises the boundary's typed error,
never another exception, and never slowly.

- `TraceSegment` / `TraceScript` (lamps_core.trace): pydantic's `ValidationError`.
- `TraceRequest` and `ChatRequest` as the ingress parses them (`deployments.ingress._parse`, the
  path of HTTP and the Python handle alike): `RequestError` (HTTP 400).
- `read_trace` on generated files (and sidecars): `TraceFormatError`.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from bench.workloads import SIDECAR_FORMAT, TraceFormatError, read_trace, sidecar_path
from lamps_core.trace import TraceScript, TraceSegment

# Every example must parse in well under this (a hang or a blow-up fails the test).
DEADLINE_MS = 2000
FUZZ = settings(
    max_examples=150, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow]
)

SEGMENT_KEYS = ["prompt_tokens", "completion_tokens", "api_time", "api_token_length", "api_type"]
TEXT_KEYS = ["prompt", "completion", "api_token"]
CHAT_KEYS = [
    "model",
    "messages",
    "tools",
    "tool_choice",
    "max_tokens",
    "max_completion_tokens",
    "max_tool_calls",
    "stream",
    "n",
    "temperature",
    "top_p",
    "stop",
    "logprobs",
    "response_format",
    "stream_options",
    "seed",
]

# Any JSON value, with the awkward ones over-represented: huge and negative numbers, NaN and
# infinities (json.dumps writes them, careless clients send them), booleans where numbers go.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def near_valid_segment(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with the model's own keys (and now and then a stranger), values mostly plausible:
    deeper into the validators than random dicts get."""
    plausible = st.integers(min_value=-3, max_value=5000) | st.floats(-10, 4000) | json_values
    return st.dictionaries(
        st.sampled_from(keys) | st.text(max_size=6), plausible, max_size=len(keys) + 1
    )


segments = near_valid_segment(SEGMENT_KEYS)


@st.composite
def consistent_scripts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Segments whose contexts add up (so TraceScript's arithmetic passes), then perhaps one
    field broken: the valid region and its border."""
    n = draw(st.integers(1, 5))
    context = draw(st.integers(1, 3000))
    out: list[dict[str, Any]] = []
    for i in range(n):
        done = draw(st.integers(1, 500))
        seg: dict[str, Any] = {"prompt_tokens": context, "completion_tokens": done}
        if i < n - 1:
            returned = draw(st.integers(0, 200))
            seg |= {"api_time": draw(st.floats(0, 3600)), "api_token_length": returned}
            if draw(st.booleans()):
                seg["api_type"] = draw(st.sampled_from(["qa", "math", "calculator"]) | st.text())
            context += done + returned
        out.append(seg)
    if draw(st.booleans()):
        victim = draw(st.sampled_from(out))
        victim[draw(st.sampled_from(SEGMENT_KEYS))] = draw(json_values)
    return out


def validates_or_typed_error(model: type[BaseModel], data: Any) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


@FUZZ
@given(segments)
def test_trace_segment(data: dict[str, Any]) -> None:
    seg = validates_or_typed_error(TraceSegment, data)
    if seg is not None:
        assert isinstance(seg, TraceSegment)
        assert seg.prompt_tokens >= 1 and seg.completion_tokens >= 1
        assert (seg.api_time is None) == (seg.api_token_length is None)
        assert seg.api_time is None or (0 <= seg.api_time <= 3600 and math.isfinite(seg.api_time))


@FUZZ
@given(st.one_of(consistent_scripts(), st.lists(segments, max_size=4), json_values))
@example([{"prompt_tokens": 5, "completion_tokens": 1}])
def test_trace_script(data: Any) -> None:
    script = validates_or_typed_error(TraceScript, {"segments": data})
    if script is not None:
        assert isinstance(script, TraceScript)
        *calls, last = script.segments
        assert not last.has_api_call and all(s.has_api_call for s in calls)
        for before, after in zip(script.segments, script.segments[1:], strict=False):
            assert after.prompt_tokens == (
                before.prompt_tokens + before.completion_tokens + (before.api_token_length or 0)
            )


@pytest.fixture(scope="module")
def parse() -> Any:
    from deployments.ingress import _parse  # imports vLLM and Ray: once per module

    return _parse


def parses_or_request_error(parse: Any, model: type[BaseModel], data: Any) -> BaseModel | None:
    from lamps_vllm.errors import RequestError

    try:
        parsed = parse(model, data)
    except RequestError as exc:
        assert exc.status_code == 400 and exc.message
        return None
    assert isinstance(parsed, model)
    return parsed


@FUZZ
@given(
    st.one_of(
        st.fixed_dictionaries(
            {"segments": st.one_of(consistent_scripts(), st.lists(segments, max_size=3))},
            optional={
                "model": json_values,
                "request_id": json_values,
                "policy": json_values,
                "policy_options": json_values,
            },
        ),
        json_values,
    )
)
def test_trace_request_at_the_ingress(parse: Any, data: Any) -> None:
    from deployments.api_models import TraceRequest

    request = parses_or_request_error(parse, TraceRequest, data)
    if request is not None:
        assert 1 <= len(request.segments) <= 1024


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]) | json_values},
        optional={"content": st.text(max_size=20) | json_values, "name": json_values},
    )
    | json_values,
    max_size=3,
)
tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function") | json_values},
        optional={"function": st.fixed_dictionaries({"name": st.text(max_size=10)}) | json_values},
    )
    | json_values,
    max_size=2,
)


@FUZZ
@given(
    st.one_of(
        st.fixed_dictionaries(
            {"messages": messages | json_values},
            optional={
                "model": st.just("smollm2-135m") | json_values,
                "tools": tools,
                "tool_choice": st.sampled_from(["none", "auto", "required"]) | json_values,
                "max_tokens": st.integers(-5, 10**12) | json_values,
                "max_tool_calls": st.integers(-5, 10**6) | json_values,
                "stream": json_values,
                "n": json_values,
                "temperature": json_values,
                "response_format": json_values,
                "stream_options": json_values,
            },
        ),
        st.dictionaries(st.sampled_from(CHAT_KEYS), json_values, max_size=6),
        json_values,
    )
)
@example({"messages": 5})
@example({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1})
@example({"messages": [{"role": "user", "content": 5}]})
@example({"messages": [{"role": 5}]})
@example({"messages": [{"role": "user", "content": "hi"}], "tools": [5]})
@example({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": 3}})
def test_chat_request_at_the_ingress(parse: Any, data: Any) -> None:
    from deployments.api_models import ChatRequest

    request = parses_or_request_error(parse, ChatRequest, data)
    if request is not None:
        assert isinstance(request.messages, list)


# ---- read_trace on generated files


@st.composite
def trace_files(draw: st.DrawFn) -> tuple[Any, Any | None]:
    """A trace file's JSON (request id -> segments, artifact text fields included) and perhaps
    a sidecar."""
    seg_keys = SEGMENT_KEYS + TEXT_KEYS
    body = draw(
        st.one_of(
            st.dictionaries(
                st.text(max_size=6),  # "" included: refused (BAD_TRACE_FILES)
                st.one_of(consistent_scripts(), st.lists(near_valid_segment(seg_keys), max_size=3)),
                min_size=1,
                max_size=3,
            ),
            json_values,
        )
    )
    sidecar = None
    if draw(st.booleans()):
        ids = list(body) if isinstance(body, dict) else []
        arrivals = st.fixed_dictionaries({i: st.floats(-1, 100) | json_values for i in ids})
        sidecar = draw(
            st.fixed_dictionaries(
                {"format": st.just(SIDECAR_FORMAT) | json_values},
                optional={
                    "arrival_times": arrivals | json_values,
                    "info": st.dictionaries(st.text(max_size=5), json_values, max_size=3)
                    | json_values,
                },
            )
        )
    return body, sidecar


@FUZZ
@given(trace_files(), st.sampled_from(["drop", "run"]))
def test_read_trace(files: tuple[Any, Any | None], last_call: str) -> None:
    body, sidecar = files
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        path.write_text(json.dumps(body))
        if sidecar is not None:
            sidecar_path(path).write_text(json.dumps(sidecar))
        try:
            trace = read_trace(path, last_call=last_call)  # type: ignore[arg-type]
        except TraceFormatError as exc:
            assert str(path.with_suffix("")) in str(exc)  # names the file or its sidecar
            return
    assert len(trace.requests) == len(body)
    for req in trace.requests:
        assert not req.script.segments[-1].has_api_call


SEGMENT = [{"prompt_tokens": 5, "completion_tokens": 1}]
# Found by the fuzzing above (each once let out another exception than `TraceFormatError`:
# the name after the case), now refused with a message naming the problem.
BAD_TRACE_FILES = [
    pytest.param(
        json.dumps({"": SEGMENT}).encode(), None, "must not be empty", id="empty-request-id"
    ),
    pytest.param(
        json.dumps({"a": SEGMENT}).encode(),
        {"format": SIDECAR_FORMAT, "info": [1]},
        "info must be an object",
        id="sidecar-info-not-an-object",
    ),
    pytest.param(
        json.dumps({"a": SEGMENT}).encode(),
        {"format": SIDECAR_FORMAT, "info": "x"},
        "info must be an object",
        id="sidecar-info-a-string",
    ),
    pytest.param(b"\xff\xfe{}", None, "not UTF-8", id="not-utf8"),
    pytest.param(b"[" * 100_000, None, "nested too deeply", id="deep-nesting"),
    pytest.param(b'{"a": ' + b"[" * 100_000, None, "nested too deeply", id="deep-in-a-request"),
]


@pytest.mark.parametrize(("raw", "sidecar", "problem"), BAD_TRACE_FILES)
def test_read_trace_bad_files(tmp_path: Path, raw: bytes, sidecar: Any, problem: str) -> None:
    path = tmp_path / "trace.json"
    path.write_bytes(raw)
    if sidecar is not None:
        sidecar_path(path).write_text(json.dumps(sidecar))
    with pytest.raises(TraceFormatError, match=problem) as caught:
        read_trace(path)
    assert str(tmp_path / "trace") in str(caught.value)  # names the file or its sidecar
