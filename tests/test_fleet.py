"""The fleet router on real Ray with real engines: one application ("fleet", under /fleet) with
TWO EngineReplica replicas of the tiny dummy model (16 MiB of KV cache each, so that a few
requests fill it) behind `deployments.router.MemoryAwareRouter`, wired the way a Serve config
wires it (`request_router_config` in the `deployments:` section, as cluster/serve-gpu.yaml).

It shares the suite's Ray and Serve (the `stack` fixture): the application is added next to the
suite's own with Serve's declarative API (the suite's application is passed back unchanged, so
Serve leaves it running), and deleted at the end of the module. The two replicas run on two Ray
nodes: the suite's node (127.0.0.2) and a second one this module starts on 127.0.0.3 (`ray
start --block` joining the suite's cluster, stopped at the end), one replica on each
(`max_replicas_per_node: 1`). The replicas count the requests they receive, so each test reads
where the router's choices went from the replicas themselves.

Order matters only at the end: the last test kills a replica (its replacement starts while the
module tears down)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema
from transformers import AutoTokenizer

from lamps.local_stack import RunningStack
from lamps.model import PreparedModels
from lamps_vllm.chat_session import render_prompt
from tests.engine_harness import tiny_settings, wait_until

pytestmark = pytest.mark.engine

APP = "fleet"
SECOND_NODE_IP = "127.0.0.3"
# Small on purpose (these engines' work is seconds): a replica is full past 2 s of memory-time
# at full cache (the replica's estimate counts held KV for ROUTING_HORIZON_S = 5 s: over 40 % of
# the cache held is full), a conversation's replica may be 2 s behind the best, and a request
# waits 4 s for a replica, then gets 429.
MAX_BACKLOG_S = 2.0
AFFINITY_MARGIN_S = 2.0
ROUTING_WAIT_S = 4.0
STATS_PERIOD_S = 0.5


def preserving_engine(model: Path) -> dict[str, Any]:
    """The tiny engine running LAMPS, with a `preserve` variant that holds KV through calls."""
    return tiny_settings(
        model,
        scheduler={
            "policy": "lamps",
            "policy_variants": {
                "preserve": {"policy": "fixed", "policy_options": {"strategy": "preserve"}}
            },
        },
    ).model_dump(mode="json", exclude_none=True)


# The replicas' KV caches by rank (`kv_cache_bytes_by_rank`): a mixed fleet, here barely mixed
# (one MiB apart) so that every other test sees two alike.
KV_BY_RANK = [16 * 1024 * 1024, 17 * 1024 * 1024]


def fleet_app(model: Path) -> dict[str, Any]:
    engine = preserving_engine(model) | {"kv_cache_bytes_by_rank": KV_BY_RANK}
    return {
        "name": APP,
        "route_prefix": f"/{APP}",
        "import_path": "deployments.app:build_app",
        "args": {
            "engine": engine,
            "max_routing_wait_s": ROUTING_WAIT_S,
            "enable_benchmark_endpoints": True,  # the test replays traces
        },
        "deployments": [
            {
                "name": "EngineReplica",
                "num_replicas": 2,
                "max_replicas_per_node": 1,
                # Ray's CPUs are the suite's engine's; these replicas are tiny.
                "ray_actor_options": {"num_cpus": 0.25},
                # A replica still starting when the module ends need not be waited for.
                "graceful_shutdown_timeout_s": 2,
                "request_router_config": {
                    "request_router_class": "deployments.router.MemoryAwareRouter",
                    "request_router_kwargs": {
                        "max_backlog_s": MAX_BACKLOG_S,
                        "affinity_margin_s": AFFINITY_MARGIN_S,
                    },
                    "request_routing_stats_period_s": STATS_PERIOD_S,
                },
            },
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}},
            {"name": "ToolWorker", "ray_actor_options": {"num_cpus": 0}},
        ],
    }


# ---- the cluster and the application ------------------------------------------------------------


@contextlib.contextmanager
def second_node() -> Iterator[None]:
    """A worker node on SECOND_NODE_IP joined to the suite's Ray; gone when the context exits."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_cli is not None
    node = ray._private.worker.global_worker.node
    process = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--block",
            f"--address={node.gcs_address}",
            f"--node-ip-address={SECOND_NODE_IP}",
            "--num-cpus=1",
            f"--object-store-memory={100 * 1024 * 1024}",
            f"--temp-dir={node.get_temp_dir_path()}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: SECOND_NODE_IP in {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]},
            60,
            "the second Ray node never joined",
        )
        yield
    finally:
        _stop_tree(process.pid)


