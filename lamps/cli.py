"""The `lamps` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_DIR / "data"
DEFAULT_SERVE_CONFIG = PROJECT_DIR / "cluster" / "serve-cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamps", description=__doc__)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="models, caches, Redis files (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="the embedded models")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    model_commands.add_parser("prepare", help="build the SmolLM2 and tiny dummy model folders")

    serve_cmd = commands.add_parser("serve", help="serve locally until Ctrl-C")
    serve_cmd.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVE_CONFIG,
        help="Serve config (default: %(default)s)",
    )

    bench = commands.add_parser(
        "bench", help="run policies side by side on one engine and compare them"
    )
    from lamps.bench import add_arguments

    add_arguments(bench)

    replot = commands.add_parser("bench-plot", help="plots and ratios again from a bench run")
    replot.add_argument("out", type=Path, help="the --out folder of a `lamps bench` run")

    merge = commands.add_parser(
        "bench-merge", help="several runs of one comparison as one, their rounds in turn"
    )
    merge.add_argument("out", type=Path, help="folder for the merged results")
    merge.add_argument("runs", type=Path, nargs="+", help="the --out folders of the runs")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "model":
        return _prepare(args.data_dir)
    if args.command == "serve":
        return _serve(args.config, args.data_dir)
    if args.command == "bench-merge":
        from lamps.bench_merge import MergeError, merge_runs

        try:
            print(merge_runs(args.out, args.runs))
        except MergeError as exc:
            parser.error(str(exc))
        return 0
    if args.command == "bench-plot":
        from lamps.bench import replot

        print(replot(args.out))
        return 0
    if args.command == "bench":
        from lamps.bench import main as bench_main

        return bench_main(args, PROJECT_DIR, args.data_dir)
    parser.error(f"unknown command {args.command}")
    return 2


def _prepare(data_dir: Path) -> int:
    from lamps.model import prepare_models

    started = time.monotonic()
    models = prepare_models(data_dir)
    print(
        f"models ready in {time.monotonic() - started:.1f} s:\n  {models.smollm2}\n"
        f"  {models.tiny_dummy}"
    )
    return 0


def _serve(config_path: Path, data_dir: Path) -> int:
    from lamps.local_stack import load_serve_config, local_stack
    from lamps.model import prepare_models

    prepare_models(data_dir)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack as Ctrl-C does
    # Started in the background by a shell script, SIGINT arrives ignored: take it back, or
    # Ctrl-C (and `kill -INT`) would never stop what we start.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with local_stack(load_serve_config(config_path), PROJECT_DIR, data_dir) as stack:
            print(
                f"LAMPS serving on {stack.http_url} (ready in {time.monotonic() - started:.0f} s);"
                " Ctrl-C stops everything",
                flush=True,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
