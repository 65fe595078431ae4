"""What the learned output-length forecast costs per chat segment on the request path, and what
a background refit costs, on this machine's CPU.

Timed, per segment: the context built from the OpenAI messages (`SegmentContext.from_chat`), and
`OutputLengthPredictor.predict` (hashed features, two sparse softmax heads, the expected value),
with a fitted model and with the cold-start prior; over the prompts of bench/length_dataset.py
(short requests, some with a system prompt and an earlier exchange) and over long ones (a
conversation of 40 turns of 2,000 characters each). Then `refit` on a full buffer (4,096
segments, the default). Reported: the median and 99th percentile of single calls in
microseconds, wall and CPU time (the latter is the call's own on a shared machine), and the
refit's seconds.

Run: `python -m bench.prediction_cost [--calls 5000]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.length_dataset import conversation_specs
from lamps_core.length_model import (
    DEFAULT_BUFFER_SIZE,
    OutputLengthPredictor,
    SegmentContext,
)


def single_call_us(calls: list[Callable[[], Any]]) -> dict[str, float]:
    """Wall time and this thread's CPU time of each call: on a shared machine the wall time's
    tail is other processes' (preemption), the CPU time is the call's own."""
    wall, cpu = [], []
    for call in calls:
        started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
        call()
        cpu.append(time.thread_time_ns() - started_cpu)
        wall.append(time.perf_counter_ns() - started)
    wall_us, cpu_us = np.array(wall) / 1e3, np.array(cpu) / 1e3
    return {
        "wall_median_us": float(np.median(wall_us)),
        "wall_p99_us": float(np.percentile(wall_us, 99)),
        "cpu_median_us": float(np.median(cpu_us)),
        "cpu_p99_us": float(np.percentile(cpu_us, 99)),
    }


def long_conversation(rng: random.Random) -> list[dict[str, Any]]:
    words = ["alpha", "beta", "gamma", "delta", "story", "code", "list", "explain", "the", "of"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful. " * 100}]
    for _ in range(40):
        text = " ".join(rng.choice(words) for _ in range(350))  # about 2,000 characters
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    return messages[:-1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    specs = conversation_specs(1000, seed=1)
    short = [(s.messages, s.tools, s.tool_choice) for s in specs]
    long = [(long_conversation(rng), ["calculator"], "auto") for _ in range(20)]

    fitted = OutputLengthPredictor()
    for messages, tools, choice in (short * 5)[:DEFAULT_BUFFER_SIZE]:
        context = SegmentContext.from_chat(messages, tools, choice, 0)
        fitted.observe(context, rng.randint(1, 500), None, truncated=False)
    started, started_cpu = time.perf_counter(), time.process_time()
    assert fitted.refit()
    refit_s, refit_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    cold = OutputLengthPredictor()

    results: dict[str, Any] = {"machine": platform.processor() or platform.machine()}
    for label, conversations in (("short prompts", short), ("long prompts", long)):
        picks = [rng.choice(conversations) for _ in range(args.calls)]
        contexts = [SegmentContext.from_chat(m, t, c, 0) for m, t, c in picks]
        results[label] = {
            "context_from_messages": single_call_us(
                [lambda p=p: SegmentContext.from_chat(p[0], p[1], p[2], 0) for p in picks]
            ),
            "predict_fitted": single_call_us(
                [lambda c=c: fitted.predict(c, 500) for c in contexts]
            ),
            "predict_prior": single_call_us([lambda c=c: cold.predict(c, 500) for c in contexts]),
        }
    results["refit"] = {
        "examples": fitted.buffered,
        "features": len(fitted.model.columns) if fitted.model is not None else 0,
        "wall_s": refit_s,
        "cpu_s": refit_cpu_s,  # all of this process's threads (numpy's BLAS may use several)
    }
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