def _stop_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()


def deploy_next_to_the_suite(app: dict[str, Any]) -> None:
    """Serve's declarative API replaces the whole set of declaratively deployed applications:
    pass the running ones back as they are (same config: Serve changes nothing there)."""
    client = _get_global_client()
    details = client.get_serve_details()
    running = [
        a["deployed_app_config"]
        for a in details["applications"].values()
        if a.get("source") == "declarative" and a.get("deployed_app_config")
    ]
    schema = ServeDeploySchema.model_validate(
        {
            "proxy_location": details["proxy_location"],
            "http_options": details["http_options"],
            "applications": [*running, app],
        }
    )
    client.deploy_apps(schema, _blocking=False)


def app_running() -> bool:
    status = serve.status().applications.get(APP)
    if status is not None and status.status == "DEPLOY_FAILED":
        pytest.fail(f"the fleet application failed to deploy: {status.message}")
    return status is not None and status.status == "RUNNING"


def engine_stats() -> dict[str, dict[str, Any]]:
    """Each live replica's own figures (routing statistics + engine statistics), by replica."""
    handle = serve.get_deployment_handle("EngineReplica", APP)
    # A replica just killed (or not yet up) answers with an error: the others still count.
    routing = handle.broadcast("record_routing_stats").results(timeout_s=20, return_exceptions=True)
    engine = handle.broadcast("metrics_snapshot").results(timeout_s=20, return_exceptions=True)
    by_replica = {r["replica"]: dict(r) for r in routing if isinstance(r, dict)}
    for e in engine:
        if isinstance(e, dict) and e["replica"] in by_replica:
            by_replica[e["replica"]].update(e)
    return by_replica


