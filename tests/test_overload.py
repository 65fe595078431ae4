"""Overload: about 10x the rate an ingress can sustain, for a few seconds. The excess gets 429
with Retry-After at once; no request times out or gets a 5xx; every request is accounted for
(200 or 429); the service is healthy right after and the engine holds nothing.

A second ingress (as in test_serving_errors.py) in front of the suite's engine admits
`LIMIT` requests at once. Each request is a trace with one simulated call of `CALL_S`, so an
admitted request holds its slot at least that long: the ingress sustains at most
LIMIT / CALL_S requests per second, and the test offers 10 times that, open loop (arrivals do
not wait for answers). The 60-second version with RSS is `scripts/soak.py --overload`
(docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ray import serve

from lamps.local_stack import RunningStack
from tests.conftest import MODEL

pytestmark = pytest.mark.engine

LIMIT = 2
CALL_S = 0.5
SUSTAINABLE_RATE = LIMIT / CALL_S  # 4 requests/s at most
RATE = 10 * SUSTAINABLE_RATE
DURATION_S = 5.0
TIMEOUT_S = 30.0  # a request answered later than this counts as timed out
APP = "overload"


def slow_trace() -> dict[str, Any]:
    return {
        "segments": [
            {
                "prompt_tokens": 16,
                "completion_tokens": 2,
                "api_time": CALL_S,
                "api_token_length": 2,
            },
            {"prompt_tokens": 20, "completion_tokens": 2},
        ]
    }


@pytest.fixture(scope="module")
def small_ingress(stack: RunningStack) -> Iterator[str]:
    from deployments.ingress import Ingress, IngressSettings

    settings = IngressSettings(
        served_model_name=MODEL, max_model_len=2048, max_in_flight_requests=LIMIT
    )
    app = serve.deployment(Ingress, name="OverloadIngress", ray_actor_options={"num_cpus": 0})
    serve.run(
        app.bind(
            serve.get_deployment_handle("EngineReplica", "lamps"),
            serve.get_deployment_handle("ToolWorker", "lamps"),
            settings.model_dump(),
            None,
        ),
        name=APP,
        route_prefix=f"/{APP}",
    )
    try:
        yield f"{stack.http_url}/{APP}"
    finally:
        serve.delete(APP)


async def offer(url: str, rate: float, duration_s: float) -> list[tuple[int | str, float, str]]:
    """Open-loop arrivals at `rate` for `duration_s`: (status or exception name, seconds to the
    answer, Retry-After) per request."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:

        async def one() -> tuple[int | str, float, str]:
            start = time.monotonic()
            try:
                r = await client.post("/v1/traces", json=slow_trace())
            except httpx.HTTPError as exc:
                return type(exc).__name__, time.monotonic() - start, ""
            return r.status_code, time.monotonic() - start, r.headers.get("retry-after", "")

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        return await asyncio.gather(*tasks)


def test_ten_times_the_sustainable_rate(small_ingress: str, http: httpx.Client) -> None:
    results = asyncio.run(offer(small_ingress, RATE, DURATION_S))
    statuses = Counter(status for status, _, _ in results)
    slowest = max(seconds for _, seconds, _ in results)
    print(f"\n{len(results)} requests at {RATE:g}/s: {dict(statuses)}, slowest {slowest:.2f} s")
    assert len(results) == int(RATE * DURATION_S)
    # Every request accounted for: served or refused, none timed out, lost or failed.
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= len(results) // 2, statuses  # most of a 10x overload is refused
    assert statuses[200] >= LIMIT, statuses
    assert all(retry == "1" for status, _, retry in results if status == 429)
    # Refusals are immediate (before the body is read); the served wait no longer than a few
    # calls behind the limit.
    assert max(s for status, s, _ in results if status == 429) < 5.0
    # Healthy right after, and the engine holds nothing once its last step is published.
    assert http.get("/health").json() == {"status": "ok"}
    assert http.post("/v1/traces", json=slow_trace()).status_code == 200
    engine = serve.get_deployment_handle("EngineReplica", "lamps")
    deadline = time.monotonic() + 10
    while (used := engine.stats.remote().result()["kv_blocks_used"]) != 0:
        assert time.monotonic() < deadline, f"{used} KV blocks still used"
        tiny = {"segments": [{"prompt_tokens": 8, "completion_tokens": 1}]}
        http.post("/v1/traces", json=tiny)
        time.sleep(0.2)
