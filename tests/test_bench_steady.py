"""`lamps bench --steady` and `--goodput` without an engine: which requests a steady run counts,
the steadiness check, the slowdown, the rate search over a fake attainment, and both drivers
against fake targets whose latency is a function of the load."""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.results import (
    EngineSeries,
    RateSearch,
    RequestResult,
    Window,
    bracket,
    goodput_summary,
    goodput_table,
    plot_attainment,
    slo_attainment,
    steadiness,
    steady_window,
    summarize,
    trend,
    unloaded_engine_s,
    unloaded_time_s,
    window_members,
)
from bench.workloads import Trace, TraceRequest
from lamps.bench import (
    STOPPED_EARLY,
    SteadyPlan,
    add_arguments,
    build_traces,
    goodput_workloads,
    parse_policies,
    report,
    run_all,
    run_goodput,
    run_one,
)
from lamps_core.costs import EngineCosts
from lamps_core.trace import TraceScript, TraceSegment

COSTS = EngineCosts(
    kv_bytes_per_token=1024,
    fwd_intercept_s=0.002,
    fwd_slope_s=1e-4,
    swap_slope_s=1e-6,
    decode_step_s=0.001,
)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # a full collection here takes ~1 s
    monkeypatch.setattr(gc, "freeze", lambda: None)
    monkeypatch.setattr("lamps.bench.plot", lambda *a, **k: [])  # 3 s a run's PNGs; tested apart


def script(prompt: int = 10, decode: int = 4, calls: int = 0, call_s: float = 0.0) -> TraceScript:
    segments, context = [], prompt
    for _ in range(calls):
        segments.append(TraceSegment(prompt_tokens=context, completion_tokens=decode,
                                     api_time=call_s, api_token_length=3))  # fmt: skip
        context += decode + 3
    segments.append(TraceSegment(prompt_tokens=context, completion_tokens=decode))
    return TraceScript(segments=segments)


# ---------------------------------------------------------------------------------------------
# The window


def test_window_defaults_to_a_fifth_of_the_duration_and_counts_arrivals_in_it() -> None:
    window = steady_window(30.0)
    assert (window.start_s, window.end_s) == (6.0, 30.0)
    assert window.second_half == (18.0, 30.0)
    assert steady_window(30.0, 0.0).start_s == 0.0
    arrivals = {"a": 0.0, "b": 5.99, "c": 6.0, "d": 29.99, "e": 30.0, "f": 41.0}
    assert window_members(arrivals, window) == {"c", "d"}  # [start, end)
    for bad in (30.0, -1.0):
        with pytest.raises(ValueError, match="warm-up"):
            steady_window(30.0, bad)
    with pytest.raises(ValueError, match="duration"):
        steady_window(0.0)


def test_steady_flags_are_checked_before_anything_starts() -> None:
    from lamps.bench import check_steady_args

    policies = parse_policies("lamps,vllm")
    for argv, message in [
        (["--steady", "--requests", "9"], "no --requests"),
        (["--steady", "--warmup-s", "60"], "warm-up"),
        (["--steady", "--slo-share", "1.5"], "slo-share"),
        (["--goodput", "--router", "memory,pow2"], "no --router"),
    ]:
        with pytest.raises(SystemExit, match=message):
            check_steady_args(bench_args("--workload", "toolbench", *argv), policies)
    with pytest.raises(SystemExit, match="own"):
        check_steady_args(bench_args("--workload", "toolbench", "--goodput"),
                          parse_policies("lamps,stock"))  # fmt: skip
    args = bench_args("--workload", "toolbench", "--goodput")
    check_steady_args(args, policies)
    assert args.steady  # --goodput is a search over steady runs