def received() -> dict[str, int]:
    return {rid: s["requests_received"] for rid, s in engine_stats().items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {rid: after[rid] - before.get(rid, 0) for rid in after}


def replica_nodes() -> dict[str, str]:
    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"]["EngineReplica"]["replicas"]
    return {r["replica_id"]: r["node_ip"] for r in replicas if r["state"] == "RUNNING"}


@dataclass(frozen=True)
class Fleet:
    url: str
    replicas: tuple[str, str]  # replica ids, as the replicas report them
    tokenizer: Any


@pytest.fixture(scope="module")
def fleet(stack: RunningStack, prepared_models: PreparedModels) -> Iterator[Fleet]:
    started = time.monotonic()
    with second_node():
        node_s = time.monotonic() - started
        deploy_next_to_the_suite(fleet_app(prepared_models.tiny_dummy))
        try:
            wait_until(app_running, 300, "the fleet application is not running")
            stats = wait_for_stats(2)
            nodes = replica_nodes()
            tokenizer = AutoTokenizer.from_pretrained(prepared_models.tiny_dummy)
            print(
                f"\nfleet: second node up after {node_s:.0f} s, 2 replicas running after "
                f"{time.monotonic() - started:.0f} s, on nodes {sorted(nodes.values())}"
            )
            assert sorted(nodes.values()) == sorted(["127.0.0.2", SECOND_NODE_IP])
            a, b = sorted(stats)
            yield Fleet(f"{stack.http_url}/{APP}", (a, b), tokenizer)
        finally:
            stopping = time.monotonic()
            serve.delete(APP)
            print(f"\nfleet deleted in {time.monotonic() - stopping:.0f} s")


def wait_for_stats(count: int) -> dict[str, dict[str, Any]]:
    """Every replica answers with statistics that carry its engine's measured costs."""
    found: dict[str, dict[str, Any]] = {}

    def ready() -> bool:
        nonlocal found
        with contextlib.suppress(Exception):
            found = engine_stats()
        return len(found) == count and all(s.get("costs") for s in found.values())

    wait_until(ready, 120, f"{count} replicas with statistics")
    return found


# ---- requests -----------------------------------------------------------------------------------


def trace(prompt: int, completion: int = 4, api_time: float | None = None) -> dict[str, Any]:
    """A trace request; with `api_time`, one call whose KV cache is held (preserved) throughout."""
    if api_time is None:
        return {"segments": [{"prompt_tokens": prompt, "completion_tokens": completion}]}
    return {
        "policy": "preserve",
        "segments": [
            {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "api_time": api_time,
                "api_token_length": 2,
                "api_type": "qa",
            },
            {"prompt_tokens": prompt + completion + 2, "completion_tokens": 2},
        ],
    }


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as client:
        return client.post(path, json=body)


def replicas_holding_calls() -> dict[str, int]:
    return {rid: s["paused_in_tool_calls"] for rid, s in engine_stats().items()}


def router_sees_it() -> None:
    """The controller pulls statistics every STATS_PERIOD_S and pushes them to the routers: two
    periods and a margin, and the ingress's router has figures taken after what we saw."""
    time.sleep(2 * STATS_PERIOD_S + 0.5)


def settle() -> None:
    """Nothing running, waiting or held on any replica, and the router knows it (it would
    otherwise place the next requests by the figures of the last test's)."""

    def idle() -> bool:
        return all(
            s["running_requests"] == 0 and s["waiting_requests"] == 0 and s["kv_in_use_bytes"] == 0
            for s in engine_stats().values()
        )

    wait_until(idle, 30, "the fleet is not idle")
    router_sees_it()


# ---- the tests ----------------------------------------------------------------------------------


def test_each_replica_runs_the_kv_cache_of_its_rank(fleet: Fleet) -> None:
    """A deployment's replicas share one config; `kv_cache_bytes_by_rank` gives them caches of
    different sizes, as a fleet of mixed cards has, and the router reads each one's own."""
    capacities = sorted(s["kv_capacity_bytes"] for s in engine_stats().values())
    assert len(capacities) == 2
    # vLLM rounds a budget down to whole blocks (16 tokens of the tiny model: 64 KiB) and may
    # keep one block back.
    for got, asked in zip(capacities, KV_BY_RANK, strict=True):
        assert asked - 2 * 64 * 1024 <= got <= asked


def test_a_replica_holding_preserved_calls_gets_fewer_new_requests(fleet: Fleet) -> None:
    """One replica holds a long call's KV cache (600 tokens, preserved for 6 s: 0.7 s of its
    drain by the replica's own estimate); a burst of 8 short requests then arrives. By queue
    length (Serve's power of two choices) the loaded replica has one request, so a burst
    spreads over both; by memory-time the idle replica finishes each sooner."""
    settle()
    before = received()
    with ThreadPoolExecutor(9) as pool:
        long = pool.submit(post, fleet.url, "/v1/traces", trace(600, api_time=6.0))
        wait_until(lambda: sum(replicas_holding_calls().values()) == 1, 20, "no call started")
        [loaded] = [rid for rid, n in replicas_holding_calls().items() if n == 1]
        [idle] = [rid for rid in fleet.replicas if rid != loaded]
        router_sees_it()
        burst = [pool.submit(post, fleet.url, "/v1/traces", trace(40)) for _ in range(8)]
        assert [f.result().status_code for f in burst] == [200] * 8
        placed = delta(before, received())
        assert long.result().status_code == 200
    new_on_loaded = placed[loaded] - 1  # its one long request
    print(f"\nburst of 8: loaded replica took {new_on_loaded}, idle one {placed[idle]}")
    assert new_on_loaded + placed[idle] == 8
    assert new_on_loaded <= 1 < 7 <= placed[idle]


def chat_turns(session: int, marker: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A conversation's first turn and its second (which repeats the first: its context)."""
    # About 150 tokens: a few turns in flight on one replica stay well under the backlog bound.
    words = " ".join(f"{marker}{session}w{i}" for i in range(20))
    first = [
        {"role": "system", "content": f"Session {marker}-{session}. Answer briefly."},
        {"role": "user", "content": f"Summarise: {words}"},
    ]
    second = [*first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    return first, second


def chat(fleet: Fleet, messages: list[dict[str, str]]) -> httpx.Response:
    return post(fleet.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})


def test_a_sessions_next_turn_goes_back_to_its_context(fleet: Fleet) -> None:
    """Six conversations start at once (the router spreads them over both replicas); their
    second turns then arrive at once in the reverse order. Each must land where its first
    turn's KV blocks are cached: the engines' prefix-cache hits must account for every
    session's whole shared context (a turn placed elsewhere finds none of it)."""
    sessions = 6
    marker = uuid.uuid4().hex[:6]  # nothing of an earlier run is in any cache
    turns = [chat_turns(s, marker) for s in range(sessions)]
    settle()
    before = received()
    with ThreadPoolExecutor(sessions) as pool:
        firsts = list(pool.map(lambda t: chat(fleet, t[0]), turns))
    assert [r.status_code for r in firsts] == [200] * sessions, firsts[0].text
    first_placement = delta(before, received())
    assert all(n >= 1 for n in first_placement.values()), first_placement  # both took some

    router_sees_it()
    stats = engine_stats()
    hits_before = {rid: s["prefix_cache_hits"] for rid, s in stats.items()}
    before = {rid: s["requests_received"] for rid, s in stats.items()}
    with ThreadPoolExecutor(sessions) as pool:
        seconds = list(pool.map(lambda t: chat(fleet, t[1]), reversed(turns)))
    assert [r.status_code for r in seconds] == [200] * sessions
    stats = engine_stats()
    second_placement = delta(before, {rid: s["requests_received"] for rid, s in stats.items()})
    hits = sum(s["prefix_cache_hits"] - hits_before[rid] for rid, s in stats.items())

    # The context of each first turn, in whole 16-token blocks (what the prefix cache reuses).
    reusable = [
        16 * (shared_prefix_tokens(fleet.tokenizer, first, second) // 16) for first, second in turns
    ]
    expected = sum(reusable)
    print(
        f"\nsessions: first turns {first_placement}, second turns {second_placement}; "
        f"prefix-cache hits {hits} tokens of {expected} reusable"
    )
    assert second_placement == first_placement
    # A turn placed away from its context finds none of it: a whole session's worth missing.
    assert hits > expected - min(reusable), (hits, expected, reusable)


def shared_prefix_tokens(tokenizer: Any, first: list[Any], second: list[Any]) -> int:
    """Tokens the second turn's prompt shares with the first's, as the engine renders them."""
    a = render_prompt(tokenizer, first, None)
    b = render_prompt(tokenizer, second, None)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_full_fleet_holds_requests_then_429s_and_loses_none(fleet: Fleet) -> None:
    """Both replicas hold a 1900-token context through a 7 s call (2.3 s of backlog each by
    their own estimate, over the 2 s bound): the fleet is full. Requests sent then wait at the
    router; those that wait ROUTING_WAIT_S get 429 (short, Retry-After) and never run; those
    sent when the first are refused are held until the calls end (about 2 s later), then run.
    Retried, the refused ones complete."""
    settle()
    before = received()
    short = trace(40)
    with ThreadPoolExecutor(8) as pool:
        # At once: the first goes to an idle replica, the second to the other, still idle.
        longs = [
            pool.submit(post, fleet.url, "/v1/traces", trace(1900, api_time=7.0)) for _ in range(2)
        ]

        def one_call_each() -> bool:
            done = [f.result().text for f in longs if f.done()]
            assert not done, f"a long request ended before its call: {done}"
            return sorted(replicas_holding_calls().values()) == [1, 1]

        wait_until(one_call_each, 20, "not one call per replica")
        router_sees_it()
        sent = time.monotonic()
        early = [pool.submit(post, fleet.url, "/v1/traces", short) for _ in range(3)]
        refused = [f.result() for f in early]
        refused_after = time.monotonic() - sent
        later: list[Future[httpx.Response]] = [
            pool.submit(post, fleet.url, "/v1/traces", short) for _ in range(3)
        ]
        held = [f.result() for f in later]
        held_for = time.monotonic() - sent - refused_after
        long_results = [f.result() for f in longs]

    print(f"\nfull fleet: 3 refused after {refused_after:.1f} s, 3 held {held_for:.1f} s then run")
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "ServerBusyError"
        assert "every engine replica is full" in error["message"]
        assert len(response.text) < 300 and "Traceback" not in response.text
    assert ROUTING_WAIT_S - 0.5 <= refused_after < ROUTING_WAIT_S + 3
    assert [r.status_code for r in held] == [200] * 3
    assert held_for > 0.5  # they waited for the calls to end: a short request alone takes less
    assert [r.status_code for r in long_results] == [200] * 2

    retried = [post(fleet.url, "/v1/traces", short) for _ in refused]
    assert [r.status_code for r in retried] == [200] * 3
    # None lost, none run twice: the refused ones never reached a replica.
    assert sum(delta(before, received()).values()) == 2 + 3 + 3


def replica_actor(replica_id: str) -> Any:
    return ray.get_actor(f"SERVE_REPLICA::{APP}#EngineReplica#{replica_id}", namespace="serve")


def test_a_killed_replicas_requests_fail_clearly_and_the_rest_go_to_the_live_one(
    fleet: Fleet,
) -> None:
    """Four requests in 3 s calls spread over both replicas; one replica is killed. Its
    in-flight requests fail with a short 503 (Serve does not retry a request a replica had
    accepted); the live one's complete; every request after that is served by the live one."""
    settle()
    # The replica on the second node: a node's replica lost, the head's lives on.
    [victim] = [rid for rid, ip in replica_nodes().items() if ip == SECOND_NODE_IP]
    [survivor] = [rid for rid in fleet.replicas if rid != victim]
    with ThreadPoolExecutor(4) as pool:
        running = [
            pool.submit(post, fleet.url, "/v1/traces", trace(100, api_time=3.0)) for _ in range(4)
        ]

        def both_in_calls() -> bool:
            holding = replicas_holding_calls()
            return sum(holding.values()) == 4 and min(holding.values()) >= 1

        wait_until(both_in_calls, 20, "the calls did not start on both replicas")
        on_victim = replicas_holding_calls()[victim]
        ray.kill(replica_actor(victim), no_restart=True)
        killed_at = time.monotonic()
        results = [f.result() for f in running]
    codes = sorted(r.status_code for r in results)
    print(f"\nkilled replica: in-flight answers {codes} after {time.monotonic() - killed_at:.1f} s")
    assert codes == sorted([200] * (4 - on_victim) + [503] * on_victim)
    for response in results:
        if response.status_code == 503:
            error = response.json()["error"]
            assert error["type"] == "EngineUnavailableError"
            assert "was lost while serving this request" in error["message"]
            assert len(response.text) < 300 and "Traceback" not in response.text

    before = received_by(survivor)
    after_kill = [post(fleet.url, "/v1/traces", trace(40)) for _ in range(4)]
    assert [r.status_code for r in after_kill] == [200] * 4
    assert received_by(survivor) - before == 4


def received_by(replica_id: str) -> int:
    return engine_stats()[replica_id]["requests_received"]
