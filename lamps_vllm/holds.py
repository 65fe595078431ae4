"""Nothing held for a request outlives it: when an augmented request ends early (its client went
away, a tool failed, the request was cancelled), the engine is told at once to let go of the KV it
holds for it (preserved or kept blocks, a swapped-out copy in the host pool), instead of holding it
until `max_preserve_s`.

The message is an engine request of one token whose `RequestMeta.release_held` names the
augmented request: the scheduler plugin releases the holds when the request is added, in the
engine-core process that owns them, whatever vLLM version carries it. The serving layer sends it
only for its own (server-issued) request ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.request_meta import RequestMeta

logger = logging.getLogger(__name__)

_RELEASE_PROMPT = [1000]  # any token id the vocabulary has; the answer is thrown away
_pending: set[asyncio.Task[None]] = set()  # releases under way (kept referenced until done)


async def _send_control(engine: AsyncLLM, meta: RequestMeta, engine_request_id: str) -> None:
    """One-token request whose only purpose is to carry `meta`'s instruction to the scheduler
    plugin; the plugin acts on it when the request arrives."""
    params = SamplingParams(max_tokens=1, extra_args=meta.to_extra_args())
    async for _ in engine.generate(
        TokensPrompt(prompt_token_ids=_RELEASE_PROMPT), params, engine_request_id
    ):
        pass


async def release_held(engine: AsyncLLM, request_id: str) -> None:
    meta = RequestMeta(request_id=request_id, arrival_time=time.time(), release_held=True)
    await _send_control(engine, meta, f"{request_id}-release-{uuid.uuid4().hex[:8]}")


async def expire_holds(engine: AsyncLLM, older_than_s: float) -> None:
    """Tell the engine to let go of every hold older than `older_than_s`, now: what it does
    only when it steps (`max_preserve_s`), for an engine that has gone idle."""
    meta = RequestMeta(
        request_id=f"expire-{uuid.uuid4().hex[:8]}",
        arrival_time=time.time(),
        expire_holds_after_s=older_than_s,
    )
    await _send_control(engine, meta, meta.request_id)


def _send_release(engine: AsyncLLM, request_id: str) -> None:
    async def send() -> None:
        try:
            await release_held(engine, request_id)
        except Exception:  # the engine is gone too: then nothing is held either
            logger.warning("could not release the KV held for %s", request_id, exc_info=True)

    task = asyncio.get_running_loop().create_task(send())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


@contextlib.asynccontextmanager
async def released_if_abandoned(engine: AsyncLLM, request_id: str) -> AsyncIterator[None]:
    """Around an augmented request's whole life (generate, pause, call, resume): if it ends by
    an exception or a cancellation, whatever the engine holds for it is released. The release
    runs as a task of its own, so a cancelled caller does not wait for it."""
    try:
        yield
    except BaseException:
        _send_release(engine, request_id)
        raise
