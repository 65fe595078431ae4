"""The life of one augmented request, shared by every kind of request the server drives:

    generate a segment ─▶ it ends in a call? ─ no ─▶ outcome
          ▲                      │ yes
          └── resume ◀── run the call (the engine decides meanwhile what its KV does)

Each segment is one engine request `<id>-s<i>`; every segment carries the augmented request's
server-issued id in its `RequestMeta`, so the engine ranks a resumed segment by the request it
belongs to and files whatever it holds through the call under that id (`hold_table.py`).

What differs between kinds of request is a `Conversation`: what the next segment's prompt and
sampling are, what a segment's output streams, which call (if any) a segment ended in, and what
the call's result adds. Chat (`chat_session.py`) and trace replay (`trace_replay.py`) are two.

However the request ends (its answer, a limit, a parse failure, a tool error, a cancelled
client, an engine error), `drive` ends it with one unconditional "done" to the engine, which
lets go of anything still held for it: nothing held outlives its request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_vllm.holds import HoldControl
from tool_workers.tools import ToolResult

# (tool name, arguments, name to record the call's statistics under) -> result; never raises.
CallTool = Callable[[str, dict[str, Any], str | None], Awaitable[ToolResult]]

E = TypeVar("E")


@dataclass
class NextSegment:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class SegmentRun:
    """One segment as the engine ran it."""

    index: int
    prompt_tokens: int
    output: RequestOutput  # the last output of the engine request
    submitted_at: float  # wall clock
    first_token_at: float | None
    finished_at: float

    @property
    def token_ids(self) -> list[int]:
        return list(self.output.outputs[0].token_ids)

    @property
    def text(self) -> str:
        return self.output.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.output.outputs[0].finish_reason

    @property
    def cached_tokens(self) -> int:
        return self.output.num_cached_tokens or 0


@dataclass
class Call:
    """The call a segment ended in. `refused`: it is not run; the model reads this error as
    its result (a tool the request did not offer)."""

    name: str
    arguments: dict[str, Any]
    record_as: str | None = None
    refused: str | None = None


class Conversation(Protocol, Generic[E]):
    """What one kind of augmented request decides; events of type E are what it streams."""

    def next_segment(self, index: int, waited_s: float) -> NextSegment | None:
        """The next segment to generate; None: the request is over (a limit reached)."""
        ...

    def on_output(self, output: RequestOutput) -> Iterable[E]:
        """Events while a segment generates (text deltas)."""
        ...

    def call_in(self, segment: SegmentRun) -> Call | None:
        """The call the finished segment ended in; None: the request is over."""
        ...

    def on_result(self, segment: SegmentRun, call: Call, result: ToolResult) -> Iterable[E]:
        """Takes the call's result into the conversation; events it makes (a tool execution)."""
        ...

    def outcome(self) -> E:
        """The last event: the request's outcome."""
        ...


async def drive(
    engine: AsyncLLM,
    request_id: str,
    conversation: Conversation[E],
    call_tool: CallTool,
    holds: HoldControl | None,
) -> AsyncIterator[E]:
    """Run one augmented request to its end, yielding the conversation's events, its outcome
    last. `holds`: the engine's hold table (None: an engine without the scheduler plugin)."""
    waited_s = 0.0  # by the earlier segments, for the starvation guard
    ended = False
    try:
        index = 0
        while (segment := conversation.next_segment(index, waited_s)) is not None:
            run = None
            async for event in _generate(engine, request_id, index, segment, conversation):
                if isinstance(event, SegmentRun):
                    run = event
                else:
                    yield event
            assert run is not None
            waited_s += (run.first_token_at or run.finished_at) - run.submitted_at
            call = conversation.call_in(run)
            if call is None:
                break
            result = (
                _refused(call, call.refused)
                if call.refused is not None
                else await call_tool(call.name, call.arguments, call.record_as)
            )
            for event in conversation.on_result(run, call, result):
                yield event
            index += 1
        yield conversation.outcome()
        ended = True
    finally:
        if holds is not None:
            if ended:
                await holds.done(request_id)
            else:  # failed or cancelled: a task of its own, so a cancelled caller does not wait
                holds.done_soon(request_id)


async def _generate(
    engine: AsyncLLM,
    request_id: str,
    index: int,
    segment: NextSegment,
    conversation: Conversation[E],
) -> AsyncIterator[E | SegmentRun]:
    submitted, first_token_at, final = time.time(), None, None
    async for output in engine.generate(
        TokensPrompt(prompt_token_ids=segment.prompt_ids), segment.params, f"{request_id}-s{index}"
    ):
        final = output
        if first_token_at is None and output.outputs[0].token_ids:
            first_token_at = time.time()
        for event in conversation.on_output(output):
            yield event
    assert final is not None
    yield SegmentRun(index, len(segment.prompt_ids), final, submitted, first_token_at, time.time())


def _refused(call: Call, why: str) -> ToolResult:
    return ToolResult(
        tool=call.name, ok=False, error=why, started_at=datetime.now(UTC), duration_s=0.0
    )
