"""How well the learned output-length model (lamps_core/length_model.py) forecasts chat segments'
decode lengths, against the baselines the scheduler had, on held-out conversations of the
dataset bench/length_dataset.py made with the real SmolLM2-135M-Instruct model.

The model is trained as the engine replica trains it (`OutputLengthPredictor.observe` on every
training segment, then `refit`, default settings); every forecast is capped at the segment's
token budget, as the serving layer caps it. Reported per predictor on the held-out segments:
the share in the right bin of 10 tokens (the last bin, 490 and up, open), within one bin, and
the mean absolute error in tokens, the mean signed error (how far a sum over requests is off,
per request); and for the tool head, how often it names what the segment
did (no call, or which tool).

Predictors: `learned` (the expected value of the bin distribution, what the scheduler gets),
`learned_argmax` (the likeliest bin's length, for comparison), `fixed_128` (the default every
chat segment got before), `mean` (the running mean of all training lengths: the cold-start
prior), `mode_mean` (per tool-choice group: forced call, auto, none: the prior once it has
data), `tool_mean` (per tool-choice mode, forced tool and the tool result it follows).

Run: `python -m bench.length_accuracy [--data bench/data/length_dataset.jsonl.gz] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamps_core.length_model import (
    BIN_TOKENS,
    DEFAULT_DECODE_TOKENS,
    OutputLengthPredictor,
    SegmentContext,
    length_bin,
    segment_features,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DATA = PROJECT_DIR / "bench" / "data" / "length_dataset.jsonl.gz"
DEFAULT_OUT = PROJECT_DIR / "bench" / "data"


@dataclass(frozen=True, slots=True)
class Segment:
    context: SegmentContext
    decode_tokens: int
    tool: str | None
    truncated: bool
    budget: int
    kind: str


def read_segments(path: Path) -> dict[str, list[Segment]]:
    """Segments by split; a segment's budget is what its conversation had left."""
    splits: dict[str, list[Segment]] = defaultdict(list)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            left = record["max_tokens"]
            for s in record["segments"]:
                context = SegmentContext.from_dict(s["context"])
                splits[record["split"]].append(
                    Segment(
                        context, s["decode_tokens"], s["tool"], s["truncated"], left, record["kind"]
                    )
                )
                left -= s["decode_tokens"]
    return dict(splits)


def _group(context: SegmentContext) -> str:
    return "forced" if context.tool_mode in ("required", "named") else context.tool_mode


def _tool_key(context: SegmentContext) -> tuple[Any, ...]:
    return (context.tool_mode, context.forced_tool, context.after_tool)


def mean_by(
    train: list[Segment], key: Callable[[SegmentContext], Any]
) -> Callable[[Segment], float]:
    """Mean training length of the segment's group; the overall mean for an unseen group."""
    sums: dict[Any, list[int]] = defaultdict(list)
    for s in train:
        sums[key(s.context)].append(s.decode_tokens)
    overall = float(np.mean([s.decode_tokens for s in train]))
    means = {k: float(np.mean(v)) for k, v in sums.items()}
    return lambda s: means.get(key(s.context), overall)


def scores(predicted: list[float], segments: list[Segment]) -> dict[str, float]:
    actual = np.array([s.decode_tokens for s in segments])
    capped = np.array([max(min(p, s.budget), 1) for p, s in zip(predicted, segments, strict=True)])
    predicted_bins = np.array([length_bin(round(p)) for p in capped])
    actual_bins = np.array([length_bin(a) for a in actual])
    return {
        "exact_bin": float(np.mean(predicted_bins == actual_bins)),
        "within_one_bin": float(np.mean(np.abs(predicted_bins - actual_bins) <= 1)),
        "mae_tokens": float(np.mean(np.abs(capped - actual))),
        # Signed: what a sum over requests (a batch's decode work) is off by, per request.
        "mean_error_tokens": float(np.mean(capped - actual)),
    }


