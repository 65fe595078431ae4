"""`lamps bench`: the same requests against each policy, on one engine, one policy after another,
at each offered load; results, plots and the ratios of the first policy to the others.

Each (rate, policy) run starts from an empty prefix cache and waits until every request has
finished (drained); the horizon-style figure of the artifacts (what finished by `--duration`
after the first arrival) is reported beside it, labelled. Request ids, and so the synthetic
prompts, differ between runs (they name the policy, rate and round), so no run finds another's
KV blocks.

A comparison (docs/benchmarks.md, "How a comparison is run"): a warm-up run of the first policy
on the first requests of the trace (discarded), then `--rounds` rounds; within a rate, even
rounds run the policies in the given order and odd rounds in reverse, so no policy always runs
first or last. The driver's garbage collector is paused during each run and run between runs,
so its pauses don't land inside one policy's run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gzip
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from bench.results import (
    DEFAULT_WARMUP_SHARE,
    EngineSeries,
    PolicySummary,
    RateSearch,
    RequestResult,
    Window,
    certainly_missed,
    goodput_summary,
    goodput_table,
    latency_parts_table,
    plot,
    plot_attainment,
    rate_key,
    ratio_table,
    reaches,
    round_ratios,
    slo_attainment,
    steadiness,
    steady_window,
    summarize,
    summarize_all,
    unloaded_engine_s,
    unloaded_time_s,
    write_request_results,
    write_results,
)
from bench.workloads import (
    CHARS_PER_TOKEN,
    WORKLOADS,
    Trace,
    TraceFormatError,
    arrivals_before,
    get_workload,
    over_length,
    read_trace,
    sample_requests,
    with_poisson_arrivals,
    with_time_scale,
)
from lamps_core.costs import EngineCosts
from lamps_core.policies import POLICY_NAMES
from lamps_core.predictors import PREDICTOR_KINDS

if TYPE_CHECKING:  # the engine's modules load only when a run starts, not for --help
    from lamps.bench_targets import ReplayTarget

# Figures of the scheduler plugin that are counters: a run's share is after minus before.
_COUNTERS = (
    "calls_preserve",
    "calls_keep",
    "calls_discard",
    "calls_swap",
    "demoted_to_discard",
    "demoted_to_swap",
    "kept_given_back",
    "keep_released_resumed",
    "kept_swapped",
    # LAMPS's pauses: at the strategy planned when ranked, or planned again (and why).
    "policy_calls_as_planned",
    "policy_calls_replanned_stale",
    "policy_calls_replanned_length",
    "policy_calls_replanned_unranked",
    "policy_calls_replanned_unforeseen",
    "policy_calls_kept_while_slack",
    "swap_refused",
    "preemptions",
    "admission_refused",
    "policy_errors",
    "preserved_block_seconds",
    # The step profile (docs/benchmarks.md): where the engine's time and tokens went.
    "prefill_tokens",
    "decode_tokens",
    "decode_steps",
    "time_step_s",
    "time_schedule_s",
    "time_plugin_s",
)
# Not a policy: the control, vLLM's own scheduler without our plugin, on an engine of its own
# (same settings) started after the plugin's runs (--engine-only only).
STOCK = "stock"
# The host pool's counters (the scheduler's figures under "swap"), reported as swap_<name>.
_SWAP_COUNTERS = ("bytes_out", "bytes_in", "seconds_out", "seconds_in", "refused", "loaded_async")
# The warm-up run: this many requests of the first rate's trace, under the first policy.
WARMUP_REQUESTS = 32
# With --sessions each request is a conversation of tens of turns: fewer do the same warming
# (8: at least one per replica of the fleets benchmarked so far, spread by any router).
WARMUP_CONVERSATIONS = 8
# A run during which processes not ours used more than this share of the machine's CPU time is
# flagged. On the 2-core CPU machine runs at 35-40 % were 1.4-2x slower than their repeats; runs
# at up to 12 % (system daemons, idle neighbours) were within 2.5 % of each other.
NOISY_SHARE = 0.20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a trace file (INFERCEPT/MARS format)")
    source.add_argument(
        "--workload",
        help=f"a generated workload (bench/workloads.py): {', '.join(WORKLOADS)}; with "
        "--goodput, several, comma-separated",
    )
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
    parser.add_argument(
        "--time-scale",
        type=float,
        help="multiply every API call's duration by this (a workload: instead of --scale; "
        "a trace file: its api_time values)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sample",
        choices=("inorder", "shuffle"),
        default="inorder",
        help="which requests of a trace file run: the first n in file order, or the first n "
        "after a shuffle seeded by --seed",
    )
    parser.add_argument(
        "--last-call",
        choices=("drop", "run"),
        default="drop",
        help="a trace file's call on a request's last segment: drop it, or run it and decode "
        "one more token after it (as the artifacts do)",
    )
    parser.add_argument(
        "--chars-per-token",
        type=float,
        default=CHARS_PER_TOKEN,
        help="count a trace file's text at this many characters per token when the engine's "
        "model folder has no tokenizer (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every (rate, policy) this many times, alternating the policies' order; "
        "results give the median and spread over rounds",
    )
    parser.add_argument(
        "--first-round",
        type=int,
        default=0,
        help="number the rounds from this one (1: start with the reversed order): the next "
        "part of a comparison split over several runs, merged by `lamps bench-merge`",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the warm-up run (the first policy on the first "
        f"{WARMUP_REQUESTS} requests, discarded) before the first round",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("cluster/serve-bench-cpu.yaml"),
        help="Serve config of the engine to run against",
    )
    parser.add_argument(
        "--engine-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one engine setting of --config (a field of EngineSettings, the value "
        "read as YAML), e.g. swap_copy_stream=false; repeatable. It applies to every policy "
        "of the run: to ablate a setting, run with and without it and compare a ratio to a "
        "policy it does not touch (e.g. lamps / vllm for the copy stream)",
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="drive an engine in this process instead of the Serve deployment "
        "(machines without Ray; same engine, plugin and replay code)",
    )
    parser.add_argument(
        "--router",
        help="compare Serve request routers instead of policies: ROUTER[,ROUTER...] of "
        "lamps.bench_targets.ROUTERS (memory, pow2, round-robin, hash), each on a fleet of "
        "--replicas engine replicas running the first of --policies; ratios compare the first "
        "router with the others",
    )
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas of a --router run")
    parser.add_argument(
        "--sessions",
        action="store_true",
        help="play each request as a conversation of chat turns, one request per segment, the "
        "client waiting each call's duration between turns (its own tool): every turn is "
        "placed anew by the router and finds its context cached only where the last turn ran "
        "(lamps/bench_sessions.py). One policy, the engine's own: a chat turn names no variant",
    )
    parser.add_argument(
        "--predictor",
        help="compare LAMPS's predictors instead of policies: PREDICTOR[,PREDICTOR...] of "
        "oracle, estimates (learned call durations), estimates:P (and relative noise P on the "
        "lengths), noisy:P (the oracle with relative noise P); each runs as a LAMPS "
        "variant, INFERCEPT beside them, and the ratios add how much of the oracle's "
        "mean-latency gain over INFERCEPT each keeps",
    )
    steady = parser.add_argument_group(
        'steady load and goodput (docs/benchmarks.md, "Steady load and goodput")'
    )
    steady.add_argument(
        "--steady",
        action="store_true",
        help="Poisson arrivals at each rate for --duration seconds; only requests arriving in "
        "the measured window [--warmup-s, --duration) count (all of them run to the end), "
        "arrivals go on after it while they run; the engine's queue and KV use are sampled "
        "and the window's second half checked for being flat; slowdowns are reported",
    )
    steady.add_argument(
        "--warmup-s",
        type=float,
        help="seconds of arrivals discarded at the start of a steady run (default: "
        f"{DEFAULT_WARMUP_SHARE * 100:.0f}%% of --duration)",
    )
    steady.add_argument(
        "--cooldown-s",
        type=float,
        help="longest that arrivals go on after the window while its requests finish (not "
        "counted; default: the window's length)",
    )
    steady.add_argument(
        "--sample-every-s",
        type=float,
        default=0.5,
        help="how often a steady run samples the engine's queue and KV use (default: %(default)s)",
    )
    steady.add_argument(
        "--goodput",
        action="store_true",
        help="search each policy's goodput (implies --steady): the highest rate at which "
        "--slo-share of requests finish within --slo-slowdown times their unloaded time; "
        "--rate is where the search starts (one rate, or one per --workload), every rate "
        "tried runs every policy; --workload may name several (one engine start)",
    )
    steady.add_argument(
        "--slo-slowdown",
        type=float,
        default=5.0,
        help="the SLO: latency at most this many times the request's unloaded time "
        "(default: %(default)s)",
    )
    steady.add_argument(
        "--slo-share",
        type=float,
        default=0.9,
        help="the share of requests that must meet the SLO (default: %(default)s)",
    )
    steady.add_argument(
        "--search-factor",
        type=float,
        default=2.0,
        help="--goodput: the rate grows (shrinks) by this factor until bracketed "
        "(default: %(default)s)",
    )
    steady.add_argument(
        "--bisect-steps",
        type=int,
        default=3,
        help="--goodput: bisection steps once bracketed (default: %(default)s)",
    )
    steady.add_argument(
        "--min-rate",
        type=float,
        help="--goodput: lowest rate tried (default: start / factor^4, and at least 8 "
        "expected requests in the window)",
    )
    steady.add_argument(
        "--max-rate", type=float, help="--goodput: highest rate tried (default: start x factor^4)"
    )
    steady.add_argument(
        "--budget-s",
        type=float,
        help="--goodput: wall seconds for the whole command (engine start included); no rate "
        "is started that would not end within it by the runs so far, each workload getting "
        "an even share of what is left, and the brackets are reported as they stand",
    )
    steady.add_argument(
        "--no-early-stop",
        dest="early_stop",
        action="store_false",
        help="--goodput: run every rate to the end, even once a policy has missed the SLO "
        "for more than 1 - --slo-share of the window's requests (default: stop it there)",
    )
    steady.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="--goodput: go on with the searches of an earlier --goodput run's folder (its "
        "goodput.json; same settings, another --out): the rates it tried are not run again, "
        "its attainment counts, and the new goodput.json holds both (a search longer than one "
        "device call)",
    )
    steady.add_argument(
        "--keep-requests",
        action="store_true",
        help="--goodput: also write each workload's per-request records (its windows' "
        "requests, requests.jsonl.gz; megabytes at GPU rates); default: summaries only",
    )
    steady.add_argument(
        "--calibrate",
        type=int,
        default=4,
        help="steady runs: play this many requests alone (calls of 0 s) before the warm-up, "
        "to report how their measured time compares with the unloaded time computed from "
        "the engine's costs (0: skip; default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))


def read_trace_file(
    args: argparse.Namespace, count_tokens: Callable[[str], int] | None = None
) -> Trace:
    """The `--trace` file as read: text counted, artifact quirks handled (bench.workloads)."""
    return read_trace(
        args.trace,
        count_tokens=count_tokens,
        chars_per_token=args.chars_per_token,
        last_call=args.last_call,
    )


def is_steady(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "steady", False) or getattr(args, "goodput", False))


def run_window(args: argparse.Namespace) -> Window:
    """A steady run's measured window: [--warmup-s, --duration)."""
    try:
        return steady_window(args.duration, args.warmup_s)
    except ValueError as exc:
        raise SystemExit(f"lamps bench: {exc}") from None


