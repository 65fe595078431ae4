"""The Ray GCS killed and restarted, with GCS fault tolerance (its tables in a real Redis), while
requests are in flight on a real local Ray cluster running the Serve application (the tiny
dummy-model engine, a `preserve` and a `swap` variant so that calls hold KV blocks in the engine
and in the host pool). What the client sees, that no accepted request hangs or vanishes, and that
afterwards every KV block is free and the host pool empty (read from the engine replica).
docs/reliability.md gives the measured outcome.

The cluster is this module's own (own Ray, own Redis for the GCS, torn down at the end), and
runs in a child process: a process joins one Ray cluster at most, and the suite's session
stack may already have made the test process a driver of its own. The child runs
`local_stack(..., gcs_redis_address=...)` and answers commands over a pipe: kill or start the
GCS (Ray's own `Node.kill_gcs_server` / `start_gcs_server`, as Ray's GCS fault-tolerance tests
restart it), and read the engine's figures through a Serve handle. The test process is the
client: HTTP to the child's Serve proxy.

The child imports this module (multiprocessing's spawn): vLLM and the engine harness are
imported inside the functions that need them, not here."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from lamps.redis_server import RedisServer, free_port

APP = "lamps"
CHILD_MARK = "LAMPS_GCS_TEST_ID"  # in every process of the child's cluster: the last-resort reap
# Ray, Serve and the tiny engine: about 35 s on 2 cores, minutes when other work shares them.
START_TIMEOUT_S = 420.0
COMMAND_TIMEOUT_S = 90.0
CALL_S = 2.0  # the API call of each request in flight when the GCS dies
OUTAGE_S = 6.0  # the GCS stays down at least this long: past every in-flight call's end
MAX_OUTAGE_S = 30.0  # ... and until every request answered, at most this long
REQUEST_BOUND_S = 60.0  # no request may take longer (a hang fails the test)


# ---- the cluster's process ----------------------------------------------------------------------


def _cluster_main(
    conn: Connection, config: dict[str, Any], project_dir: str, data_dir: str, gcs_redis: str
) -> None:
    """Runs in the child: the stack until the parent says quit (or goes away)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")

    # local_stack keeps this handler through ray.init: a terminate() still tears the stack down.
    signal.signal(signal.SIGTERM, stop)
    try:
        _serve_commands(conn, config, project_dir, data_dir, gcs_redis)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


def _serve_commands(
    conn: Connection, config: dict[str, Any], project_dir: str, data_dir: str, gcs_redis: str
) -> None:
    import ray
    from ray import serve

    from lamps.local_stack import local_stack

    with local_stack(
        config, Path(project_dir), Path(data_dir), log_to_driver=False, gcs_redis_address=gcs_redis
    ) as running:
        node = ray._private.worker._global_node
        # Made (and its router started) while the GCS is up: a handle's calls go straight to
        # the replica's actor, so this one can still read the engine during the outage.
        engine = serve.get_deployment_handle("EngineReplica", APP)

        def engine_figures() -> dict[str, Any]:
            stats = engine.stats.remote().result(timeout_s=30)
            scheduler = engine.scheduler_stats.remote().result(timeout_s=30)
            return {"stats": stats, "scheduler": scheduler}

        def gcs_pid() -> int:
            return int(node.all_processes["gcs_server"][0].process.pid)

        def kill_gcs() -> int:
            pid = gcs_pid()
            node.kill_gcs_server()
            return pid

        def start_gcs() -> dict[str, Any]:
            started = time.monotonic()
            # On the port of the one killed: Node kept it, and every raylet and worker is
            # reconnecting to that address.
            node.start_gcs_server()
            # Answering once it has reloaded its tables from Redis and this driver reconnected.
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            return {
                "pid": gcs_pid(),
                "address": node.gcs_address,
                "answered_s": time.monotonic() - started,
                "alive_nodes": alive,
            }

        def cluster() -> dict[str, Any]:
            """What only the GCS knows (its actor table) and what Serve's controller reports:
            after a restart, read back from the Redis tables."""
            status = serve.status().applications[APP]
            actors = ray.util.list_named_actors(all_namespaces=True)
            return {
                "app": status.status.value,
                "deployments": {n: d.status.value for n, d in status.deployments.items()},
                "actors": sorted(a["name"] for a in actors),
                "gcs_address": node.gcs_address,
                "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                "namespace": node._config.get("external_storage_namespace"),
            }

        commands: dict[str, Callable[[], Any]] = {
            "engine": engine_figures,
            "gcs_pid": gcs_pid,
            "kill_gcs": kill_gcs,
            "start_gcs": start_gcs,
            "cluster": cluster,
        }
        conn.send(("ready", running.http_url))
        while True:
            try:
                command = conn.recv()
            except EOFError:  # the parent is gone: tear the stack down
                break
            if command == "quit":
                break
            try:
                conn.send(("ok", commands[command]()))
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))


