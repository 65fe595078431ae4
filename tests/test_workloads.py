"""Trace files and workload generators (bench.workloads)."""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.workloads import (
    AUGMENTATION_TYPES,
    TOOLBENCH,
    WORKLOADS,
    Trace,
    TraceFormatError,
    arrivals_before,
    get_workload,
    multi_api,
    poisson_arrivals,
    read_trace,
    sidecar_path,
    single_api,
    toolbench_like,
    trace_stats,
    with_poisson_arrivals,
    write_trace,
)
from lamps_core.trace import TraceScript

ARTIFACT = {
    "0": [
        {"prompt_tokens": 10, "completion_tokens": 5, "api_time": 1.5, "api_token_length": 3},
        {"prompt_tokens": 18, "completion_tokens": 4},
    ],
    "7": [{"prompt_tokens": 30, "completion_tokens": 2}],
    "3": [
        {"prompt_tokens": 8, "completion_tokens": 2, "api_time": 0.25, "api_token_length": 0},
        {"prompt_tokens": 10, "completion_tokens": 6, "api_time": 2, "api_token_length": 4},
        {"prompt_tokens": 20, "completion_tokens": 1},
    ],
}


def write_json(path: Path, body: object) -> Path:
    path.write_text(json.dumps(body))
    return path


# ---------------------------------------------------------------------------------------------
# Files


def test_artifact_file_reads_without_arrivals_in_file_order(tmp_path: Path) -> None:
    trace = read_trace(write_json(tmp_path / "t.json", ARTIFACT))
    assert [r.request_id for r in trace.requests] == ["0", "7", "3"]
    assert not trace.has_arrivals
    assert trace.requests[2].script.num_api_calls == 2
    assert trace.requests[2].script.segments[1].api_time == 2.0

    timed = with_poisson_arrivals(trace, rate=2.0, seed=5)
    assert timed.has_arrivals
    assert [r.arrival_time for r in timed.requests] == poisson_arrivals(3, 2.0, 5)
    assert [r.script for r in timed.requests] == [r.script for r in trace.requests]


def test_round_trip_keeps_artifact_format_and_sidecar(tmp_path: Path) -> None:
    trace = toolbench_like(40, rate=3.0, seed=11, scale=0.2)
    path = write_trace(trace, tmp_path / "tb.json")
    assert read_trace(path) == trace
    # The trace file itself is exactly the artifacts' format (plus api_type): id -> segments.
    body = json.loads(path.read_text())
    assert set(body) == {r.request_id for r in trace.requests}
    last = body["0"][-1]
    assert set(last) == {"prompt_tokens", "completion_tokens"}
    assert set(body["0"][0]) == {
        "prompt_tokens",
        "completion_tokens",
        "api_time",
        "api_token_length",
        "api_type",
    }
    assert sidecar_path(path) == tmp_path / "tb.arrivals.json"
    # Without the sidecar it is an artifact file: same scripts, no arrivals.
    bare = read_trace(path, sidecar=False)
    assert not bare.has_arrivals
    assert [r.script for r in bare.requests] == [r.script for r in trace.requests]


def test_rewriting_without_arrivals_drops_a_stale_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    write_trace(single_api("qa", 3, rate=1.0, seed=0), path)
    assert sidecar_path(path).exists()
    bare = Trace(
        requests=[r.model_copy(update={"arrival_time": None}) for r in read_trace(path).requests]
    )
    write_trace(bare, path)
    assert not sidecar_path(path).exists()
    assert not read_trace(path).has_arrivals


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda b: b["3"][1].update(prompt_tokens=11),
            ["request '3'", "segment 1", "context of 10"],
        ),
        (lambda b: b["0"][0].pop("api_token_length"), ["request '0'", "segment 0", "together"]),
        (
            lambda b: b["3"][2].update(completion_tokens=0),
            ["request '3'", "segment 2", "completion_tokens"],
        ),
        (lambda b: b["0"][1].update(tokens=3), ["request '0'", "segment 1", "tokens"]),
        (lambda b: b.update({"9": {"prompt_tokens": 1}}), ["request '9'", "list of segments"]),
        (lambda b: b["7"].__setitem__(0, 5), ["request '7'", "segment 0", "object"]),
    ],
)
def test_corrupted_file_names_request_and_segment(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], object], expected: list[str]
) -> None:
    body = json.loads(json.dumps(ARTIFACT))
    mutate(body)
    path = write_json(tmp_path / "bad.json", body)
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    for part in [str(path), *expected]:
        assert part in str(info.value)


def test_not_json_and_bad_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        read_trace(path)
    write_json(path, ARTIFACT)
    write_json(
        sidecar_path(path),
        {"format": "lamps-trace-sidecar/1", "arrival_times": {"0": 0.0, "7": 1.0}, "info": {}},
    )
    with pytest.raises(TraceFormatError, match=re.escape("missing e.g. ['3']")):
        read_trace(path)


