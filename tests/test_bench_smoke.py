"""`lamps bench` end to end on the shared deployment: two policies on one engine, one after
another; results, plots and ratios come out and agree with each other (no timings checked)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
from pathlib import Path

import pytest

from lamps.bench import add_arguments, parse_policies, report, run_all
from lamps.bench_targets import DeploymentTarget
from lamps.local_stack import RunningStack

pytestmark = pytest.mark.engine


def test_bench_runs_policies_side_by_side(stack: RunningStack, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--workload",
            "toolbench",
            "--scale",
            "0.05",
            "--time-scale",
            "0.02",
            "--rate",
            "4",
            "--requests",
            "6",
            "--duration",
            "2",
            "--policies",
            "lamps,vllm",
            "--out",
            str(tmp_path),
        ]
    )
    policies = parse_policies(args.policies)
    outcome = asyncio.run(run_all(DeploymentTarget(), args, policies, [4.0], 2048))
    table = report(args, outcome, engine={"model": "smollm2-135m"})

    body = json.loads((tmp_path / "results.json").read_text())
    for policy in ("lamps", "vllm"):
        drained = body["results"][policy]["4"]["drained"]
        assert drained["completed"] == 6 and drained["failed"] == 0
        assert drained["latency_p99_s"] >= drained["latency_p50_s"] > 0
    runs = body["config"]["scheduler_per_run"]
    calls = sum(len(r.script.segments) - 1 for r in outcome["traces"][4.0].requests)
    assert runs["vllm"]["4"]["calls_discard"] == calls  # vLLM's policy discards every call
    strategies = ("preserve", "keep", "discard", "swap")
    assert sum(runs["lamps"]["4"][f"calls_{s}"] for s in strategies) == calls
    records = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(records) == 12
    for png in ("latency_vs_rate.png", "ttft_vs_rate.png", "latency_cdf.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert table.splitlines()[0].startswith("lamps / other")
    ratio_rows = table.split("\n\n")[0].splitlines()[2:]  # the latency table follows
    assert [line.split()[1] for line in ratio_rows] == ["vllm"]  # the run's others
    assert "where the mean latency goes" in table


def test_a_steady_run_counts_its_window_and_samples_the_engine(
    stack: RunningStack, tmp_path: Path
) -> None:
    """`--steady` through the deployment: the window's requests counted, the replica's queue and
    KV use sampled, slowdowns from the engine's measured costs, one request calibrated."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--workload", "toolbench", "--scale", "0.05", "--time-scale", "0.02", "--steady",
         "--rate", "4", "--duration", "2", "--warmup-s", "0.5", "--cooldown-s", "1",
         "--sample-every-s", "0.25", "--calibrate", "1", "--no-warmup", "--policies",
         "lamps,vllm", "--out", str(tmp_path)]
    )  # fmt: skip
    policies = parse_policies(args.policies)
    outcome = asyncio.run(run_all(DeploymentTarget(), args, policies, [4.0], 2048))
    report(args, outcome, engine={"model": "smollm2-135m"})

    body = json.loads((tmp_path / "results.json").read_text())
    steady = body["config"]["steady"]
    assert steady["window_s"] == [0.5, 2.0] and steady["costs"]["decode_step_s"] > 0
    assert steady["calibration"]["requests"] == 1
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    counted = [r for r in records if r["window"] and r["policy"] == "lamps"]
    drained = body["results"]["lamps"]["4"]["drained"]
    assert counted and drained["requests"] == len(counted) and drained["failed"] == 0
    assert drained["slowdown_p50"] >= 0.5 and drained["slo_attained"] is not None
    series = json.loads(gzip.decompress((tmp_path / "timeseries.json.gz").read_bytes()))
    run = series["vllm"]["4"][0]
    assert len(run["t"]) >= 2 and run["kv_blocks_total"] > 0
    assert steady["steadiness"]["vllm"]["4"][0]["span_s"] == [1.25, 2.0]
