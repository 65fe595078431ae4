"""An engine core ends when its server dies (lamps_vllm/parent_watch.py), shown with real
processes: a middle process (the server) starts two children the way vLLM starts its engine core,
one watching its parent and one not, and is then killed with SIGKILL as `ray.kill` kills a
replica. The watching child shuts down through its SIGTERM handler (vLLM's orderly shutdown);
the other is orphaned, which is the leak the watch exists for."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import psutil

from tests.engine_harness import wait_until


def _child(watch: bool, marker: Path) -> None:
    from lamps_vllm.parent_watch import exit_with_parent

    def on_term(signum: int, frame: object) -> None:
        marker.write_text("sigterm")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if watch:
        assert exit_with_parent(poll_s=0.05, grace_s=5.0)
    marker.write_text("started")
    time.sleep(600)


def _server(tmp: str, pids: multiprocessing.Queue) -> None:
    context = multiprocessing.get_context("spawn")
    for watch in (True, False):
        child = context.Process(target=_child, args=(watch, Path(tmp) / f"watch-{watch}"))
        child.start()
        pids.put(child.pid)
    time.sleep(600)


def test_engine_core_exits_when_its_server_is_killed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    pids: multiprocessing.Queue = context.Queue()
    server = context.Process(target=_server, args=(str(tmp_path), pids))
    server.start()
    watching, unwatched = pids.get(timeout=60), pids.get(timeout=60)
    try:
        wait_until(
            lambda: all((tmp_path / f"watch-{w}").exists() for w in (True, False)),
            60,
            "the children never started",
        )
        assert psutil.pid_exists(watching) and psutil.pid_exists(unwatched)
        os.kill(server.pid, signal.SIGKILL)
        server.join(10)
        wait_until(lambda: not _alive(watching), 10, "the watching child outlived its server")
        assert (tmp_path / "watch-True").read_text() == "sigterm"  # the orderly path ran
        time.sleep(0.5)
        assert _alive(unwatched), "without the watch the child is orphaned, not ended"
    finally:
        for pid in (watching, unwatched):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_engine_in_the_serving_process_is_not_watched() -> None:
    from lamps_vllm.parent_watch import exit_with_parent

    assert multiprocessing.parent_process() is None
    assert not exit_with_parent()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