# ---------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("name", list(AUGMENTATION_TYPES))
def test_multi_api_matches_infercept_table(name: str) -> None:
    kind = AUGMENTATION_TYPES[name]
    trace = multi_api(400, rate=1.0, seed=42, mix={name: 1.0})
    calls = [seg for r in trace.requests for seg in r.script.segments if seg.has_api_call]
    times = [seg.api_time or 0.0 for seg in calls]
    stats = trace_stats(trace)
    assert stats["calls_per_request"] == pytest.approx(kind.calls_per_request, rel=0.05)
    assert statistics.fmean(times) == pytest.approx(kind.api_time_mean_s, rel=0.05)
    assert statistics.stdev(times) == pytest.approx(kind.api_time_std_s, rel=0.15)
    assert stats["context_tokens"] == pytest.approx(kind.context_tokens, rel=0.05)
    assert {seg.api_type for seg in calls} == {name}
    assert min(r.script.num_api_calls for r in trace.requests) >= 1


def test_single_api_makes_one_call_per_request() -> None:
    trace = single_api("chatbot", 300, rate=1.0, seed=3)
    assert {r.script.num_api_calls for r in trace.requests} == {1}
    times = [r.script.total_api_time for r in trace.requests]
    assert statistics.fmean(times) == pytest.approx(28.6, rel=0.1)


def test_multi_mix_draws_every_type_by_weight() -> None:
    trace = multi_api(600, rate=1.0, seed=1, mix={"math": 3.0, "qa": 1.0}, scale=0.1)
    first = [r.script.segments[0].api_type for r in trace.requests]
    assert set(first) == {"math", "qa"}
    assert first.count("math") / len(first) == pytest.approx(0.75, abs=0.06)
    with pytest.raises(ValueError, match="unknown augmentation type"):
        multi_api(5, rate=1.0, mix={"calculator": 1.0})


def test_toolbench_shape() -> None:
    stats = trace_stats(toolbench_like(800, rate=1.0, seed=9))
    assert stats["calls_per_request"] == pytest.approx(4.0, rel=0.05)
    assert stats["prompt_tokens"] == pytest.approx(540, rel=0.05)
    assert stats["output_tokens"] == pytest.approx(370, rel=0.05)
    assert stats["api_time_per_call_s"] == pytest.approx(12.0, rel=0.05)
    assert TOOLBENCH.prompt_tokens == pytest.approx(540)


def test_poisson_interarrival_mean_and_burst() -> None:
    times = poisson_arrivals(5000, rate=4.0, seed=2)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    assert poisson_arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0.0, 0)


def test_seeded_and_rate_independent_contents() -> None:
    a = multi_api(50, rate=2.0, seed=7)
    assert a == multi_api(50, rate=2.0, seed=7)
    assert a != multi_api(50, rate=2.0, seed=8)
    # One seed gives the same requests at every rate of a sweep; only arrivals change.
    b = multi_api(50, rate=5.0, seed=7)
    assert [r.script for r in a.requests] == [r.script for r in b.requests]
    assert a.requests[-1].arrival_time != b.requests[-1].arrival_time
    assert with_poisson_arrivals(a, 5.0, 7).requests == b.requests


def test_scale_shrinks_tokens_and_durations() -> None:
    full = trace_stats(toolbench_like(400, rate=1.0, seed=4))
    small = trace_stats(toolbench_like(400, rate=1.0, seed=4, scale=0.1))
    slow = trace_stats(toolbench_like(400, rate=1.0, seed=4, scale=0.1, time_scale=1.0))
    assert small["calls_per_request"] == full["calls_per_request"]
    assert small["context_tokens"] == pytest.approx(0.1 * full["context_tokens"], rel=0.1)
    assert small["api_time_per_call_s"] == pytest.approx(0.1 * full["api_time_per_call_s"])
    assert slow["api_time_per_call_s"] == pytest.approx(full["api_time_per_call_s"])


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("cap", [3, 48, 512])
def test_max_context_is_honoured(name: str, cap: int) -> None:
    trace = get_workload(name)(60, 1.0, 5, scale=0.5, max_context=cap)
    assert max(r.script.total_tokens for r in trace.requests) <= cap


def test_max_context_keeps_short_requests_untouched() -> None:
    free = multi_api(100, rate=1.0, seed=6, mix={"chatbot": 1.0})
    capped = multi_api(100, rate=1.0, seed=6, mix={"chatbot": 1.0}, max_context=900)
    for a, b in zip(free.requests, capped.requests, strict=True):
        if a.script.total_tokens <= 900:
            assert a.script == b.script
        else:
            assert b.script.total_tokens <= 900


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="max_context"):
        toolbench_like(5, rate=1.0, max_context=1)
    with pytest.raises(ValueError, match="scale"):
        toolbench_like(5, rate=1.0, scale=0.0)
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("nope")


# ---------------------------------------------------------------------------------------------
# Families with the published traces' statistics (issue 24)


