"""Every way an augmented request can end leaves nothing held: no KV blocks in use, nothing in
the host pool, no hold in the engine's table. Read from the engine itself
(`EngineReplica.holds`, a utility call into the engine core), on the shared real stack
(SmolLM2, policy LAMPS, a host pool for Swap)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest
from ray import serve

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 1234*5678?"}]
CALCULATOR = [{"type": "function", "function": {"name": "calculator"}}]
CONTEXT = 2048  # tests/conftest.py's max_model_len for the stack


def engine_holds() -> dict[str, Any]:
    handle = serve.get_deployment_handle("EngineReplica", "lamps")
    return dict(handle.holds.remote().result())


def assert_nothing_held(within_s: float = 30.0) -> dict[str, Any]:
    """Nothing held, read from the engine. A release runs as the request ends; a cancelled
    request's runs as a task of its own, so it may land a moment after the client saw the end."""
    deadline = time.monotonic() + within_s
    while True:
        holds = engine_holds()
        if (
            holds["holds"] == 0
            and holds["kv_blocks_used"] == 0
            and holds["host_pool_bytes"] == 0
            and holds["running"] == 0
            and holds["waiting"] == 0
        ):
            return holds
        assert time.monotonic() < deadline, f"still held: {holds}"
        time.sleep(0.2)


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    request = {"model": "smollm2-135m", "messages": QUESTION, **body}
    response = http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_normal_chat_with_a_call_leaves_nothing_held(http: httpx.Client) -> None:
    answer = chat(http, tools=CALCULATOR, tool_choice="required", max_tokens=64)
    assert answer["tool_executions"][0]["ok"]
    assert_nothing_held()


@pytest.fixture(scope="module")
def call_tokens(http: httpx.Client) -> int:
    """Tokens of the forced calculator call for QUESTION (greedy, so always the same): the
    smallest budget that completes the call, by bisection."""
    low, high = 1, 64  # no call at `low`; a call at `high`
    assert chat(http, tools=CALCULATOR, tool_choice="required", max_tokens=high)["tool_executions"]
    while high - low > 1:
        middle = (low + high) // 2
        answer = chat(http, tools=CALCULATOR, tool_choice="required", max_tokens=middle)
        low, high = (low, middle) if answer["tool_executions"] else (middle, high)
    return high


def test_chats_cut_short_inside_or_right_after_a_forced_call_leave_nothing_held(
    http: httpx.Client, call_tokens: int
) -> None:
    """`max_tokens` ending the forced call before it parses (the call is never made), and
    exactly at its end (the result comes back, no budget is left to resume): both stop after a
    paused segment, whose hold only the request's end can release."""
    for max_tokens in (3, 6, call_tokens - 1):
        answer = chat(http, tools=CALCULATOR, tool_choice="required", max_tokens=max_tokens)
        assert not answer["tool_executions"]
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == max_tokens
    answer = chat(http, tools=CALCULATOR, tool_choice="required", max_tokens=call_tokens)
    assert answer["tool_executions"]  # made, and all of the budget went to it
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == call_tokens
    assert_nothing_held()


def test_a_tool_error_leaves_nothing_held(http: httpx.Client) -> None:
    # `http_get` reaches only allowlisted hosts, and the stack allows none: the call fails and
    # the model answers with the error as its result.
    answer = chat(
        http,
        tools=[{"type": "function", "function": {"name": "http_get"}}],
        tool_choice={"type": "function", "function": {"name": "http_get"}},
        max_tokens=48,
    )
    executions = answer["tool_executions"]
    assert executions and not executions[0]["ok"]
    assert_nothing_held()


def test_a_chat_whose_tool_result_fills_the_context_leaves_nothing_held(
    http: httpx.Client, call_tokens: int
) -> None:
    """The prompt is sized so that the forced call just fits and the tool's result then leaves
    no room to resume (finish_reason `length` with the call made)."""

    def ask(words: int, max_tokens: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": "ok " * words + "What is 1234*5678?"}]
        body = {"messages": messages, "tools": CALCULATOR, "tool_choice": "required"}
        return chat(http, max_tokens=max_tokens, **body)

    # The prompt's tokens per word, measured on this model.
    small, large = (ask(w, 1)["usage"]["prompt_tokens"] for w in (100, 1100))
    per_word = (large - small) / 1000
    room = call_tokens + 2  # the call fits; its result (a message of its own) does not
    words = 100 + round((CONTEXT - room - small) / per_word)
    for _ in range(4):  # tokens per word are not exactly constant: adjust to the real count
        prompt = ask(words, 1)["usage"]["prompt_tokens"]
        if CONTEXT - prompt == room:
            break
        words += round((CONTEXT - room - prompt) / per_word) or 1
    answer = ask(words, CONTEXT - prompt)
    assert answer["tool_executions"], answer
    assert answer["choices"][0]["finish_reason"] == "length"
    assert_nothing_held()


def test_a_client_gone_during_a_call_leaves_nothing_held(http: httpx.Client) -> None:
    """The client hangs up while its request is paused in a 60-s call whose KV is preserved
    (seen held in the engine first): Serve cancels the request, and the hold goes long before
    the call would have ended."""
    trace = {
        "policy": "preserve",
        "segments": [
            {"prompt_tokens": 300, "completion_tokens": 4, "api_time": 60.0, "api_token_length": 4},
            {"prompt_tokens": 308, "completion_tokens": 4},
        ],
    }

    async def hang_up_during_the_call() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=300) as client:
            request = asyncio.create_task(client.post("/v1/traces", json=trace))
            while (held := await asyncio.to_thread(engine_holds))["device_holds"] == 0:
                assert not request.done(), request.result().text
                await asyncio.sleep(0.1)
            request.cancel()  # the connection closes: the client is gone
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return held

    held = asyncio.run(hang_up_during_the_call())
    assert held["holds"] == 1 and held["device_blocks"] > 0
    assert_nothing_held(within_s=30.0)
