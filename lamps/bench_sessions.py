"""`lamps bench --sessions`: each request of a workload played as a conversation whose tools the
client runs. Segment i of a request is turn i, a chat request of its own (so the router places
every turn anew): its new message holds the segment's new tokens (the first prompt, then what the
previous call returned) as filler words, and it decodes exactly the segment's completion tokens
(`ignore_eos`). Between turns the client waits the call's duration, as an agent running its own
tool would. The next turn repeats the whole conversation, so it finds its context in the prefix
cache only on the replica that served the turn before: what session affinity is worth.

A conversation's results have a trace's shape (`TraceResponse`, one segment per turn), so the
bench's summaries, ratios and plots read them unchanged; `cached_tokens` of each turn is the
engine's (`usage.prompt_tokens_details.cached_tokens`)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Protocol

from deployments.api_models import ChatResponse, TraceResponse, TraceSegmentResult
from lamps_core.trace import TraceScript

# Common English words, one token each (with their leading space) in SmolLM2's and GPT-2's
# vocabularies, so a message of n of them is about n tokens.
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there one all we their can has more when will would if
so no what up out about who get them me time year people way day man thing woman life
child world school state family student group country problem hand part place case week
"""
_WORDS = tuple(_WORD_TEXT.split())


def filler_text(count: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, count)))


class ChatTarget(Protocol):
    async def chat(self, request: dict[str, Any]) -> ChatResponse: ...


async def play_conversation(
    target: ChatTarget, request_id: str, script: TraceScript
) -> TraceResponse:
    """One conversation, turn by turn (module docstring). The first message names `request_id`,
    so no two conversations (nor two runs) share a context beyond the chat template's head."""
    rng = random.Random(request_id)
    first = script.segments[0]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f"{request_id}: {filler_text(first.prompt_tokens, rng)}"}
    ]
    turns: list[TraceSegmentResult] = []
    started = time.monotonic()
    ttft_s = 0.0
    model = ""
    for index, segment in enumerate(script.segments):
        sent = time.monotonic()
        response = await target.chat(
            {
                "messages": messages,
                "max_tokens": segment.completion_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            }
        )
        took = time.monotonic() - sent
        model = response.model
        assert response.usage is not None and response.timings is not None
        # Time before the server saw the turn (the router's queue) counts as queueing.
        before_server = max(0.0, took - response.timings.latency_s)
        first_token_s = before_server + (response.timings.ttft_s or response.timings.latency_s)
        if index == 0:
            ttft_s = first_token_s
        details = response.usage.prompt_tokens_details
        turns.append(
            TraceSegmentResult(
                index=index,
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens or 0,
                cached_tokens=(details.cached_tokens or 0) if details else 0,
                queue_and_prefill_s=first_token_s,
                decode_s=took - first_token_s,
                api_duration_s=segment.api_time,
                api_ok=True if segment.has_api_call else None,
            )
        )
        if not segment.has_api_call:
            break
        await asyncio.sleep(segment.api_time or 0.0)  # the client runs its tool
        messages += [
            {"role": "assistant", "content": response.choices[0].message.content or ""},
            {"role": "user", "content": filler_text(segment.api_token_length or 0, rng)},
        ]
    return TraceResponse(
        request_id=request_id,
        client_request_id=request_id,
        model=model,
        ttft_s=ttft_s,
        latency_s=time.monotonic() - started,
        segments=turns,
    )
