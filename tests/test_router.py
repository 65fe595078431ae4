"""The Serve glue of the fleet router (deployments/router.py): Serve's real RequestRouter base
class, fed fake replicas whose `routing_stats` look like EngineReplica.record_routing_stats.
No Ray cluster here: tests/test_fleet.py runs the router in front of two real engine replicas."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from bench.placement_cost import pending_request as pending
from deployments.router import (
    MemoryAwareRouter,
    SentLedger,
    conversation_key,
    request_demand,
    session_key,
)
from lamps_core.costs import EngineCosts
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import ChatPlan

GB = 1e9
DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="lamps")
COSTS = {
    "kv_bytes_per_token": 1000,
    "fwd_intercept_s": 0.01,
    "fwd_slope_s": 0.001,
    "swap_slope_s": 0.0001,
    "decode_step_s": 0.01,
}


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    routing_stats: dict[str, Any] = field(default_factory=dict)


def replica(name: str, committed_s: float, **stats: Any) -> FakeReplica:
    return FakeReplica(
        ReplicaID(unique_id=name, deployment_id=DEPLOYMENT),
        {
            "stats_time": time.time(),
            "kv_capacity_bytes": GB,
            "kv_in_use_bytes": 0,
            "kv_paused_bytes": 0,
            "committed_memory_time": committed_s * GB,
            "costs": COSTS,
            "healthy": True,
            **stats,
        },
    )


def trace_request(n: int, api_time: float = 1.0) -> PendingRequest:
    return pending("replay", trace_args(n, api_time), n)


def trace_args(n: int, api_time: float) -> list[Any]:
    script = TraceScript.model_validate(
        {
            "segments": [
                {
                    "prompt_tokens": 1000,
                    "completion_tokens": 10,
                    "api_time": api_time,
                    "api_token_length": 5,
                },
                {"prompt_tokens": 1015, "completion_tokens": 10},
            ]
        }
    )
    return [f"r{n}", script, 0.0]


def chat_request(n: int, messages: list[dict[str, Any]]) -> PendingRequest:
    plan = ChatPlan(
        request_id=f"c{n}",
        messages=messages,
        tools=[],
        tool_choice="auto",
        max_tokens=64,
        max_tool_calls=0,
    )
    return pending("chat", [plan], n, conversation_key(messages) or "")  # as the ingress sets it


def make_router(**kwargs: Any) -> MemoryAwareRouter:
    router = MemoryAwareRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


def ids(groups: list[list[FakeReplica]]) -> list[str]:
    return [r.replica_id.unique_id for group in groups for r in group]


def test_a_burst_is_spread_by_the_routers_own_counts() -> None:
    async def main() -> list[str]:
        router = make_router()
        replicas = [replica("a", 1.0), replica("b", 1.5)]
        firsts = []
        for n in range(8):
            groups = await router.choose_replicas(replicas, trace_request(n))  # type: ignore[arg-type]
            firsts.append(ids(groups)[0])
        return firsts

    firsts = asyncio.run(main())
    # Each request holds 1 MB for 1 s (about 1e6 byte·s): tiny next to 0.5 s of backlog
    # difference, so pick heavier ones below; here the stale stats alone would send all to "a".
    assert firsts == ["a"] * 8

    async def heavy() -> list[str]:
        router = make_router()
        replicas = [replica("a", 1.0), replica("b", 1.5)]
        firsts = []
        for n in range(8):
            # 1000 tokens · 1000 B held through a 200 s call: 0.2 GB·s each.
            groups = await router.choose_replicas(replicas, trace_request(n, 200.0))  # type: ignore[arg-type]
            firsts.append(ids(groups)[0])
        return firsts

    firsts = asyncio.run(heavy())
    assert firsts[:3] == ["a", "a", "a"]  # evening out the 0.5 s difference first
    assert firsts.count("b") >= 3  # then shared, not piled onto "a"


def test_reranking_a_request_counts_it_once() -> None:
    async def main() -> list[str]:
        router = make_router()
        replicas = [replica("a", 1.0), replica("b", 1.5)]
        request = trace_request(0, 200.0)
        for _ in range(5):  # its first choice was full five times: still one request
            groups = await router.choose_replicas(replicas, request)  # type: ignore[arg-type]
        return ids(groups)

    assert asyncio.run(main()) == ["a", "b"]


def test_stats_taken_after_a_send_replace_the_count() -> None:
    ledger = SentLedger()
    ledger.record("a", "r1", 5.0, at=10.0)
    ledger.record("a", "r2", 7.0, at=12.0)
    assert ledger.since("a", stats_time=9.0) == (2, 12.0)
    assert ledger.since("a", stats_time=11.0) == (1, 7.0)
    ledger.move("r2", "b")
    assert ledger.since("a", stats_time=11.0) == (0, 0.0)
    assert ledger.since("b", stats_time=11.0) == (1, 7.0)


def test_a_full_fleet_backs_off_and_sets_should_backoff() -> None:
    async def main() -> tuple[list[str], bool]:
        router = make_router(max_backlog_s=10.0)
        request = trace_request(0)
        groups = await router.choose_replicas([replica("a", 12.0), replica("b", 11.0)], request)  # type: ignore[arg-type]
        return ids(groups), request.routing_context.should_backoff

    assert asyncio.run(main()) == ([], True)


def test_a_request_over_the_bound_alone_runs_on_an_idle_replica_not_never() -> None:
    async def main() -> list[list[str]]:
        # Each request: 1005 tokens held through a 200 s call, 0.2 s of a 1 GB replica's
        # drain, twice the bound: no replica could ever take it if idle ones were "full".
        router = make_router(max_backlog_s=0.1)
        replicas = [replica("a", 0.0), replica("b", 0.0)]
        return [
            ids(await router.choose_replicas(replicas, trace_request(n, 200.0)))  # type: ignore[arg-type]
            for n in range(3)
        ]

    first, second, third = asyncio.run(main())
    assert first == ["a", "b"]  # both idle: both open, the lower id first
    assert second == ["b"]  # "a" has the first one now: over the bound, not idle
    assert third == []  # neither is idle: back off


def test_router_options_are_checked() -> None:
    for bad in ({"max_backlog_s": 0}, {"affinity_margin_s": float("nan")}, {"margin": 1}):
        with pytest.raises(ValueError, match="MemoryAwareRouter options"):
            make_router(**bad)


def test_unhealthy_and_preserved_replicas_rank_last_or_not_at_all() -> None:
    async def main() -> list[str]:
        router = make_router()
        replicas = [
            replica("a", 0.0, healthy=False),
            replica("b", 20.0, kv_paused_bytes=0.8 * GB),  # long preserved calls
            replica("c", 0.5),
        ]
        return ids(await router.choose_replicas(replicas, trace_request(0)))  # type: ignore[arg-type]

    assert asyncio.run(main()) == ["c", "b"]


def test_a_conversations_next_turn_goes_back_within_the_margin() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi " * 50}]
    later = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]

    async def main() -> tuple[list[str], list[str], list[str], list[str]]:
        router = make_router(affinity_margin_s=1.0)
        turn_1 = await router.choose_replicas(
            [replica("a", 1.0), replica("b", 1.2)],
            chat_request(1, first),  # type: ignore[list-item]
        )
        # Now "b" is emptier by 0.5 s: the session stays on "a" (within 1 s).
        turn_2 = await router.choose_replicas(
            [replica("a", 1.0), replica("b", 0.5)],
            chat_request(2, later),  # type: ignore[list-item]
        )
        # "a" is 3 s behind, but its free KV holds the turn: the turn starts there at once.
        turn_3 = await router.choose_replicas(
            [replica("a", 4.0), replica("b", 1.0)],
            chat_request(3, later),  # type: ignore[list-item]
        )
        # "a" is 3 s behind and its cache is full: the session moves.
        turn_4 = await router.choose_replicas(
            [replica("a", 4.0, kv_in_use_bytes=GB), replica("b", 1.0)],
            chat_request(4, later),  # type: ignore[list-item]
        )
        return ids(turn_1), ids(turn_2), ids(turn_3), ids(turn_4)

    turn_1, turn_2, turn_3, turn_4 = asyncio.run(main())
    assert turn_1[0] == "a"
    assert turn_2[0] == "a"
    assert turn_3[0] == "a"
    assert turn_4[0] == "b"


def test_the_session_key_is_the_conversation_head_and_demand_reads_the_request() -> None:
    head = [{"role": "user", "content": "What is 2+2?"}]
    plan = ChatPlan(
        request_id="x", messages=head, tools=[], tool_choice="auto", max_tokens=8, max_tool_calls=0
    )
    longer = ChatPlan(
        request_id="y",
        messages=[*head, {"role": "assistant", "content": "4"}],
        tools=[],
        tool_choice="auto",
        max_tokens=8,
        max_tool_calls=0,
    )
    other = ChatPlan(
        request_id="z",
        messages=[{"role": "user", "content": "Hi"}],
        tools=[],
        tool_choice="auto",
        max_tokens=8,
        max_tool_calls=0,
    )
    assert conversation_key(plan.messages) == conversation_key(longer.messages)
    assert conversation_key(plan.messages) != conversation_key(other.messages)

    # The router reads the key the ingress sent; a trace script is one request, never a session.
    def metadata(method: str, session_id: str) -> RequestMetadata:
        return RequestMetadata(request_id="q", internal_request_id="i", call_method=method,
                               session_id=session_id)  # fmt: skip

    sent = conversation_key(longer.messages) or ""
    assert session_key(metadata("chat", sent)) == conversation_key(plan.messages)
    assert session_key(metadata("chat", "")) is None
    assert session_key(metadata("replay", "any")) is None
    costs = EngineCosts.from_dict(COSTS)
    assert request_demand("check_health", [], costs).memory_time == 0.0
    short = request_demand("replay", trace_args(0, 1.0), costs)
    long = request_demand("replay", trace_args(0, 100.0), costs)
    assert long.memory_time > 50 * short.memory_time


def test_engine_replica_reports_its_kv_and_its_commitment() -> None:
    from types import SimpleNamespace

    from deployments.engine_replica import ROUTING_HORIZON_S, EngineReplica
    from lamps_vllm.stats import EngineStatsSnapshot

    snap = EngineStatsSnapshot(
        running_requests=2, waiting_requests=1, kv_blocks_total=100, kv_blocks_used=30
    )
    snap.scheduler = {
        "block_size": 16,
        "costs": COSTS,
        "preserved_blocks": 10,
        "swap": {"host_pool_bytes_in_use": 4096},
    }
    replica_ = EngineReplica.__new__(EngineReplica)
    replica_._stats = SimpleNamespace(snapshot=snap)  # type: ignore[attr-defined]
    replica_.settings = SimpleNamespace(block_size=None)  # type: ignore[assignment]
    replica_._engine = SimpleNamespace(errored=False, shutdown=lambda: None)  # type: ignore[attr-defined]
    replica_._paused_in_tool_calls = 3
    replica_._replica_id = "r1"
    replica_._requests_received = 7
    replica_._api_estimates = {"calculator": 0.5}
    stats = replica_.record_routing_stats()
    block = 16 * 1000
    assert stats["kv_capacity_bytes"] == 100 * block
    assert stats["kv_in_use_bytes"] == 30 * block
    assert stats["kv_paused_bytes"] == 10 * block + 4096  # preserved on device + swapped
    # 30 blocks held by 2 running, one more waiting at their mean: 45 blocks for the horizon.
    assert stats["committed_memory_time"] == 45 * block * ROUTING_HORIZON_S
    assert stats["committed_estimated"] is True  # the plugin reported none
    assert stats["api_estimates"] == {"calculator": 0.5}
    assert stats["healthy"] is True and abs(stats["stats_time"] - time.time()) < 5
    assert (stats["replica"], stats["requests_received"]) == ("r1", 7)
    replica_._engine = SimpleNamespace(errored=True, shutdown=lambda: None)  # type: ignore[attr-defined]
    assert replica_.record_routing_stats()["healthy"] is False
    # The plugin's own sum of scores, when it reports one, is what the router gets.
    snap.scheduler["committed_memory_time"] = 123.0
    stats = replica_.record_routing_stats()
    assert (stats["committed_memory_time"], stats["committed_estimated"]) == (123.0, False)


def test_a_forced_chat_call_is_priced_by_the_replicas_tool_estimates() -> None:
    from deployments.router import DEFAULT_CALL_S, call_estimates_from_stats

    costs = EngineCosts.from_dict(COSTS)
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {}}}
        for name in ("calculator", "search")
    ]

    def turn(tool_choice: str) -> ChatPlan:
        return ChatPlan(
            request_id="c",
            messages=[{"role": "user", "content": "What is 2 + 2?"}],
            tools=tools,
            tool_choice=tool_choice,
            max_tokens=16,
            max_tool_calls=1,
        )

    stats = [{}, {"api_estimates": {"calculator": 0.5, "search": 30.0, "bad": float("nan")}}]
    estimates = call_estimates_from_stats(stats)
    assert estimates == {"calculator": 0.5, "search": 30.0}  # a broken figure is left out

    def memory_time(tool_choice: str, known: dict[str, float]) -> float:
        return request_demand("chat", [turn(tool_choice)], costs, known).memory_time

    fast, slow = memory_time("calculator", estimates), memory_time("search", estimates)
    assert slow > 10 * fast  # a 30-s search holds its context 60x longer than a 0.5-s sum
    assert memory_time("required", estimates) == pytest.approx(slow)  # the longest offered
    assert memory_time("auto", estimates) < fast  # no call foreseen
    # Before any records: the default duration for every tool.
    assert memory_time("search", {}) == pytest.approx(memory_time("calculator", {}))
    assert memory_time("search", {}) == pytest.approx(
        memory_time("calculator", {"calculator": DEFAULT_CALL_S})
    )
