"""Bad input gets a 4xx with a message saying what is wrong, and the service stays healthy."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.engine


def chat(**overrides: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **overrides,
    }


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
