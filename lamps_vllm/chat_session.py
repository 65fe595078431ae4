"""A chat request as the driver of augmented requests (`augmented_request.drive`) runs it: each
segment's prompt is the conversation so far, rendered by the chat template; when the model calls
a tool, the call runs, its result joins the conversation and the next segment resumes, until the
model answers or a limit (tokens, context, calls) is reached.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.call_durations import ApiEstimate
from lamps_core.length_model import LengthForecast, SegmentContext, forecast_call
from lamps_core.request_meta import MAX_PREDICTED_DECODE_TOKENS, RequestMeta
from lamps_vllm.augmented_request import Call, CallTool, NextSegment, SegmentRun, drive
from lamps_vllm.errors import PromptTooLongError
from lamps_vllm.holds import HoldControl
from lamps_vllm.tool_calls import (
    TOOL_CALL_END,
    ParsedToolCall,
    ToolMode,
    call_end_token_ids,
    forced_call_constraint,
    parse_forced_call,
    parse_hermes_call,
    visible_prefix,
)
from tool_workers.tools import ToolResult

logger = logging.getLogger(__name__)


class SegmentLengths(Protocol):
    """Forecasts a segment's decode length from its context and learns from what it decoded
    (`lamps_core.length_model.OutputLengthPredictor`)."""

    def predict(self, context: SegmentContext, budget: int | None = None) -> LengthForecast: ...

    def observe(
        self, context: SegmentContext, decode_tokens: int, tool: str | None, truncated: bool
    ) -> bool: ...


@dataclass
class ChatPlan:
    """A validated chat request, in the terms the session needs."""

    request_id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]  # OpenAI function tools, server-side schemas
    tool_choice: ToolMode
    max_tokens: int  # generated tokens over all segments
    max_tool_calls: int
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, seed, stop
    arrival_time: float = field(default_factory=time.time)
    # Set by the engine replica: what the tool workers' records say calls take (by tool), and
    # the longest a call of each tool can last there (its timeout and the replica's grace).
    api_estimates: dict[str, ApiEstimate] | None = None
    api_estimates_version: int | None = None  # raised by the replica at every change
    call_timeouts_s: dict[str, float] | None = None
    # Server-side only (benchmarks): the engine's policy variant to schedule this request with
    # (`RequestMeta.policy_variant`). The ingress never sets it, so no client can pick a policy.
    policy_variant: str | None = None


@dataclass
class ToolExecution:
    call_id: str
    name: str
    arguments: dict[str, Any]
    result: ToolResult
    segment_index: int


@dataclass
class TextDelta:
    text: str


@dataclass
class ChatOutcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_executions: list[ToolExecution]
    segments: int
    first_token_time: float | None
    cached_tokens: int = 0  # of `prompt_tokens`, found in the prefix cache (not recomputed)


ChatEvent = TextDelta | ToolExecution | ChatOutcome


def tool_message_content(result: ToolResult) -> str:
    return result.output if result.ok else f"error: {result.error}"


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=True
    )
    # transformers 5 returns a BatchEncoding-like mapping for some tokenizers.
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


async def run_chat(
    engine: AsyncLLM,
    tokenizer: Any,
    max_model_len: int,
    plan: ChatPlan,
    call_tool: CallTool,
    lengths: SegmentLengths | None = None,
    holds: HoldControl | None = None,
) -> AsyncIterator[ChatEvent]:
    """Yield text deltas and tool executions as they happen, then the outcome. With `lengths`,
    each segment's engine request carries its forecast decode length
    (`RequestMeta.predicted_decode_tokens`) and each completed segment is reported to it.
    `holds`: the engine's hold table, told when the request is over (None: no plugin)."""
    chat = ChatConversation(tokenizer, max_model_len, plan, lengths)
    async for event in drive(engine, plan.request_id, chat, call_tool, holds):
        yield event