# ---- the test's side ----------------------------------------------------------------------------


@dataclass
class Cluster:
    url: str
    gcs_redis: RedisServer
    _conn: Connection

    def ask(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        self._conn.send(command)
        assert self._conn.poll(timeout_s), f"the cluster did not answer {command!r}"
        kind, value = self._conn.recv()
        assert kind == "ok", f"{command}: {value}"
        return value


def engine_app(model: Path) -> dict[str, Any]:
    from tests.engine_harness import tiny_settings

    engine = tiny_settings(
        model,
        scheduler={
            "policy": "lamps",
            "policy_variants": {
                "preserve": {"policy": "fixed", "policy_options": {"strategy": "preserve"}},
                "swap": {"policy": "fixed", "policy_options": {"strategy": "swap"}},
            },
        },
    ).model_dump(mode="json", exclude_none=True)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                # No redis_url: tool statistics are not what this test is about (the GCS's
                # Redis is a server of its own).
                "args": {"engine": engine, "enable_benchmark_endpoints": True},
                "deployments": [
                    {"name": "EngineReplica", "ray_actor_options": {"num_cpus": 0.5}},
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def cluster(prepared_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import DATA_DIR, PROJECT_DIR

    mark = uuid.uuid4().hex
    config = engine_app(prepared_models.tiny_dummy)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    with RedisServer(tmp_path_factory.mktemp("gcs-redis"), free_port()) as gcs_redis:
        os.environ[CHILD_MARK] = mark  # inherited by the child, and by all it starts
        try:
            process = context.Process(
                target=_cluster_main,
                args=(
                    child,
                    config,
                    str(PROJECT_DIR),
                    str(DATA_DIR),
                    f"127.0.0.1:{gcs_redis.port}",
                ),
                daemon=False,  # it starts processes of its own (Ray's)
            )
            process.start()
        finally:
            del os.environ[CHILD_MARK]
        child.close()
        ready = False
        try:
            started = time.monotonic()
            while not parent.poll(1.0):
                assert process.is_alive(), f"the cluster's process exited ({process.exitcode})"
                assert time.monotonic() - started < START_TIMEOUT_S, "the cluster did not start"
            kind, value = parent.recv()
            assert kind == "ready", f"the cluster did not start:\n{value}"
            ready = True
            print(f"\ncluster up in {time.monotonic() - started:.0f} s")
            yield Cluster(value, gcs_redis, parent)
        finally:
            if ready:  # it reads the pipe: a clean stop
                with contextlib.suppress(OSError):
                    parent.send("quit")
                process.join(60)
            if process.is_alive():  # still starting, or stuck: SIGTERM tears the stack down too
                process.terminate()
                process.join(30)
            _reap_marked(mark)


def _reap_marked(mark: str) -> None:
    """Whatever of the child's cluster outlived it (it normally stops all of it itself)."""
    left = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(CHILD_MARK) == mark:
                left.append(p)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)


def held_call(policy: str, api_time: float) -> dict[str, Any]:
    """A trace whose one call holds its KV cache on the GPU (`preserve`) or in the host pool
    (`swap`) for `api_time`."""
    return {
        "policy": policy,
        "segments": [
            {
                "prompt_tokens": 40,
                "completion_tokens": 4,
                "api_time": api_time,
                "api_token_length": 3,
                "api_type": "qa",
            },
            {"prompt_tokens": 47, "completion_tokens": 3},
        ],
    }


@dataclass
class Sent:
    name: str
    sent_at: float
    future: Future[httpx.Response]


@dataclass
class Answer:
    name: str
    status: int
    body: dict[str, Any]
    text: str
    latency_s: float
    done_at: float


def post(url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    with httpx.Client(base_url=url, timeout=REQUEST_BOUND_S) as client:
        response = client.post("/v1/traces", json=body)
    return response, time.monotonic()


def answers(sent: list[Sent]) -> list[Answer]:
    """Every request's answer; a request still unanswered after REQUEST_BOUND_S fails here
    (httpx's timeout): it hung."""
    result = []
    for s in sent:
        response, done_at = s.future.result()
        try:
            body = response.json()
        except ValueError:
            body = {}
        result.append(
            Answer(s.name, response.status_code, body, response.text, done_at - s.sent_at, done_at)
        )
    return result


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    from tests.engine_harness import wait_until as poll

    return poll(check, timeout_s, what)


def engine_idle(cluster: Cluster) -> bool:
    figures = cluster.ask("engine")
    swap = figures["scheduler"].get("swap", {})
    return (
        figures["stats"]["kv_blocks_used"] == 0
        and figures["scheduler"].get("preserved_blocks", 0) == 0
        and swap.get("host_pool_bytes_in_use", 0) == 0
        and swap.get("entries", 0) == 0
    )


def test_gcs_restart_under_load(cluster: Cluster) -> None:
    """Eight requests in 2 s calls (four with their KV blocks preserved, four swapped out to the
    host pool); the GCS is killed while they are in their calls; a /health, a read of the engine
    through a Serve handle and three more requests arrive while it is down; it stays down at
    least OUTAGE_S and until every request has answered, then restarts. Every request must
    answer 200 within the bound, all of them while the GCS is down (Serve's data path does not
    go through it); the restarted GCS must find the cluster as it was in Redis (same node, same
    replicas, nothing restarted); the engine must end with every block free and the host pool
    empty."""
    before = cluster.ask("cluster")
    assert before["app"] == "RUNNING"
    store = redis.Redis(port=cluster.gcs_redis.port)
    assert any(before["namespace"].encode() in k for k in store.keys("*")), (
        "the GCS keeps nothing in Redis: fault tolerance is off"
    )
    with httpx.Client(base_url=cluster.url, timeout=REQUEST_BOUND_S) as client:
        assert client.post("/v1/traces", json=held_call("swap", 0.1)).status_code == 200
    wait_until(lambda: engine_idle(cluster), 30, "the engine is not idle before the fault")
    counts_before = cluster.ask("engine")["scheduler"]

    with ThreadPoolExecutor(12) as pool:

        def send(name: str, body: dict[str, Any]) -> Sent:
            return Sent(name, time.monotonic(), pool.submit(post, cluster.url, body))

        # The same burst without a fault first: what the requests take on this machine.
        baseline = answers(
            [send(p, held_call(p, CALL_S)) for _ in range(4) for p in ("preserve", "swap")]
        )
        assert [a.status for a in baseline] == [200] * 8
        wait_until(lambda: engine_idle(cluster), 30, "the engine is not idle before the fault")

        in_flight = [
            send(f"{policy}-{i}", held_call(policy, CALL_S))
            for i in range(4)
            for policy in ("preserve", "swap")
        ]
        wait_until(
            lambda: cluster.ask("engine")["stats"]["paused_in_tool_calls"] >= 6,
            30,
            "the calls did not start",
        )
        at_kill = cluster.ask("engine")
        gcs_pid = cluster.ask("kill_gcs")
        killed_at = time.monotonic()
        assert not psutil.pid_exists(gcs_pid)  # killed and reaped

        during = [send(f"during-{p}", held_call(p, 1.0)) for p in ("preserve", "swap")]
        during.append(
            send("during-no-call", {"segments": [{"prompt_tokens": 16, "completion_tokens": 4}]})
        )
        with httpx.Client(base_url=cluster.url, timeout=REQUEST_BOUND_S) as client:
            t0 = time.monotonic()
            health = client.get("/health")
            health_s = time.monotonic() - t0
        t0 = time.monotonic()
        down_figures = cluster.ask("engine")  # through the handle made before the outage
        handle_s = time.monotonic() - t0

        sent = in_flight + during

        def all_answered() -> bool:
            return time.monotonic() - killed_at >= OUTAGE_S and all(s.future.done() for s in sent)

        # A request that needed the GCS would wait for it: the cap stays well inside the 60 s
        # the raylets wait for a GCS before they give up (gcs_rpc_server_reconnect_timeout_s).
        wait_until(all_answered, MAX_OUTAGE_S, "requests unanswered while the GCS is down")
        restart_at = time.monotonic()
        outage_s = restart_at - killed_at
        restarted = cluster.ask("start_gcs")
        got = answers(sent)

    after = cluster.ask("cluster")
    with httpx.Client(base_url=cluster.url, timeout=REQUEST_BOUND_S) as client:
        late = [client.post("/v1/traces", json=held_call(p, 0.5)) for p in ("preserve", "swap")]
    wait_until(lambda: engine_idle(cluster), 30, "KV blocks or host pool still held")
    end = cluster.ask("engine")

    swapped = (
        end["scheduler"]["swap"]["swapped_out_requests"]
        - counts_before["swap"]["swapped_out_requests"]
    )

    def spread(answers: list[Answer]) -> str:
        latencies = sorted(a.latency_s for a in answers)
        return f"{latencies[0]:.2f}-{latencies[-1]:.2f} s"

    calls_end_s = max(s.sent_at for s in in_flight) + CALL_S - killed_at
    print(
        f"\nGCS killed with {at_kill['stats']['paused_in_tool_calls']} requests in calls "
        f"({at_kill['stats']['kv_blocks_used']} KV blocks used, host pool "
        f"{at_kill['scheduler']['swap']['host_pool_bytes_in_use']:,} B in "
        f"{at_kill['scheduler']['swap']['entries']} entries); down {outage_s:.1f} s.\n"
        f"in flight (2 s calls, ending {calls_end_s:.1f} s after the kill): "
        f"{sorted({a.status for a in got[:8]})} in {spread(got[:8])} (without the fault: "
        f"{spread(baseline)}), the last "
        f"{max(a.done_at for a in got[:8]) - killed_at:.1f} s after the kill;\n"
        f"sent while down: {[(a.name, a.status, round(a.latency_s, 2)) for a in got[8:]]};\n"
        f"/health while down: {health.status_code} in {health_s:.2f} s; a handle read the engine "
        f"in {handle_s:.2f} s;\nthe new GCS answered {restarted['answered_s']:.1f} s after its "
        f"start; after: {[r.status_code for r in late]}, replicas {after['actors']};\n"
        f"engine at the end: {end['stats']['kv_blocks_used']} KV blocks used "
        f"({end['stats']['kv_blocks_free']} free), "
        f"{end['scheduler'].get('preserved_blocks', 0)} preserved, host pool "
        f"{end['scheduler']['swap']['host_pool_bytes_in_use']} B, "
        f"{end['scheduler']['swap']['entries']} entries; swapped out during the test: {swapped}"
    )

    # The fault hit requests holding memory: KV blocks in the engine and in the host pool.
    assert at_kill["stats"]["kv_blocks_used"] > 0
    assert at_kill["scheduler"]["swap"]["host_pool_bytes_in_use"] > 0
    # While down: the ingress answered /health (it asks the engine replica), and a handle made
    # before the outage reached the engine.
    assert health.status_code == 200 and health_s < 3.5, health.text
    assert down_figures["stats"]["kv_blocks_total"] > 0
    # Every request served, none lost or failed; all before the GCS was back.
    assert [a.status for a in got] == [200] * len(got), [a.text for a in got if a.status != 200]
    assert all(a.done_at < restart_at for a in got)
    for a in got:  # served in full: every segment decoded, every call's result used
        segments = a.body["segments"]
        if a.name == "during-no-call":
            assert [s["completion_tokens"] for s in segments] == [4]
        else:
            assert [s["completion_tokens"] for s in segments] == [4, 3]
            assert segments[0]["api_ok"] is True, segments[0]
    # The same GCS address and cluster, reloaded from Redis: the node, the controller and
    # every replica of before (none died, none was replaced), the application running.
    assert restarted["pid"] != gcs_pid
    assert restarted["address"] == before["gcs_address"]
    assert restarted["alive_nodes"] == before["nodes"]
    assert after["actors"] == before["actors"]
    assert after["app"] == "RUNNING"
    assert set(after["deployments"].values()) == {"HEALTHY"}
    assert [r.status_code for r in late] == [200, 200]
    # Afterwards nothing is held: the four swapped calls (and the later ones) really used the
    # host pool, and gave it back.
    assert swapped >= 4
    assert end["stats"]["kv_blocks_used"] == 0
    assert end["scheduler"].get("preserved_blocks", 0) == 0
    assert end["scheduler"]["swap"]["host_pool_bytes_in_use"] == 0
    assert end["scheduler"]["swap"]["entries"] == 0
