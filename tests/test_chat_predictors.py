"""bench/chat_predictors.py without an engine: the workload it replays and the oracle's lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chat_predictors import (
    DEFAULT_DATA,
    SegmentLog,
    build_workload,
    oracle_call,
    oracle_forecast,
    read_records,
    write_report,
)
from bench.results import RequestResult
from lamps_core.length_model import SegmentContext
from lamps_core.request_meta import RequestMeta
from lamps_vllm.chat_session import ChatPlan, _sampling_params


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return read_records(Path(DEFAULT_DATA))


def test_workload_is_the_same_for_a_seed_and_held_out_only(records: list[dict]) -> None:
    a = build_workload(records, 48, 0.4, seed=0)
    b = build_workload(records, 48, 0.4, seed=0)
    assert a == b  # every variant and round replays this list
    assert build_workload(records, 48, 0.4, seed=1) != a
    held_out = {r["id"] for r in records if r["split"] == "held_out"}
    assert {r.record_id for r in a} <= held_out
    assert len({r.record_id for r in a}) == 48
    arrivals = [r.arrival_s for r in a]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    # Poisson at 0.4/s: 47 gaps of mean 2.5 s, well within a factor of two.
    assert 0.5 * 47 * 2.5 < arrivals[-1] < 1.5 * 47 * 2.5
    choices = {r.tool_choice for r in a}
    assert "auto" in choices and choices & {"required", "calculator", "http_get", "simulated_api"}
    assert all(1.0 <= r.simulated_call_s <= 4.0 for r in a)


def test_oracle_returns_each_segments_recorded_length(records: list[dict]) -> None:
    record = next(r for r in records if r["split"] == "held_out" and len(r["segments"]) > 1)
    lengths = [s["decode_tokens"] for s in record["segments"]]
    forecast = oracle_forecast(lengths)
    for i, s in enumerate(record["segments"]):
        context = SegmentContext.from_dict(s["context"])
        assert context.segment_index == i
        assert forecast(context, None) == lengths[i]
    # A segment the recording lacks (the replay diverged): no forecast, the policy's default.
    assert forecast(SegmentContext(segment_index=len(lengths)), None) is None


def test_segment_log_keeps_forecast_and_decoded_without_learning() -> None:
    log = SegmentLog(oracle_forecast([40, 7]), oracle_call(["calculator", None]))
    first, second = SegmentContext(segment_index=0), SegmentContext(segment_index=1)
    assert (log.predict_call(first), log.predict_call(second)) == ("calculator", None)
    assert log.predict_decode_tokens(first, 500) == 40
    assert log.observe(first, 38, "calculator", False) is False
    assert log.predict_decode_tokens(second, 460) == 7
    log.observe(second, 7, None, False)
    assert log.segments == [(0, 40, 38), (1, 7, 7)]


def test_policy_variant_reaches_the_meta_only_when_the_server_sets_it() -> None:
    plan = ChatPlan("r", [{"role": "user", "content": "hi"}], [], "none", 16, 0)
    meta = RequestMeta.from_extra_args(_sampling_params(plan, "none", 16, 0, 0.0, None).extra_args)
    assert meta is not None and meta.policy_variant is None
    plan.policy_variant = "infercept"
    meta = RequestMeta.from_extra_args(_sampling_params(plan, "none", 16, 0, 0.0, None).extra_args)
    assert meta is not None and meta.policy_variant == "infercept"


def test_an_auto_turns_call_forecast_is_a_prediction_never_a_known_call() -> None:
    tool = {"type": "function", "function": {"name": "calculator", "parameters": {}}}
    plan = ChatPlan("r", [{"role": "user", "content": "3*4?"}], [tool], "auto", 16, 1)
    params = _sampling_params(plan, "auto", 16, 0, 0.0, None, 12, "calculator")
    meta = RequestMeta.from_extra_args(params.extra_args)
    assert meta is not None and meta.predicted_call_tool == "calculator"
    # The engine pauses only for a call the model writes: a forecast sets no known call.
    assert meta.ends_in_api_call is False and meta.api_type is None
    forced = RequestMeta.from_extra_args(
        _sampling_params(plan, "required", 16, 0, 0.0, None, 12, "calculator").extra_args
    )
    assert forced is not None and forced.predicted_call_tool is None  # known, not forecast


def test_report_of_synthetic_runs(tmp_path: Path) -> None:
    # What the bench writes after its runs, on made-up results: oracle fastest, infercept
    # slowest, learned halfway, so learned keeps half of the oracle's gain.
    labels = ["oracle", "learned", "default", "infercept"]
    latency = {"oracle": 10.0, "learned": 15.0, "default": 18.0, "infercept": 20.0}
    results = [
        RequestResult(
            request_id=f"q{i}",
            policy=label,
            rate=0.2,
            round=r,
            arrival=float(i),
            first_token=i + 1.0,
            finish=i + latency[label] + r,
            output_tokens=50,
        )
        for label in labels
        for r in range(2)
        for i in range(4)
    ]
    segments = [
        {"request_id": "q0", "policy": label, "round": 0, "segment": 0, "predicted": p,
         "decoded": 40, "recorded": 40}
        for label, p in [("oracle", 40), ("learned", 60), ("default", None), ("infercept", None)]
    ]  # fmt: skip
    config = {"requests": 4, "rate": 0.2, "seed": 0, "rounds": 2, "kv_cache_mib": 192}
    text = write_report(tmp_path, labels, results, segments, config)
    kept = text.split("gain over infercept kept")[1].splitlines()
    assert [line.split() for line in kept[1:3]] == [
        ["0.2", "learned", "0.50", "[0.50,", "0.50]"],
        ["0.2", "default", "0.20", "[0.20,", "0.20]"],
    ]
    assert (tmp_path / "results.json").exists() and (tmp_path / "ratios.txt").exists()
    assert (tmp_path / "requests.jsonl.gz").exists() and not (tmp_path / "requests.jsonl").exists()
