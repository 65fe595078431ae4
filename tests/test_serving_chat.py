"""Chat through HTTP with the real SmolLM2 model: a forced calculator call is made, its result
reaches the model, and the answer contains it; the same as a stream."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MODEL, SERVE_CONFIG

pytestmark = pytest.mark.engine

BLOCK = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["engine"][
    "block_size"
]  # prefix reuse counts whole blocks

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


def test_a_conversations_next_turn_reports_the_context_it_reused(http: httpx.Client) -> None:
    """Through the `openai` client: a conversation's second turn finds its first turn's prompt
    in the prefix cache, and says so in `usage.prompt_tokens_details.cached_tokens` (what the
    fleet's session affinity keeps, and what `lamps bench --sessions` reads)."""
    from openai import OpenAI

    client = OpenAI(
        base_url=str(http.base_url).rstrip("/") + "/v1", api_key="not-checked", max_retries=0
    )
    marker = uuid.uuid4().hex  # nothing of an earlier turn of any test is in the cache
    messages: list[Any] = [
        {"role": "system", "content": f"Conversation {marker}. " + "Answer briefly. " * 40},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Another one."},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    reused_first = first.usage.prompt_tokens_details.cached_tokens or 0
    reused_second = second.usage.prompt_tokens_details.cached_tokens or 0
    # The first turn shares at most the chat template's head with earlier requests; the second
    # reuses the first's whole prompt, in whole blocks.
    assert reused_first <= BLOCK, first.usage
    assert reused_second >= first.usage.prompt_tokens - (BLOCK - 1), (first.usage, second.usage)
    assert reused_second < second.usage.prompt_tokens
