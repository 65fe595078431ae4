"""RedisServer starts, reuses and stops a real redis-server."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lamps.redis_server import RedisServer, RedisServerError, _pid_alive, free_port

# A server started with these reads its data back at about 1 ms a key (Redis's debug setting
# `key-load-delay`, in microseconds) and answers clients between keys, with LOADING: the state a
# large append-only file leaves a restarted Redis in for seconds, made to last on a small one.
SLOW_LOADING = {"key-load-delay": "1000", "loading-process-events-interval-bytes": "1024"}
FILLER_KEYS = 2000  # about 2 s of loading under SLOW_LOADING


def fill_for_slow_loading(server: RedisServer, keys: int = FILLER_KEYS) -> None:
    """Write `keys` keys, then rewrite the append-only file: its base becomes an RDB file, which
    is what `key-load-delay` slows down (commands in the incremental file are not)."""
    client = redis.Redis.from_url(server.url)
    with client.pipeline(transaction=False) as pipe:
        for i in range(keys):
            pipe.set(f"filler:{i}", "x" * 16)
        pipe.execute()
    client.bgrewriteaof()
    deadline = time.monotonic() + 30
    while True:
        persistence = client.info("persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            break
        assert time.monotonic() < deadline, "the append-only file was not rewritten"
        time.sleep(0.05)
    assert persistence["aof_last_bgrewrite_status"] == "ok"
    client.close()


def strict_client(server: RedisServer) -> redis.Redis:
    """A client that reports LOADING instead of retrying it (redis-py retries connection
    errors, BusyLoadingError among them, a few times by default)."""
    return redis.Redis.from_url(server.url, decode_responses=True, retry=Retry(NoBackoff(), 0))


def is_loading(server: RedisServer) -> bool:
    try:
        strict_client(server).ping()
    except redis.BusyLoadingError:
        return True
    return False


def test_start_reuse_stop(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        pid = int(server.pidfile.read_text())
        assert redis.Redis.from_url(server.url).ping()
        again = RedisServer(tmp_path, port).start()
        assert again.reused and int(again.pidfile.read_text()) == pid
        # A different data dir on the same port is somebody else's server: refuse.
        with pytest.raises(RedisServerError, match="not ours"):
            RedisServer(tmp_path / "other", port).start()
    assert not _pid_alive(pid)  # stop() waited for the process to exit
    assert not server.pidfile.exists()
    server.stop()  # stopping a stopped server is a no-op


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    # Something that is not Redis holds the port: redis-server cannot bind and aborts.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RedisServerError, match="did not come up") as info:
            RedisServer(tmp_path, port).start(timeout_s=5)
    assert "Address already in use" in str(info.value) or "aborting" in str(info.value)


def test_restart_after_failed_start_in_same_dir(tmp_path: Path) -> None:
    # The log keeps the earlier failure's "aborting": it must not fail the next start.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RedisServerError):
            RedisServer(tmp_path, port).start(timeout_s=5)
    with RedisServer(tmp_path, free_port()) as server:
        assert redis.Redis.from_url(server.url).ping()


def test_data_survives_a_restart(tmp_path: Path) -> None:
    """Persistence is on: what was written before a stop is there after the next start, read
    at once (start() returns once the file is loaded, so no client retry is needed)."""
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        redis.Redis.from_url(server.url).rpush("lamps:tool:x:durations", "0.5", "0.7")
    assert (tmp_path / "appendonlydir").is_dir()
    with RedisServer(tmp_path, port) as server:
        client = strict_client(server)
        assert client.lrange("lamps:tool:x:durations", 0, -1) == ["0.5", "0.7"]


def test_start_returns_once_the_data_is_loaded(tmp_path: Path) -> None:
    """Redis answers INFO (and so looked started) while it still reads its append-only file
    back, refusing every other command with LOADING: the restart test read then, and failed
    with BusyLoadingError now and then. start() waits for PING to answer."""
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        strict_client(server).rpush("lamps:tool:x:durations", "0.5", "0.7")
        fill_for_slow_loading(server)
    slow = RedisServer(tmp_path, port, options=SLOW_LOADING)
    # The window this is about: answering, pidfile written, data not loaded.
    slow.start(wait_loaded=False)
    try:
        assert slow.is_running()
        assert is_loading(slow), "the slowed-down load was over before it could be seen"
        with pytest.raises(redis.BusyLoadingError):
            strict_client(slow).lrange("lamps:tool:x:durations", 0, -1)
        slow.wait_loaded(timeout_s=60)
        assert strict_client(slow).lrange("lamps:tool:x:durations", 0, -1) == ["0.5", "0.7"]
    finally:
        slow.stop()
    # And start() itself waits (it did not: it returned as soon as INFO answered).
    with RedisServer(tmp_path, port, options=SLOW_LOADING).start(timeout_s=60) as server:
        assert strict_client(server).lrange("lamps:tool:x:durations", 0, -1) == ["0.5", "0.7"]
        assert strict_client(server).dbsize() == FILLER_KEYS + 1


def test_reusing_a_loading_server_waits_too(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        fill_for_slow_loading(server)
    first = RedisServer(tmp_path, port, options=SLOW_LOADING).start(wait_loaded=False)
    try:
        assert is_loading(first)
        again = RedisServer(tmp_path, port).start(timeout_s=60)  # another process's view
        assert again.reused
        assert strict_client(again).dbsize() == FILLER_KEYS
    finally:
        first.stop()


def test_a_server_that_dies_while_loading_is_reported(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        fill_for_slow_loading(server)
    slow = RedisServer(tmp_path, port, options=SLOW_LOADING).start(wait_loaded=False)
    assert is_loading(slow)
    pid = int(slow.pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RedisServerError, match="exited while loading its data"):
        slow.wait_loaded(timeout_s=60)
    slow.stop()  # a dead server's pidfile is cleaned up
    assert not slow.pidfile.exists()


def test_password_is_required_when_set(tmp_path: Path) -> None:
    with RedisServer(tmp_path, free_port(), password="s3cret/pw") as server:
        assert server.is_running()  # our own checks authenticate
        assert redis.Redis.from_url(server.url).ping()  # the URL carries it, quoted
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port).ping()
        assert "s3cret" not in repr(server)
