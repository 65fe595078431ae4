"""Benchmark summaries, results files, ratio table and plots (bench.results)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.results import (
    PolicySummary,
    RequestResult,
    combine_rounds,
    percentile,
    plot,
    ratio_table,
    read_request_results,
    read_results,
    round_ratios,
    rounds_summary,
    summarize,
    summarize_all,
    write_request_results,
    write_results,
)
from lamps.bench import (
    add_arguments,
    collector_paused,
    noisy_runs,
    parse_policies,
    replot,
    report,
    run_all,
    run_routers,
    schedule,
)
from lamps_core.trace import TraceScript


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


# ---------------------------------------------------------------------------------------------
# Rounds


def test_schedule_alternates_the_order_of_policies_per_round() -> None:
    a, b, c = parse_policies("a=vllm,b=lamps,c=sjf")
    runs = [(rate, r, spec.label) for rate, r, spec in schedule([4.0, 8.0], [a, b, c], 3)]
    assert runs == [
        (4.0, 0, "a"), (4.0, 0, "b"), (4.0, 0, "c"),
        (4.0, 1, "c"), (4.0, 1, "b"), (4.0, 1, "a"),
        (4.0, 2, "a"), (4.0, 2, "b"), (4.0, 2, "c"),
        (8.0, 0, "a"), (8.0, 0, "b"), (8.0, 0, "c"),
        (8.0, 1, "c"), (8.0, 1, "b"), (8.0, 1, "a"),
        (8.0, 2, "a"), (8.0, 2, "b"), (8.0, 2, "c"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="rounds"):
        schedule([4.0], [a], 0)
    # The second part of a comparison split over runs starts where the first left off.
    second = [(r, spec.label) for _, r, spec in schedule([4.0], [a, b, c], 1, first_round=1)]
    assert second == [(1, "c"), (1, "b"), (1, "a")]


def test_a_router_run_starts_each_fleet_in_the_order_its_first_round_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU fleet comparison is one round per 10-minute call: the second call must start with
    the other router, or the first router always runs on the colder machine."""
    fleets: list[str] = []

    @contextlib.contextmanager
    def no_stack(config: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        fleets.append(config["applications"][0]["deployments"][-1]["request_router_config"])
        yield

    async def no_replay(target: Any, args: Any, specs: Any, *rest: Any) -> dict[str, Any]:
        return {"results": [], "runs": {}, "runs_per_round": {}, "machine_per_round": {},
                "order": [spec.label for spec in specs]}  # fmt: skip

    monkeypatch.setattr("lamps.local_stack.local_stack", no_stack)
    monkeypatch.setattr("lamps.bench_targets.FleetTarget", lambda **kwargs: None)
    monkeypatch.setattr("lamps.bench.run_all", no_replay)
    config = {"applications": [{"deployments": []}]}
    (policy,) = parse_policies("lamps")
    orders = []
    for first_round in (0, 1):
        args = SimpleNamespace(router="memory,pow2", replicas=2, sessions=False,
                               first_round=first_round)  # fmt: skip
        outcome = run_routers(args, config, policy, [4.0], 2048, {}, Path("."), Path("."))
        orders.append(outcome["order"])
    assert orders == [["memory", "pow2"], ["pow2", "memory"]]
    assert fleets[0] != fleets[1] and fleets[1] == fleets[2]


class FakeTarget:
    """Answers every replay at once; records what it was sent and counts its calls."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.resets = 0
        self.calls = 0

    async def replay(self, request_id: str, script: TraceScript, *rest: Any) -> Any:
        self.ids.append(request_id)
        self.calls += script.num_api_calls
        seg = script.segments[0]
        segment = SimpleNamespace(
            completion_tokens=seg.completion_tokens,
            prompt_tokens=seg.prompt_tokens,
            cached_tokens=0,
            api_duration_s=seg.api_time,
            queue_and_prefill_s=0.01,
        )
        return SimpleNamespace(ttft_s=0.01, latency_s=0.02, segments=[segment])

    async def reset_prefix_cache(self) -> None:
        self.resets += 1

    async def scheduler_stats(self) -> dict[str, Any]:
        return {"calls_discard": self.calls, "preemptions": len(self.ids)}


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_all_warms_up_then_runs_rounds_with_new_ids_each_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # a full collection here takes ~1 s
    monkeypatch.setattr(gc, "freeze", lambda: None)
    args = bench_args(
        "--workload", "toolbench", "--scale", "0.05", "--rate", "1000", "--requests", "40",
        "--rounds", "3", "--policies", "a=vllm,b=vllm",
    )  # fmt: skip
    target = FakeTarget()
    outcome = asyncio.run(run_all(target, args, parse_policies(args.policies), [1000.0], 2048))
    warmup = [i for i in target.ids if i.startswith("warmup-")]
    assert len(warmup) == 32 and all(i.startswith("warmup-a-1000-") for i in warmup)
    assert target.ids[:32] == warmup  # before the first round
    assert outcome["warmup"]["requests"] == 32
    assert len(target.ids) == len(set(target.ids)) == 32 + 40 * 2 * 3  # no id twice
    assert target.resets == 1 + 2 * 3  # an empty prefix cache for every run
    assert [o[2] for o in outcome["order"]] == ["a", "b", "b", "a", "a", "b"]
    results = outcome["results"]
    assert len(results) == 40 * 2 * 3  # the warm-up's are discarded
    assert {(r.policy, r.round) for r in results} == {(p, r) for p in "ab" for r in range(3)}
    # Scheduler counters per round, each run's own share; the median over rounds beside them.
    per_round = outcome["runs_per_round"]["a"]["1000"]
    calls = sum(len(r.script.segments) - 1 for r in outcome["traces"][1000.0].requests)
    assert [d["calls_discard"] for d in per_round] == [calls] * 3
    assert [d["preemptions"] for d in per_round] == [40, 40, 40]
    assert outcome["runs"]["a"]["1000"]["calls_discard"] == calls
    conditions = outcome["machine_per_round"]["b"]["1000"]
    assert len(conditions) == 3 and all(m["wall_s"] > 0 and "load_1m" in m for m in conditions)

    # The files: per-round counters and ratios, the spread in ratios.txt, a flagged run noted.
    busy = {"wall_s": 10.0, "cpu_others_s": 9.0 * (os.cpu_count() or 1)}  # 90 % of the machine
    outcome["machine_per_round"]["b"]["1000"][1] |= busy
    args.out = tmp_path
    table = report(args, outcome, engine={})
    body = json.loads((tmp_path / "results.json").read_text())
    assert len(body["config"]["scheduler_per_round"]["b"]["1000"]) == 3
    assert {r["other"] for r in body["ratios"]} == {"b"}
    assert body["results"]["a"]["1000"]["rounds"] == 3
    written = (tmp_path / "ratios.txt").read_text().splitlines()
    assert "over 3 rounds" in written[0] and "[" in written[2]
    assert any(line.startswith("note: b at 1000/s, round 1:") for line in written)
    assert any(line.startswith("where the mean latency goes") for line in written)
    # The printed table is the file's, less the notes (printed apart).
    assert table.splitlines() == [line for line in written if not line.startswith("note: ")]

    args.warmup = False
    target = FakeTarget()
    asyncio.run(run_all(target, args, parse_policies(args.policies), [1000.0], 2048))
    assert not any(i.startswith("warmup-") for i in target.ids)
    # Played as conversations, each request is tens of chat turns: fewer warm up.
    args.sessions, args.rounds, args.warmup, target = True, 1, True, FakeTarget()
    outcome = asyncio.run(run_all(target, args, parse_policies(args.policies), [1000.0], 2048))
    assert outcome["warmup"]["requests"] == 8
    assert sum(i.startswith("warmup-") for i in target.ids) == 8


def test_runs_where_other_processes_took_the_cpu_are_flagged() -> None:
    quiet = {"wall_s": 20.0, "load_1m": 4.0, "cpu_others_s": 1.5}  # 4 % of 2 cores
    busy = {"wall_s": 28.0, "load_1m": 7.1, "cpu_others_s": 22.3}  # 40 %
    machine = {"a": {"12": [quiet, quiet, quiet]}, "b": {"12": [quiet, quiet, busy]}}
    notes = noisy_runs(machine, cpus=2)
    assert len(notes) == 1 and notes[0].startswith("b at 12/s, round 2: ") and "40%" in notes[0]
    assert noisy_runs({"a": {"12": [{"wall_s": 20.0, "load_1m": 9.0}]}}, cpus=2) == []


def test_collector_paused_during_a_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append("collect"))
    monkeypatch.setattr(gc, "freeze", lambda: collected.append("freeze"))
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        assert collected == ["collect", "freeze"]  # before the run, never inside it
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def rounds_of(latencies: dict[str, list[float]]) -> list[RequestResult]:
    """Per policy, round r: ten requests of latency `latencies[policy][r]`."""
    return [
        RequestResult(
            request_id=str(i),
            policy=policy,
            rate=2.0,
            round=r,
            arrival=float(i),
            first_token=i + latency / 10,
            finish=i + latency,
            output_tokens=10,
        )
        for policy, per_round in latencies.items()
        for r, latency in enumerate(per_round)
        for i in range(10)
    ]


# Per-round ratios 1/3, 2, 1.5: median 1.5; the ratio of the medians (2/2) would say 1.
ROUNDS = {"lamps": [1.0, 2.0, 3.0], "vllm": [3.0, 1.0, 2.0]}


def test_ratio_per_round_then_median_and_spread() -> None:
    summaries = summarize_all(rounds_of(ROUNDS))
    assert [(s.policy, s.round) for s in summaries] == [
        ("lamps", 0), ("lamps", 1), ("lamps", 2), ("vllm", 0), ("vllm", 1), ("vllm", 2),
    ]  # fmt: skip
    ratios = {r.metric: r.ratio for r in round_ratios(summaries, "lamps", ["vllm"])}
    mean = ratios["latency_mean_s"]
    assert mean.per_round == pytest.approx([1 / 3, 2.0, 1.5])
    assert (mean.median, mean.min, mean.max) == pytest.approx((1.5, 1 / 3, 2.0))
    assert ratios["ttft_mean_s"].median == pytest.approx(1.5)
    table = ratio_table(summaries, against=("vllm", "sjf"))
    assert "median [min, max] over 3 rounds" in table.splitlines()[0]
    row = table.splitlines()[2]
    assert row.split()[:5] == ["2", "vllm", "1.50", "[0.33,", "2.00]"]
    assert "n/a" in table.splitlines()[3]  # no sjf runs


def test_rounds_summary_and_combined_summary() -> None:
    summaries = summarize_all(rounds_of(ROUNDS))
    spreads = {s.policy: s for s in rounds_summary(summaries)}
    lat = spreads["vllm"].metrics["latency_mean_s"]
    assert lat.per_round == pytest.approx([3.0, 1.0, 2.0])
    assert (lat.median, lat.min, lat.max) == pytest.approx((2.0, 1.0, 3.0))
    assert set(spreads["vllm"].metrics) == {
        "latency_mean_s",
        "latency_p99_s",
        "ttft_mean_s",
        "throughput_tokens_per_s",
    }
    combined = {s.policy: s for s in combine_rounds(summaries)}["vllm"]
    assert (combined.round, combined.rounds, combined.requests) == (None, 3, 30)
    assert combined.drained.latency_mean_s == pytest.approx(2.0)  # median over rounds
    assert combined.drained.completed == 30 and combined.drained.output_tokens == 300  # totals
    assert "median over 3 rounds" in combined.drained.label
    one = summarize_all(rounds_of({"lamps": [1.0]}))
    assert combine_rounds(one) == one  # one round: the run itself


def test_results_files_with_rounds(tmp_path: Path) -> None:
    results = rounds_of(ROUNDS)
    summaries = summarize_all(results, horizon_s=30.0)
    path = write_results(
        tmp_path, summaries, {"rounds": 3}, ratios=round_ratios(summaries, "lamps", ["vllm"])
    )
    body = json.loads(path.read_text())
    assert body["results"]["vllm"]["2"]["rounds"] == 3
    assert body["results"]["vllm"]["2"]["drained"]["latency_mean_s"] == pytest.approx(2.0)
    per_round = body["rounds"]["vllm"]["2"]["per_round"]
    assert [s["round"] for s in per_round] == [0, 1, 2]
    assert body["rounds"]["vllm"]["2"]["spread"]["metrics"]["latency_mean_s"]["max"] == 3.0
    mean = next(r for r in body["ratios"] if r["metric"] == "latency_mean_s")
    assert mean["ratio"]["median"] == pytest.approx(1.5)
    read, _ = read_results(path)
    assert [(s.policy, s.rounds) for s in read] == [("lamps", 3), ("vllm", 3)]
    assert read_request_results(write_request_results(tmp_path, results)) == results
    # A record written before rounds existed reads as round 0.
    old = '{"request_id": "1", "policy": "lamps", "rate": 2.0, "arrival": 0.0, "finish": 1.0}'
    (tmp_path / "old.jsonl").write_text(old + "\n")
    assert read_request_results(tmp_path / "old.jsonl")[0].round == 0
    paths = plot(tmp_path, summaries, results)  # several rounds: medians with min-max bars
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def _run_dir(tmp_path: Path, name: str, router: str, latency: dict[str, float]) -> Path:
    """A --router run's folder: one round, one request per router at rate 2."""
    records = [
        result(f"{name}-{label}", 0.0, seconds, policy=label) for label, seconds in latency.items()
    ]
    command = {"router": router, "policies": "lamps", "rate": "2", "duration": 10.0}
    summaries = summarize_all(records, horizon_s=10.0)
    out = tmp_path / name
    write_results(out, summaries, {"command": command}, machine={"gpu": "H100"})
    write_request_results(out, records)
    return out


def test_bench_merge_puts_the_runs_rounds_in_turn(tmp_path: Path) -> None:
    from lamps.bench_merge import merge_runs

    first = _run_dir(tmp_path, "a", "memory,pow2", {"memory": 4.0, "pow2": 8.0})
    second = _run_dir(tmp_path, "b", "pow2,memory", {"memory": 6.0, "pow2": 6.0})
    table = merge_runs(tmp_path / "merged", [first, second])
    assert "over 2 rounds" in table
    merged = read_request_results(tmp_path / "merged" / "requests.jsonl")
    assert sorted((r.request_id, r.round) for r in merged) == [
        ("a-memory", 0),
        ("a-pow2", 0),
        ("b-memory", 1),
        ("b-pow2", 1),
    ]
    _, body = read_results(tmp_path / "merged" / "results.json")
    (ratio,) = [r for r in body["ratios"] if r["metric"] == "latency_mean_s"]
    assert (ratio["base"], ratio["other"]) == ("memory", "pow2")  # the first run's first router
    assert ratio["ratio"]["per_round"] == pytest.approx([0.5, 1.0])
    assert [m["run"] for m in body["config"]["merged_from"]] == [str(first), str(second)]


def test_a_run_cut_short_still_merges_and_replots(tmp_path: Path) -> None:
    """A run stopped by a time limit left run.json (written before its first run) and the runs
    it finished (runs.partial.jsonl): both bench-merge and bench-plot read them as a run."""
    import argparse

    from lamps.bench import keep_partial, write_started
    from lamps.bench_merge import MergeError, merge_runs

    first = _run_dir(tmp_path, "a", "memory,pow2", {"memory": 4.0, "pow2": 8.0})
    cut = tmp_path / "cut"
    command = {"router": "pow2,memory", "policies": "lamps", "rate": "2", "duration": 10.0}
    write_started(argparse.Namespace(out=cut, **command), engine={})
    keep_partial(cut, [result("cut-pow2", 0.0, 6.0, policy="pow2")], {"label": "pow2"})
    keep_partial(cut, [result("cut-memory", 0.0, 3.0, policy="memory")], {"label": "memory"})
    assert "cut short" in replot(cut)  # its own ratios, flagged, and its files written
    assert read_results(cut / "results.json")[1]["config"]["cut_short"] is True
    merge_runs(tmp_path / "merged", [first, cut])
    _, body = read_results(tmp_path / "merged" / "results.json")
    (ratio,) = [r for r in body["ratios"] if r["metric"] == "latency_mean_s"]
    assert ratio["ratio"]["per_round"] == pytest.approx([0.5, 0.5])
    assert [m["cut_short"] for m in body["config"]["merged_from"]] == [False, True]
    with pytest.raises(MergeError, match="neither results"):
        merge_runs(tmp_path / "merged2", [first, tmp_path / "empty"])


def test_bench_merge_pairs_one_router_runs_into_rounds(tmp_path: Path) -> None:
    """A round split by router (one fleet per device call): memory, pow2, then pow2, memory."""
    from lamps.bench_merge import merge_runs

    runs = [
        _run_dir(tmp_path, "a", "memory", {"memory": 4.0}),
        _run_dir(tmp_path, "b", "pow2", {"pow2": 8.0}),
        _run_dir(tmp_path, "c", "pow2", {"pow2": 6.0}),
        _run_dir(tmp_path, "d", "memory", {"memory": 3.0}),
    ]
    table = merge_runs(tmp_path / "merged", runs)
    assert "over 2 rounds" in table
    merged = read_request_results(tmp_path / "merged" / "requests.jsonl")
    assert sorted((r.request_id, r.round) for r in merged) == [
        ("a-memory", 0),
        ("b-pow2", 0),
        ("c-pow2", 1),
        ("d-memory", 1),
    ]
    _, body = read_results(tmp_path / "merged" / "results.json")
    (ratio,) = [r for r in body["ratios"] if r["metric"] == "latency_mean_s"]
    assert (ratio["base"], ratio["other"]) == ("memory", "pow2")
    assert ratio["ratio"]["per_round"] == pytest.approx([0.5, 0.5])
    assert body["config"]["command"]["router"] == "memory,pow2"
    alone = replot(runs[0])  # a one-router run's own table: where its time goes, no ratios
    assert "/ other" not in alone and "where the mean latency goes" in alone


def test_bench_merge_refuses_runs_of_different_comparisons(tmp_path: Path) -> None:
    from lamps.bench_merge import MergeError, merge_runs

    first = _run_dir(tmp_path, "a", "memory,pow2", {"memory": 4.0, "pow2": 8.0})
    other = _run_dir(tmp_path, "b", "memory,hash", {"memory": 4.0, "hash": 8.0})
    with pytest.raises(MergeError, match="compares"):
        merge_runs(tmp_path / "merged", [first, other])
    alone = _run_dir(tmp_path, "c", "memory", {"memory": 4.0})
    with pytest.raises(MergeError, match="nothing to compare"):
        merge_runs(tmp_path / "merged", [alone, alone])


def test_runs_with_requests_refused_by_the_server_are_flagged() -> None:
    from lamps.bench import refusal_notes

    busy = "RayTaskError(ServerBusyError): this server has 256 requests in flight, its limit"
    records = [
        result("a", 0.0, 4.0, policy="memory"),
        result("b", 0.0, None, policy="memory", error=busy),
        result("c", 0.0, None, policy="pow2", error="RuntimeError: the engine died"),
    ]
    assert refusal_notes(records) == [
        "memory @ 2/s round 0: 1 of 2 requests refused by the server (429: "
        "max_in_flight_requests or max_routing_wait_s); raise the limit for a benchmark"
    ]


def test_predictor_list_becomes_lamps_variants_then_infercept() -> None:
    from lamps.bench import predictor_policies

    specs = parse_policies(predictor_policies("oracle,noisy:0.2,estimates,estimates:0.75"))
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("oracle", "lamps", {"predictor": "oracle"}),
        ("noisy-0.2", "lamps", {"predictor": "noisy", "noise": 0.2}),
        ("estimates", "lamps", {"predictor": "estimates"}),
        ("estimates-0.75", "lamps", {"predictor": "estimates", "noise": 0.75}),
        ("infercept", "infercept", None),
    ]
    bad_lists = ("noisy", "noisy:-1", "noisy:nan", "psychic", "oracle:0.2", "estimates:", "")
    for bad in bad_lists:
        with pytest.raises(SystemExit):
            predictor_policies(bad)


def test_gain_kept_is_the_share_of_the_oracles_gain_over_infercept_per_round() -> None:
    from lamps.bench import gain_kept_table

    means = {  # per round: infercept, oracle, noisy
        0: {"infercept": 10.0, "oracle": 6.0, "noisy-0.2": 7.0},  # kept 3/4
        1: {"infercept": 12.0, "oracle": 8.0, "noisy-0.2": 10.0},  # kept 2/4
    }
    records = [
        result(f"{label}-{r}", 0.0, seconds, policy=label, round=r)
        for r, by_label in means.items()
        for label, seconds in by_label.items()
    ]
    table = gain_kept_table(summarize_all(records), ["oracle", "noisy-0.2", "infercept"])
    assert table.splitlines()[1].split() == ["2", "noisy-0.2", "0.62", "[0.50,", "0.75]"]