def test_a_steady_trace_is_the_poisson_arrivals_until_the_cooldown_ends() -> None:
    args = bench_args("--workload", "toolbench", "--scale", "0.05", "--steady", "--rate", "20",
                      "--duration", "10", "--warmup-s", "2", "--cooldown-s", "3")  # fmt: skip
    trace = build_traces(args, [20.0], 2048)[20.0]
    arrivals = [r.arrival_time or 0.0 for r in trace.requests]
    assert max(arrivals) < 13.0 and len(trace) == pytest.approx(20 * 13, rel=0.2)
    in_window = sum(2.0 <= t < 10.0 for t in arrivals)
    assert in_window == pytest.approx(160, rel=0.25)
    # The same seed gives the same requests as a plain run's, only more of them.
    plain = build_traces(bench_args("--workload", "toolbench", "--scale", "0.05", "--rate", "20",
                                    "--duration", "10"), [20.0], 2048)[20.0]  # fmt: skip
    assert trace.requests[: len(plain)] == plain.requests[: len(trace)][: len(plain)]
    with pytest.raises(SystemExit, match="no request arrives"):
        build_traces(bench_args("--workload", "toolbench", "--steady", "--rate", "0.001",
                                "--duration", "1"), [0.001], 2048)  # fmt: skip


class SleepTarget:
    """Answers each replay after `latency(request id, script)` seconds (cancellable); reports
    engine state from the number in flight and fixed costs."""

    def __init__(self, latency: Callable[[str, TraceScript], float]) -> None:
        self.latency = latency
        self.sent: list[str] = []
        self.in_flight = 0
        self.cancelled = 0

    async def replay(self, request_id: str, script: TraceScript, *rest: Any) -> Any:
        self.sent.append(request_id)
        self.in_flight += 1
        latency = self.latency(request_id, script)
        try:
            await asyncio.sleep(latency)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        segments = [
            SimpleNamespace(
                completion_tokens=s.completion_tokens,
                prompt_tokens=s.prompt_tokens,
                cached_tokens=0,
                api_duration_s=s.api_time,
                queue_and_prefill_s=0.0,
            )
            for s in script.segments
        ]
        return SimpleNamespace(ttft_s=latency / 2, latency_s=latency, segments=segments)

    async def reset_prefix_cache(self) -> None:
        return None

    async def scheduler_stats(self) -> dict[str, Any]:
        return {"costs": COSTS.to_dict(), "calls_discard": 0}

    async def engine_stats(self) -> dict[str, Any]:
        return {"waiting": self.in_flight, "running": 1, "kv_blocks_used": 10 * self.in_flight,
                "kv_blocks_total": 1000}  # fmt: skip


def fixed_trace(arrivals: list[float]) -> Trace:
    return Trace(
        requests=[
            TraceRequest(request_id=str(i), arrival_time=t, script=script(decode=2 + i))
            for i, t in enumerate(arrivals)
        ]
    )


def test_a_steady_run_counts_its_window_and_stops_when_its_requests_are_done() -> None:
    """Requests 2-4 arrive in [0.1, 0.25): they count and run to the end. 0 and 1 (warm-up)
    are recorded but not counted; 5 arrives after the window while 4 still runs and is
    cancelled once 4 ends, 6 never goes out."""
    trace = fixed_trace([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.6])
    latencies = {"0": 0.01, "1": 0.02, "2": 0.05, "3": 0.05, "4": 0.2, "5": 5.0, "6": 0.01}
    target = SleepTarget(lambda rid, s: latencies[rid.rsplit("-", 1)[1]])
    plan = SteadyPlan(Window(start_s=0.1, end_s=0.25), {str(i): 0.04 for i in range(7)}, 0.02)
    (spec,) = parse_policies("vllm")
    record: dict[str, Any] = {}
    got, _ = asyncio.run(run_one(target, trace, spec, 10.0, steady=plan, record=record))
    by_id = {r.request_id: r for r in got}
    assert sorted(by_id) == ["0", "1", "2", "3", "4"]
    assert [by_id[i].window for i in "01234"] == [False, False, True, True, True]
    assert all(by_id[i].completed for i in "234")
    assert record["tail_cancelled"] == 2 and not record["stopped_early"]
    assert target.cancelled == 1 and len(target.sent) == 6  # 5 went out and was cancelled
    assert by_id["4"].slowdown == pytest.approx(0.2 / 0.04, rel=0.3)
    series: EngineSeries = record["series"]
    assert len(series.t) >= 5 and series.kv_blocks_total == 1000
    # Only the window counts in the summary, and its SLO share is of the window.
    summary = summarize(got, slo_slowdown=2.0).drained
    assert summary.requests == 3 and summary.slo_attained == pytest.approx(2 / 3)


