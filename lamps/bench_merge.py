"""`lamps bench-merge OUT RUN...`: several runs of one comparison as one, their rounds in turn.

A comparison that does not fit one process gets its rounds from several: a GPU device call is
limited to 10 minutes, and a fleet run starts a fresh stack per router, so the GPU router
comparison runs `--router memory,pow2` in one call and the same with `--first-round 1` in the
next (the order alternated, as `--rounds` alternates it within a run). Where one router's fleet
takes most of a call, a round is split by router: `--router memory`, then `--router pow2`, then
`--router pow2`, then `--router memory`.

A run that compares every label keeps its rounds together, after every round before it (its
variants ran on one engine: a round cut short stays short rather than borrow a label from
another run). A one-router run's rounds are that router's next ones, so one-router runs pair up
into rounds in the order given. Ratios, spreads and plots are then computed as for one run of
that many rounds.

The runs must be at the same rates with the same trace settings, and each must compare either
every label of the merge or (a --router run) one; the first run's first label is the base of
the ratios, its command the merged file's, and every run's command and machine are kept beside
it.
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
    "steady",
    "warmup_s",
    "cooldown_s",
    "slo_slowdown",
)


class MergeError(ValueError):
    pass


def merge_runs(out: Path, runs: Sequence[Path]) -> str:
    """Write `out` (results.json, requests.jsonl, ratios.txt, plots) from the `runs`' folders;
    returns the ratio table."""
    from lamps.bench import compared_labels, read_run, replot, summary_settings

    if len(runs) < 2:
        raise MergeError("bench-merge needs at least two runs")
    try:
        read = [read_run(run) for run in runs]
    except FileNotFoundError as exc:
        raise MergeError(str(exc)) from exc
    bodies = [body for body, _ in read]
    commands = [body["config"]["command"] for body in bodies]
    first = commands[0]
    each = [compared_labels(c.get("policies") or "", c.get("router")) for c in commands]
    labels = list(dict.fromkeys(label for run_labels in each for label in run_labels))
    if len(labels) < 2:
        raise MergeError(f"the runs compare only {labels}: nothing to compare")
    for run, command, theirs in zip(runs, commands, each, strict=True):
        differ = [k for k in SAME_SETTINGS if command.get(k) != first.get(k)]
        if differ:
            raise MergeError(f"{run}: not the same comparison as {runs[0]} ({', '.join(differ)})")
        if set(theirs) == set(labels):
            continue
        if len(theirs) != 1 or not command.get("router"):  # policies share one engine's runs
            raise MergeError(f"{run}: compares {sorted(theirs)}, not {sorted(labels)}")

    merged: list[RequestResult] = []
    rounds_so_far = dict.fromkeys(labels, 0)  # per label, the merged rounds it has so far
    for (_, records), theirs in zip(read, each, strict=True):
        own = sorted({r.round for r in records})
        # One router's run: its next rounds, beside the others' in turn. A run of every label:
        # its rounds stay together, after all others (its variants shared one engine).
        alone = len(theirs) == 1
        first_new = rounds_so_far[theirs[0]] if alone else max(rounds_so_far.values())
        numbered = {round_: first_new + i for i, round_ in enumerate(own)}
        merged += [r.model_copy(update={"round": numbered[r.round]}) for r in records]
        for label in theirs:
            rounds_so_far[label] = first_new + len(own)
    rounds = 1 + max((r.round for r in merged), default=-1)

    config: dict[str, Any] = dict(bodies[0]["config"])
    config.pop("cut_short", None)  # said per run in merged_from
    config["command"] = first | {"rounds": rounds}
    if first.get("router"):  # what the merged files compare (a one-router run names only its own)
        config["command"]["router"] = ",".join(labels)
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
    summaries = summarize_all(merged, **summary_settings(first))
    base, *others = labels
    out.mkdir(parents=True, exist_ok=True)
    write_results(
        out, summaries, config, bodies[0].get("machine"), round_ratios(summaries, base, others)
    )
    write_request_results(out, merged)
    for run in runs:  # anything else a run wrote (logs), kept under its own name
        for extra in run.glob("*.log"):
            shutil.copy(extra, out / f"{run.name}-{extra.name}")
    return replot(out)
