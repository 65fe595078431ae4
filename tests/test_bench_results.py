"""Benchmark summaries, results files, ratio table and plots (bench.results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.results import (
    PolicySummary,
    RequestResult,
    percentile,
    plot,
    ratio_table,
    read_request_results,
    read_results,
    summarize,
    summarize_all,
    write_request_results,
    write_results,
)
from lamps.bench import parse_policies


def result(rid: str, arrival: float, finish: float | None, **kw: object) -> RequestResult:
    fields: dict[str, object] = {
        "request_id": rid,
        "policy": "lamps",
        "rate": 2.0,
        "arrival": arrival,
        "finish": finish,
        "first_token": None if finish is None else arrival + 0.5,
        "output_tokens": 10,
    }
    fields.update(kw)
    return RequestResult.model_validate(fields)


def hand_made() -> list[RequestResult]:
    return [
        # latency 4, ttft 1, (4 - 2) / 10 = 0.2 s/token
        result("a", 0.0, 4.0, first_token=1.0, api_time=2.0, strategies=["preserve", "swap"]),
        # latency 2, ttft 0.5, 2 / 20 = 0.1
        result("b", 1.0, 3.0, output_tokens=20, cached_tokens=64, strategies=["discard"]),
        # latency 9 (finishes late), ttft 0.5, (9 - 5) / 8 = 0.5
        result("c", 2.0, 11.0, output_tokens=8, api_time=5.0, recomputed_tokens=32),
        result("d", 3.0, None, error="engine died"),
    ]


def test_percentile_interpolates_linearly() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 10.0], 99) == pytest.approx(3.0 + 0.97 * 7.0)


def test_drained_summary_by_hand() -> None:
    s = summarize(hand_made())
    m = s.drained
    assert (s.policy, s.rate, s.requests) == ("lamps", 2.0, 4)
    assert (m.completed, m.failed, m.unfinished) == (3, 1, 0)
    assert m.latency_mean_s == pytest.approx(5.0)
    assert m.latency_p50_s == pytest.approx(4.0)
    assert m.latency_p99_s == pytest.approx(4.0 + 0.98 * 5.0)
    assert m.ttft_mean_s == pytest.approx(2.0 / 3.0)
    assert m.ttft_p99_s == pytest.approx(0.5 + 0.98 * 0.5)
    assert m.normalized_latency_mean_s == pytest.approx((0.2 + 0.1 + 0.5) / 3)
    assert m.window_s == pytest.approx(11.0)  # first arrival 0 -> last finish 11
    assert m.throughput_rps == pytest.approx(3 / 11)
    assert m.throughput_tokens_per_s == pytest.approx(38 / 11)
    assert (m.cached_tokens, m.recomputed_tokens) == (64, 32)
    assert m.strategy_counts == {"discard": 1, "preserve": 1, "swap": 1}
    assert s.horizon is None


def test_unfinished_counts_as_failure_when_drained() -> None:
    results = [*hand_made()[:3], result("e", 4.0, None, first_token=4.2)]
    m = summarize(results).drained
    assert (m.completed, m.failed, m.unfinished) == (3, 1, 1)


def test_horizon_hides_a_late_finisher() -> None:
    s = summarize(hand_made(), horizon_s=6.0)
    h = s.horizon
    assert h is not None and "horizon" in h.label and "drained" in s.drained.label
    assert (h.completed, h.failed, h.unfinished) == (2, 1, 1)
    assert h.latency_mean_s == pytest.approx(3.0)  # c (9 s) finished at 11 s: left out
    assert s.drained.latency_mean_s == pytest.approx(5.0)
    assert h.latency_p99_s is not None and s.drained.latency_p99_s is not None
    assert h.latency_p99_s < s.drained.latency_p99_s
    assert h.throughput_rps == pytest.approx(2 / 6.0)
    assert h.strategy_counts == {"discard": 1, "preserve": 1, "swap": 1}


def test_summary_rejects_mixed_runs_and_summarize_all_splits() -> None:
    mixed = [*hand_made(), result("x", 0.0, 1.0, policy="vllm")]
    with pytest.raises(ValueError, match="several runs"):
        summarize(mixed)
    keys = [(s.policy, s.rate) for s in summarize_all(mixed)]
    assert keys == [("lamps", 2.0), ("vllm", 2.0)]


def test_result_times_must_follow_arrival() -> None:
    with pytest.raises(ValueError, match="before arrival"):
        result("z", 5.0, 4.0)


def sweep() -> tuple[list[PolicySummary], list[RequestResult]]:
    """Three policies at two rates; lamps twice as fast as infercept, four times vllm."""
    results = []
    for policy, factor in (("lamps", 1.0), ("infercept", 2.0), ("vllm", 4.0)):
        for rate in (1.0, 4.0):
            for i in range(20):
                arrival = i / rate
                latency = factor * (1.0 + i % 5) * rate
                results.append(
                    RequestResult(
                        request_id=str(i),
                        policy=policy,
                        rate=rate,
                        arrival=arrival,
                        first_token=arrival + 0.1 * factor,
                        finish=arrival + latency,
                        output_tokens=50,
                    )
                )
    return summarize_all(results, horizon_s=30.0), results


def test_ratio_table() -> None:
    summaries, _ = sweep()
    table = ratio_table(summaries)
    lines = table.splitlines()
    assert "lamps / other, drained" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[:2] for r in rows] == [
        ["1", "infercept"],
        ["1", "vllm"],
        ["4", "infercept"],
        ["4", "vllm"],
    ]
    assert rows[0][2:6] == ["0.50", "0.50", "0.50", "0.50"]
    assert rows[1][2:6] == ["0.25", "0.25", "0.25", "0.25"]
    assert float(rows[1][6]) > 1.0  # lamps drains sooner, so more requests/s
    missing = ratio_table(summaries, against=("sjf",))
    assert "n/a" in missing
    assert "horizon" in ratio_table(summaries, variant="horizon").splitlines()[0]


def test_results_files_round_trip(tmp_path: Path) -> None:
    summaries, results = sweep()
    config = {"workload": "toolbench", "rates": [1.0, 4.0], "out": tmp_path}
    path = write_results(tmp_path, summaries, config, machine={"gpu": "H100"})
    body = json.loads(path.read_text())
    assert body["machine"] == {"gpu": "H100"}
    assert body["config"]["out"] == str(tmp_path)
    assert set(body["results"]) == {"lamps", "infercept", "vllm"}
    assert set(body["results"]["lamps"]) == {"1", "4"}
    assert set(body["results"]["lamps"]["4"]) >= {"drained", "horizon", "horizon_s"}
    read, _ = read_results(path)
    assert read == sorted(summaries, key=lambda s: (s.policy, s.rate))
    assert read_request_results(write_request_results(tmp_path, results)) == results


def test_plots_are_png_files(tmp_path: Path) -> None:
    summaries, results = sweep()
    # One unfinished request: its CDF stays below 1 and its label says so.
    results.append(RequestResult(request_id="late", policy="vllm", rate=4.0, arrival=1.0))
    paths = plot(tmp_path, summaries, results)
    names = {p.name for p in paths}
    assert names == {
        "latency_vs_rate.png",
        "ttft_vs_rate.png",
        "throughput_vs_rate.png",
        "latency_cdf.png",
    }
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_policy_variants_keep_their_json_options_whole() -> None:
    specs = parse_policies('lamps,q=lamps:{"max_queued_s":1.0,"max_passed_over":null},vllm')
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("lamps", "lamps", None),
        ("q", "lamps", {"max_queued_s": 1.0, "max_passed_over": None}),
        ("vllm", "vllm", None),
    ]
    with pytest.raises(SystemExit, match="not JSON"):
        parse_policies('q=lamps:{"max_queued_s":}')
