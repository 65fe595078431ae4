"""Trace replay through the real engine: forced segment lengths, API waits honoured, and every
call recorded in Redis under its API type."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from lamps.local_stack import RunningStack
from tests.conftest import MODEL
from tool_workers.stats import ToolStatsStore

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


def test_replay_forces_lengths_and_waits(http: httpx.Client, stack: RunningStack) -> None:
    api_type = f"qa-{uuid.uuid4().hex[:6]}"
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

    async def recorded() -> tuple[int, float | None]:
        store = ToolStatsStore(stack.redis_url)
        try:
            estimate = await store.estimate(api_type)
        finally:
            await store.close()
        return estimate.count, estimate.mean_s

    count, mean = asyncio.run(recorded())
    assert count == 2
    assert mean == pytest.approx(0.45, abs=0.05)


def test_concurrent_replays_all_complete(http: httpx.Client) -> None:
    async def run_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=300) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/traces", json={"segments": script("concurrent")})
                    for _ in range(6)
                )
            )

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 6
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 6
    for r in responses:
        assert [s["completion_tokens"] for s in r.json()["segments"]] == [8, 6, 4]
