"""How much of LAMPS's gain over INFERCEPT survives an imperfect output-length forecast, on chat
traffic (issue 11): the real SmolLM2-135M-Instruct model served by one in-process engine, the
held-out conversations of bench/data/length_dataset.jsonl.gz as requests (their prompts, tools
and `tool_choice` as recorded: forced and `auto` calls), Poisson arrivals, and four variants run
on the same engine, rounds alternated:

- `oracle`: LAMPS, each segment forecast at the length SmolLM2 produced for it in the dataset
  (greedy decoding makes a replay repeat it; how often it did is measured and reported), and an
  `auto` segment at the tool it called there;
- `learned`: LAMPS with the output-length model (lengths and, for `auto` turns, the tool head's
  call forecast) fitted on the dataset's training split only;
- `default`: LAMPS without a forecast (the policy's fixed default length);
- `infercept`: the INFERCEPT policy, the baseline of the gains.

A variant is selected per request by `ChatPlan.policy_variant` (the engine's policy variants are
built at start-up). Tools: calculator and http_get run for real (http_get with an empty
allowlist fails at once, as in the dataset), simulated_api runs as in the dataset and then waits a
simulated duration drawn per request, so a call pauses its request long enough for the
preserve/discard decision to matter. Results look like `lamps bench`'s (bench/results.py).

Run: `python -m bench.chat_predictors [--requests 48] [--rate 0.4] [--rounds 2] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.length_dataset import DEFAULT_OUT as DEFAULT_DATA
from bench.length_dataset import read_records
from bench.results import (
    RequestResult,
    combine_rounds,
    ratio_table,
    round_ratios,
    summarize_all,
    write_request_results,
    write_results,
)
from lamps.bench import PolicySpec, collector_paused, gain_kept_table, schedule
from lamps_core.length_model import LengthForecast, OutputLengthPredictor, SegmentContext

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PROJECT_DIR / "docs" / "results" / "cpu-chat-predictors"
MAX_TOOL_CALLS = 4  # as the dataset ran them (the shipped config's default)
MAX_SIMULATED_DURATION_S = 0.2  # the dataset's cap: the same calls fail or succeed as there

# label -> engine policy variant. The forecast each LAMPS variant gets is the label's.
VARIANT_POLICIES = {
    "oracle": "lamps",
    "learned": "lamps",
    "default": "lamps",
    # The oracle's lengths without admission by predicted memory: ordering apart from admission.
    "oracle-noadmit": "lamps-noadmit",
    "infercept": "infercept",
}
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "lamps": {"policy": "lamps", "policy_options": {"predictor": "estimates"}},
    "lamps-noadmit": {
        "policy": "lamps",
        "policy_options": {"predictor": "estimates", "admission": False},
    },
    "infercept": {"policy": "infercept"},
}


@dataclass(frozen=True)
class ChatRequest:
    """One request of the workload: a held-out conversation of the dataset, when it arrives,
    and how long its simulated_api calls wait."""

    request_id: str
    record_id: int
    arrival_s: float
    kind: str
    messages: list[dict[str, Any]]
    tools: tuple[str, ...]
    tool_choice: str
    max_tokens: int
    recorded_lengths: tuple[int, ...]  # decode tokens per segment, as the dataset recorded them
    simulated_call_s: float
    recorded_tools: tuple[str | None, ...] = ()  # the tool each segment called (None: none)


def build_workload(
    records: Sequence[dict[str, Any]],
    count: int,
    rate: float,
    seed: int,
    call_s: tuple[float, float] = (1.0, 4.0),
) -> list[ChatRequest]:
    """`count` held-out conversations drawn with `seed`, Poisson arrivals at `rate`/s from 0,
    and per request a simulated-call duration uniform in `call_s`. A pure function of its
    arguments: every variant and round replays the same list."""
    held_out = sorted((r for r in records if r["split"] == "held_out"), key=lambda r: r["id"])
    if count > len(held_out):
        raise ValueError(f"{count} requests asked, the data has {len(held_out)} held out")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(held_out, count), key=lambda r: r["id"])
    rng.shuffle(chosen)  # arrival order not by dataset id (ids follow the generator's order)
    requests, t = [], 0.0
    for i, record in enumerate(chosen):
        requests.append(
            ChatRequest(
                request_id=f"q{i:03d}-c{record['id']}",
                record_id=record["id"],
                arrival_s=t,
                kind=record["kind"],
                messages=record["messages"],
                tools=tuple(record["tools"]),
                tool_choice=record["tool_choice"],
                max_tokens=record["max_tokens"],
                recorded_lengths=tuple(s["decode_tokens"] for s in record["segments"]),
                simulated_call_s=rng.uniform(*call_s),
                recorded_tools=tuple(s["tool"] for s in record["segments"]),
            )
        )
        t += rng.expovariate(rate)
    return requests


def fit_learned(records: Sequence[dict[str, Any]]) -> OutputLengthPredictor:
    """The output-length model as the engine replica trains it, on the training split only."""
    predictor = OutputLengthPredictor()
    for record in records:
        if record["split"] != "train":
            continue
        for s in record["segments"]:
            context = SegmentContext.from_dict(s["context"])
            predictor.observe(context, s["decode_tokens"], s["tool"], s["truncated"])
    if not predictor.refit():
        raise SystemExit("too few training segments to fit the length model")
    return predictor


Forecast = Callable[[SegmentContext, int | None], int | None]


def oracle_forecast(recorded: Sequence[int]) -> Forecast:
    """The length SmolLM2 decoded for this segment of this conversation in the dataset; None
    (the policy's default) for a segment the recording did not have (the replay diverged)."""

    def forecast(context: SegmentContext, budget: int | None = None) -> int | None:
        i = context.segment_index
        return recorded[i] if i < len(recorded) else None

    return forecast


def no_forecast(context: SegmentContext, budget: int | None = None) -> int | None:
    return None


CallForecast = Callable[[SegmentContext], str | None]


def oracle_call(recorded: Sequence[str | None]) -> CallForecast:
    """The tool this segment of this conversation called in the dataset (None: none, or a
    segment the recording did not have)."""

    def forecast(context: SegmentContext) -> str | None:
        i = context.segment_index
        return recorded[i] if i < len(recorded) else None

    return forecast


def no_call(context: SegmentContext) -> str | None:
    return None


@dataclass
class SegmentLog:
    """A `SegmentLengths` for one request of one run: forecasts with `forecast`, learns
    nothing (every variant keeps the same forecaster all run long) and keeps, per segment, the
    forecast and what was decoded."""

    forecast: Forecast
    call: CallForecast = no_call
    segments: list[tuple[int, int | None, int]] = field(default_factory=list)
    _pending: dict[int, int | None] = field(default_factory=dict)

    def predict_decode_tokens(
        self, context: SegmentContext, budget: int | None = None
    ) -> int | None:
        predicted = self.forecast(context, budget)
        self._pending[context.segment_index] = predicted
        return predicted

    def predict_call(self, context: SegmentContext) -> str | None:
        return self.call(context)

    def predict(self, context: SegmentContext, budget: int | None = None) -> LengthForecast:
        """What `run_chat` asks: this variant's length (none: "default") and call."""
        tokens, tool = self.predict_decode_tokens(context, budget), self.predict_call(context)
        source = "default" if tokens is None else "model"
        return LengthForecast(tokens or 1, source, 1.0 if tool else 0.0, tool)

    def observe(
        self, context: SegmentContext, decode_tokens: int, tool: str | None, truncated: bool
    ) -> bool:
        index = context.segment_index
        self.segments.append((index, self._pending.pop(index, None), decode_tokens))
        return False


def segment_log(label: str, request: ChatRequest, learned: OutputLengthPredictor) -> SegmentLog:
    """The forecasts a variant gets: the recording's (oracle), the learned model's, or none."""
    if label.startswith("oracle"):
        return SegmentLog(
            oracle_forecast(request.recorded_lengths), oracle_call(request.recorded_tools)
        )
    if label == "learned":
        return SegmentLog(learned.predict_decode_tokens, learned.predict_call)
    return SegmentLog(no_forecast)


class ChatBench:
    """The engine, its tokenizer and the tools, shared by every run."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lamps_vllm.engine import EngineSettings

        self.settings = EngineSettings.model_validate(
            {  # cluster/serve-cpu.yaml's engine with a smaller KV cache: requests queue for it
                "model": Path(args.model),
                "served_model_name": "smollm2-135m",
                "dtype": "float32",
                "max_model_len": 4096,
                "kv_cache_bytes": args.kv_cache_mib << 20,
                "block_size": 32,
                "max_num_seqs": 32,
                "swap_pool_bytes": 256 << 20,
                "scheduler": {
                    "policy": "lamps",
                    "policy_options": {"predictor": "estimates"},
                    "policy_variants": ENGINE_VARIANTS,
                },
            }
        )

    async def start(self) -> None:
        from lamps_vllm.engine import start_engine
        from tool_workers.worker import ToolWorker

        self.engine, _ = await start_engine(self.settings)
        self.tokenizer = self.engine.get_tokenizer()
        self.worker = ToolWorker(None, max_simulated_duration_s=MAX_SIMULATED_DURATION_S)
        self.schemas = {s["function"]["name"]: s for s in self.worker.schemas()}

    def close(self) -> None:
        self.engine.shutdown()

    async def run_request(
        self,
        request: ChatRequest,
        label: str,
        round_: int,
        started: float,
        prefix: str,
        log: SegmentLog,
    ) -> RequestResult:
        from lamps_vllm.chat_session import ChatOutcome, ChatPlan, run_chat
        from tool_workers.tools import ToolArgumentsError, ToolResult, UnknownToolError

        await asyncio.sleep(max(0.0, started + request.arrival_s - time.monotonic()))
        sent = time.monotonic() - started
        sent_wall = time.time()
        in_calls = 0.0

        async def call_tool(
            name: str, arguments: dict[str, Any], record_as: str | None
        ) -> ToolResult:
            nonlocal in_calls
            begun = time.monotonic()
            try:
                result = await self.worker.call(name, arguments, record_as)
            except (UnknownToolError, ToolArgumentsError) as exc:  # as the engine replica answers
                result = ToolResult(
                    tool=name,
                    ok=False,
                    error=str(exc),
                    duration_s=0.0,
                    started_at=datetime.now(UTC),
                )
            if name == "simulated_api":  # the simulated duration; the result is the dataset's
                await asyncio.sleep(request.simulated_call_s)
            in_calls += time.monotonic() - begun
            return result

        plan = ChatPlan(
            request_id=f"{prefix}-{request.request_id}",
            messages=request.messages,
            tools=[self.schemas[name] for name in request.tools],
            tool_choice=request.tool_choice,  # type: ignore[arg-type]
            max_tokens=request.max_tokens,
            max_tool_calls=MAX_TOOL_CALLS,
            sampling={"temperature": 0.0, "top_p": 1.0, "seed": None},
            policy_variant=VARIANT_POLICIES[label],
        )
        record = {
            "request_id": request.request_id,
            "policy": label,
            "rate": 0.0,
            "round": round_,
            "arrival": sent,
        }
        try:
            outcome = None
            async for event in run_chat(
                self.engine, self.tokenizer, self.settings.max_model_len, plan, call_tool, log
            ):
                if isinstance(event, ChatOutcome):
                    outcome = event
            assert outcome is not None
        except Exception as exc:  # counted as a failed request, never dropped
            return RequestResult(**record, error=f"{type(exc).__name__}: {exc}")
        finish = time.monotonic() - started
        first = outcome.first_token_time
        return RequestResult(
            **record,
            first_token=None if first is None else min(sent + first - sent_wall, finish),
            finish=finish,
            output_tokens=outcome.completion_tokens,
            api_time=in_calls,
            segments=outcome.segments,
        )

    async def run_variant(
        self,
        requests: Sequence[ChatRequest],
        label: str,
        round_: int,
        rate: float,
        learned: OutputLengthPredictor,
        prefix: str,
    ) -> tuple[list[RequestResult], list[dict[str, Any]]]:
        # Every run replays the same prompts: without a reset the later runs would find them
        # cached. Request ids carry the run's prefix, so the engine never sees one twice.
        await self.engine.reset_prefix_cache()
        logs = [segment_log(label, r, learned) for r in requests]
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                self.run_request(r, label, round_, started, prefix, log)
                for r, log in zip(requests, logs, strict=True)
            )
        )
        segments = [
            {
                "request_id": r.request_id,
                "policy": label,
                "round": round_,
                "segment": index,
                "predicted": predicted,
                "decoded": decoded,
                "recorded": r.recorded_lengths[index] if index < len(r.recorded_lengths) else None,
            }
            for r, log in zip(requests, logs, strict=True)
            for index, predicted, decoded in log.segments
        ]
        return [x.model_copy(update={"rate": rate}) for x in results], segments


def forecast_table(segments: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Per variant, over its segments: the mean absolute forecast error (no forecast: the
    policy's default of 128 tokens), and how often the replay decoded what the dataset had."""
    lines = [
        f"{'variant':<10} {'segments':>8} {'forecast MAE':>13} {'= recorded':>11} "
        f"{'within 10':>10} {'|decoded - recorded|':>21}"
    ]
    for label in labels:
        mine = [s for s in segments if s["policy"] == label]
        if not mine:
            continue
        errors = [abs((s["predicted"] or 128) - s["decoded"]) for s in mine]
        known = [s for s in mine if s["recorded"] is not None]
        diffs = [abs(s["decoded"] - s["recorded"]) for s in known]
        lines.append(
            f"{label:<10} {len(mine):>8} {statistics.mean(errors):>13.1f} "
            f"{sum(d == 0 for d in diffs) / max(len(mine), 1):>11.1%} "
            f"{sum(d <= 10 for d in diffs) / max(len(mine), 1):>10.1%} "
            f"{statistics.mean(diffs) if diffs else float('nan'):>21.1f}"
        )
    return "\n".join(lines)


def latency_table(summaries: Sequence[Any], labels: Sequence[str]) -> str:
    per_round: dict[str, list[float]] = {}
    for s in summaries:
        if s.drained.latency_mean_s is not None:
            per_round.setdefault(s.policy, []).append(s.drained.latency_mean_s)
    combined = {s.policy: s.drained for s in combine_rounds(summaries)}
    header = (
        f"{'variant':<10} {'done':>6} {'mean lat':>9} {'P99 lat':>8} {'mean TTFT':>10} "
        f"{'P99 TTFT':>9} {'tok/s':>6}  mean lat per round"
    )
    lines = ["drained, median over rounds (s)", header]
    for label in labels:
        m = combined.get(label)
        if m is None:
            continue

        def f(v: float | None, w: int) -> str:
            return f"{v:>{w}.2f}" if v is not None else f"{'n/a':>{w}}"

        rounds = ", ".join(f"{v:.2f}" for v in per_round.get(label, []))
        lines.append(
            f"{label:<10} {m.completed:>3}/{m.requests:<2} {f(m.latency_mean_s, 9)} "
            f"{f(m.latency_p99_s, 8)} {f(m.ttft_mean_s, 10)} {f(m.ttft_p99_s, 9)} "
            f"{f(m.throughput_tokens_per_s, 6)}  {rounds}"
        )
    return "\n".join(lines)


PARTIAL_FILE = "runs.partial.jsonl"


async def run(args: argparse.Namespace) -> str:
    records = read_records(Path(args.data))
    requests = build_workload(records, args.requests, args.rate, args.seed)
    learned = fit_learned(records)
    labels = [v for v in args.variants.split(",") if v]
    unknown = set(labels) - set(VARIANT_POLICIES)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANT_POLICIES)}")
    specs = [PolicySpec(label, VARIANT_POLICIES[label]) for label in labels]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    bench = ChatBench(args)
    started = time.monotonic()
    await bench.start()
    print(f"engine started in {time.monotonic() - started:.0f} s", flush=True)
    results: list[RequestResult] = []
    segments: list[dict[str, Any]] = []
    walls: list[dict[str, Any]] = []
    try:
        if args.warmup:
            head = requests[: args.warmup]
            t = time.monotonic()
            with collector_paused():
                await bench.run_variant(head, labels[0], 0, args.rate, learned, "warmup")
            print(f"warm-up ({len(head)} requests, discarded) in {time.monotonic() - t:.0f} s")
        for rate, round_, spec in schedule([args.rate], specs, args.rounds):
            t = time.monotonic()
            with collector_paused():
                got, segs = await bench.run_variant(
                    requests, spec.label, round_, rate, learned, f"{spec.label}-r{round_}"
                )
            took = time.monotonic() - t
            results += got
            segments += segs
            walls.append({"policy": spec.label, "round": round_, "wall_s": took})
            # After every run: a bench cut short keeps what it finished.
            with (out / PARTIAL_FILE).open("a") as f:
                for r in got:
                    f.write(json.dumps({"request": r.model_dump(exclude_none=True)}) + "\n")
                for seg in segs:
                    f.write(json.dumps({"segment": seg}) + "\n")
            done = [r for r in got if r.completed]
            mean = statistics.mean(r.latency or 0.0 for r in done) if done else float("nan")
            print(
                f"{spec.label} round {round_ + 1}/{args.rounds}: {len(done)}/{len(got)} done, "
                f"mean latency {mean:.2f} s, run {took:.0f} s",
                flush=True,
            )
    finally:
        bench.close()
    config = {
        "command": "python -m bench.chat_predictors " + " ".join(args.argv),
        "data": str(Path(args.data).relative_to(PROJECT_DIR))
        if Path(args.data).is_relative_to(PROJECT_DIR)
        else str(args.data),
        "requests": args.requests,
        "rate": args.rate,
        "seed": args.seed,
        "rounds": args.rounds,
        "kv_cache_mib": args.kv_cache_mib,
        "variants": {label: VARIANT_POLICIES[label] for label in labels},
        "engine_variants": ENGINE_VARIANTS,
        "workload": [
            {
                "request_id": r.request_id,
                "record_id": r.record_id,
                "arrival_s": r.arrival_s,
                "kind": r.kind,
                "tool_choice": r.tool_choice,
                "simulated_call_s": r.simulated_call_s,
            }
            for r in requests
        ],
        "runs": walls,
    }
    text = write_report(out, labels, results, segments, config)
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    print(text)
    return text