def test_a_goodput_run_stops_early_once_its_slo_share_is_lost() -> None:
    trace = fixed_trace([0.01 * i for i in range(20)])
    target = SleepTarget(lambda rid, s: 10.0)  # every request far past 5x its 0.01 s
    plan = SteadyPlan(Window(start_s=0.0, end_s=0.2), {str(i): 0.01 for i in range(20)}, 0.02,
                      stop_early=(5.0, 0.9))  # fmt: skip
    (spec,) = parse_policies("vllm")
    record: dict[str, Any] = {}
    got, _ = asyncio.run(asyncio.wait_for(
        run_one(target, trace, spec, 100.0, steady=plan, record=record), timeout=5.0))  # fmt: skip
    assert record["stopped_early"]
    assert len(got) == 20 and all(r.error == STOPPED_EARLY for r in got)
    assert slo_attainment(got, 5.0) == 0.0


# ---------------------------------------------------------------------------------------------
# Steadiness


def test_a_flat_series_is_steady_and_a_growing_queue_is_not() -> None:
    window = Window(start_s=2.0, end_s=12.0)  # second half: [7, 12)
    ts = [0.5 * i for i in range(30)]
    flat = EngineSeries(kv_blocks_total=1000)
    growing = EngineSeries(kv_blocks_total=1000)
    for t in ts:
        flat.add(t, {"waiting": 10 + (1 if int(t * 2) % 2 else -1), "kv_blocks_used": 500})
        growing.add(t, {"waiting": int(3 * t), "kv_blocks_used": 200 + 60 * t})
    steady = steadiness(flat, window)
    assert steady["steady"] is True and steady["span_s"] == [7.0, 12.0]
    assert steady["waiting"]["samples"] == 10 and abs(steady["waiting"]["slope_per_s"]) < 0.3
    assert steady["kv_blocks_used"]["relative_change"] == pytest.approx(0.0)
    unsteady = steadiness(growing, window)
    assert unsteady["steady"] is False
    assert unsteady["waiting"]["slope_per_s"] == pytest.approx(3.0, rel=0.05)
    assert unsteady["waiting"]["flat"] is False and unsteady["kv_blocks_used"]["flat"] is False
    assert steadiness(EngineSeries(), window)["steady"] is None  # nothing sampled: unknown


