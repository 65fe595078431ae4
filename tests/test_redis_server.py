"""RedisServer starts, reuses and stops a real redis-server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from lamps.redis_server import RedisServer, RedisServerError, _pid_alive, free_port


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
    """Persistence is on: what was written before a stop is there after the next start."""
    port = free_port()
    with RedisServer(tmp_path, port) as server:
        redis.Redis.from_url(server.url).rpush("lamps:tool:x:durations", "0.5", "0.7")
    assert (tmp_path / "appendonlydir").is_dir()
    with RedisServer(tmp_path, port) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.lrange("lamps:tool:x:durations", 0, -1) == ["0.5", "0.7"]


def test_password_is_required_when_set(tmp_path: Path) -> None:
    with RedisServer(tmp_path, free_port(), password="s3cret/pw") as server:
        assert server.is_running()  # our own checks authenticate
        assert redis.Redis.from_url(server.url).ping()  # the URL carries it, quoted
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port).ping()
        assert "s3cret" not in repr(server)
