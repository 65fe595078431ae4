"""Another Ray Serve application calls LAMPS through a handle, without HTTP."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import ray.cloudpickle
from ray import serve

from lamps.local_stack import RunningStack
from tests.conftest import MODEL

pytestmark = pytest.mark.engine


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Calculus:
    """A second application: asks LAMPS a question through the `lamps` app's handle."""

    def __init__(self) -> None:
        self._lamps = serve.get_app_handle("lamps")

    async def __call__(self, question: str) -> dict[str, Any]:
        response = await self._lamps.chat.remote(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": question}],
                "tools": [{"type": "function", "function": {"name": "calculator"}}],
                "tool_choice": "required",
                "max_tokens": 96,
            }
        )
        return response.model_dump(mode="json")


def test_second_app_calls_through_a_handle(stack: RunningStack) -> None:
    # Replicas cannot import the tests folder: ship this module's code by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    handle = serve.run(Calculus.bind(), name="calculus", route_prefix="/calculus")
    try:
        body = handle.remote("What is 1234*5678?").result(timeout_s=300)
    finally:
        serve.delete("calculus")
    [execution] = body["tool_executions"]
    assert execution["name"] == "calculator"
    assert execution["output"] == "7006652"
    assert "7006652" in body["choices"][0]["message"]["content"]


def test_handle_errors_are_typed(stack: RunningStack) -> None:
    from lamps_vllm.errors import RequestError, UnknownModelError

    lamps = serve.get_app_handle("lamps")
    with pytest.raises(UnknownModelError, match="gpt-9"):
        lamps.chat.remote(
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
        ).result()
    with pytest.raises(RequestError, match="api_time"):
        lamps.replay.remote(
            {
                "segments": [
                    {
                        "prompt_tokens": 4,
                        "completion_tokens": 1,
                        "api_time": -1,
                        "api_token_length": 1,
                    },
                    {"prompt_tokens": 6, "completion_tokens": 1},
                ]
            }
        ).result()


def test_handle_gets_engine_errors_typed_and_short(stack: RunningStack) -> None:
    """An error found in the engine replica reaches a handle caller as its own type, with the
    short message HTTP gives (`message`; Ray's copy has Ray's traceback as its str())."""
    from lamps_vllm.errors import PromptTooLongError, UnknownPolicyVariantError

    lamps = serve.get_app_handle("lamps")
    too_long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}
    with pytest.raises(PromptTooLongError) as raised:
        lamps.chat.remote(too_long).result()
    assert "context" in raised.value.message
    assert len(raised.value.message) < 300 and "Traceback" not in raised.value.message
    assert type(raised.value.cause) is PromptTooLongError  # one Ray wrapping, not two
    with pytest.raises(UnknownPolicyVariantError, match="this deployment has: lamps"):
        lamps.replay.remote(
            {
                "policy": "mine",
                "segments": [
                    {
                        "prompt_tokens": 4,
                        "completion_tokens": 1,
                        "api_time": 0,
                        "api_token_length": 1,
                    },
                    {"prompt_tokens": 6, "completion_tokens": 1},
                ],
            }
        ).result()


def test_handle_streams_the_same_chunks(stack: RunningStack) -> None:
    lamps = serve.get_app_handle("lamps")
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 45*12?"}],
        "tools": [{"type": "function", "function": {"name": "calculator"}}],
        "tool_choice": "required",
        "max_tokens": 64,
    }

    async def collect() -> list[Any]:
        return [chunk async for chunk in lamps.options(stream=True).chat_stream.remote(request)]

    chunks = asyncio.run(collect())
    executions = [c.tool_execution for c in chunks if c.tool_execution is not None]
    assert [(e.name, e.output) for e in executions] == [("calculator", "540")]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
