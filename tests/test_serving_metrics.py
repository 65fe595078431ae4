"""Prometheus metrics reflect what the service did."""

from __future__ import annotations

import re
import time

import httpx
import pytest

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
