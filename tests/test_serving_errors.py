"""Bad input gets a 4xx with a message saying what is wrong, and the service stays healthy;
overload gets a 429 with Retry-After."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from ray import serve

from lamps.local_stack import RunningStack
from tests.conftest import MODEL

pytestmark = pytest.mark.engine


def chat(**overrides: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **overrides,
    }


CALCULATOR = {"type": "function", "function": {"name": "calculator"}}


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def trace(**first_segment: Any) -> dict[str, Any]:
    segment = {
        "prompt_tokens": 16,
        "completion_tokens": 2,
        "api_time": 0.1,
        "api_token_length": 2,
        **first_segment,
    }
    return {"segments": [segment, {"prompt_tokens": 20, "completion_tokens": 2}]}


CASES = [
    pytest.param(
        "/v1/chat/completions",
        b'{"model": "smollm2-135m", "messages": [',
        400,
        "not valid JSON",
        id="malformed-json",
    ),
    pytest.param("/v1/chat/completions", b"[1, 2]", 400, "JSON object", id="not-an-object"),
    pytest.param(
        "/v1/chat/completions", chat(messages="hello"), 400, "messages", id="messages-not-a-list"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "rm_rf"}}]),
        400,
        "unknown tool 'rm_rf'",
        id="unknown-tool",
    ),
    pytest.param("/v1/chat/completions", chat(model="gpt-9"), 404, "gpt-9", id="unknown-model"),
    pytest.param(
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "word " * 3000}]),
        400,
        "context",
        id="prompt-over-context",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "word " * 3000}], stream=True),
        400,
        "context",
        id="prompt-over-context-streamed",
    ),
    pytest.param(
        "/v1/chat/completions", chat(max_tool_calls=1000), 400, "limit", id="too-many-calls-asked"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(tool_choice="required"),
        400,
        "`tools` must be set",
        id="required-without-tools",
    ),
    pytest.param("/v1/chat/completions", chat(n=3), 400, "n", id="n-unsupported"),
    # vLLM's message union admits harmony's `Message` (gpt-oss); our templates read `role`:
    # it was a 500 (jinja's UndefinedError in the engine replica).
    pytest.param(
        "/v1/chat/completions",
        chat(messages=[{"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}]}]),
        400,
        "message 0 has no `role`: harmony-style messages (`author`) are not supported",
        id="harmony-message",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(messages=[{"author": {"role": "user"}}], stream=True),
        400,
        "harmony-style messages",
        id="harmony-message-streamed",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "calculator", "arguments": "[1]"},
                        }
                    ],
                },
            ]
        ),
        400,
        "message 1: a tool call's arguments must be a JSON object",
        id="tool-call-arguments-not-an-object",
    ),
    pytest.param("/v1/chat/completions", chat(messages=5), 400, "messages", id="messages-a-number"),
    pytest.param(
        "/v1/chat/completions", chat(max_tokens=-1), 400, "max_tokens", id="negative-max-tokens"
    ),
    pytest.param(
        "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", id="zero-max-tokens"
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        id="zero-max-completion-tokens",
    ),
    pytest.param(
        "/v1/chat/completions",
        b"{" + b" " * (1 << 20) + b"}",
        413,
        "limit of 1048576 bytes",
        id="body-over-limit",
    ),
    # Python's parser recursed once per level: a RecursionError, HTTP 500.
    pytest.param(
        "/v1/chat/completions",
        b"[" * 200_000,
        400,
        "nests JSON arrays and objects 200000 levels deep; this server takes at most 64",
        id="nesting-200000-deep",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(padding=nested(64)),  # a field vLLM ignores; the body is one level more
        400,
        "nests JSON arrays and objects 65 levels deep",
        id="nesting-one-past-the-limit",
    ),
    pytest.param("/v1/traces", {**trace(), "x": nested(100)}, 400, "at most 64", id="deep-trace"),
    pytest.param(
        "/v1/chat/completions",
        chat(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "calculator",
                                "arguments": json.dumps(nested(100)),
                            },
                        }
                    ],
                },
            ]
        ),
        400,
        "message 1: a tool call's arguments nest deeper than 64 levels",
        id="tool-call-arguments-nested-deep",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(tools=[CALCULATOR] * 65),
        400,
        "tools: 65 entries; this server takes at most 64",
        id="too-many-tools",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(max_tokens=2048),
        400,
        "max_tokens=2048 does not fit this model's context of 2048 tokens with a prompt: at "
        "most 2047",
        id="max-tokens-the-whole-context",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(max_completion_tokens=10**12),
        400,
        "max_completion_tokens=1000000000000 does not fit",
        id="max-completion-tokens-huge",
    ),
    pytest.param("/v1/traces", trace(api_time=-1.0), 400, "api_time", id="negative-duration"),
    pytest.param("/v1/traces", trace(api_time=1e9), 400, "api_time", id="huge-duration"),
    pytest.param("/v1/traces", trace(api_time=float("nan")), 400, "api_time", id="nan-duration"),
    pytest.param(
        "/v1/traces", trace(prompt_tokens=15), 400, "prompt_tokens", id="inconsistent-context"
    ),
    pytest.param(
        "/v1/traces",
        trace(prompt_tokens=5000, completion_tokens=2),
        400,
        "context",
        id="trace-over-context",
    ),
    pytest.param("/v1/traces", {"segments": []}, 400, "segments", id="empty-trace"),
    pytest.param(
        "/v1/traces",
        {**trace(), "policy": "fastest-please"},
        400,
        "unknown policy variant 'fastest-please'; this deployment has: "
        "lamps, vllm, preserve, lamps-plan",
        id="unknown-policy-variant",
    ),
    pytest.param(
        "/v1/traces",
        {**trace(), "policy": "lamps", "policy_options": {"max_wait_s": 0}},
        400,
        "policy_options",
        id="policy-options",
    ),
    pytest.param(
        "/v1/traces",
        trace(api_type="calculator-600s"),
        400,
        "unknown api_type 'calculator-600s'",
        id="unknown-api-type",
    ),
]


def post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    # json.dumps writes NaN as the literal NaN, as careless clients do.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("path", "body", "status", "message"), CASES)
def test_bad_input_is_a_clear_4xx(
    http: httpx.Client, path: str, body: Any, status: int, message: str
) -> None:
    response = post(http, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == status


def test_nesting_up_to_the_limit_is_served(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat(padding=nested(63)))
    assert response.status_code == 200, response.text


def test_a_tool_named_many_times_is_rendered_once(http: httpx.Client) -> None:
    """The ingress sends the engine one schema per tool: 64 copies of the calculator (130
    tokens each, 8,000 in all, past the 2,048-token context) make the prompt of one."""
    once = http.post("/v1/chat/completions", json=chat(tools=[CALCULATOR]))
    many = http.post("/v1/chat/completions", json=chat(tools=[CALCULATOR] * 64))
    assert once.status_code == 200, once.text
    assert many.status_code == 200, many.text
    assert many.json()["usage"]["prompt_tokens"] == once.json()["usage"]["prompt_tokens"]


def test_health_stays_ok_while_thousands_of_tools_are_refused(
    http: httpx.Client, stack: RunningStack
) -> None:
    """12,000 copies of one tool (a 0.7 MB body, under the size limit) were rendered into a
    prompt on the engine replica's event loop: it stalled for seconds, /health answered 503
    meanwhile, and only then did the context limit refuse the request. Now the ingress refuses
    it at once, and /health, probed all along from another connection, stays 200."""
    body = json.dumps(chat(tools=[CALCULATOR] * 12_000)).encode()
    assert len(body) < 1 << 20
    stop = threading.Event()
    health: list[int] = []

    def probe() -> None:
        with httpx.Client(base_url=stack.http_url, timeout=60) as client:
            while not stop.is_set():
                health.append(client.get("/health").status_code)

    with ThreadPoolExecutor(1) as pool:
        prober = pool.submit(probe)
        try:
            while not health:  # probing before the first refusal
                assert not prober.done(), prober.exception()
                time.sleep(0.01)
            for _ in range(3):
                refused = post(http, "/v1/chat/completions", body)
                assert refused.status_code == 400, refused.text
                assert "tools: 12000 entries; this server takes at most 64" in refused.text
            seen = len(health)
            while len(health) < seen + 2:  # and after the last one
                assert not prober.done(), prober.exception()
                time.sleep(0.01)
        finally:
            stop.set()
        prober.result()
    assert set(health) == {200}, health


def test_max_tokens_past_the_context_stops_at_the_context(http: httpx.Client) -> None:
    """Below the context, max_tokens is a ceiling: the request generates until the context is
    full (2021 prompt tokens here, so 27 more), finish_reason "length"."""
    body = chat(
        messages=[{"role": "user", "content": "word " * 1990}], max_tokens=2047, ignore_eos=True
    )
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] < 2047
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 2048


def test_too_many_calls_in_a_script(http: httpx.Client) -> None:
    calls = 9  # the suite's stack allows 8
    segments = [
        {
            "prompt_tokens": 10 + 3 * i,
            "completion_tokens": 2,
            "api_time": 0.0,
            "api_token_length": 1,
        }
        for i in range(calls)
    ] + [{"prompt_tokens": 10 + 3 * calls, "completion_tokens": 2}]
    response = http.post("/v1/traces", json={"segments": segments})
    assert response.status_code == 400
    assert "9 API calls" in response.json()["error"]["message"]


def test_service_healthy_after_bad_input(http: httpx.Client) -> None:
    for path, body, *_ in (case.values for case in CASES):
        post(http, path, body)
    assert http.get("/health").json() == {"status": "ok"}
    response = http.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_engine_errors_reach_the_client_short(http: httpx.Client, stream: bool) -> None:
    """Found in the engine replica (the prompt is tokenized there), yet no Ray wrapping: the
    one useful line, not pids, actor ids, ANSI codes and a traceback."""
    body = chat(messages=[{"role": "user", "content": "word " * 3000}], stream=stream)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "PromptTooLongError"
    assert "context" in error["message"]
    assert len(response.text) < 300, response.text
    for noise in ("Traceback", "ray::", "pid=", "\x1b["):
        assert noise not in response.text


@pytest.fixture(scope="module")
def tight_ingress(stack: RunningStack) -> Iterator[str]:
    """A second ingress in front of the suite's engine that admits one request at a time."""
    from deployments.ingress import Ingress, IngressSettings

    settings = IngressSettings(
        served_model_name=MODEL, max_model_len=2048, max_in_flight_requests=1
    )
    app = serve.deployment(Ingress, name="TightIngress", ray_actor_options={"num_cpus": 0}).bind(
        serve.get_deployment_handle("EngineReplica", "lamps"),
        serve.get_deployment_handle("ToolWorker", "lamps"),
        settings.model_dump(),
        None,
    )
    serve.run(app, name="tight", route_prefix="/tight")
    try:
        yield f"{stack.http_url}/tight"
    finally:
        serve.delete("tight")


def test_overload_is_a_429_with_retry_after(tight_ingress: str) -> None:
    from lamps_vllm.errors import ServerBusyError

    slow = {"segments": [{**trace()["segments"][0], "api_time": 3.0}, trace()["segments"][1]]}
    # Admitted, then refused before any work (a wrong model is a 404 once admitted).
    probe = {**trace(), "model": "gpt-9"}
    with httpx.Client(base_url=tight_ingress, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/v1/traces", json=slow)
        deadline = time.monotonic() + 20
        while (refused := client.post("/v1/traces", json=probe)).status_code == 404:
            assert time.monotonic() < deadline, "the slow request never got in"
            time.sleep(0.05)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "limit" in refused.json()["error"]["message"]
        with pytest.raises(ServerBusyError) as raised:  # the Python handle is bounded too
            serve.get_app_handle("tight").replay.remote(probe).result()
        assert "limit" in raised.value.message
        assert running.result().status_code == 200  # the admitted one was not disturbed
        # Its slot is free again.
        assert client.post("/v1/traces", json=probe).status_code == 404
