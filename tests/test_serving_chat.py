"""Chat through HTTP with the real SmolLM2 model: a forced calculator call is made, its result
reaches the model, and the answer contains it; the same as a stream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.engine

CALCULATOR = {"type": "function", "function": {"name": "calculator"}}


def ask(http: httpx.Client, question: str, **extra: Any) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "tools": [CALCULATOR],
        "tool_choice": "required",
        "max_tokens": 64,
        **extra,
    }
    return http.post("/v1/chat/completions", json=body)


def test_calculator_result_reaches_the_answer(http: httpx.Client) -> None:
    response = ask(http, "What is 1234*5678?")
    assert response.status_code == 200, response.text
    body = response.json()
    [execution] = body["tool_executions"]
    assert execution["name"] == "calculator"
    assert execution["ok"], execution
    assert execution["output"] == "7006652"
    assert execution["arguments"]["expression"].replace(" ", "") == "1234*5678"
    assert "7006652" in body["choices"][0]["message"]["content"]
    assert body["timings"]["segments"] == 2
    assert body["usage"]["completion_tokens"] > 0


def test_named_tool_choice_forces_that_tool(http: httpx.Client) -> None:
    response = ask(
        http,
        "Compute 987 + 654.",
        tool_choice={"type": "function", "function": {"name": "calculator"}},
    )
    assert response.status_code == 200, response.text
    [execution] = response.json()["tool_executions"]
    assert (execution["name"], execution["output"]) == ("calculator", "1641")


def test_tool_choice_none_makes_no_call(http: httpx.Client) -> None:
    response = ask(http, "What is 2+2?", tool_choice="none", max_tokens=16)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tool_executions"] == []
    assert body["timings"]["segments"] == 1


def test_streaming_reports_the_call_and_streams_the_answer(http: httpx.Client) -> None:
    chunks = []
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is 45*12?"}],
            "tools": [CALCULATOR],
            "tool_choice": "required",
            "max_tokens": 48,
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    executions = [e["tool_execution"] for e in events if e.get("tool_execution")]
    assert [(x["name"], x["output"]) for x in executions] == [("calculator", "540")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    # Text arrives after the call: the forced call itself is not shown as content.
    first_text = next(i for i, e in enumerate(events) if e["choices"][0]["delta"].get("content"))
    first_call = next(i for i, e in enumerate(events) if e.get("tool_execution"))
    assert first_call < first_text
    assert "540" in text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] > 0