def _call_times(trace: Trace) -> list[float]:
    return [s.api_time for r in trace.requests for s in r.script.segments if s.api_time is not None]


def test_multicall_has_the_published_multi_call_statistics() -> None:
    trace = get_workload("multicall")(3000, 1.0, 3)
    stats = trace_stats(trace)
    assert stats["calls_per_request"] == pytest.approx(4.2, rel=0.04)
    assert stats["prompt_tokens"] == pytest.approx(511, rel=0.04)
    assert stats["output_tokens"] == pytest.approx(397, rel=0.04)
    assert stats["max_context_tokens"] <= 2048
    calls = _call_times(trace)
    assert statistics.fmean(calls) == pytest.approx(12.0, rel=0.1)  # 1.2 s at --time-scale 0.1
    assert sum(c < 0.01 for c in calls) / len(calls) == pytest.approx(0.17, abs=0.015)
    assert sum(c >= 60.0 for c in calls) / len(calls) == pytest.approx(0.06, abs=0.015)
    scaled = get_workload("multicall")(3000, 1.0, 3, time_scale=0.1)
    assert statistics.fmean(_call_times(scaled)) == pytest.approx(1.2, rel=0.1)
    assert max(_call_times(scaled)) == pytest.approx(6.0)  # the cap comes before the scaling


def test_onecall_has_one_call_of_the_published_length() -> None:
    trace = get_workload("onecall")(3000, 1.0, 4, time_scale=0.1)
    stats = trace_stats(trace)
    assert {len(r.script.segments) for r in trace.requests} == {2}
    assert stats["output_tokens"] == pytest.approx(184, rel=0.04)
    assert stats["api_time_per_call_s"] == pytest.approx(0.8, rel=0.1)


def test_longcalls_rank_differently_by_length_and_by_memory_over_time() -> None:
    """Holders (large contexts, long calls, short decodes) come first by output length and
    last by memory over time (context x time); talkers the other way round."""
    trace = get_workload("longcalls")(2000, 1.0, 5)
    holders = [r.script for r in trace.requests if r.script.segments[0].prompt_tokens > 1000]
    talkers = [r.script for r in trace.requests if r.script.segments[0].prompt_tokens <= 1000]
    assert 0.45 < len(holders) / len(trace) < 0.55

    def output(s: TraceScript) -> int:
        return sum(seg.completion_tokens for seg in s.segments)

    def memory_time(s: TraceScript, step_s: float = 0.01) -> float:  # token-seconds, preserved
        held = 0.0
        for seg in s.segments:
            held += (seg.prompt_tokens + seg.completion_tokens / 2) * seg.completion_tokens * step_s
            held += (seg.prompt_tokens + seg.completion_tokens) * (seg.api_time or 0.0)
        return held

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    assert mean([output(s) for s in holders]) * 3 < mean([output(s) for s in talkers])
    assert mean([memory_time(s) for s in holders]) > 10 * mean([memory_time(s) for s in talkers])
    # Even with no call held (every call swapped out), the decodes alone rank them apart.
    decode_only = [
        sum((g.prompt_tokens + g.completion_tokens / 2) * g.completion_tokens for g in s.segments)
        for s in holders
    ]
    talkers_decode = [
        sum((g.prompt_tokens + g.completion_tokens / 2) * g.completion_tokens for g in s.segments)
        for s in talkers
    ]
    assert mean(decode_only) > 1.5 * mean(talkers_decode)
    assert max(s.total_tokens for s in holders) <= 4000


@pytest.mark.parametrize("name", ["multicall", "onecall", "longcalls"])
def test_families_are_seeded_prefix_stable_and_name_simulated_api_types(name: str) -> None:
    from lamps_core.api_types import API_TYPE_NAMES
    from tool_workers.simulated_api import SIMULATED_API_TYPES

    make = get_workload(name)
    a = make(40, 2.0, 7, scale=0.1)
    assert a == make(40, 2.0, 7, scale=0.1)
    assert a != make(40, 2.0, 8, scale=0.1)
    assert make(60, 2.0, 7, scale=0.1).requests[:40] == a.requests  # a longer run starts alike
    types = {s.api_type for r in a.requests for s in r.script.segments if s.api_type}
    assert types and types <= API_TYPE_NAMES <= SIMULATED_API_TYPES


def test_arrivals_before_counts_the_prefix_of_the_poisson_stream() -> None:
    times = poisson_arrivals(400, rate=8.0, seed=3)
    for until in (0.01, 1.0, 7.5, 20.0):
        assert arrivals_before(8.0, 3, until) == sum(t < until for t in times)
    with pytest.raises(ValueError, match="rate"):
        arrivals_before(math.inf, 3, 1.0)


def test_production_code_does_not_import_the_benchmark_workloads() -> None:
    root = Path(__file__).resolve().parent.parent
    for package in ("deployments", "lamps_core", "lamps_vllm", "tool_workers"):
        for path in (root / package).rglob("*.py"):
            imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M)
            assert not [name for name in imports if name.startswith("bench")], path