class ChatConversation:
    """A chat request as the driver runs it (`augmented_request.Conversation`): each segment's
    prompt is the conversation rendered by the chat template; a segment ends in a call when the
    model wrote one (forced by `tool_choice` on the first turn, or on its own in `auto` turns)."""

    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        plan: ChatPlan,
        lengths: SegmentLengths | None,
    ) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._plan = plan
        self._lengths = lengths
        self._parser = Hermes2ProToolParser(tokenizer)
        self._messages = list(plan.messages)
        self._offered = {t["function"]["name"] for t in plan.tools}
        self._executions: list[ToolExecution] = []
        self._text_parts: list[str] = []
        self._prompt_tokens = self._completion_tokens = self._cached_tokens = 0
        self._first_token_time: float | None = None
        self._finish_reason = "stop"
        # Of the segment under way:
        self._mode: ToolMode = "none"
        self._context: SegmentContext | None = None
        self._shown = 0
        self._call: ParsedToolCall | None = None

    def next_segment(self, index: int, waited_s: float) -> NextSegment | None:
        plan = self._plan
        mode = _segment_mode(plan, index, calls_made=len(self._executions))
        prompt_ids = render_prompt(
            self._tokenizer, self._messages, plan.tools if mode != "none" else None
        )
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            if index == 0:
                raise PromptTooLongError(
                    f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                    f"{self._max_model_len} tokens"
                )
            self._finish_reason = "length"  # tool results filled the context
            return None
        budget = min(plan.max_tokens - self._completion_tokens, room)
        if budget < 1:
            self._finish_reason = "length"
            return None
        ends = call_end_token_ids(self._tokenizer) if mode == "auto" else None
        self._context = predicted = forecast_tool = None
        if self._lengths is not None:
            self._context = _segment_context(plan, self._messages, mode, index)
            predicted, forecast_tool = _forecast(self._lengths, self._context, budget)
        params = _sampling_params(
            plan, mode, budget, index, waited_s, ends, predicted, forecast_tool
        )
        self._prompt_tokens = self._prompt_tokens or len(prompt_ids)
        self._mode, self._shown = mode, 0
        return NextSegment(prompt_ids, params)

    def on_output(self, output: RequestOutput) -> Iterable[ChatEvent]:
        if self._mode not in ("none", "auto"):
            return ()  # a forced call is not text the client reads
        text = output.outputs[0].text
        visible = visible_prefix(text) if self._mode == "auto" else text
        if len(visible) <= self._shown:
            return ()
        delta, self._shown = visible[self._shown :], len(visible)
        return (TextDelta(delta),)

    def call_in(self, segment: SegmentRun) -> Call | None:
        if segment.index == 0:  # the prompt the usage reports is the first segment's
            self._cached_tokens = segment.cached_tokens
        self._first_token_time = self._first_token_time or segment.first_token_at
        self._completion_tokens += len(segment.output.outputs[0].token_ids)
        call = _parse_call(self._mode, segment.text, self._parser)
        if self._lengths is not None and self._context is not None:
            truncated = segment.finish_reason == "length"
            _observe(self._lengths, self._context, len(segment.token_ids), call, truncated)
        self._call = call
        if call is None:
            self._text_parts.append(segment.text)
            self._finish_reason = segment.finish_reason or "stop"
            return None
        if call.content:
            self._text_parts.append(call.content)
        refused = None
        if call.name not in self._offered:
            # The model wrote a call to a tool this request did not offer: not run, whatever
            # the server could run; the model reads why.
            refused = f"tool {call.name[:64]!r} was not offered in this request"
        return Call(call.name, call.arguments, refused=refused)

    def on_result(self, segment: SegmentRun, call: Call, result: ToolResult) -> Iterable[ChatEvent]:
        parsed = self._call
        assert parsed is not None
        execution = ToolExecution(
            call_id=f"call_{uuid.uuid4().hex[:24]}",
            name=call.name,
            arguments=call.arguments,
            result=result,
            segment_index=segment.index,
        )
        self._executions.append(execution)
        self._messages += _conversation_turns(parsed, execution)
        return (execution,)

    def outcome(self) -> ChatOutcome:
        return ChatOutcome(
            text="".join(self._text_parts),
            finish_reason=self._finish_reason,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            tool_executions=self._executions,
            segments=len(self._executions) + 1,
            first_token_time=self._first_token_time,
            cached_tokens=self._cached_tokens,
        )


def _segment_context(
    plan: ChatPlan, messages: list[dict[str, Any]], mode: ToolMode, segment: int
) -> SegmentContext:
    offered = [t["function"]["name"] for t in plan.tools] if mode != "none" else []
    return SegmentContext.from_chat(messages, offered, mode, segment)


