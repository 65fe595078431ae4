"""Trace replay through the real engine: forced segment lengths, API waits honoured, every call
recorded in Redis under its (bounded) API type, and request ids that are the server's."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from lamps.local_stack import RunningStack
from tests.conftest import MODEL
from tool_workers.stats import ToolDurationEstimate, ToolStatsStore

pytestmark = pytest.mark.engine


def script(api_type: str) -> list[dict]:
    return [
        {
            "prompt_tokens": 40,
            "completion_tokens": 8,
            "api_time": 0.6,
            "api_token_length": 5,
            "api_type": api_type,
        },
        {
            "prompt_tokens": 53,
            "completion_tokens": 6,
            "api_time": 0.3,
            "api_token_length": 3,
            "api_type": api_type,
        },
        {"prompt_tokens": 62, "completion_tokens": 4},
    ]


def estimates(redis_url: str | None, *tools: str) -> dict[str, ToolDurationEstimate]:
    async def read() -> dict[str, ToolDurationEstimate]:
        assert redis_url is not None
        store = ToolStatsStore(redis_url)
        try:
            return await store.all_estimates(tools)
        finally:
            await store.close()

    return asyncio.run(read())


def test_replay_forces_lengths_and_waits(http: httpx.Client, stack: RunningStack) -> None:
    api_type = "virtual_env"  # a simulated type no other test uses
    before = estimates(stack.redis_url, api_type)[api_type].count
    response = http.post("/v1/traces", json={"model": MODEL, "segments": script(api_type)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [s["completion_tokens"] for s in body["segments"]] == [8, 6, 4]
    assert [s["prompt_tokens"] for s in body["segments"]] == [40, 53, 62]
    waits = [s["api_duration_s"] for s in body["segments"][:2]]
    assert waits[0] == pytest.approx(0.6, abs=0.05)
    assert waits[1] == pytest.approx(0.3, abs=0.05)
    assert body["segments"][2]["api_duration_s"] is None
    assert all(s["api_ok"] for s in body["segments"][:2])
    assert body["latency_s"] >= 0.9  # the request's latency includes its API time
    assert 0 < body["ttft_s"] < body["latency_s"]

    recorded = estimates(stack.redis_url, api_type)[api_type]
    assert recorded.count == before + 2
    assert recorded.last_s == pytest.approx(0.3, abs=0.05)


def test_a_real_tools_name_is_not_learned_from_a_script(
    http: httpx.Client, stack: RunningStack
) -> None:
    """A script may say its call is a `calculator` call (predicted as one), but its made-up
    duration is recorded as the simulated API's, never as the calculator's."""
    tools = ("calculator", "simulated_api")
    before = estimates(stack.redis_url, *tools)
    response = http.post("/v1/traces", json={"segments": script("calculator")})
    assert response.status_code == 200, response.text
    after = estimates(stack.redis_url, *tools)
    assert after["calculator"].count == before["calculator"].count
    assert after["simulated_api"].count == before["simulated_api"].count + 2


def test_concurrent_replays_all_complete(http: httpx.Client) -> None:
    async def run_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=300) as client:
            return await asyncio.gather(
                *(client.post("/v1/traces", json={"segments": script("qa")}) for _ in range(6))
            )

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 6
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 6
    for r in responses:
        assert [s["completion_tokens"] for s in r.json()["segments"]] == [8, 6, 4]


def test_a_repeated_client_id_leaks_nothing(http: httpx.Client) -> None:
    """Two requests under one client id, both holding KV through their calls at the same time:
    each gets an id of its own, both complete, and the engine holds no block afterwards."""
    body = {"request_id": "same-id", "policy": "preserve", "segments": script("qa")}
    engine = serve.get_deployment_handle("EngineReplica", "lamps")
    preserved_before = engine.scheduler_stats.remote().result().get("calls_preserve", 0)

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/traces", json=body) for _ in range(2)))

    responses = asyncio.run(both())
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert [b["client_request_id"] for b in bodies] == ["same-id", "same-id"]
    assert len({b["request_id"] for b in bodies}) == 2
    assert all(b["request_id"].startswith("trace-") for b in bodies)
    assert all(b["segments"][1]["cached_tokens"] > 0 for b in bodies)

    # One more request makes the engine step and publish its figures after both finished.
    last = [{"prompt_tokens": 8, "completion_tokens": 1}]
    assert http.post("/v1/traces", json={"segments": last}).status_code == 200
    time.sleep(0.3)
    scheduler = engine.scheduler_stats.remote().result()
    assert scheduler["calls_preserve"] - preserved_before == 4  # the variant held every call
    assert scheduler["preserved_requests"] == 0
    assert engine.stats.remote().result()["kv_blocks_used"] == 0
