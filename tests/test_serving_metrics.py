"""Prometheus metrics reflect what the service did."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from ray import serve

pytestmark = pytest.mark.engine


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name}{labels} not in metrics"
    return total


def test_metrics_count_tool_calls_and_blocks(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    probe = "tts"  # a simulated API type (traces may name no others) no other test uses
    calls_before = (
        metric(before, "lamps_tool_calls_total", tool=probe, outcome="ok")
        if f'tool="{probe}"' in before
        else 0.0
    )
    segments = [
        {
            "prompt_tokens": 20,
            "completion_tokens": 2,
            "api_time": 0.05,
            "api_token_length": 1,
            "api_type": probe,
        },
        {"prompt_tokens": 23, "completion_tokens": 2},
    ]
    assert http.post("/v1/traces", json={"segments": segments}).status_code == 200
    time.sleep(1.5)  # engine stats are published every second
    after = http.get("/metrics").text
    assert metric(after, "lamps_tool_calls_total", tool=probe, outcome="ok") == (calls_before + 1)
    total = metric(after, "lamps_engine_kv_blocks_total")
    free = metric(after, "lamps_engine_kv_blocks_free")
    used = metric(after, "lamps_engine_kv_blocks_used")
    assert total > 0 and used + free == total
    assert metric(after, "lamps_engine_generation_tokens_total") >= 4
    assert metric(after, "lamps_redis_up") == 1.0
    assert re.search(r"^lamps_engine_waiting_requests\{", after, re.M)
    assert re.search(r"^lamps_engine_paused_in_tool_calls\{", after, re.M)


def engine_swap_stats() -> dict[str, Any]:
    """The swap connector's figures, read from the engine replica itself (not through /metrics)."""
    handle = serve.get_deployment_handle("EngineReplica", "lamps")
    return dict(handle.scheduler_stats.remote().result().get("swap") or {})


def swapped_call(prompt: int, call_s: float) -> dict[str, Any]:
    """A trace LAMPS swaps out during its call: the `lamps-plan` variant schedules with the
    script's own durations, and a 4 s call on a 1.5k-token context wastes far less memory
    swapped (a ~30 ms copy each way on this CPU engine) than preserved, kept or recomputed. (The
    shipped `lamps` keeps it instead while memory is slack, as it is on this idle engine.)"""
    first = {
        "prompt_tokens": prompt,
        "completion_tokens": 2,
        "api_time": call_s,
        "api_token_length": 2,
        "api_type": "search",
    }
    return {
        "policy": "lamps-plan",
        "segments": [first, {"prompt_tokens": prompt + 4, "completion_tokens": 2}],
    }


def test_host_pool_gauges_follow_a_swapped_out_request(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    capacity = metric(before, "lamps_engine_host_pool_capacity_bytes")
    # cluster/serve-cpu.yaml's swap_pool_bytes (256 MiB), in whole KV blocks.
    assert 0.99 * 2**28 <= capacity <= 2**28
    assert metric(before, "lamps_engine_host_pool_used_bytes") == 0
    assert metric(before, "lamps_engine_host_pool_entries") == 0
    start = engine_swap_stats()

    used = entries = 0.0
    own: dict[str, Any] = {}
    with ThreadPoolExecutor(1) as pool:
        # 1536 tokens: 48 blocks of 32; the stack's context is 2048.
        answer = pool.submit(http.post, "/v1/traces", json=swapped_call(1536, 4.0))
        while not answer.done() and used == 0:
            text = http.get("/metrics").text
            used = metric(text, "lamps_engine_host_pool_used_bytes")
            entries = metric(text, "lamps_engine_host_pool_entries")
            if used > 0:
                own = engine_swap_stats()
            time.sleep(0.1)
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    swap = engine_swap_stats()
    assert swap["swapped_out_requests"] == start["swapped_out_requests"] + 1, swap
    # While the call ran the gauge showed exactly what was copied out, as the engine did.
    assert used == swap["bytes_out"] - start["bytes_out"] > 0
    assert used == own["host_pool_bytes_in_use"] and entries == own["entries"] == 1

    # The request done, the pool is empty again. The gauges are the engine's last step's: a
    # short request makes it step once more.
    tiny = {"segments": [{"prompt_tokens": 8, "completion_tokens": 1}]}
    assert http.post("/v1/traces", json=tiny).status_code == 200
    deadline = time.monotonic() + 10
    after = http.get("/metrics").text
    while metric(after, "lamps_engine_host_pool_used_bytes") != 0:
        assert time.monotonic() < deadline, "the host pool still in use after the request"
        time.sleep(0.2)
        after = http.get("/metrics").text
    assert metric(after, "lamps_engine_host_pool_entries") == 0
    assert metric(after, "lamps_engine_host_pool_capacity_bytes") == capacity