def arrivals_end_s(args: argparse.Namespace) -> float:
    """How long a steady run's arrivals may last: the window, then --cooldown-s (default the
    window's length) while the window's requests finish."""
    window = run_window(args)
    cooldown = args.cooldown_s if args.cooldown_s is not None else window.end_s - window.start_s
    if not cooldown >= 0:
        raise SystemExit(f"lamps bench: --cooldown-s must be >= 0, got {cooldown}")
    return window.end_s + cooldown


def load_trace(
    args: argparse.Namespace, rate: float, max_context: int, source: Trace | None = None
) -> Trace:
    """The requests of one rate: from the trace file (`source`, the file as read, or read here),
    sampled, time-scaled and given Poisson arrivals where it has none; or generated. A steady
    run's requests are the Poisson arrivals before `arrivals_end_s` (a file's own arrival
    times are replaced)."""
    steady = is_steady(args)
    if steady:
        n = arrivals_before(rate, args.seed, arrivals_end_s(args))
    else:
        n = args.requests or max(1, round(rate * args.duration))
    if args.trace:
        trace = source if source is not None else read_trace_file(args)
        trace = sample_requests(trace, n, args.sample, args.seed)
        if args.time_scale is not None:
            trace = with_time_scale(trace, args.time_scale)
        if steady or not trace.has_arrivals:
            trace = with_poisson_arrivals(trace, rate, args.seed)
        if steady and len(trace) < n:
            last = max(req.arrival_time or 0.0 for req in trace.requests)
            if last < run_window(args).end_s:
                raise ValueError(
                    f"{args.trace}: {len(trace)} requests arrive by {last:.1f} s at {rate:g}/s, "
                    f"before the measured window ends ({args.duration:g} s)"
                )
        return trace
    return get_workload(args.workload)(
        n, rate, args.seed, scale=args.scale, time_scale=args.time_scale, max_context=max_context
    )


def build_traces(
    args: argparse.Namespace,
    rates: Sequence[float],
    max_model_len: int,
    count_tokens: Callable[[str], int] | None = None,
) -> dict[float, Trace]:
    """Every rate's trace, checked before an engine starts (a bad file would otherwise surface
    minutes later, after start-up): exits with one line naming the file, request and segment,
    or the requests longer than the engine's context."""
    try:
        source = read_trace_file(args, count_tokens) if args.trace else None
        traces = {rate: load_trace(args, rate, max_model_len, source) for rate in rates}
    except (TraceFormatError, ValueError) as exc:
        raise SystemExit(f"lamps bench: {exc}") from None
    if is_steady(args):
        window = run_window(args)
        for rate, trace in traces.items():
            if not any(window.contains(req.arrival_time or 0.0) for req in trace.requests):
                raise SystemExit(
                    f"lamps bench: no request arrives in the measured window at {rate:g}/s; "
                    "lengthen --duration"
                )
    for trace in traces.values():
        if too_long := over_length(trace, max_model_len):
            first = too_long[0]
            raise SystemExit(
                f"lamps bench: {args.trace or args.workload}: {len(too_long)} of {len(trace)} "
                f"requests need more than the engine's max_model_len={max_model_len} tokens, "
                f"e.g. request {first.request_id!r} ({first.script.total_tokens} tokens)"
            )
    return traces


def model_token_counter(model_dir: Path) -> Callable[[str], int] | None:
    """The model folder's Hugging Face tokenizer as a token counter, or None when the folder
    has none (the trace's text is then counted by characters)."""
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # No special tokens: a segment's text is a piece of the context, not a whole prompt.
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def trace_notes(traces: dict[float, Trace]) -> list[str]:
    """What reading the trace file changed, and how many of its requests run: for the log."""
    first = next(iter(traces.values()))
    notes = []
    if reader := first.info.get("reader"):
        notes.append(f"trace file read with changes: {json.dumps(reader)}")
    if "file_requests" in first.info:
        for rate, trace in traces.items():
            notes.append(
                f"rate {rate:g}: {len(trace)} of the file's {trace.info['file_requests']} "
                f"requests ({trace.info['sample']['how']})"
            )
    return notes


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


GAIN_BASELINE = "infercept"  # what a --predictor run's gains are measured from


def predictor_policies(text: str) -> str:
    """`--predictor`'s list as `--policies`: a LAMPS variant per predictor, labelled by it
    (`noisy:0.2` as `noisy-0.2`), then INFERCEPT, the baseline of the gain each keeps.
    `noisy:P` is the oracle with relative error P on every length and duration; `estimates:P`
    the learned call durations with that error on the lengths only (serving's predictions)."""
    usage = "oracle, estimates, estimates:P or noisy:P"
    items = []
    for item in split_top_level(text):
        kind, colon, noise = item.partition(":")
        options: dict[str, Any] = {"predictor": kind}
        if kind not in PREDICTOR_KINDS or (colon and kind == "oracle"):
            raise SystemExit(f"--predictor {item!r}: one of {usage}")
        if colon or kind == "noisy":
            try:
                options["noise"] = float(noise)
            except ValueError:
                options["noise"] = -1.0
            if not (0 <= options["noise"] < float("inf")):
                raise SystemExit(
                    f"--predictor {item!r}: {kind} needs a noise >= 0, e.g. {kind}:0.2"
                )
        # Labels are what variant labels allow (no colon): noisy:0.2 runs as noisy-0.2.
        label = f"{kind}-{options['noise']:g}" if "noise" in options else kind
        items.append(f"{label}=lamps:{json.dumps(options)}")
    if not items:
        raise SystemExit("--predictor names no predictor")
    return ",".join([*items, GAIN_BASELINE])


def gain_kept_table(summaries: Sequence[PolicySummary], labels: Sequence[str]) -> str:
    """Per rate, how much of the first predictor's (the oracle's) mean-latency gain over
    INFERCEPT each other keeps: (INFERCEPT - it) / (INFERCEPT - first), per round, then the
    median and [min, max] over rounds (1.0: all of it; 0: none; < 0: slower than INFERCEPT)."""
    reference, *others = [label for label in labels if label != GAIN_BASELINE]
    mean: dict[tuple[str, float, int], float] = {}
    for s in summaries:
        m = s.metrics("drained")
        if m is not None and m.latency_mean_s is not None:
            mean[(s.policy, s.rate, s.round or 0)] = m.latency_mean_s
    lines = [f"share of {reference}'s mean-latency gain over {GAIN_BASELINE} kept"]
    for rate in sorted({rate for _, rate, _ in mean}):
        rounds = sorted({r for label, rt, r in mean if rt == rate and label == reference})
        for other in others:
            kept = []
            for r in rounds:
                base = mean.get((GAIN_BASELINE, rate, r))
                best, it = mean.get((reference, rate, r)), mean.get((other, rate, r))
                if None not in (base, best, it) and base != best:
                    kept.append((base - it) / (base - best))  # type: ignore[operator]
            cell = f"{statistics.median(kept):.2f}" if kept else "n/a"
            if len(kept) > 1:
                cell += f" [{min(kept):.2f}, {max(kept):.2f}]"
            lines.append(f"{rate_key(rate):>6}  {other:>12}  {cell}")
    return "\n".join(lines)


