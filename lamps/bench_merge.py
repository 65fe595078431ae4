"""`lamps bench-merge OUT RUN...`: several runs of one comparison as one, their rounds in turn.

A comparison that does not fit one process gets its rounds from several: a GPU device call is
limited to 10 minutes, and a fleet run starts a fresh stack per router, so the GPU router
comparison runs `--router memory,pow2` in one call and `--router pow2,memory` in the next (the
order alternated, as `--rounds` alternates it within a run). Merged, run k's rounds follow run
k-1's, and ratios, spreads and plots are computed as for one run of that many rounds.

The runs must compare the same labels at the same rates with the same trace settings; the first
run's command is the merged file's, and every run's command and machine are kept beside it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.results import (
    RequestResult,
    round_ratios,
    summarize_all,
    write_request_results,
    write_results,
)

# What must agree between the runs merged (the rest, e.g. the order of the labels, may differ).
SAME_SETTINGS = (
    "workload",
    "trace",
    "rate",
    "duration",
    "requests",
    "scale",
    "time_scale",
    "seed",
    "sample",
    "replicas",
    "config",
)


class MergeError(ValueError):
    pass


def merge_runs(out: Path, runs: Sequence[Path]) -> str:
    """Write `out` (results.json, requests.jsonl, ratios.txt, plots) from the `runs`' folders;
    returns the ratio table."""
    from lamps.bench import compared_labels, read_run, replot

    if len(runs) < 2:
        raise MergeError("bench-merge needs at least two runs")
    try:
        read = [read_run(run) for run in runs]
    except FileNotFoundError as exc:
        raise MergeError(str(exc)) from exc
    bodies = [body for body, _ in read]
    commands = [body["config"]["command"] for body in bodies]
    first = commands[0]
    labels = set(compared_labels(first.get("policies") or "", first.get("router")))
    for run, command in zip(runs[1:], commands[1:], strict=True):
        differ = [k for k in SAME_SETTINGS if command.get(k) != first.get(k)]
        if differ:
            raise MergeError(f"{run}: not the same comparison as {runs[0]} ({', '.join(differ)})")
        theirs = set(compared_labels(command.get("policies") or "", command.get("router")))
        if theirs != labels:
            raise MergeError(f"{run}: compares {sorted(theirs)}, not {sorted(labels)}")

    merged: list[RequestResult] = []
    offset = 0
    for _, records in read:
        merged += [r.model_copy(update={"round": r.round + offset}) for r in records]
        offset += 1 + max((r.round for r in records), default=-1)

    config: dict[str, Any] = dict(bodies[0]["config"])
    config.pop("cut_short", None)  # said per run in merged_from
    config["command"] = first | {"rounds": offset}
    config["merged_from"] = [
        {
            "run": str(run),
            "command": body["config"]["command"],
            "machine": body.get("machine"),
            "cut_short": bool(body.get("cut_short") or body["config"].get("cut_short")),
        }
        for run, body in zip(runs, bodies, strict=True)
    ]
    config["noisy_runs"] = [
        note for body in bodies for note in body["config"].get("noisy_runs") or []
    ]
    summaries = summarize_all(merged, horizon_s=first.get("duration"))
    base, *others = compared_labels(first.get("policies") or "", first.get("router"))
    out.mkdir(parents=True, exist_ok=True)
    write_results(
        out, summaries, config, bodies[0].get("machine"), round_ratios(summaries, base, others)
    )
    write_request_results(out, merged)
    for run in runs:  # anything else a run wrote (logs), kept under its own name
        for extra in run.glob("*.log"):
            shutil.copy(extra, out / f"{run.name}-{extra.name}")
    return replot(out)
