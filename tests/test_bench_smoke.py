"""`lamps bench` end to end on the shared deployment: two policies on one engine, one after
another; results, plots and ratios come out and agree with each other (no timings checked)."""

from __future__ import annotations

import argparse
import asyncio
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