def test_small_levels_are_judged_against_their_floor() -> None:
    """A queue going 0 -> 1 over the half is not a trend; 0 -> 8 is."""
    ts = [float(i) for i in range(10)]
    assert trend(ts, [i // 9 for i in range(10)], (0.0, 10.0), floor=4.0).flat is True
    assert trend(ts, [i for i in range(10)], (0.0, 10.0), floor=4.0).flat is False
    assert trend(ts[:2], [0, 1], (0.0, 10.0), floor=4.0).flat is None
    # A level that jumps about: a slope within two standard errors of 0 is noise, not a trend.
    noisy = trend(ts[:6], [20, 0, 30, 0, 50, 5], (0.0, 6.0), floor=4.0)
    assert noisy.relative_change > 0.25 and noisy.slope_stderr > noisy.slope_per_s > 0
    assert noisy.flat is True


def test_a_run_waits_for_the_last_runs_blocks_before_emptying_the_cache() -> None:
    from lamps.bench import empty_prefix_cache

    answers = [False, False, True]

    class Busy:
        async def reset_prefix_cache(self) -> bool:
            return answers.pop(0)

    asyncio.run(empty_prefix_cache(Busy()))  # type: ignore[arg-type]
    assert answers == []


# ---------------------------------------------------------------------------------------------
# Slowdown


def test_unloaded_time_is_prefills_of_what_is_new_and_batch_1_decode_steps_plus_calls() -> None:
    s = script(prompt=100, decode=10, calls=2, call_s=1.5)
    # Segment 0 prefills 100 tokens, the others the 3 tokens each call returned; each segment
    # decodes 9 more tokens after its prefill step makes the first.
    engine = COSTS.t_fwd(100) + 2 * COSTS.t_fwd(3) + 3 * 9 * COSTS.decode_step_s
    assert unloaded_engine_s(s, COSTS) == pytest.approx(engine)
    assert unloaded_time_s(s, COSTS) == pytest.approx(engine + 3.0)


def test_slowdown_and_slo_attainment_count_failures_as_misses() -> None:
    def r(rid: str, latency: float | None, error: str | None = None) -> RequestResult:
        return RequestResult(request_id=rid, policy="p", rate=1.0, arrival=1.0,
                             finish=None if latency is None else 1.0 + latency, error=error,
                             service_s=2.0, window=True)  # fmt: skip

    results = [r("a", 2.0), r("b", 10.0), r("c", 11.0), r("d", None), r("e", 1.0, "boom")]
    assert [x.slowdown for x in results] == [1.0, 5.0, 5.5, None, None]
    assert [x.meets_slo(5.0) for x in results] == [True, True, False, False, False]
    assert slo_attainment(results, 5.0) == pytest.approx(0.4)
    m = summarize(results, slo_slowdown=5.0).drained
    assert m.slo_attained == pytest.approx(0.4) and m.slo_slowdown == 5.0
    assert m.slowdown_p50 == pytest.approx(5.0)  # of the completed ones
    assert summarize(results).drained.slo_attained is None  # no SLO, no share
    unknown = RequestResult(request_id="x", policy="p", rate=1.0, arrival=0.0, finish=1.0)
    assert unknown.slowdown is None and not unknown.meets_slo(100.0)


# ---------------------------------------------------------------------------------------------
# The rate search


def run_search(search: RateSearch, limit: dict[str, float]) -> list[list[float]]:
    """Drives `search` with a fake attainment: policy p meets the SLO up to `limit[p]`."""
    batches = []
    while rates := search.propose():
        batches.append(rates)
        for rate in rates:
            search.record(rate, {p: rate <= limit[p] for p in search.policies})
        assert len(batches) < 50
    return batches


def test_search_doubles_until_every_policy_fails_then_bisects_each_bracket() -> None:
    search = RateSearch(8.0, ["lamps", "vllm"], bisect_steps=2)
    batches = run_search(search, {"lamps": 40.0, "vllm": 12.0})
    assert batches[:3] == [[8.0], [16.0], [32.0]]
    assert batches[3] == [64.0]  # lamps still met at 32
    # Bisection: the geometric middles of [8, 16) and [32, 64), then of what is left.
    assert batches[4] == [11.3, 45.3]
    assert len(batches) == 6 and search.steps == 2
    brackets = search.brackets()
    assert brackets["vllm"].met is not None and brackets["vllm"].failed is not None
    assert brackets["vllm"].met <= 12.0 < brackets["vllm"].failed
    assert brackets["lamps"].met <= 40.0 < brackets["lamps"].failed  # type: ignore[operator]
    assert brackets["lamps"].failed / brackets["lamps"].met < 1.2  # type: ignore[operator]


def test_search_halves_when_everything_fails_at_the_start() -> None:
    search = RateSearch(64.0, ["a", "b"], bisect_steps=0)
    batches = run_search(search, {"a": 10.0, "b": 20.0})
    assert batches == [[64.0], [32.0], [16.0], [8.0]]
    assert search.brackets()["a"].model_dump() == {"met": 8.0, "failed": 16.0}
    assert search.brackets()["b"].model_dump() == {"met": 16.0, "failed": 32.0}


def test_search_stays_within_its_range_and_says_where_a_side_is_missing() -> None:
    search = RateSearch(4.0, ["fast", "slow"], min_rate=2.0, max_rate=16.0, bisect_steps=3)
    run_search(search, {"fast": 1000.0, "slow": 0.5})
    assert search.tried == [2.0, 4.0, 8.0, 16.0]
    assert search.brackets()["fast"].model_dump() == {"met": 16.0, "failed": None}  # >= 16
    assert search.brackets()["slow"].model_dump() == {"met": None, "failed": 2.0}  # < 2


def test_search_tries_one_middle_for_brackets_that_share_it() -> None:
    search = RateSearch(10.0, ["a", "b", "c"], bisect_steps=1)
    batches = run_search(search, {"a": 25.0, "b": 30.0, "c": 15.0})
    assert batches[-1] == [14.1, 28.3]  # a and b share [20, 40): one middle for both


def test_a_met_rate_above_a_failed_one_does_not_raise_the_bracket() -> None:
    assert bracket({8.0: True, 16.0: False, 32.0: True}).model_dump() == {
        "met": 8.0,
        "failed": 16.0,
    }
    assert bracket({}).model_dump() == {"met": None, "failed": None}
    with pytest.raises(ValueError, match="factor"):
        RateSearch(1.0, ["a"], factor=1.0)


def test_goodput_summary_brackets_per_round_and_ratios_with_their_range(tmp_path: Path) -> None:
    attainment = {
        "lamps": {8.0: [1.0, 1.0], 16.0: [0.95, 0.85], 32.0: [0.5, 0.4]},
        "vllm": {8.0: [0.92, 0.95], 16.0: [0.7, 0.6], 32.0: [0.1, 0.0]},
    }
    summary = goodput_summary(attainment, share=0.9)
    lamps, vllm = summary["policies"]["lamps"], summary["policies"]["vllm"]
    assert lamps["bracket"] == {"met": 16.0, "failed": 32.0}  # median 0.90 at 16
    assert [b["met"] for b in lamps["per_round"]] == [16.0, 8.0]
    assert vllm["bracket"] == {"met": 8.0, "failed": 16.0}
    ratio = summary["ratios"]["vllm"]
    assert (ratio["ratio"], ratio["low"], ratio["high"]) == (2.0, 1.0, 4.0)
    assert ratio["per_round"]["per_round"] == [2.0, 1.0]
    table = goodput_table("toolbench", summary, 5.0)
    assert "90% of requests" in table and "[16, 32)" in table and "2.00" in table
    pytest.importorskip("matplotlib")
    png = plot_attainment(tmp_path / "curve.png", {"toolbench": summary}, 0.9, 5.0)
    assert png.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# The drivers, against a target whose slowdown is a function of the policy and the rate


def load_latency(caps: dict[str, float]) -> Callable[[str, TraceScript], float]:
    """Latency = unloaded engine time x (1 + rate / cap of the run's policy): a policy meets a
    5x SLO up to 4 x its cap, whatever the arrivals' noise."""
    run_id = re.compile(r"^(?P<label>\w+)-(?P<rate>[\d.]+)-r\d+-")

    def latency(request_id: str, s: TraceScript) -> float:
        m = run_id.match(request_id)
        slowdown = 1.0 if m is None else 1.0 + float(m["rate"]) / caps[m["label"]]
        return unloaded_engine_s(s, COSTS) * slowdown

    return latency


def test_a_steady_comparison_reports_the_window_steadiness_and_slowdowns(
    tmp_path: Path,
) -> None:
    args = bench_args("--workload", "toolbench", "--scale", "0.05", "--time-scale", "0",
                      "--steady", "--rate", "40", "--duration", "0.6", "--warmup-s", "0.1",
                      "--sample-every-s", "0.05", "--calibrate", "2", "--no-warmup",
                      "--policies", "a=vllm,b=vllm", "--out", str(tmp_path))  # fmt: skip
    target = SleepTarget(load_latency({"a": 40.0, "b": 5.0}))
    outcome = asyncio.run(run_all(target, args, parse_policies(args.policies), [40.0], 2048))
    assert outcome["calibration"]["requests"] == 2
    assert outcome["calibration"]["ratio_median"] == pytest.approx(1.0, rel=0.5)
    assert outcome["costs"] == COSTS.to_dict()
    report(args, outcome, engine={})
    body = json.loads((tmp_path / "results.json").read_text())
    steady = body["config"]["steady"]
    assert steady["window_s"] == [0.1, 0.6] and steady["slo"] == {"slowdown": 5.0, "share": 0.9}
    assert len(steady["steadiness"]["a"]["40"]) == 1
    a, b = body["results"]["a"]["40"]["drained"], body["results"]["b"]["40"]["drained"]
    assert a["slo_attained"] == 1.0 and a["slowdown_p50"] == pytest.approx(2.0, rel=0.3)
    assert b["slo_attained"] == 0.0  # 1 + 40/5 = 9x
    assert body["results"]["a"]["40"]["horizon"] is None  # a steady run has no horizon figure
    records = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert {r["window"] for r in records} == {True, False}
    assert a["requests"] == sum(r["window"] for r in records if r["policy"] == "a")
    series = json.loads(gzip.decompress((tmp_path / "timeseries.json.gz").read_bytes()))
    assert len(series["b"]["40"][0]["t"]) >= 3


def test_goodput_search_on_two_workloads_brackets_each_policy(tmp_path: Path) -> None:
    args = bench_args("--workload", "toolbench,onecall", "--scale", "0.05", "--time-scale", "0",
                      "--goodput", "--rate", "40", "--duration", "0.3", "--warmup-s", "0.06",
                      "--bisect-steps", "1", "--calibrate", "1", "--sample-every-s", "0.05",
                      "--policies", "a=vllm,b=vllm", "--out", str(tmp_path))  # fmt: skip
    args.steady = True
    workloads = goodput_workloads(args, [40.0])
    assert [w.name for w in workloads] == ["toolbench", "onecall"]
    assert workloads[1].args.out == tmp_path / "onecall" and workloads[1].args.workload == "onecall"
    for w in workloads:
        w.first = build_traces(w.args, [w.start], 2048)[w.start]
    target = SleepTarget(load_latency({"a": 60.0, "b": 24.0}))  # 5x at 240/s and at 96/s
    body = asyncio.run(run_goodput(target, args, workloads, parse_policies(args.policies), 2048,
                                   {}, started=0.0))  # fmt: skip
    for name in ("toolbench", "onecall"):
        w = body["workloads"][name]
        a, b = w["policies"]["a"]["bracket"], w["policies"]["b"]["bracket"]
        assert w["tried"][:4] == [40.0, 80.0, 160.0, 320.0]
        assert a["met"] <= 240 < a["failed"] and b["met"] <= 96 < b["failed"]
        assert a["failed"] / a["met"] < 2 and b["failed"] / b["met"] < 2  # one bisection each
        assert w["ratios"]["b"]["ratio"] == pytest.approx(a["met"] / b["met"])
        assert w["stopped_early"]["b"]["320"] == [True]  # failing runs end early
        assert (tmp_path / name / "results.json").exists()
    written = json.loads((tmp_path / "goodput.json").read_text())
    assert written["format"] == "lamps-bench-goodput/1" and written["costs"] == COSTS.to_dict()
    assert "goodput ratio a / other" in (tmp_path / "goodput.txt").read_text()


def test_goodput_budget_stops_the_search_and_says_so(tmp_path: Path) -> None:
    args = bench_args("--workload", "toolbench", "--scale", "0.05", "--time-scale", "0",
                      "--goodput", "--rate", "40", "--duration", "0.3", "--warmup-s", "0.05",
                      "--budget-s", "0.4", "--calibrate", "0", "--no-warmup",
                      "--policies", "a=vllm,b=vllm", "--out", str(tmp_path))  # fmt: skip
    args.steady = True
    (w,) = goodput_workloads(args, [40.0])
    w.first = build_traces(w.args, [w.start], 2048)[w.start]
    target = SleepTarget(load_latency({"a": 60.0, "b": 24.0}))
    body = asyncio.run(run_goodput(target, args, [w], parse_policies(args.policies), 2048, {},
                                   started=time.monotonic()))  # fmt: skip
    result = body["workloads"]["toolbench"]
    assert result["cut"] and result["cut"].startswith("--budget-s")
    assert 1 <= len(result["tried"]) < 4
    assert "search cut short" in (tmp_path / "goodput.txt").read_text()


def test_every_policy_and_rate_of_a_search_has_its_attainment_per_round() -> None:
    attainment = {"a": {10.0: [1.0, None]}, "b": {10.0: [0.5, 0.7]}}
    summary = goodput_summary(attainment, share=0.9)
    assert summary["policies"]["a"]["attainment"]["10"]["median"] == 1.0
    assert math.isclose(summary["policies"]["b"]["attainment"]["10"]["median"], 0.6)


def test_a_search_cut_by_its_budget_resumes_in_the_next_call(tmp_path: Path) -> None:
    """--resume: the rates tried before are not run again, their attainment counts, and the new
    goodput.json holds the whole search; a different search is refused."""
    common = ["--workload", "toolbench", "--scale", "0.05", "--time-scale", "0", "--goodput",
              "--rate", "40", "--duration", "0.3", "--warmup-s", "0.06", "--calibrate", "0",
              "--no-warmup", "--bisect-steps", "1", "--policies", "a=vllm,b=vllm"]  # fmt: skip
    policies = parse_policies("a=vllm,b=vllm")

    def search(*extra: str) -> tuple[dict[str, Any], SleepTarget]:
        args = bench_args(*common, *extra)
        args.steady = True
        (w,) = goodput_workloads(args, [40.0])
        w.first = build_traces(w.args, [w.start], 2048)[w.start]
        target = SleepTarget(load_latency({"a": 60.0, "b": 24.0}))
        body = asyncio.run(run_goodput(target, args, [w], policies, 2048, {},
                                       started=time.monotonic()))  # fmt: skip
        return body, target

    first, _ = search("--budget-s", "0.4", "--out", str(tmp_path / "one"))
    tried = first["workloads"]["toolbench"]["tried"]
    assert first["workloads"]["toolbench"]["cut"] and len(tried) < 4
    second, target = search("--resume", str(tmp_path / "one"), "--out", str(tmp_path / "two"))
    result = second["workloads"]["toolbench"]
    assert result["tried"][: len(tried)] == tried and not result["cut"]
    assert not any(i.startswith(f"a-{rate:g}-") for i in target.sent for rate in tried)
    a, b = result["policies"]["a"]["bracket"], result["policies"]["b"]["bracket"]
    assert a["met"] <= 240 < a["failed"] and b["met"] <= 96 < b["failed"]
    assert set(result["steady"]["a"]) == {f"{rate:g}" for rate in result["tried"]}
    assert second["resumed_from"]["run"] == str(tmp_path / "one")
    with pytest.raises(SystemExit, match="slo_share"):
        search("--resume", str(tmp_path / "one"), "--slo-share", "0.5", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="another --out"):
        search("--resume", str(tmp_path / "one"), "--out", str(tmp_path / "one"))