def gain_note(summaries: Sequence[Any], reference: str) -> str:
    """A warning under the gain-kept table when the reference has no gain to keep: its
    shares then divide by a loss (or by noise) and mean nothing."""
    mean = {
        s.policy: s.drained.latency_mean_s
        for s in combine_rounds(summaries)
        if s.drained.latency_mean_s is not None
    }
    if reference in mean and "infercept" in mean and mean[reference] >= mean["infercept"]:
        return (
            f"\n(no gain to keep: {reference} is not faster than infercept here "
            f"({mean[reference]:.2f} s vs {mean['infercept']:.2f} s), so these shares mean nothing)"
        )
    return ""


def write_report(
    out: Path,
    labels: Sequence[str],
    results: Sequence[RequestResult],
    segments: Sequence[dict[str, Any]],
    config: dict[str, Any],
) -> str:
    """results.json, requests.jsonl.gz, segments.jsonl.gz and ratios.txt under `out`; returns
    the text of ratios.txt."""
    summaries = summarize_all(results)
    lamps_labels = [label for label in labels if VARIANT_POLICIES[label].startswith("lamps")]
    baseline = "infercept" in labels
    parts = [
        f"{config['requests']} held-out chat requests at {config['rate']:g}/s "
        f"(seed {config['seed']}), {config['rounds']} rounds, KV cache "
        f"{config['kv_cache_mib']} MiB",
        latency_table(summaries, labels),
    ]
    if baseline:
        parts += [
            ratio_table(summaries, base=label, against=["infercept"]) for label in lamps_labels
        ]
        if len(lamps_labels) > 1:
            parts.append(gain_kept_table(summaries, labels) + gain_note(summaries, lamps_labels[0]))
    parts.append(
        "forecasts (per segment; no forecast counts as 128 tokens) and how closely the replay "
        "repeated the dataset's lengths\n" + forecast_table(segments, labels)
    )
    text = "\n\n".join(parts)
    machine = {"platform": platform.platform(), "python": platform.python_version()}
    ratios = [
        ratio
        for label in (lamps_labels if baseline else [])
        for ratio in round_ratios(summaries, label, ["infercept"])
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, summaries, config, machine, ratios)
    path = write_request_results(out, results)
    with path.open("rb") as src, gzip.open(out / "requests.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    with gzip.open(out / "segments.jsonl.gz", "wt", encoding="utf-8") as f:
        for s in segments:
            f.write(json.dumps(s) + "\n")
    (out / "ratios.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--model", type=Path, default=PROJECT_DIR / "data" / "models" / "SmolLM2-135M-Instruct"
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=0.4, help="requests/s (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        default=192,
        help="KV cache (MiB); vLLM needs one full context: 180 MiB for SmolLM2 at 4096 tokens",
    )
    parser.add_argument("--variants", default="oracle,learned,default,infercept")
    parser.add_argument("--warmup", type=int, default=3, help="requests run first, discarded")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
