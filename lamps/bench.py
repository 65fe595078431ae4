"""`lamps bench`: the same requests against each policy, on one engine, one policy after another,
at each offered load; results, plots and the ratios of the first policy to the others.

Each (rate, policy) run starts from an empty prefix cache and waits until every request has
finished (drained); the horizon-style figure of the artifacts (what finished by `--duration`
after the first arrival) is reported beside it, labelled. Request ids, and so the synthetic
prompts, differ between runs, so no run finds another's KV blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from bench.results import (
    PolicySummary,
    RequestResult,
    plot,
    ratio_table,
    summarize_all,
    write_request_results,
    write_results,
)
from lamps_core.policies import POLICY_NAMES
from lamps_core.workloads import Trace, get_workload, read_trace, with_poisson_arrivals

if TYPE_CHECKING:  # the engine's modules load only when a run starts, not for --help
    from lamps.bench_targets import ReplayTarget

# Figures of the scheduler plugin that are counters: a run's share is after minus before.
_COUNTERS = (
    "calls_preserve",
    "calls_discard",
    "calls_swap",
    "demoted_to_discard",
    "demoted_to_swap",
    "swap_refused",
    "preemptions",
    "preserved_block_seconds",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a trace file (INFERCEPT/MARS format)")
    source.add_argument("--workload", help="a generated workload: see lamps_core.workloads")
    parser.add_argument(
        "--policies",
        default="lamps,infercept,vllm,sjf",
        help="comma-separated; a variant of a policy as LABEL=NAME:JSON_OPTIONS, e.g. "
        "'lamps-unguarded=lamps:{\"max_passed_over\":null}'; ratios.txt compares the first "
        "with each of the others",
    )
    parser.add_argument("--rate", default="1", help="offered loads, requests/s: R[,R...]")
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds of arrivals per run (and the horizon of the horizon figure)",
    )
    parser.add_argument("--requests", type=int, help="requests per run (default rate x duration)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink a workload's lengths and durations (CPU runs)",
    )
    parser.add_argument("--time-scale", type=float, help="shrink durations by this instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("cluster/serve-bench-cpu.yaml"),
        help="Serve config of the engine to run against",
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="drive an engine in this process instead of the Serve deployment "
        "(machines without Ray; same engine, plugin and replay code)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))


def load_trace(args: argparse.Namespace, rate: float, max_context: int) -> Trace:
    n = args.requests or max(1, round(rate * args.duration))
    if args.trace:
        trace = read_trace(args.trace)
        trace = trace.model_copy(update={"requests": trace.requests[:n]})
        return trace if trace.has_arrivals else with_poisson_arrivals(trace, rate, args.seed)
    return get_workload(args.workload)(
        n, rate, args.seed, scale=args.scale, time_scale=args.time_scale, max_context=max_context
    )


@dataclass(frozen=True)
class PolicySpec:
    """A policy as one run uses it: its label in the results, its name and its options."""

    label: str
    name: str
    options: dict[str, Any] | None = None


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside braces: a variant's JSON options have commas too."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_policies(text: str) -> list[PolicySpec]:
    specs = []
    for item in split_top_level(text):
        label, _, rest = item.partition("=") if "=" in item else (item, "", item)
        name, _, options = rest.partition(":")
        try:
            parsed = json.loads(options) if options else None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"options of {label!r} are not JSON: {exc}") from None
        if name not in POLICY_NAMES:
            raise SystemExit(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
        specs.append(PolicySpec(label, name, parsed))
    return specs


async def run_one(
    target: ReplayTarget, trace: Trace, spec: PolicySpec, rate: float, bar: tqdm
) -> tuple[list[RequestResult], dict[str, float]]:
    await target.reset_prefix_cache()
    before = await target.scheduler_stats()
    started = time.monotonic()
    policy = spec.label

    async def one(request: Any) -> RequestResult:
        await asyncio.sleep(max(0.0, started + request.arrival_time - time.monotonic()))
        sent = time.monotonic() - started
        script = request.script
        try:
            response = await target.replay(
                f"{policy}-{rate:g}-{request.request_id}", script, spec.name, spec.options
            )
        except Exception as exc:  # counted as a failed request, never dropped
            return RequestResult(
                request_id=request.request_id,
                policy=policy,
                rate=rate,
                arrival=sent,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            bar.update()
        resumed = response.segments[1:]
        return RequestResult(
            request_id=request.request_id,
            policy=policy,
            rate=rate,
            arrival=sent,
            first_token=sent + response.ttft_s,
            finish=sent + response.latency_s,
            output_tokens=sum(s.completion_tokens for s in response.segments),
            api_time=sum(s.api_duration_s or 0.0 for s in response.segments),
            segments=len(response.segments),
            cached_tokens=sum(s.cached_tokens for s in resumed),
            recomputed_tokens=sum(s.prompt_tokens - s.cached_tokens for s in resumed),
            queued_s=sum(s.queue_and_prefill_s for s in response.segments),
        )

    results = await asyncio.gather(*(one(r) for r in trace.requests))
    after = await target.scheduler_stats()
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in _COUNTERS}
    costs = after.get("costs", {})
    block_bytes = costs.get("kv_bytes_per_token", 0) * after.get("block_size", 0)
    delta["preserved_gb_s"] = delta["preserved_block_seconds"] * block_bytes / 1e9
    return list(results), delta


async def run_all(
    target: ReplayTarget,
    args: argparse.Namespace,
    policies: Sequence[PolicySpec],
    rates: Sequence[float],
    max_context: int,
) -> dict[str, Any]:
    traces = {rate: load_trace(args, rate, max_context) for rate in rates}
    total = sum(len(t) for t in traces.values()) * len(policies)
    results: list[RequestResult] = []
    runs: dict[str, dict[str, dict[str, float]]] = {}
    with tqdm(total=total, unit="req", desc="lamps bench") as bar:
        for rate in rates:
            for spec in policies:
                bar.set_postfix_str(f"{spec.label} @ {rate:g}/s")
                got, delta = await run_one(target, traces[rate], spec, rate, bar)
                results += got
                runs.setdefault(spec.label, {})[f"{rate:g}"] = delta
    return {"results": results, "runs": runs, "traces": traces}


def run_ratio_table(summaries: Sequence[PolicySummary], policies: str) -> str:
    """Ratios of the run's first policy to each of the others (a run of variants compares the
    variants; the default run, lamps to the baselines)."""
    base, *others = [spec.label for spec in parse_policies(policies)]
    return ratio_table(summaries, base=base, against=others)


def report(args: argparse.Namespace, outcome: dict[str, Any], engine: dict[str, Any]) -> str:
    results: list[RequestResult] = outcome["results"]
    summaries = summarize_all(results, horizon_s=args.duration)
    config = {
        "command": vars(args) | {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
        "engine": engine,
        "scheduler_per_run": outcome["runs"],
        "traces": {f"{rate:g}": trace.info for rate, trace in outcome["traces"].items()},
    }
    machine = {
        "node": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }
    write_results(args.out, summaries, config, machine)
    write_request_results(args.out, results)
    try:
        plot(args.out, summaries, results)
    except ImportError as exc:  # a GPU machine without matplotlib: plot later from the records
        print(f"no plots ({exc}); `lamps bench-plot {args.out}` draws them from requests.jsonl")
    table = run_ratio_table(summaries, args.policies)
    (args.out / "ratios.txt").write_text(table + "\n")
    return table


def replot(out: Path) -> str:
    """Plots and the ratio table again from a run's files (a run made where matplotlib was not
    installed, or plotted differently)."""
    from bench.results import read_request_results, read_results

    results = read_request_results(out / "requests.jsonl")
    _, body = read_results(out / "results.json")
    command = body.get("config", {}).get("command", {})
    summaries = summarize_all(results, horizon_s=command.get("duration"))
    plot(out, summaries, results)
    table = run_ratio_table(summaries, command.get("policies") or "lamps,infercept,vllm")
    (out / "ratios.txt").write_text(table + "\n")
    return table


def main(args: argparse.Namespace, project_dir: Path, data_dir: Path) -> int:
    import yaml

    from lamps.bench_targets import bench_engine_settings, engine_target

    policies = parse_policies(args.policies)
    rates = [float(r) for r in args.rate.split(",")]
    config = yaml.safe_load(args.config.read_text())
    settings = bench_engine_settings(config, project_dir)
    if not settings.model.exists():  # the embedded models are built on first use
        from lamps.model import prepare_models

        prepare_models(data_dir)
    engine = settings.model_dump(mode="json")

    if args.engine_only:

        async def go() -> dict[str, Any]:
            async with engine_target(settings) as target:
                return await run_all(target, args, policies, rates, settings.max_model_len)

        outcome = asyncio.run(go())
    else:
        from lamps.bench_targets import DeploymentTarget
        from lamps.local_stack import local_stack

        with local_stack(config, project_dir, data_dir, log_to_driver=False):
            outcome = asyncio.run(
                run_all(DeploymentTarget(), args, policies, rates, settings.max_model_len)
            )
    table = report(args, outcome, engine)
    print(table)
    print(f"results, plots and per-request records in {args.out}/")
    print(json.dumps(outcome["runs"], indent=1))
    return 0
