"""One augmented chat request driven through the engine: generate; when the model calls a tool,
pause, run the tool, append its result to the conversation and resume; until the model answers
or the request's call limit is reached.

Each stretch of generation between two calls is one engine request (a segment). Between segments
the request holds no engine state of its own: what its KV cache does meanwhile is the scheduler
policy's decision, taken in the engine when the segment ends.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.call_durations import ApiEstimate
from lamps_core.length_model import LengthForecast, SegmentContext, forecast_call
from lamps_core.request_meta import MAX_PREDICTED_DECODE_TOKENS, RequestMeta
from lamps_vllm.errors import PromptTooLongError
from lamps_vllm.holds import released_if_abandoned
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

# (tool name, arguments, name to record the call's statistics under) -> result; never raises.
CallTool = Callable[[str, dict[str, Any], str | None], Awaitable[ToolResult]]


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
) -> AsyncIterator[ChatEvent]:
    """Yield text deltas and tool executions as they happen, then the outcome. With `lengths`,
    each segment's engine request carries its forecast decode length
    (`RequestMeta.predicted_decode_tokens`) and each completed segment is reported to it."""
    parser = Hermes2ProToolParser(tokenizer)
    messages = list(plan.messages)
    executions: list[ToolExecution] = []
    text_parts: list[str] = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    first_token_time: float | None = None
    waited_s = 0.0  # by the earlier segments, for the starvation guard
    finish_reason = "stop"

    async with released_if_abandoned(engine, plan.request_id):
        for segment in range(plan.max_tool_calls + 1):
            mode = _segment_mode(plan, segment, calls_made=len(executions))
            prompt_ids = render_prompt(tokenizer, messages, plan.tools if mode != "none" else None)
            room = max_model_len - len(prompt_ids)
            if room < 1:
                if segment == 0:
                    raise PromptTooLongError(
                        f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                        f"{max_model_len} tokens"
                    )
                finish_reason = "length"  # tool results filled the context
                break
            budget = min(plan.max_tokens - completion_tokens, room)
            if budget < 1:
                finish_reason = "length"
                break
            ends = call_end_token_ids(tokenizer) if mode == "auto" else None
            context = predicted = forecast_tool = None
            if lengths is not None:
                context = _segment_context(plan, messages, mode, segment)
                predicted, forecast_tool = _forecast(lengths, context, budget)
            params = _sampling_params(
                plan, mode, budget, segment, waited_s, ends, predicted, forecast_tool
            )
            prompt_tokens = prompt_tokens or len(prompt_ids)

            shown = 0
            final = None
            submitted, segment_first_token = time.time(), None
            async for output in engine.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, f"{plan.request_id}-s{segment}"
            ):
                final = output.outputs[0]
                if segment_first_token is None and final.token_ids:
                    segment_first_token = time.time()
                    first_token_time = first_token_time or segment_first_token
                if mode in ("none", "auto"):
                    visible = visible_prefix(final.text) if mode == "auto" else final.text
                    if len(visible) > shown:
                        yield TextDelta(visible[shown:])
                        shown = len(visible)
            assert final is not None
            if segment == 0:  # the prompt the usage reports is the first segment's
                cached_tokens = output.num_cached_tokens or 0
            completion_tokens += len(final.token_ids)
            waited_s += (segment_first_token or time.time()) - submitted

            call = _parse_call(mode, final.text, parser)
            if lengths is not None and context is not None:
                truncated = final.finish_reason == "length"
                _observe(lengths, context, len(final.token_ids), call, truncated)
            if call is None:
                text_parts.append(final.text)
                finish_reason = final.finish_reason or "stop"
                break
            if call.content:
                text_parts.append(call.content)
            execution = ToolExecution(
                call_id=f"call_{uuid.uuid4().hex[:24]}",
                name=call.name,
                arguments=call.arguments,
                result=await call_tool(call.name, call.arguments, None),
                segment_index=segment,
            )
            executions.append(execution)
            yield execution
            messages += _conversation_turns(call, execution)

    yield ChatOutcome(
        text="".join(text_parts),
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        tool_executions=executions,
        segments=len(executions) + 1,
        first_token_time=first_token_time,
        cached_tokens=cached_tokens,
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
