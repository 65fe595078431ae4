"""An engine core never outlives the server that started it.

vLLM runs the engine core in a child process of the engine replica. When the replica dies
without shutting its engine down (a crash, `ray.kill`, the OOM killer), nothing in vLLM stops the
child, and Ray kills a dead worker's children only when it finds them before they are re-parented
(CI saw one survive): the orphan keeps the whole KV cache (and its GPU) with no one to serve. So
the engine core watches its parent and shuts itself down when the parent is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

_armed = False


def exit_with_parent(poll_s: float = 1.0, grace_s: float = 10.0) -> bool:
    """In a process started by `multiprocessing` (vLLM's engine core), start a daemon thread that
    ends this process once its parent has died: SIGTERM first (vLLM's own orderly shutdown), then
    a hard exit after `grace_s` if that did not end it. Returns whether a watch runs; an engine
    that runs inside the serving process (no parent of its own to outlive) is not watched."""
    global _armed
    parent = multiprocessing.parent_process()
    if _armed or parent is None or parent.pid is None:
        return _armed
    # The pid multiprocessing recorded at the start, not getppid(): a parent that died before
    # this call is already gone from getppid().
    parent_pid = parent.pid
    threading.Thread(
        target=_watch, args=(parent_pid, poll_s, grace_s), daemon=True, name="exit-with-parent"
    ).start()
    _armed = True
    return True


def _watch(parent_pid: int, poll_s: float, grace_s: float) -> None:
    # A dead parent's children are re-parented (to init or a subreaper): polling the parent id
    # needs no cooperation from the parent, unlike a pipe it might close early.
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    logger.warning(
        "engine core %d: its server (pid %d) is gone; shutting down", os.getpid(), parent_pid
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    logger.error("engine core %d: not down %.0f s after SIGTERM; exiting", os.getpid(), grace_s)
    os._exit(1)