def evaluate(data: Path) -> dict[str, Any]:
    splits = read_segments(data)
    train, held_out = splits["train"], splits["held_out"]
    predictor = OutputLengthPredictor()
    kept = sum(predictor.observe(s.context, s.decode_tokens, s.tool, s.truncated) for s in train)
    started = time.perf_counter()
    assert predictor.refit(), "too few training segments to fit"
    fit_s = time.perf_counter() - started
    model = predictor.model
    assert model is not None

    learned = [float(predictor.predict(s.context, s.budget).decode_tokens) for s in held_out]
    argmax = [
        float(
            model.bin_tokens[int(np.argmax(model.bin_probabilities(segment_features(s.context))))]
        )
        for s in held_out
    ]
    trained_on = [s for s in train if not (s.truncated and s.decode_tokens < 490)]
    overall = float(np.mean([s.decode_tokens for s in trained_on]))
    mode_mean, tool_mean = mean_by(trained_on, _group), mean_by(trained_on, _tool_key)
    predictions = {
        "learned": learned,
        "learned_argmax": argmax,
        "fixed_128": [float(DEFAULT_DECODE_TOKENS)] * len(held_out),
        "mean": [overall] * len(held_out),
        "mode_mean": [mode_mean(s) for s in held_out],
        "tool_mean": [tool_mean(s) for s in held_out],
    }
    results = {name: scores(p, held_out) for name, p in predictions.items()}

    # The tool head: "no call" or the tool, against the rule the serving layer knew before (a
    # forced call to the named tool, or to the only tool offered; otherwise no call).
    def rule(c: SegmentContext) -> str | None:
        if c.tool_mode == "named":
            return c.forced_tool
        return c.tools[0] if c.tool_mode == "required" and len(c.tools) == 1 else None

    def head(c: SegmentContext) -> str | None:
        forecast = model.forecast(segment_features(c))
        return forecast.tool if (forecast.call_probability or 0.0) > 0.5 else None

    tool_accuracy = {
        "learned": float(np.mean([head(s.context) == s.tool for s in held_out])),
        "forced_rule": float(np.mean([rule(s.context) == s.tool for s in held_out])),
    }
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({s.kind for s in held_out}):
        index = [i for i, s in enumerate(held_out) if s.kind == kind]
        subset = [held_out[i] for i in index]
        by_kind[kind] = {
            "segments": len(index),
            "mean_tokens": float(np.mean([s.decode_tokens for s in subset])),
            **{
                f"mae_{name}": scores([predictions[name][i] for i in index], subset)["mae_tokens"]
                for name in ("learned", "fixed_128", "tool_mean")
            },
        }
    return {
        "data": str(data.relative_to(PROJECT_DIR) if data.is_relative_to(PROJECT_DIR) else data),
        "bin_tokens": BIN_TOKENS,
        "train_segments": len(train),
        "train_segments_kept": kept,
        "held_out_segments": len(held_out),
        "held_out_mean_tokens": float(np.mean([s.decode_tokens for s in held_out])),
        "fit_s": fit_s,
        "predictors": results,
        "tool_head_accuracy": tool_accuracy,
        "held_out_by_kind": by_kind,
    }


def report_text(report: dict[str, Any]) -> str:
    lines = [
        f"{report['data']}: trained on {report['train_segments_kept']} of "
        f"{report['train_segments']} training segments (fit {report['fit_s']:.2f} s), "
        f"{report['held_out_segments']} held-out segments "
        f"(mean {report['held_out_mean_tokens']:.0f} tokens)",
        "",
        f"{'predictor':<16} {'exact bin':>10} {'within 1':>10} {'MAE tokens':>11} "
        f"{'mean error':>11}",
    ]
    for name, s in report["predictors"].items():
        lines.append(
            f"{name:<16} {s['exact_bin']:>10.1%} {s['within_one_bin']:>10.1%} "
            f"{s['mae_tokens']:>11.1f} {s['mean_error_tokens']:>+11.1f}"
        )
    tools = report["tool_head_accuracy"]
    lines += [
        "",
        f"ends in a call, and which tool: learned {tools['learned']:.1%}, "
        f"forced-choice rule {tools['forced_rule']:.1%}",
        "",
        f"{'held out, by kind':<18} {'n':>4} {'mean':>6} {'MAE learned':>12} {'MAE 128':>8} "
        f"{'MAE tool mean':>14}",
    ]
    for kind, k in report["held_out_by_kind"].items():
        lines.append(
            f"{kind:<18} {k['segments']:>4} {k['mean_tokens']:>6.0f} {k['mae_learned']:>12.1f} "
            f"{k['mae_fixed_128']:>8.1f} {k['mae_tool_mean']:>14.1f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = evaluate(args.data.resolve())
    text = report_text(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "length_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "length_accuracy.txt").write_text(text)
    print(text, end="")
    return report


if __name__ == "__main__":
    main()
