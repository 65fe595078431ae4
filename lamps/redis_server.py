"""Start and stop a real local ``redis-server`` for scripts and tests.

The server is daemonized with a pidfile in ``data_dir`` so that a later process
(another script, a re-run test session) can find it, reuse it or stop it.
Persistence is on (an append-only file in ``data_dir``, fsynced every second): the tool
statistics the scheduler predicts from survive a restart of Redis or of the machine. A started
server has read that file back: until then Redis answers every command with LOADING.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "RedisServerError", "free_port"]

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 20


class RedisServerError(RuntimeError):
    """redis-server could not be started or stopped; the message carries the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on ``host``.

    Another process may take it before we bind it; callers that start a server on
    it get a clear RedisServerError in that (rare) case rather than a silent clash.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    # A daemonized redis-server is re-parented; in containers where PID 1 does not
    # reap, the dead server lingers as a zombie that os.kill(pid, 0) still "finds".
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        stat = ""
    if stat:
        # The state letter follows the parenthesised command name, which may itself contain spaces.
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the pidfile as redis itself does
    return b"redis-server" in cmdline


class RedisServer:
    """A local redis-server bound to ``host:port`` with its files in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        executable: str = "redis-server",
        password: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.executable = executable
        self.password = password
        # More redis-server settings (`--NAME VALUE`), after ours (tests slow its loading down).
        self.options = dict(options or {})
        self.reused = False
        self._log_offset = 0

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "redis.log"

    def _client(self) -> redis.Redis:
        # Short timeouts and no retry storm: we poll in our own loop.
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _answering_pid(self) -> int | None:
        """The process id of the server answering on our port, or None if none answers."""
        client = self._client()
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
        finally:
            client.close()
        pid = info.get("process_id")
        return int(pid) if pid is not None else None

    def _loaded(self) -> bool:
        """Whether the server answering on our port serves commands: it has read its data back
        (PING answers PONG, not LOADING)."""
        client = self._client()
        try:
            return bool(client.ping())
        except redis.RedisError:  # BusyLoadingError while it loads, or no answer at all
            return False
        finally:
            client.close()

    def wait_loaded(self, timeout_s: float = _START_TIMEOUT_S) -> Self:
        """Wait until the server has read its append-only file back. Redis answers INFO, and
        accepts connections, while it loads, but refuses every other command with LOADING: a
        caller that read right after a restart saw BusyLoadingError."""
        started = time.monotonic()
        while not self._loaded():
            pid = self._read_pid()
            problem = None
            if pid is None or not _pid_alive(pid):
                problem = "exited while loading its data"  # e.g. a damaged append-only file
            elif time.monotonic() - started > timeout_s:
                problem = f"has not loaded its data after {timeout_s:.0f} s"
            if problem is not None:
                raise RedisServerError(
                    f"redis-server on {self.host}:{self.port} {problem}"
                    f"\n--- {self.logfile} ---\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)
        return self

    def is_running(self) -> bool:
        """True if a server answers on our port and it is the one our pidfile names."""
        pid = self._read_pid()
        return pid is not None and _pid_alive(pid) and self._answering_pid() == pid

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_says_aborted(self) -> bool:
        # redis-server exits before creating its pidfile when it cannot listen or load
        # its config; its log is then the only sign, and these are the words it uses.
        # Only what this start wrote: the log is appended to across restarts.
        try:
            with self.logfile.open("rb") as f:
                f.seek(self._log_offset)
                new = f.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        return "aborting" in new or "FATAL" in new

    def start(self, timeout_s: float = _START_TIMEOUT_S, *, wait_loaded: bool = True) -> Self:
        """Start the server (or reuse ours if it already answers), wait until it answers, then
        (up to ``timeout_s`` more) until it has loaded its data. ``wait_loaded=False`` returns
        while it may still be loading: for tests of clients that must ride that out."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            self.reused = True
            # Ours, maybe started a moment ago by another process and still loading.
            return self.wait_loaded(timeout_s) if wait_loaded else self
        answering = self._answering_pid()
        if answering is not None:
            raise RedisServerError(
                f"port {self.host}:{self.port} is served by another redis-server "
                f"(pid {answering}) that is not ours (pidfile {self.pidfile})"
            )
        stale = self._read_pid()
        if stale is not None and not _pid_alive(stale):
            # redis-server refuses nothing on a stale pidfile, but we would later signal a
            # recycled pid from it: drop it first.
            self.pidfile.unlink(missing_ok=True)
        if shutil.which(self.executable) is None:
            raise RedisServerError(f"{self.executable!r} not found on PATH; install redis-server")
        self._log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        cmd = [
            self.executable,
            "--bind", self.host,
            "--port", str(self.port),
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile.resolve()),
            "--dir", str(self.data_dir.resolve()),
            "--logfile", str(self.logfile.resolve()),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            *(["--requirepass", self.password] if self.password else []),
            *(arg for name, value in self.options.items() for arg in (f"--{name}", value)),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            output = proc.stderr.strip() or proc.stdout.strip()
            raise RedisServerError(
                f"redis-server exited with {proc.returncode}: {output}"
                f"\n--- {self.logfile} ---\n{self.log_tail()}"
            )
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            pid = self._read_pid()
            if pid is not None and self._answering_pid() == pid:
                self.reused = False
                # Loading a large append-only file takes a while of its own: a budget of its own.
                return self.wait_loaded(timeout_s) if wait_loaded else self
            if pid is not None and not _pid_alive(pid):
                break  # it died after writing its pidfile: no point waiting out the timeout
            if pid is None and self._log_says_aborted():
                break  # it died before writing its pidfile (e.g. cannot bind)
            time.sleep(_POLL_INTERVAL_S)
        raise RedisServerError(
            f"redis-server on {self.host}:{self.port} did not come up "
            f"(no PING answer after {time.monotonic() - started:.1f} s of {timeout_s:.0f} s)"
            f"\n--- {self.logfile} ---\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop the server named by our pidfile and wait until its process is gone.

        A no-op if it is not running. SHUTDOWN NOSAVE first (the append-only file is still
        flushed; NOSAVE only skips an RDB snapshot); SIGTERM, then SIGKILL, if the process is
        still there.
        """
        pid = self._read_pid()  # read before SHUTDOWN: redis removes its pidfile on exit
        if pid is None or not _pid_alive(pid):
            self.pidfile.unlink(missing_ok=True)
            return
        answering = self._answering_pid()
        if answering != pid and not _is_redis_process(pid):
            # A stale pidfile whose pid now belongs to some unrelated process: never signal it.
            self.pidfile.unlink(missing_ok=True)
            return
        if answering == pid:
            client = self._client()
            try:
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass  # fall through to signals
            finally:
                client.close()
        if not self._wait_exit(pid, timeout_s / 2):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout_s / 2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_exit(pid, 2.0):
                    raise RedisServerError(f"redis-server pid {pid} did not exit")
        self.pidfile.unlink(missing_ok=True)

    @staticmethod
    def _wait_exit(pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL_S)
        return True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}"  # not the URL: it may carry the password
        return f"RedisServer({where}, data_dir={str(self.data_dir)!r})"