def parse_policies(text: str) -> list[PolicySpec]:
    specs = []
    for item in split_top_level(text):
        label, _, rest = item.partition("=") if "=" in item else (item, "", item)
        name, _, options = rest.partition(":")
        try:
            parsed = json.loads(options) if options else None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"options of {label!r} are not JSON: {exc}") from None
        if name == STOCK and parsed:
            raise SystemExit(f"{label!r}: {STOCK!r} (vLLM without the plugin) takes no options")
        if name not in (*POLICY_NAMES, STOCK):
            raise SystemExit(
                f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}, and {STOCK!r}"
            )
        specs.append(PolicySpec(label, name, parsed))
    return specs


@dataclass(frozen=True)
class SteadyPlan:
    """How a steady run counts and watches its requests (`run_one`).

    `window`: the requests arriving in it count; the run ends once all of them have finished,
    when requests still running or not yet sent from outside it are cancelled (they are not
    recorded). `unloaded_s`: each request's unloaded time (id -> s), the slowdown's
    denominator. `stop_early`: (SLO slowdown, share): end the run as soon as more of the
    window's requests have missed the SLO than the share allows (finished too slowly, failed,
    or still running past the SLO), cancelling the rest (recorded as failed): the run has
    failed the SLO whatever the others do."""

    window: Window
    unloaded_s: dict[str, float]
    sample_every_s: float = 0.5
    stop_early: tuple[float, float] | None = None


# How long a run waits for the engine to let go of the last run's blocks before it starts.
RESET_WAIT_S = 30.0


async def empty_prefix_cache(target: ReplayTarget) -> None:
    """Empties the engine's prefix cache, waiting while blocks are still in use: the requests a
    steady run cancelled (and their held calls) leave the engine a moment after it ends, and
    vLLM refuses a reset until they have (targets that cannot say return None: one try)."""
    deadline = time.monotonic() + RESET_WAIT_S
    while await target.reset_prefix_cache() is False:
        if time.monotonic() > deadline:
            print(f"note: the prefix cache is still in use after {RESET_WAIT_S:g} s; going on")
            return
        await asyncio.sleep(0.2)


async def engine_state(target: ReplayTarget) -> dict[str, Any] | None:
    """The engine's queue and KV use now (`engine_stats` of the target), None where the target
    cannot say (a fleet's replicas, a test's fake)."""
    read = getattr(target, "engine_stats", None)
    if read is None:
        return None
    try:
        return await read()
    except Exception:  # a sample missed (a replica busy restarting): the run goes on
        return None


