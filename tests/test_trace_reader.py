"""The INFERCEPT/MARS artifacts' trace files read as they are (bench.workloads.read_trace and
the rest of what `lamps bench --trace` does with them before an engine starts)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench.workloads import (
    CHARS_PER_TOKEN,
    Trace,
    TraceFormatError,
    TraceRequest,
    read_trace,
    sample_requests,
    toolbench_like,
    with_time_scale,
)
from lamps.bench import add_arguments, build_traces


def words(text: str) -> int:
    """A stand-in tokenizer: one token a word."""
    return len(text.split())


# Artifact-style: text where the numbers would be; a later prompt holds the context so far, and
# counted on its own need not add up (here: 9 words, where the first segment ends at 11).
TEXT_FILE = {
    "q1": [
        {
            "prompt": "what is six times seven",
            "completion": "let me compute",
            "api_time": 0.5,
            "api_token": "the answer: 42",
        },
        {
            "prompt": "what is six times seven let me compute 42",
            "completion": "it is forty two",
        },
    ],
    # Numbers beside the text win, as in the artifacts' loaders.
    "q2": [{"prompt": "ignored text", "prompt_tokens": 7, "completion": "a b c"}],
}


def write(tmp_path: Path, body: object, name: str = "trace.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


def lengths(trace: Trace, rid: str) -> list[tuple[int, int, int | None]]:
    req = next(r for r in trace.requests if r.request_id == rid)
    return [(s.prompt_tokens, s.completion_tokens, s.api_token_length) for s in req.script.segments]


def test_text_segments_counted_with_the_tokenizer_and_contexts_cumulative(
    tmp_path: Path,
) -> None:
    trace = read_trace(write(tmp_path, TEXT_FILE), count_tokens=words)
    # 5 + 3 + 3 = 11, not the 9 words of the second prompt's text counted on its own.
    assert lengths(trace, "q1") == [(5, 3, 3), (11, 4, None)]
    assert lengths(trace, "q2") == [(7, 3, None)]
    reader = trace.info["reader"]
    assert reader["counted_with"] == "tokenizer"
    assert reader["from_text"] == {"prompt": 1, "completion": 3, "api_token": 1}
    assert reader["prompts_computed"] == 1


def test_without_a_tokenizer_text_is_counted_by_characters(tmp_path: Path) -> None:
    body = {"r": [{"prompt": "x" * 41, "completion": "y" * 8, "api_time": 1, "api_token": "z"}]}
    body["r"].append({"completion": ""})  # empty: must still decode one token
    trace = read_trace(write(tmp_path, body))
    assert CHARS_PER_TOKEN == 4.0
    assert lengths(trace, "r") == [(math.ceil(41 / 4), 2, 1), (11 + 2 + 1, 1, None)]
    assert trace.info["reader"]["counted_with"] == "4 characters per token"
    assert trace.info["reader"]["completion_raised_to_1"] == 1
    halved = read_trace(write(tmp_path, body), chars_per_token=2.0)
    assert lengths(halved, "r")[0] == (21, 4, 1)
    with pytest.raises(ValueError, match="chars_per_token"):
        read_trace(write(tmp_path, body), chars_per_token=0.0)


def test_numbers_only_files_still_must_add_up(tmp_path: Path) -> None:
    body = {
        "r": [
            {"prompt_tokens": 4, "completion_tokens": 2, "api_time": 1, "api_token_length": 3},
            {"prompt_tokens": 10, "completion_tokens": 1},
        ]
    }
    with pytest.raises(TraceFormatError, match="context of 9"):
        read_trace(write(tmp_path, body))
    body["r"][1]["prompt_tokens"] = 9
    trace = read_trace(write(tmp_path, body))
    assert lengths(trace, "r") == [(4, 2, 3), (9, 1, None)]
    assert "reader" not in trace.info  # nothing was changed


LAST_CALL = {
    "r": [
        {"prompt_tokens": 4, "completion_tokens": 2, "api_time": 1.5, "api_token_length": 3},
        {"prompt_tokens": 9, "completion_tokens": 5, "api_time": 2.0, "api_token_length": 6},
    ],
    # A call of 0 s returning nothing is no call to the artifacts: dropped in either mode.
    "e": [{"prompt_tokens": 3, "completion_tokens": 1, "api_time": 0, "api_token_length": 0}],
}


def test_last_call_dropped_by_default(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, LAST_CALL))
    assert lengths(trace, "r") == [(4, 2, 3), (9, 5, None)]
    assert trace.requests[0].script.num_api_calls == 1
    assert trace.info["reader"]["last_calls_dropped"] == 2
    assert trace.info["reader"]["last_calls_run"] == 0


def test_last_call_run_appends_one_decoded_token(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, LAST_CALL), last_call="run")
    assert lengths(trace, "r") == [(4, 2, 3), (9, 5, 6), (20, 1, None)]
    assert trace.requests[0].script.total_api_time == pytest.approx(3.5)
    assert lengths(trace, "e") == [(3, 1, None)]
    assert trace.info["reader"]["last_calls_run"] == 1
    assert trace.info["reader"]["last_calls_dropped"] == 1


def test_negative_returned_length_clamped_and_counted(tmp_path: Path) -> None:
    body = {
        "r": [
            {"prompt_tokens": 10, "completion_tokens": 2, "api_time": 1, "api_token_length": -4},
            # The file's context took the -4 into account: 10 + 2 - 4.
            {"prompt_tokens": 8, "completion_tokens": 3, "api_time": 1, "api_token_length": -1},
            {"prompt_tokens": 10, "completion_tokens": 1},
        ]
    }
    trace = read_trace(write(tmp_path, body))
    assert lengths(trace, "r") == [(10, 2, 0), (12, 3, 0), (15, 1, None)]
    assert trace.info["reader"]["api_token_length_clamped"] == 2
    assert trace.info["reader"]["prompts_computed"] == 2


def test_bad_text_names_file_request_and_segment(tmp_path: Path) -> None:
    body = {"r": [{"prompt_tokens": 3, "completion": 17}]}
    path = write(tmp_path, body)
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert str(info.value) == f"{path}: request 'r', segment 0: completion must be a string"


def test_time_scale_multiplies_every_call(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, LAST_CALL), last_call="run")
    scaled = with_time_scale(trace, 0.25)
    times = [s.api_time for s in scaled.requests[0].script.segments]
    assert times == [pytest.approx(0.375), pytest.approx(0.5), None]
    assert scaled.info["time_scale"] == 0.25
    assert lengths(scaled, "r") == lengths(trace, "r")
    with pytest.raises(ValueError, match="longer than 3600"):
        with_time_scale(trace, 5000.0)


def many(n: int) -> Trace:
    return toolbench_like(n, rate=1.0, seed=3, scale=0.05)


def test_shuffle_is_seeded_and_differs_from_file_order() -> None:
    trace = many(40)
    ids = [r.request_id for r in trace.requests]
    inorder = sample_requests(trace, 10)
    assert [r.request_id for r in inorder.requests] == ids[:10]
    first = [r.request_id for r in sample_requests(trace, 10, "shuffle", seed=1).requests]
    again = [r.request_id for r in sample_requests(trace, 10, "shuffle", seed=1).requests]
    other = [r.request_id for r in sample_requests(trace, 10, "shuffle", seed=2).requests]
    assert first == again
    assert first != ids[:10] and first != other
    assert len(set(first)) == 10 and set(first) <= set(ids)
    # The load stays the file's: the picked requests take its first arrival times, in order.
    shuffled = sample_requests(trace, 10, "shuffle", seed=1)
    assert [r.arrival_time for r in shuffled.requests] == [
        r.arrival_time for r in trace.requests[:10]
    ]
    assert len(sample_requests(trace, 100).requests) == 40
    assert sample_requests(trace, 100).info["file_requests"] == 40


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_applies_sample_time_scale_and_arrivals_to_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "file.json"
    trace = Trace(
        requests=[TraceRequest(request_id=r.request_id, script=r.script) for r in many(30).requests]
    )
    path.write_text(
        json.dumps(
            {
                r.request_id: [s.model_dump(exclude_none=True) for s in r.script.segments]
                for r in trace.requests
            }
        )
    )
    args = bench_args(
        "--trace", str(path), "--requests", "8", "--sample", "shuffle", "--time-scale", "0.5"
    )
    traces = build_traces(args, [2.0, 4.0], max_model_len=4096)
    for rate, got in traces.items():
        assert len(got) == 8 and got.has_arrivals and got.info["rate"] == rate
        original = {r.request_id: r.script for r in trace.requests}
        for req in got.requests:
            before = [s.api_time for s in original[req.request_id].segments]
            after = [s.api_time for s in req.script.segments]
            assert after == [None if t is None else pytest.approx(t * 0.5) for t in before]
    file_order = [r.request_id for r in trace.requests]
    assert [r.request_id for r in traces[2.0].requests] != file_order[:8]


def test_bench_rejects_a_bad_file_before_the_engine_starts(tmp_path: Path) -> None:
    body = json.loads(json.dumps(LAST_CALL))
    body["r"][1]["completion_tokens"] = 0
    path = write(tmp_path, body)
    with pytest.raises(SystemExit) as info:
        build_traces(bench_args("--trace", str(path)), [1.0], max_model_len=4096)
    message = str(info.value)
    assert "\n" not in message
    for part in (str(path), "request 'r'", "segment 1", "completion_tokens"):
        assert part in message


def test_bench_reports_contexts_over_max_model_len(tmp_path: Path) -> None:
    path = write(tmp_path, LAST_CALL)
    args = bench_args("--trace", str(path), "--last-call", "run")
    with pytest.raises(SystemExit, match=r"1 of 2 requests .* max_model_len=16 .*'r' \(21 tokens"):
        build_traces(args, [1.0], max_model_len=16)
    assert len(build_traces(args, [1.0], max_model_len=21)[1.0]) == 2
