"""Everything `lamps serve` and the test suite run on one machine: a Redis server, a local Ray
(dashboard off, object store capped, on 127.0.0.2) and the Serve applications of a Serve config,
deployed the way `serve run config.yaml` deploys them. Leaving the context stops all of it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psutil
import ray
import yaml
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema

from lamps.redis_server import RedisServer

logger = logging.getLogger(__name__)

RAY_NODE_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; this stays local
OBJECT_STORE_BYTES = 512 * 1024 * 1024
STACK_MARK = "LAMPS_STACK_ID"


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class RunningStack:
    http_url: str
    redis_url: str | None


def load_serve_config(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def engine_environment(project_dir: Path, data_dir: Path) -> dict[str, str]:
    """Environment the replicas inherit through Ray: offline, caches inside the data folder,
    and vLLM's CPU threads bound to every core (it binds one otherwise)."""
    cores = os.cpu_count() or 1
    return {
        "LAMPS_HOME": str(project_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(data_dir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(data_dir / "inductor-cache"),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_NO_USAGE_STATS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextlib.contextmanager
def local_stack(
    config: dict[str, Any],
    project_dir: Path,
    data_dir: Path,
    deploy_timeout_s: float = 600.0,
    log_to_driver: bool = True,
    gcs_redis_address: str | None = None,
) -> Iterator[RunningStack]:
    """Run `config`'s applications until the context exits; `log_to_driver=False` keeps the
    replicas' logs in Ray's session folder instead of this process's output (tests).

    `gcs_redis_address` ("host:port" of a running Redis, somebody else's to run) turns on Ray's
    GCS fault tolerance: the GCS keeps its tables there, under a namespace of this stack's own,
    so that a GCS restarted while the stack runs finds the cluster again. None (the default)
    keeps them in the GCS's memory, lost with it."""
    schema = ServeDeploySchema.model_validate(config)
    redis_url = _single_redis_url(schema)
    # Every process started from here on inherits this mark, which finds them at the end even
    # after Ctrl-C killed their parents (the terminal signals Ray's daemons too).
    stack_id = uuid.uuid4().hex
    os.environ.update(engine_environment(project_dir, data_dir), **{STACK_MARK: stack_id})
    ray_temp = Path(tempfile.mkdtemp(prefix="lamps-ray-"))
    redis_server = _redis_for(redis_url, data_dir)
    try:
        if redis_server is not None:
            redis_server.start()
        on_sigterm = signal.getsignal(signal.SIGTERM)
        with _gcs_storage(gcs_redis_address):
            ray.init(
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                num_cpus=os.cpu_count(),
                _node_ip_address=RAY_NODE_IP,
                _temp_dir=str(ray_temp),
                namespace="serve",
                logging_level=logging.WARNING,
                log_to_driver=log_to_driver,
                # A system setting, not an environment variable: the head node keeps it and
                # hands it to a GCS it restarts, which must read the same namespace.
                _system_config=(
                    {"external_storage_namespace": stack_id} if gcs_redis_address else None
                ),
            )
        # Ray's driver aborts on SIGTERM, which would skip the cleanup below: restore ours.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
        )
        client.deploy_apps(schema, _blocking=False)
        _wait_running(schema, deploy_timeout_s)
        http = schema.http_options
        yield RunningStack(f"http://{http.host}:{http.port}", redis_url)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if redis_server is not None:
            redis_server.stop()
        _reap(_marked_processes(stack_id))
        shutil.rmtree(ray_temp, ignore_errors=True)


@contextlib.contextmanager
def _gcs_storage(redis_address: str | None) -> Iterator[None]:
    """`RAY_REDIS_ADDRESS` while Ray starts: the only way `ray.init` takes an external GCS
    store. Ray's head node reads it once, at start, and keeps the address for a GCS it
    restarts; unset again afterwards, so that nothing else this process starts inherits it."""
    if redis_address is None:
        yield
        return
    before = os.environ.get("RAY_REDIS_ADDRESS")
    os.environ["RAY_REDIS_ADDRESS"] = redis_address
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_REDIS_ADDRESS"]
        else:
            os.environ["RAY_REDIS_ADDRESS"] = before


def _single_redis_url(schema: ServeDeploySchema) -> str | None:
    urls = {app.args.get("redis_url") for app in schema.applications} - {None}
    if len(urls) > 1:
        raise StackError(f"applications name different Redis servers: {sorted(urls)}")
    return next(iter(urls), None)


def _redis_for(redis_url: str | None, data_dir: Path) -> RedisServer | None:
    """A local server for a local URL; a remote Redis is somebody else's to run."""
    if redis_url is None:
        return None
    parsed = urlparse(redis_url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        return None
    return RedisServer(
        data_dir / f"redis-{parsed.port}",
        port=parsed.port or 6379,
        password=unquote(parsed.password) if parsed.password else None,
    )


def _wait_running(schema: ServeDeploySchema, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    names = [app.name for app in schema.applications]
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in names}
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        failed = {
            f"{name}/{dep_name}": dep.message or s.message
            for name, s in states.items()
            if s is not None and s.status in ("DEPLOY_FAILED", "UNHEALTHY")
            for dep_name, dep in s.deployments.items()
            if dep.status != "HEALTHY"
        }
        # An application that failed before it had deployments (its import or builder raised)
        # names none: without this it would wait out the whole timeout.
        failed |= {
            name: s.message
            for name, s in states.items()
            if s is not None and s.status == "DEPLOY_FAILED" and not s.deployments
        }
        if failed:
            raise StackError(f"Serve applications failed to deploy: {failed}")
        if time.monotonic() > deadline:
            raise StackError(f"Serve applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(1.0)


def _marked_processes(stack_id: str) -> list[psutil.Process]:
    """Processes of this stack still alive: Ray's daemons and workers, vLLM engine cores."""
    me = os.getpid()
    marked = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != me and p.environ().get(STACK_MARK) == stack_id:
                marked.append(p)
    return marked


def _reap(processes: list[psutil.Process]) -> None:
    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=10)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