async def run_one(
    target: ReplayTarget,
    trace: Trace,
    spec: PolicySpec,
    rate: float,
    progress: Callable[[], object] | None = None,
    round_: int = 0,
    id_prefix: str | None = None,
    steady: SteadyPlan | None = None,
    record: dict[str, Any] | None = None,
) -> tuple[list[RequestResult], dict[str, float]]:
    """One policy on one trace; `progress` is called as each request ends. Request ids start
    with `id_prefix` (default: the policy's label, the rate and the round), so they, and the
    prompts drawn from them, are new to the engine in every run. With `steady` (a `SteadyPlan`)
    the run counts its window's requests only and samples the engine's state into
    `record["series"]` (an `EngineSeries`); `record` also gets what was cut (`tail_cancelled`,
    `stopped_early`)."""
    await empty_prefix_cache(target)
    before = await target.scheduler_stats()
    started = time.monotonic()
    policy = spec.label
    prefix = id_prefix or f"{policy}-{rate:g}-r{round_}"
    window = steady.window if steady is not None else None
    measured = (
        {req.request_id for req in trace.requests if window.contains(req.arrival_time or 0.0)}
        if window is not None
        else set()
    )
    sent_at: dict[str, float] = {}
    finished: dict[str, RequestResult] = {}
    measured_done = asyncio.Event()
    stop = asyncio.Event()
    if steady is not None and not measured:
        measured_done.set()

    def result(request: Any, **fields: Any) -> RequestResult:
        rid = request.request_id
        unloaded = steady.unloaded_s.get(rid) if steady is not None else None
        in_window = (rid in measured) if steady is not None else None
        return RequestResult(request_id=rid, policy=policy, rate=rate, round=round_,
                             window=in_window, service_s=unloaded, **fields)  # fmt: skip

    async def one(request: Any) -> RequestResult:
        await asyncio.sleep(max(0.0, started + request.arrival_time - time.monotonic()))
        sent = time.monotonic() - started
        sent_at[request.request_id] = sent
        script = request.script
        try:
            response = await target.replay(f"{prefix}-{request.request_id}", script, spec.label)
        except Exception as exc:  # counted as a failed request, never dropped
            out = result(request, arrival=sent, error=f"{type(exc).__name__}: {exc}")
        else:
            resumed = response.segments[1:]
            out = result(
                request,
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
        finally:
            if progress is not None:
                progress()
        if request.request_id in measured:
            finished[request.request_id] = out
            if len(finished) == len(measured):
                measured_done.set()
        return out

    async def watch(series: EngineSeries) -> None:
        """Samples the engine; with `stop_early`, ends the run once the SLO share is lost."""
        assert steady is not None
        while not measured_done.is_set():
            now = time.monotonic() - started
            state = await engine_state(target)
            if state is not None:
                series.add(now, state)
            if steady.stop_early is not None:
                slo, share = steady.stop_early
                missed = sum(not r.meets_slo(slo) for r in finished.values())
                missed += sum(
                    1
                    for rid in measured
                    if rid not in finished
                    and rid in sent_at
                    and now - sent_at[rid] > slo * steady.unloaded_s.get(rid, float("inf"))
                )
                if certainly_missed(missed, len(measured), share):
                    stop.set()
                    return
            await asyncio.sleep(steady.sample_every_s)

    tasks = [asyncio.create_task(one(r)) for r in trace.requests]
    if steady is None:
        results = list(await asyncio.gather(*tasks))
    else:
        series = EngineSeries()
        watcher = asyncio.create_task(watch(series))
        ends = [asyncio.create_task(measured_done.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        stopped = stop.is_set() and not measured_done.is_set()
        for task in [*ends, watcher, *tasks]:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        results, cancelled = [], 0
        for request, outcome in zip(trace.requests, outcomes, strict=True):
            if isinstance(outcome, RequestResult):
                results.append(outcome)
            elif isinstance(outcome, asyncio.CancelledError):
                if request.request_id in measured:  # only an early stop cancels these
                    sent = sent_at.get(request.request_id, request.arrival_time or 0.0)
                    results.append(result(request, arrival=sent, error=STOPPED_EARLY))
                else:
                    cancelled += 1
            else:
                raise outcome
        if record is not None:
            record |= {"series": series, "tail_cancelled": cancelled, "stopped_early": stopped}
    after = await target.scheduler_stats()
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in _COUNTERS}
    swap_before, swap_after = before.get("swap", {}), after.get("swap", {})
    for key in _SWAP_COUNTERS:
        delta[f"swap_{key}"] = swap_after.get(key, 0) - swap_before.get(key, 0)
    costs = after.get("costs", {})
    block_bytes = costs.get("kv_bytes_per_token", 0) * after.get("block_size", 0)
    delta["preserved_gb_s"] = delta["preserved_block_seconds"] * block_bytes / 1e9
    return results, delta


# What a request of the window cancelled by an early stop records as its error.
STOPPED_EARLY = "StoppedEarly: the run had already missed its SLO share"


Variant = TypeVar("Variant")


def round_order(variants: Sequence[Variant], round_: int) -> list[Variant]:
    """The variants (policies, or a --router run's fleets) in the given order in even rounds and
    reversed in odd ones: whatever drifts during a comparison (machine load, warm caches) falls
    on each variant alike."""
    return list(variants) if round_ % 2 == 0 else list(reversed(variants))


def schedule(
    rates: Sequence[float], policies: Sequence[PolicySpec], rounds: int, first_round: int = 0
) -> list[tuple[float, int, PolicySpec]]:
    """Every run of a comparison, in the order they run: (rate, round, policy). Rounds are
    numbered from `first_round`: a comparison split over several processes (a GPU's 10-minute
    calls) gives the next one the next round's order."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if first_round < 0:
        raise ValueError(f"the first round must be >= 0, got {first_round}")
    return [
        (rate, r, spec)
        for rate in rates
        for r in range(first_round, first_round + rounds)
        for spec in round_order(policies, r)
    ]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in this process while a run is measured: a collection pauses the
    event loop that sends requests and (with --engine-only) reads the engine's outputs, at
    moments that differ from run to run. Garbage is collected before the run instead, so each
    starts from the same state; what a run leaves is collected before the next. What survives
    (modules, the engine, earlier runs' results: ~700k objects with vLLM loaded, a 0.3 s full
    collection on the 2-core CPU machine) is frozen, so no later collection walks it again."""
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median_counters(per_round: Sequence[dict[str, float]]) -> dict[str, float]:
    """A run's scheduler counters over rounds: the median of each (the one round's own)."""
    if len(per_round) == 1:
        return dict(per_round[0])
    return {key: statistics.median(d[key] for d in per_round) for key in per_round[0]}


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far: by the whole machine, and per process of ours (this one and
    its children: the engine core with --engine-only, Ray's processes otherwise)."""

    machine: float
    ours: dict[int, float]

    @classmethod
    def take(cls) -> CpuSample | None:
        try:
            import psutil  # comes with Ray and vLLM; without it, no CPU figures
        except ImportError:
            return None
        t = psutil.cpu_times()
        busy = (
            t.user
            + t.nice
            + t.system
            + sum(getattr(t, name, 0.0) for name in ("irq", "softirq", "steal"))
        )
        ours: dict[int, float] = {}
        me = psutil.Process()
        for proc in (me, *me.children(recursive=True)):
            with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
                times = proc.cpu_times()
                ours[proc.pid] = times.user + times.system
        return cls(busy, ours)


def run_conditions(started: float, before: CpuSample | None) -> dict[str, float]:
    """How long a run took, how loaded the machine was at its end (1-minute load average) and,
    where psutil is there, the CPU time the machine spent on processes not ours during it:
    identical runs that differ usually differ here first (a shared machine)."""
    conditions = {"wall_s": time.monotonic() - started, "load_1m": os.getloadavg()[0]}
    after = CpuSample.take()
    if before is not None and after is not None:
        busy = after.machine - before.machine
        ours = sum(t - before.ours.get(pid, 0.0) for pid, t in after.ours.items())
        conditions |= {"cpu_busy_s": busy, "cpu_ours_s": ours, "cpu_others_s": busy - ours}
    return conditions


def noisy_runs(
    machine: dict[str, dict[str, list[dict[str, float]]]], cpus: int | None = None
) -> list[str]:
    """The runs (policy, rate, round) during which other processes took more than
    `NOISY_SHARE` of the machine's CPU time (`machine_per_round` of `run_all`)."""
    cpus = cpus or os.cpu_count() or 1
    notes = []
    for label, by_rate in machine.items():
        for rate, per_round in by_rate.items():
            for r, m in enumerate(per_round):
                share = m.get("cpu_others_s", 0.0) / (cpus * m["wall_s"]) if m["wall_s"] else 0.0
                if share > NOISY_SHARE:
                    notes.append(
                        f"{label} at {rate}/s, round {r}: other processes took {share:.0%} of "
                        "the machine's CPU time; its figures may not compare with its repeats"
                    )
    return notes


async def warm_up(
    target: ReplayTarget, trace: Trace, spec: PolicySpec, rate: float, requests: int
) -> dict:
    """The first policy on the first `requests` requests of `trace`, results discarded:
    first-use costs (kernels, allocator, tool worker, JIT) land here, not on the first
    measured run."""
    head = trace.model_copy(update={"requests": trace.requests[:requests]})
    print(f"warm-up (discarded): {spec.label} on {len(head)} requests at {rate:g}/s", flush=True)
    started = time.monotonic()
    with collector_paused():
        await run_one(target, head, spec, rate, id_prefix=f"warmup-{spec.label}-{rate:g}")
    took = time.monotonic() - started
    print(f"warm-up done in {took:.1f} s", flush=True)
    return {"policy": spec.label, "rate": rate, "requests": len(head), "seconds": took}


@dataclass
class Runs:
    """What the measured runs of a comparison gathered (`run_all`, `run_goodput`)."""

    out: Path
    results: list[RequestResult] = field(default_factory=list)
    per_round: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    machine: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    order: list[list[Any]] = field(default_factory=list)
    # Steady runs: per label and rate, each round's steadiness and sampled engine state.
    steadiness: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    series: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    async def measure(
        self,
        target: ReplayTarget,
        trace: Trace,
        spec: PolicySpec,
        rate: float,
        round_: int,
        plan: SteadyPlan | None = None,
        slo: float | None = None,
        progress: Callable[[], object] | None = None,
        write: Callable[[str], object] = print,
    ) -> list[RequestResult]:
        """One run of `run_one`, its figures kept (and appended to PARTIAL_FILE at once: a bench
        cut short by a time limit keeps what it finished) and its line printed."""
        started, cpu = time.monotonic(), CpuSample.take()
        record: dict[str, Any] = {}
        with collector_paused():
            got, delta = await run_one(target, trace, spec, rate, progress, round_,
                                       steady=plan, record=record)  # fmt: skip
        self.results += got
        key = rate_key(rate)
        steady_info = None
        if plan is not None:
            series: EngineSeries = record["series"]
            steady_info = steadiness(series, plan.window) | {
                "tail_cancelled": record["tail_cancelled"],
                "stopped_early": record["stopped_early"],
            }
            self.steadiness.setdefault(spec.label, {}).setdefault(key, []).append(steady_info)
            self.series.setdefault(spec.label, {}).setdefault(key, []).append(
                series.model_dump(exclude_none=True)
            )
        write(run_line(spec.label, rate, round_, got, delta, slo, steady_info))
        self.per_round.setdefault(spec.label, {}).setdefault(key, []).append(delta)
        keep_partial(self.out, got, {"label": spec.label, "rate": rate, "round": round_, **delta})
        self.machine.setdefault(spec.label, {}).setdefault(key, []).append(
            run_conditions(started, cpu)
        )
        self.order.append([rate, round_, spec.label])
        return got

    def outcome(self, **extra: Any) -> dict[str, Any]:
        runs = {
            label: {rate: median_counters(deltas) for rate, deltas in by_rate.items()}
            for label, by_rate in self.per_round.items()
        }
        body = {
            "results": self.results,
            "runs": runs,
            "runs_per_round": self.per_round,
            "machine_per_round": self.machine,
            "order": self.order,
        }
        if self.steadiness:
            body |= {"steadiness": self.steadiness, "series": self.series}
        return body | extra


async def measured_costs(target: ReplayTarget) -> EngineCosts | None:
    """The engine's costs as its scheduler plugin measured them (None: no plugin). Read before
    any load, they hold the start-up measurement: prefills of a few sizes and decode steps of
    one request alone (`lamps_vllm.engine.warm_up`), i.e. batch 1."""
    data = (await target.scheduler_stats()).get("costs")
    return EngineCosts.from_dict(data) if data else None


def steady_plan(
    args: argparse.Namespace, trace: Trace, costs: EngineCosts | None, stop_early: bool = False
) -> SteadyPlan:
    """A steady run of `trace`: the window of `args`, each request's unloaded time from
    `costs` (none without costs: no slowdowns), the early stop of a goodput search."""
    unloaded: dict[str, float] = {}
    if costs is not None:
        for req in trace.requests:
            if (t := unloaded_time_s(req.script, costs)) > 0:
                unloaded[req.request_id] = t
    stop = (args.slo_slowdown, args.slo_share) if stop_early and costs is not None else None
    return SteadyPlan(run_window(args), unloaded, args.sample_every_s, stop)


async def calibrate(
    target: ReplayTarget, trace: Trace, spec: PolicySpec, requests: int, costs: EngineCosts
) -> dict[str, Any]:
    """The first `requests` requests of `trace` played alone, one after the other, their calls
    made 0 s long: each one's measured latency against its unloaded engine time from `costs`.
    A median ratio near 1 says the slowdown's denominator is what the request costs alone;
    above 1, what the replay adds around the engine's steps (reported, not corrected)."""
    head = with_time_scale(trace.model_copy(update={"requests": trace.requests[:requests]}), 0.0)
    measured, predicted = [], []
    print(f"calibration: {len(head)} requests alone under {spec.label}", flush=True)
    with collector_paused():
        for req in head.requests:
            response = await target.replay(f"calibrate-{req.request_id}", req.script, spec.label)
            measured.append(response.latency_s)
            predicted.append(unloaded_engine_s(req.script, costs))
    ratios = [m / p for m, p in zip(measured, predicted, strict=True) if p > 0]
    ratio = statistics.median(ratios) if ratios else None
    print(f"calibration: measured / unloaded time from the costs, median {ratio}", flush=True)
    return {
        "policy": spec.label,
        "requests": len(head),
        "measured_s": measured,
        "unloaded_engine_s": predicted,
        "ratio_median": ratio,
    }


async def steady_start(
    target: ReplayTarget,
    args: argparse.Namespace,
    trace: Trace,
    spec: PolicySpec,
    costs: EngineCosts | None,
) -> tuple[EngineCosts | None, dict[str, Any] | None]:
    """Before a steady comparison's warm-up: the engine's costs (read now, or `costs` from the
    engine that ran before), then the calibration (`--calibrate`)."""
    if costs is None:
        costs = await measured_costs(target)
    calibration = None
    if costs is not None and getattr(args, "calibrate", 0) > 0:
        calibration = await calibrate(target, trace, spec, args.calibrate, costs)
    return costs, calibration


async def run_all(
    target: ReplayTarget,
    args: argparse.Namespace,
    policies: Sequence[PolicySpec],
    rates: Sequence[float],
    max_context: int,
    traces: dict[float, Trace] | None = None,
    costs: EngineCosts | None = None,
) -> dict[str, Any]:
    """Warm-up, then every run of `schedule`; `traces` per rate (built here when not given).
    Steady runs (`--steady`) first read the engine's costs (or take `costs`, those of the
    engine before: the stock control has none) and calibrate."""
    if traces is None:
        traces = build_traces(args, rates, max_context)
    steady = is_steady(args)
    calibration = None
    if steady:
        costs, calibration = await steady_start(target, args, traces[rates[0]], policies[0], costs)
    runs_in_order = schedule(rates, policies, args.rounds, args.first_round)
    head = WARMUP_CONVERSATIONS if args.sessions else WARMUP_REQUESTS
    warmup = (
        await warm_up(target, traces[rates[0]], policies[0], rates[0], head)
        if args.warmup
        else None
    )
    plans = {rate: steady_plan(args, traces[rate], costs) for rate in rates} if steady else {}
    slo = args.slo_slowdown if steady else None
    runs = Runs(args.out)
    total = sum(len(traces[rate]) for rate, _, _ in runs_in_order)
    # The bar costs ~0.5 us an update (it redraws at most 10 times a second): no noise.
    # disable=None: no bar where the output is not a terminal (a GPU run's log).
    with tqdm(total=total, unit="req", desc="lamps bench", disable=None) as bar:
        last = args.first_round + args.rounds
        for rate, r, spec in runs_in_order:
            bar.set_postfix_str(f"{spec.label} @ {rate:g}/s, round {r + 1}/{last}")
            await runs.measure(target, traces[rate], spec, rate, r, plans.get(rate), slo,
                               bar.update, bar.write)  # fmt: skip
    extra: dict[str, Any] = {"warmup": warmup, "traces": traces}
    if steady:
        extra |= {"costs": costs.to_dict() if costs else None, "calibration": calibration}
    return runs.outcome(**extra)


PARTIAL_FILE = "runs.partial.jsonl"
# What a run was asked to do, written before its first run: with PARTIAL_FILE, a run cut short
# (a lent GPU's 10-minute call) can still be re-plotted and merged (`read_run`).
STARTED_FILE = "run.json"


def command_record(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as results.json keeps it (paths as strings)."""
    return vars(args) | {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)}


def machine_record() -> dict[str, str]:
    return {
        "node": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }


def write_started(args: argparse.Namespace, engine: dict[str, Any]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    body = {"config": {"command": command_record(args), "engine": engine}}
    (args.out / STARTED_FILE).write_text(json.dumps(body | {"machine": machine_record()}, indent=1))


def read_run(out: Path) -> tuple[dict[str, Any], list[RequestResult]]:
    """A bench folder's body (config, machine) and request records: from results.json and
    requests.jsonl(.gz) when the run finished, else from run.json and the runs it finished
    (PARTIAL_FILE; the body then says `"cut_short": true`)."""
    from bench.results import read_request_results, read_results

    if (out / "results.json").exists():
        body = read_results(out / "results.json")[1]
        if (out / "requests.jsonl").exists():
            return body, read_request_results(out / "requests.jsonl")
        if (out / "requests.jsonl.gz").exists():  # as the repository keeps large records
            text = gzip.decompress((out / "requests.jsonl.gz").read_bytes()).decode()
            return body, _records(text.splitlines())
        raise FileNotFoundError(f"{out}: results.json but no requests.jsonl")
    if (out / STARTED_FILE).exists() and (out / PARTIAL_FILE).exists():
        body = json.loads((out / STARTED_FILE).read_text()) | {"cut_short": True}
        return body, _records((out / PARTIAL_FILE).read_text().splitlines())
    raise FileNotFoundError(f"{out}: neither results.json nor {STARTED_FILE} with {PARTIAL_FILE}")


def _records(lines: Sequence[str]) -> list[RequestResult]:
    """Request records of a requests.jsonl or PARTIAL_FILE (whose counter lines are skipped)."""
    return [
        RequestResult.model_validate_json(line)
        for line in lines
        if line.strip() and not line.startswith('{"counters"')
    ]


def keep_partial(out: Path, got: Sequence[RequestResult], counters: dict[str, Any]) -> None:
    """Appends a finished run (its requests, then its counters) to `PARTIAL_FILE`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / PARTIAL_FILE).open("a") as f:
        for result in got:
            f.write(result.model_dump_json(exclude_none=True) + "\n")
        f.write(json.dumps({"counters": counters}) + "\n")


def run_line(
    label: str,
    rate: float,
    round_: int,
    got: Sequence[RequestResult],
    delta: dict[str, float],
    slo: float | None = None,
    steady: dict[str, Any] | None = None,
) -> str:
    """One line per finished run, printed as it ends: a run cut short by a time limit (a lent
    GPU's) still leaves its figures in the log. A steady run's (`steady`: its `steadiness`)
    adds its slowdowns, the share within `slo`, and whether queue and KV use were flat."""

    def n(key: str) -> str:
        return f"{delta.get(key, 0):.0f}"

    if not got:  # a steady run whose window had no request
        return f"run {label} @ {rate:g}/s round {round_}: no request in its window"
    m = summarize(got, slo_slowdown=slo).metrics("drained")
    if m is None or m.latency_mean_s is None:
        return f"run {label} @ {rate:g}/s round {round_}: no request completed"
    line = (
        f"run {label} @ {rate:g}/s round {round_}: mean {m.latency_mean_s:.2f} s, "
        f"P99 {m.latency_p99_s:.2f} s, TTFT {m.ttft_mean_s:.3f} s, "
        f"{m.throughput_tokens_per_s or 0:.0f} tok/s, {m.completed}/{m.requests} done"
    )
    if steady is not None:
        line += f" (of the window; {steady_text(m, steady)})"
    if not any(delta.values()):  # a fleet run (FleetTarget) collects no scheduler counters
        return line
    steps = delta.get("decode_steps", 0)
    batch = f"{delta.get('decode_tokens', 0) / steps:.1f}" if steps else "-"
    return (
        f"{line}, preemptions {n('preemptions')}, prefill {n('prefill_tokens')} tok, "
        f"decode batch {batch}, calls P/K/S/D "
        f"{n('calls_preserve')}/{n('calls_keep')}/{n('calls_swap')}/{n('calls_discard')}"
    )


def steady_text(m: Any, steady: dict[str, Any]) -> str:
    """A steady run's slowdowns, SLO share and steadiness, for its line."""
    parts = []
    if m.slowdown_p50 is not None:
        parts.append(
            f"slowdown P50 {m.slowdown_p50:.2f} P90 {m.slowdown_p90:.2f}, "
            f"{m.slo_attained:.0%} within {m.slo_slowdown:g}x"
        )
    flat = {True: "steady", False: "NOT steady", None: "steadiness unknown"}[steady["steady"]]
    trends = [
        f"{name} {t['mean']:.1f} {t['relative_change']:+.0%}"
        for name in ("waiting", "kv_blocks_used")
        if (t := steady.get(name)) and t.get("mean") is not None
    ]
    parts.append(flat + (f" ({', '.join(trends)} over the second half)" if trends else ""))
    if steady.get("stopped_early"):
        parts.append("stopped early: SLO share missed")
    return "; ".join(parts)


def run_routers(
    args: argparse.Namespace,
    config: dict[str, Any],
    policy: PolicySpec,
    rates: Sequence[float],
    max_context: int,
    traces: dict[float, Trace],
    project_dir: Path,
    data_dir: Path,
) -> dict[str, Any]:
    """Each router of `--router` on its own fleet of `--replicas` replicas (a fresh stack: the
    router is fixed when a deployment's handles are made), all running `policy`; results are
    labelled by router. One fleet at a time, each running all its rounds; `--first-round`
    alternates the fleets' order, so a comparison split over several calls (a GPU's 10-minute
    limit) starts each call with the other router."""
    from lamps.bench_targets import FleetTarget, parse_routers, with_fleet
    from lamps.local_stack import local_stack

    outcomes = []
    for router in round_order(parse_routers(args.router), args.first_round):
        labelled = PolicySpec(router, policy.name, policy.options)
        print(f"fleet: {args.replicas} replicas behind {router!r}, policy {policy.label}")
        fleet = with_fleet(config, args.replicas, router)
        with local_stack(fleet, project_dir, data_dir, log_to_driver=False):
            # Results carry the router's label.
            target = FleetTarget(variant=policy.label, sessions=args.sessions)
            outcomes.append(
                asyncio.run(run_all(target, args, [labelled], rates, max_context, traces))
            )
    return merge_outcomes(outcomes)


def merge_outcomes(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The outcomes of runs on several engines (ours, then the stock control) as one."""
    first, *rest = outcomes
    merged = dict(first)
    for other in rest:
        merged["results"] = merged["results"] + other["results"]
        for key in ("runs", "runs_per_round", "machine_per_round", "steadiness", "series"):
            if key in merged or key in other:
                merged[key] = {**merged.get(key, {}), **other.get(key, {})}
        merged["order"] = merged["order"] + other["order"]
    return merged


def compared_labels(policies: str, routers: str | None) -> list[str]:
    """The labels a run's results carry: its routers in a --router run, else its policies."""
    if routers:
        from lamps.bench_targets import parse_routers

        return parse_routers(routers)
    return [spec.label for spec in parse_policies(policies)]


def run_ratio_table(
    summaries: Sequence[PolicySummary], labels: Sequence[str], predictors: bool = False
) -> str:
    """Ratios of the run's first policy (or router) to each of the others (a run of variants
    compares the variants; the default run, lamps to the baselines); with rounds, their median
    and spread. A `--predictor` run adds the share of the oracle's gain each predictor keeps.
    A run of one router (one fleet per call, merged later) has nothing to compare: its parts."""
    base, *others = labels
    tables = [ratio_table(summaries, base=base, against=others)] if others else []
    if predictors:
        tables.append(gain_kept_table(summaries, labels))
    return "\n\n".join([*tables, latency_parts_table(summaries)])


def summary_settings(command: dict[str, Any]) -> dict[str, Any]:
    """How a run's records are summarized, from its command: a steady run has no horizon
    figure (its window's requests all run to the end) and an SLO for its attainment."""
    if command.get("steady") or command.get("goodput"):
        return {"horizon_s": None, "slo_slowdown": command.get("slo_slowdown")}
    return {"horizon_s": command.get("duration")}


def steady_config(args: argparse.Namespace, outcome: dict[str, Any]) -> dict[str, Any]:
    """What results.json says of a steady run: the window, the SLO, the engine's costs the
    unloaded times come from, the calibration, and each run's steadiness."""
    window = run_window(args)
    return {
        "window_s": [window.start_s, window.end_s],
        "arrivals_until_s": arrivals_end_s(args),
        "slo": {"slowdown": args.slo_slowdown, "share": args.slo_share},
        "costs": outcome.get("costs"),
        "calibration": outcome.get("calibration"),
        "steadiness": outcome.get("steadiness"),
    }


SERIES_FILE = "timeseries.json.gz"


def report(args: argparse.Namespace, outcome: dict[str, Any], engine: dict[str, Any]) -> str:
    results: list[RequestResult] = outcome["results"]
    command = command_record(args)
    summaries = summarize_all(results, **summary_settings(command))  # one per round
    noisy = noisy_runs(outcome.get("machine_per_round") or {}) + refusal_notes(results)
    config = {
        "command": command,
        "engine": engine,
        # Per policy and rate: the run's counters (over rounds: each counter's median) ...
        "scheduler_per_run": outcome["runs"],
        # ... and every round's, in round order.
        "scheduler_per_round": outcome.get("runs_per_round"),
        # Per round: wall time, load average, CPU time of other processes (`run_conditions`).
        "machine_per_round": outcome.get("machine_per_round"),
        "order": outcome.get("order"),
        "warmup": outcome.get("warmup"),
        "noisy_runs": noisy,
        "traces": {f"{rate:g}": trace.info for rate, trace in outcome["traces"].items()},
    }
    if is_steady(args):
        config["steady"] = steady_config(args, outcome)
        # The engine's state as sampled, per policy, rate and round: small, kept apart.
        args.out.mkdir(parents=True, exist_ok=True)
        body = json.dumps(outcome.get("series") or {}, separators=(",", ":")).encode()
        (args.out / SERIES_FILE).write_bytes(gzip.compress(body))
    base, *others = compared_labels(args.policies, args.router)
    write_results(
        args.out, summaries, config, machine_record(), round_ratios(summaries, base, others)
    )
    if not getattr(args, "goodput", False):
        write_request_results(args.out, results)
    elif args.keep_requests:  # a search's records run to megabytes: its window's, compressed
        lines = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in results if r.window)
        (args.out / "requests.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    try:
        plot(args.out, summaries, results)
    except ImportError as exc:  # a GPU machine without matplotlib: plot later from the records
        print(f"no plots ({exc}); `lamps bench-plot {args.out}` draws them from requests.jsonl")
    table = run_ratio_table(
        summaries, compared_labels(args.policies, args.router), bool(args.predictor)
    )
    (args.out / "ratios.txt").write_text(with_notes(table, noisy) + "\n")
    for note in noisy:  # printed apart: the returned table stays a table
        print(f"note: {note}")
    return table


def refusal_notes(results: Sequence[RequestResult]) -> list[str]:
    """A line for each run where the server refused requests (429, `ServerBusyError`: its
    in-flight bound or the fleet's routing wait): such a run measured that limit, not how the
    engines serve the load, and its ratios say nothing about the policies or routers."""
    refused: dict[tuple[str, float, int], list[int]] = {}
    for r in results:
        counts = refused.setdefault((r.policy, r.rate, r.round), [0, 0])
        counts[1] += 1
        if r.error is not None and "ServerBusyError" in r.error:
            counts[0] += 1
    return [
        f"{label} @ {rate:g}/s round {round_}: {n} of {total} requests refused by the server "
        "(429: max_in_flight_requests or max_routing_wait_s); raise the limit for a benchmark"
        for (label, rate, round_), (n, total) in sorted(refused.items())
        if n
    ]


def with_notes(table: str, noisy: Sequence[str]) -> str:
    """The ratio table, then a line for each run flagged by `noisy_runs` (none: the table)."""
    return "\n".join([table, *(f"note: {n}" for n in noisy)])


def replot(out: Path) -> str:
    """Plots and the ratio table again from a run's files (a run made where matplotlib was not
    installed, or plotted differently); a run cut short gets its results.json and
    requests.jsonl here, from the runs it finished."""
    if (out / GOODPUT_FILE).exists() and not (out / "results.json").exists():
        return replot_goodput(out)
    body, results = read_run(out)
    command = body.get("config", {}).get("command", {})
    summaries = summarize_all(results, **summary_settings(command))
    labels = compared_labels(
        command.get("policies") or "lamps,infercept,vllm", command.get("router")
    )
    if body.get("cut_short"):  # written out as a finished run's files, flagged
        config = body["config"] | {"cut_short": True}
        base, *others = labels
        ratios = round_ratios(summaries, base, others)
        write_results(out, summaries, config, body.get("machine"), ratios)
        write_request_results(out, results)
    plot(out, summaries, results)
    table = run_ratio_table(summaries, labels, bool(command.get("predictor")))
    notes = (body.get("config", {}).get("noisy_runs") or []) + refusal_notes(results)
    if body.get("cut_short") or body.get("config", {}).get("cut_short"):
        notes.append(f"cut short: these are the runs it finished ({PARTIAL_FILE})")
    table = with_notes(table, list(dict.fromkeys(notes)))  # a run's own notes name refusals too
    (out / "ratios.txt").write_text(table + "\n")
    return table


# --------------------------------------------------------------------------------------------
# Goodput (`--goodput`): a search over steady rates per workload, every policy at every rate

GOODPUT_FORMAT = "lamps-bench-goodput/1"
GOODPUT_FILE = "goodput.json"
# The lowest rate a search tries leaves at least this many arrivals expected in the window: a
# share of 90 % over fewer requests says little.
MIN_WINDOW_REQUESTS = 8


def check_steady_args(args: argparse.Namespace, policies: Sequence[PolicySpec]) -> None:
    """The steady and goodput flags, checked before anything starts."""
    if args.goodput:
        args.steady = True
    if not is_steady(args):
        return
    if args.requests:
        raise SystemExit("lamps bench: a steady run's requests are its arrivals; no --requests")
    run_window(args)
    arrivals_end_s(args)
    if not args.slo_slowdown >= 1:
        raise SystemExit(f"lamps bench: --slo-slowdown must be >= 1, got {args.slo_slowdown}")
    if not 0 < args.slo_share <= 1:
        raise SystemExit(f"lamps bench: --slo-share must be in (0, 1], got {args.slo_share}")
    if not args.sample_every_s > 0:
        raise SystemExit("lamps bench: --sample-every-s must be > 0")
    if args.goodput:
        if args.router:
            raise SystemExit("lamps bench: --goodput compares policies on one engine, no --router")
        if any(spec.name == STOCK for spec in policies):
            raise SystemExit(
                f"lamps bench: --goodput runs every policy on one engine; {STOCK!r} needs its "
                "own (compare it in a --steady run)"
            )


@dataclass
class GoodputWorkload:
    """One workload of a goodput search: its name, where its search starts, the command's
    arguments with this workload and its own output folder, its trace file as read and the
    trace at its start rate (checked before the engine starts)."""

    name: str
    start: float
    args: argparse.Namespace
    source: Trace | None = None
    first: Trace | None = None
    tried_before: list[float] = field(default_factory=list)  # --resume: its earlier rates
    before: dict[str, Any] = field(default_factory=dict)  # --resume: its earlier body


def goodput_workloads(args: argparse.Namespace, rates: Sequence[float]) -> list[GoodputWorkload]:
    """`--workload A,B,...` (or the `--trace` file), each with its start rate: `--rate` gives
    one for all or one each."""
    names = [args.trace.stem] if args.trace else [w.strip() for w in args.workload.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise SystemExit(f"lamps bench: --workload {args.workload!r}: names, each once")
    if not args.trace:
        for name in names:
            try:
                get_workload(name)
            except ValueError as exc:
                raise SystemExit(f"lamps bench: {exc}") from None
    if len(rates) not in (1, len(names)):
        raise SystemExit(
            f"lamps bench: --goodput starts each workload's search at --rate: one rate, or one "
            f"per workload ({len(names)}), not {len(rates)}"
        )
    starts = list(rates) * len(names) if len(rates) == 1 else list(rates)
    out = []
    for name, start in zip(names, starts, strict=True):
        own = argparse.Namespace(**vars(args))
        own.out = args.out / name
        own.rate = f"{start:g}"
        if not args.trace:
            own.workload = name
        out.append(GoodputWorkload(name, start, own))
    return out


# What must agree between a --goodput run and the one it resumes.
RESUME_SAME = (
    "trace", "sample", "scale", "time_scale", "seed", "duration", "warmup_s", "cooldown_s",
    "slo_slowdown", "slo_share", "search_factor", "config", "engine_setting", "last_call",
)  # fmt: skip


def previous_goodput(args: argparse.Namespace, labels: Sequence[str]) -> dict[str, Any] | None:
    """The body of the --goodput run that `--resume` names, checked to be the same search."""
    if args.resume is None:
        return None
    if args.resume.resolve() == args.out.resolve():
        raise SystemExit("lamps bench: --resume DIR needs another --out (DIR keeps its runs)")
    try:
        body = json.loads((args.resume / GOODPUT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"lamps bench: --resume {args.resume}: {exc}") from None
    if body.get("format") != GOODPUT_FORMAT:
        raise SystemExit(f"lamps bench: --resume {args.resume}: not a {GOODPUT_FORMAT} file")
    before = body.get("command", {})
    mine = command_record(args)
    differ = [key for key in RESUME_SAME if before.get(key) != mine.get(key)]
    theirs = [spec.label for spec in parse_policies(before.get("policies") or "")]
    if set(theirs) != set(labels):
        differ.append("policies")
    if differ:
        raise SystemExit(
            f"lamps bench: --resume {args.resume}: not the same search ({', '.join(differ)})"
        )
    return body


def resume_search(
    search: RateSearch,
    attainment: dict[str, dict[float, list[float | None]]],
    before: dict[str, Any],
    share: float,
) -> list[float]:
    """Replays an earlier run's part of one workload's search (`goodput_body`) into `search`
    and `attainment`; returns the rates it tried, in order. A bisection step it proposed but
    was cut in is proposed again."""
    for label, p in before["policies"].items():
        if label not in attainment:
            continue
        for rate, a in p["attainment"].items():
            attainment[label][float(rate)] = list(a["per_round"])
    for rate in sorted({rate for by_rate in attainment.values() for rate in by_rate}):
        search.record(rate, goodput_met(attainment, rate, share))
    search.steps = max(0, int(before.get("bisect_steps", 0)) - (1 if before.get("cut") else 0))
    return [float(rate) for rate in before.get("tried", [])]


def search_for(args: argparse.Namespace, start: float, labels: Sequence[str]) -> RateSearch:
    window = run_window(args)
    floor = MIN_WINDOW_REQUESTS / (window.end_s - window.start_s)
    low = args.min_rate or min(start, max(start / args.search_factor**4, floor))
    try:
        return RateSearch(start, labels, args.search_factor, low, args.max_rate, args.bisect_steps)
    except ValueError as exc:
        raise SystemExit(f"lamps bench: --goodput: {exc}") from None


class Budget:
    """`--budget-s`: the command's wall time from `started`. A workload gets an even share of
    what is left when it starts; a rate is started only if it would end within that share by
    the slowest run so far (its first rate: within the whole budget)."""

    def __init__(self, seconds: float | None, started: float) -> None:
        self.deadline = None if seconds is None else started + seconds
        self.slowest_run_s: float | None = None

    def share(self, workloads_left: int) -> float | None:
        if self.deadline is None:
            return None
        return time.monotonic() + (self.deadline - time.monotonic()) / max(1, workloads_left)

    def allows(self, runs: int, until: float | None) -> bool:
        if until is None or self.slowest_run_s is None:
            return True
        return time.monotonic() + runs * self.slowest_run_s <= until


async def run_goodput(
    target: ReplayTarget,
    args: argparse.Namespace,
    workloads: Sequence[GoodputWorkload],
    policies: Sequence[PolicySpec],
    max_context: int,
    engine: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The search of every workload in turn on one engine (`RateSearch`): at each rate tried,
    `--rounds` rounds of every policy (order alternated), each a steady run stopped early once
    it has missed its SLO share (unless --no-early-stop); per workload, its results folder as a
    plain steady run's; then the goodput files (`write_goodput`), rewritten after every rate."""
    labels = [spec.label for spec in policies]
    first = workloads[0]
    assert first.first is not None
    costs, calibration = await steady_start(target, args, first.first, policies[0], None)
    if costs is None:
        raise SystemExit("lamps bench: --goodput needs the engine's costs (the scheduler plugin)")
    warmup = (
        await warm_up(target, first.first, policies[0], first.start, WARMUP_REQUESTS)
        if args.warmup
        else None
    )
    budget = Budget(args.budget_s, started)
    previous = previous_goodput(args, labels)
    body: dict[str, Any] = {
        "format": GOODPUT_FORMAT,
        "slo": {"slowdown": args.slo_slowdown, "share": args.slo_share},
        "window_s": [run_window(args).start_s, run_window(args).end_s],
        "costs": costs.to_dict(),
        "calibration": calibration,
        "warmup": warmup,
        "command": command_record(args),
        "engine": engine,
        "machine": machine_record(),
        "resumed_from": None,
        "workloads": {},
    }
    if previous is not None:  # and what that one resumed, and so on
        body["resumed_from"] = {
            "run": str(args.resume),
            "command": previous.get("command"),
            "resumed_from": previous.get("resumed_from"),
        }
    for i, w in enumerate(workloads):
        search = search_for(w.args, w.start, labels)
        runs = Runs(w.args.out)
        (w.args.out / PARTIAL_FILE).unlink(missing_ok=True)
        write_started(w.args, engine)
        attainment: dict[str, dict[float, list[float | None]]] = {label: {} for label in labels}
        if previous is not None and w.name in previous["workloads"]:
            w.before = previous["workloads"][w.name]
            w.tried_before = resume_search(search, attainment, w.before, args.slo_share)
            print(f"goodput: {w.name}: resuming after {w.tried_before} ({args.resume})")
        traces: dict[float, Trace] = {}
        until = budget.share(len(workloads) - i)
        cut = None
        print(f"goodput: {w.name}, from {w.start:g}/s", flush=True)
        while not cut and (rates := search.propose()):
            for rate in rates:
                runs_at_rate = len(policies) * w.args.rounds
                if not budget.allows(runs_at_rate, until if search.tried else budget.deadline):
                    cut = f"--budget-s: stopped before {rate:g}/s"
                    print(f"goodput: {w.name}: {cut}", flush=True)
                    break
                try:
                    trace = load_trace(w.args, rate, max_context, w.source)
                except ValueError as exc:
                    cut = f"no trace at {rate:g}/s: {exc}"
                    break
                if too_long := over_length(trace, max_context):
                    cut = f"{len(too_long)} requests at {rate:g}/s exceed max_model_len"
                    break
                traces[rate] = trace
                plan = steady_plan(w.args, trace, costs, stop_early=args.early_stop)
                for _, r, spec in schedule([rate], policies, args.rounds, args.first_round):
                    t0 = time.monotonic()
                    got = await runs.measure(target, trace, spec, rate, r, plan, args.slo_slowdown)
                    took = time.monotonic() - t0
                    budget.slowest_run_s = max(budget.slowest_run_s or 0.0, took)
                    counted = [x for x in got if x.window]
                    shares = attainment[spec.label].setdefault(rate, [None] * args.rounds)
                    shares[r - args.first_round] = slo_attainment(counted, args.slo_slowdown)
                search.record(rate, goodput_met(attainment, rate, args.slo_share))
                body["workloads"][w.name] = goodput_body(w, search, attainment, runs, args, cut)
                write_goodput(args.out, body)
        body["workloads"][w.name] = goodput_body(w, search, attainment, runs, args, cut)
        write_goodput(args.out, body)
        if runs.results:
            outcome = runs.outcome(warmup=warmup if i == 0 else None, traces=traces,
                                   costs=costs.to_dict(), calibration=calibration)  # fmt: skip
            print(report(w.args, outcome, engine), flush=True)
            # Written out: the runs' raw records (kept in case the call was cut) can go.
            (w.args.out / PARTIAL_FILE).unlink(missing_ok=True)
    return body


def goodput_met(
    attainment: dict[str, dict[float, list[float | None]]], rate: float, share: float
) -> dict[str, bool]:
    """Per policy, whether its median attainment over the rounds at `rate` reached `share`."""
    out = {}
    for label, by_rate in attainment.items():
        known = [v for v in by_rate.get(rate, []) if v is not None]
        out[label] = reaches(statistics.median(known), share) if known else False
    return out


def goodput_body(
    w: GoodputWorkload,
    search: RateSearch,
    attainment: dict[str, dict[float, list[float | None]]],
    runs: Runs,
    args: argparse.Namespace,
    cut: str | None,
) -> dict[str, Any]:
    """One workload's part of goodput.json: its search (rates in the order tried, cut), the
    brackets, ratios and attainment curve (`goodput_summary`), and each run's steadiness."""
    summary = goodput_summary(attainment, args.slo_share)

    def per_run(key: str) -> dict[str, dict[str, list[Any]]]:
        """Each run's `key` in its steadiness record, an earlier (resumed) run's first."""
        out = {label: dict(by_rate) for label, by_rate in w.before.get(key, {}).items()}
        for label, by_rate in runs.steadiness.items():
            for rate, per_round in by_rate.items():
                out.setdefault(label, {})[rate] = [
                    bool(x.get(key)) if key == "stopped_early" else x.get(key) for x in per_round
                ]
        return out

    return {
        "start": w.start,
        # In the order tried, an earlier (resumed) run's first.
        "tried": list(dict.fromkeys([*w.tried_before, *(rate for rate, _, _ in runs.order)])),
        "bisect_steps": search.steps,
        "cut": cut,
        "range": [search.min_rate, search.max_rate],
        **summary,
        "steady": per_run("steady"),
        "stopped_early": per_run("stopped_early"),
    }


def goodput_text(body: dict[str, Any]) -> str:
    """goodput.txt: every workload's table (`goodput_table`), and what cut a search short."""
    slo = body["slo"]["slowdown"]
    parts = []
    for name, w in body["workloads"].items():
        table = goodput_table(name, w, slo)
        notes = []
        if w.get("cut"):
            notes.append(f"note: search cut short: {w['cut']}")
        unsteady = [
            f"{label} @ {rate}/s"
            for label, by_rate in w.get("steady", {}).items()
            for rate, flags in sorted(by_rate.items(), key=lambda item: float(item[0]))
            if False in flags
        ]
        if unsteady:
            notes.append("note: queue or KV use not flat over the window's second half: "
                         + ", ".join(unsteady))  # fmt: skip
        parts.append("\n".join([table, *notes]))
    return "\n\n".join(parts)


def write_goodput(out: Path, body: dict[str, Any]) -> None:
    """goodput.json and goodput.txt, and the attainment plot where matplotlib is installed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / GOODPUT_FILE).write_text(json.dumps(body, indent=1, default=str))
    (out / "goodput.txt").write_text(goodput_text(body) + "\n")


def plot_goodput(out: Path, body: dict[str, Any]) -> None:
    try:
        plot_attainment(out / "goodput_attainment.png", body["workloads"],
                        body["slo"]["share"], body["slo"]["slowdown"])  # fmt: skip
    except ImportError as exc:  # a GPU machine without matplotlib: the JSON has the curves
        print(f"no attainment plot ({exc}); `lamps bench-plot {out}` draws it")


def replot_goodput(out: Path) -> str:
    """`lamps bench-plot` of a --goodput folder: its attainment plot and table again, and each
    workload's folder replotted."""
    body = json.loads((out / GOODPUT_FILE).read_text())
    if body.get("format") != GOODPUT_FORMAT:
        raise ValueError(f"{out / GOODPUT_FILE}: not a {GOODPUT_FORMAT} file")
    for name in body["workloads"]:
        if (out / name).is_dir():
            with contextlib.suppress(FileNotFoundError):  # a workload the budget never started
                replot(out / name)
    write_goodput(out, body)
    plot_goodput(out, body)
    return goodput_text(body)


def goodput_main(
    args: argparse.Namespace,
    workloads: Sequence[GoodputWorkload],
    policies: Sequence[PolicySpec],
    config: dict[str, Any],
    settings: Any,
    project_dir: Path,
    data_dir: Path,
    started: float,
) -> int:
    """`lamps bench --goodput`: one engine (in this process with --engine-only, else the Serve
    deployment) for every workload's search."""
    from lamps.bench_targets import engine_target

    engine = settings.model_dump(mode="json")
    write_started(args, engine)

    async def go(target: ReplayTarget) -> dict[str, Any]:
        return await run_goodput(target, args, workloads, policies, settings.max_model_len,
                                 engine, started)  # fmt: skip

    if args.engine_only:

        async def in_process() -> dict[str, Any]:
            async with engine_target(settings) as target:
                return await go(target)

        body = asyncio.run(in_process())
    else:
        from lamps.bench_targets import DeploymentTarget
        from lamps.local_stack import local_stack

        with local_stack(config, project_dir, data_dir, log_to_driver=False):
            body = asyncio.run(go(DeploymentTarget(sessions=args.sessions)))
    plot_goodput(args.out, body)
    print(goodput_text(body))
    print(f"goodput in {args.out}/{GOODPUT_FILE}, goodput.txt; each workload's runs under it")
    return 0


def main(args: argparse.Namespace, project_dir: Path, data_dir: Path) -> int:
    started = time.monotonic()  # --budget-s counts from here (vLLM's import included)
    import yaml

    from lamps.bench_targets import (
        bench_engine_settings,
        engine_target,
        with_engine_settings,
        with_policy_variants,
    )
    from lamps_vllm.config import PolicyVariant

    if args.predictor:
        if args.router:
            raise SystemExit("lamps bench: --predictor and --router compare different things")
        args.policies = predictor_policies(args.predictor)  # what the results then name
    policies = parse_policies(args.policies)
    check_steady_args(args, policies)
    if args.sessions and (args.engine_only or args.predictor or policies[0].name == STOCK):
        raise SystemExit("lamps bench: --sessions sends chat turns through the Serve deployment")
    if args.sessions and not args.router and len(policies) > 1:
        raise SystemExit("lamps bench: --sessions runs one policy (a chat turn names no variant)")
    rates = [float(r) for r in args.rate.split(",")]
    if args.goodput:
        workloads = goodput_workloads(args, rates)
        rates = [workloads[0].start]  # the first workload's start (the checks below)
    if args.rounds < 1:
        raise SystemExit(f"lamps bench: --rounds must be at least 1, got {args.rounds}")
    if args.first_round < 0:
        raise SystemExit(f"lamps bench: --first-round must be >= 0, got {args.first_round}")
    # Every policy of the run is a variant the engine builds at start-up; requests name one.
    config = with_policy_variants(
        with_engine_settings(yaml.safe_load(args.config.read_text()), args.engine_setting),
        {
            s.label: {"policy": s.name, "policy_options": s.options or {}}
            for s in policies
            if s.name != STOCK
        },
        # Chat turns run under the engine's own policy: make it the one compared.
        default=PolicyVariant(policy=policies[0].name, policy_options=policies[0].options or {})
        if args.sessions
        else None,
    )
    settings = bench_engine_settings(config, project_dir)
    if not settings.model.exists():  # the embedded models are built on first use
        from lamps.model import prepare_models

        prepare_models(data_dir)
    engine = settings.model_dump(mode="json")
    # The trace is read and checked before the engine starts: a bad file fails in a second.
    counter = model_token_counter(settings.model) if args.trace else None
    if args.goodput:
        for w in workloads:  # each workload's start, checked before the engine starts
            w.source = read_trace_file(args, counter) if args.trace else None
            w.first = build_traces(w.args, [w.start], settings.max_model_len, counter)[w.start]
        return goodput_main(
            args, workloads, policies, config, settings, project_dir, data_dir, started
        )
    traces = build_traces(args, rates, settings.max_model_len, counter)
    for note in trace_notes(traces):
        print(note, flush=True)

    (args.out / PARTIAL_FILE).unlink(missing_ok=True)
    write_started(args, engine)
    stock = [spec for spec in policies if spec.name == STOCK]
    if stock and not args.engine_only:
        raise SystemExit(f"lamps bench: {STOCK!r} (vLLM without the plugin) needs --engine-only")
    if args.router:
        if args.engine_only:
            raise SystemExit("lamps bench: --router needs the Serve deployment, not --engine-only")
        outcome = run_routers(
            args, config, policies[0], rates, settings.max_model_len, traces, project_dir, data_dir
        )
    elif args.engine_only:

        async def go() -> dict[str, Any]:
            ours = [spec for spec in policies if spec.name != STOCK]
            outcomes = []
            if ours:
                async with engine_target(settings) as target:
                    outcomes.append(
                        await run_all(target, args, ours, rates, settings.max_model_len, traces)
                    )
            if stock:  # one engine at a time: a GPU holds one of this size
                stock_settings = settings.model_copy(update={"scheduler": None})
                # A steady run's unloaded times: the plugin engine's costs (stock has none).
                ours_costs = outcomes[0].get("costs") if outcomes else None
                costs = EngineCosts.from_dict(ours_costs) if ours_costs else None
                async with engine_target(stock_settings) as target:
                    outcomes.append(
                        await run_all(
                            target, args, stock, rates, settings.max_model_len, traces, costs
                        )
                    )
            return merge_outcomes(outcomes)

        outcome = asyncio.run(go())
    else:
        from lamps.bench_targets import DeploymentTarget
        from lamps.local_stack import local_stack

        with local_stack(config, project_dir, data_dir, log_to_driver=False):
            outcome = asyncio.run(
                run_all(
                    DeploymentTarget(sessions=args.sessions),
                    args,
                    policies,
                    rates,
                    settings.max_model_len,
                    traces,
                )
            )
    table = report(args, outcome, engine)
    print(table)
    print(f"results, plots and per-request records in {args.out}/")
    print(json.dumps(outcome["runs"], indent=1))
    return 0