def _forecast(
    lengths: SegmentLengths, context: SegmentContext, budget: int
) -> tuple[int | None, str | None]:
    """The segment's forecast decode length and, for an `auto` turn, the tool it is forecast
    to call, from one forecast. A failing forecaster costs the scheduler its forecast (the
    defaults), never the request; a length is within what the segment may decode and what the
    meta accepts, a tool one of those offered."""
    try:
        forecast = lengths.predict(context, budget)
        tokens = None  # nothing learned yet: the policy's own default
        if forecast.source != "default":
            tokens = max(min(int(forecast.decode_tokens), budget, MAX_PREDICTED_DECODE_TOKENS), 1)
        return tokens, forecast_call(forecast, context)
    except Exception:
        logger.exception("output-length forecast failed; the scheduler uses its default")
        return None, None


def _observe(
    lengths: SegmentLengths,
    context: SegmentContext,
    tokens: int,
    call: ParsedToolCall | None,
    truncated: bool,
) -> None:
    try:
        lengths.observe(context, tokens, call.name if call else None, truncated)
    except Exception:
        logger.exception("recording a segment's length failed")


def _segment_mode(plan: ChatPlan, segment: int, calls_made: int) -> ToolMode:
    # `required` and named choices force the first turn only: after the result comes back the
    # model decides, else every turn would call a tool until the limit.
    if not plan.tools or calls_made >= plan.max_tool_calls or plan.tool_choice == "none":
        return "none"
    return plan.tool_choice if segment == 0 else "auto"


def _call_timeout_s(plan: ChatPlan, mode: ToolMode, names: list[str]) -> float | None:
    """The longest the call that may end this segment can last: the named tool's limit, else
    (`auto`, `required`) the longest of the offered tools'; None when no call can follow."""
    limits = plan.call_timeouts_s or {}
    if mode == "none" or not names:
        return None
    candidates = [mode] if mode in names else names
    known = [limits[name] for name in candidates if name in limits]
    return max(known) if len(known) == len(candidates) else None


def _sampling_params(
    plan: ChatPlan,
    mode: ToolMode,
    budget: int,
    segment: int,
    waited_s: float,
    call_ends: tuple[tuple[int, ...], ...] | None,
    predicted_decode_tokens: int | None = None,
    predicted_call_tool: str | None = None,
) -> SamplingParams:
    forced = mode not in ("none", "auto")
    # A forced call's tool is known before it is made when one tool is possible.
    names = [t["function"]["name"] for t in plan.tools]
    api_type = mode if mode in names else (names[0] if forced and len(names) == 1 else None)
    meta = RequestMeta(
        request_id=plan.request_id,
        arrival_time=plan.arrival_time,
        segment_index=segment,
        waited_s=waited_s,
        ends_in_api_call=forced,
        call_end_token_ids=[list(end) for end in call_ends] if call_ends else None,
        api_type=api_type,
        call_timeout_s=_call_timeout_s(plan, mode, names),
        api_estimates=plan.api_estimates,
        api_estimates_version=plan.api_estimates_version,
        # Computed here from the conversation, never taken from the client.
        predicted_decode_tokens=predicted_decode_tokens,
        predicted_call_tool=predicted_call_tool if mode == "auto" else None,
        policy_variant=plan.policy_variant,
    )
    stop = list(plan.sampling.get("stop") or [])
    if mode == "auto":
        stop.append(TOOL_CALL_END)
    return SamplingParams(
        max_tokens=budget,
        temperature=plan.sampling.get("temperature", 0.0),
        top_p=plan.sampling.get("top_p", 1.0),
        seed=plan.sampling.get("seed"),
        ignore_eos=bool(plan.sampling.get("ignore_eos", False)),
        stop=stop or None,
        include_stop_str_in_output=mode == "auto",
        structured_outputs=forced_call_constraint(plan.tools, mode) if forced else None,
        extra_args=meta.to_extra_args(),
    )


def _parse_call(mode: ToolMode, text: str, parser: Hermes2ProToolParser) -> ParsedToolCall | None:
    if mode == "none":
        return None
    if mode == "auto":
        return parse_hermes_call(text, parser)
    return parse_forced_call(text)


def _conversation_turns(call: ParsedToolCall, execution: ToolExecution) -> list[dict[str, Any]]:
    return [
        {
            "role": "assistant",
            "content": call.content or None,
            "tool_calls": [
                {
                    "id": execution.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": execution.call_id,
            "name": call.name,
            "content": tool_message_content(execution.result),
        },
    ]
