"""The request and response models of the public interface, HTTP and Python handle alike.

Chat uses vLLM's OpenAI protocol models, extended with what an augmented request adds: the call
limit, and in responses the tool executions (call, result, duration) the server made.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)

from lamps_core.trace import TraceSegment
from lamps_vllm.trace_replay import TraceOutcome

# How deep a request body (or a tool call's arguments) may nest JSON arrays and objects. A chat
# request needs about 6 levels, a client's tool schema a few more; 64 is generous. Beyond it a
# body is refused before it is parsed: Python's parser recurses once per level (200,000 `[` were
# a RecursionError, HTTP 500), and so would pydantic, Ray's pickling and the chat template.
MAX_JSON_DEPTH = 64
# The most entries a chat request's `tools` may have. The server has a handful of tools, and
# each entry names one of them; the limit refuses a body of thousands of copies (the client's
# copies are parsed by pydantic before anything else can look at them) at once.
MAX_TOOLS = 64

# bytes.translate: `[` and `{` become +1, `]` and `}` -1 (as int8), everything else is deleted.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def json_nesting_depth(raw: bytes | str) -> int:
    """How deep the arrays and objects of the JSON text `raw` nest, without parsing it: linear
    and in C (bytes operations and one numpy cumsum) whatever the text. Brackets inside strings
    do not count. On text that is not JSON, a parser stops at the first error, and up to there
    this scan reads the text as the parser does: the figure is never below the depth the
    parser would reach."""
    if isinstance(raw, str):
        data = raw.encode(errors="surrogatepass")
    else:
        data = raw
        encoding = json.detect_encoding(raw)  # json.loads takes UTF-16 and UTF-32 bodies too
        if encoding not in ("utf-8", "utf-8-sig"):
            # The scan below reads UTF-8 (or ASCII) bytes; what does not decode, the parser
            # refuses.
            with contextlib.suppress(UnicodeDecodeError):
                data = raw.decode(encoding).encode(errors="surrogatepass")
    # Every backslash in valid JSON starts a two-character escape (or `\uXXXX`, whose hex digits
    # are harmless): drop escaped backslashes first, then escaped quotes, and every `"` left
    # opens or closes a string. The even pieces between quotes are outside strings.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    steps = outside.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    if not steps:
        return 0
    levels = np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int64)
    # A parser reads one value: it stops where the first one closes (back to level 0: extra
    # data follows) or a bracket closes nothing (below 0). What follows never nests it deeper.
    ends = np.flatnonzero(levels <= 0)
    first = levels[: ends[0] + 1] if ends.size else levels
    return max(int(first.max()), 0)


class ChatRequest(ChatCompletionRequest):
    max_tool_calls: int | None = Field(
        default=None,
        ge=0,
        description="Tool calls allowed in this request (server default if unset).",
    )

    @field_validator("messages", mode="after")
    @classmethod
    def _messages_the_template_can_render(cls, messages: list[Any]) -> list[Any]:
        """What vLLM's union admits but a chat template cannot render is refused here (HTTP
        400), and what it admits lazily is made plain, so that the rest of the path (the
        ingress's chat plan, Ray's pickling, the template) meets only dicts, lists and strings.

        - A harmony-style message (`author` instead of `role`, vLLM's `openai_harmony.Message`):
          not OpenAI chat input; our chat templates read `role`.
        - Content parts: pydantic's lazy iterator becomes a list, a bare string part (vLLM's
          custom message type allows them) a text part.
        - A tool call's `arguments` must be a JSON object (as a string, as OpenAI sends them).
        """
        return [_plain(index, message) for index, message in enumerate(messages)]


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is `message` alone (no "Value error, " before it)."""
    return PydanticCustomError("invalid_message", message)


def _plain(index: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):  # openai_harmony.Message, the only model in the union
        raise _invalid(
            f"message {index} has no `role`: harmony-style messages (`author`) are not "
            "supported; send OpenAI chat messages (`role`, `content`)"
        )
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        message["content"] = [_content_part(index, part) for part in content]
    for call in message.get("tool_calls") or []:
        _check_arguments(index, call["function"].get("arguments"))
    return message


def _content_part(index: int, part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):  # not seen; vLLM's part types are all TypedDicts
        raise _invalid(f"message {index}: a content part must be an object or a string")
    return part


def _check_arguments(index: int, arguments: object) -> None:
    if not isinstance(arguments, str):
        return  # pydantic has refused anything but a string already
    if json_nesting_depth(arguments) > MAX_JSON_DEPTH:
        # They are parsed again and rendered into the prompt (recursively, by the template).
        raise _invalid(
            f"message {index}: a tool call's arguments nest deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        parsed = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise _invalid(f"message {index}: a tool call's arguments must be a JSON object")


class ToolExecutionInfo(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any]
    ok: bool
    output: str
    error: str | None
    duration_s: float
    segment_index: int = Field(description="Which generation segment made the call (0 = first).")


class RequestTimings(BaseModel):
    ttft_s: float | None = Field(description="Arrival to first generated token.")
    latency_s: float = Field(description="Arrival to the last token, tool time included.")
    tool_time_s: float
    segments: int


class ChatResponse(ChatCompletionResponse):
    tool_executions: list[ToolExecutionInfo] = Field(default_factory=list)
    timings: RequestTimings | None = None


class ChatStreamChunk(ChatCompletionStreamResponse):
    tool_execution: ToolExecutionInfo | None = None
    timings: RequestTimings | None = None


class TraceRequest(BaseModel):
    """A scripted augmented request: every length and API duration fixed by the script."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The client's own id, echoed back as `client_request_id`; the server gives "
        "every request an id of its own.",
    )
    segments: list[TraceSegment] = Field(min_length=1, max_length=1024)
    policy: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Label of one of the deployment's policy variants "
        "(`engine.scheduler.policy_variants`) to schedule this request with; none: the "
        "engine's policy.",
    )


class TraceSegmentResult(BaseModel):
    index: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(description="Prompt tokens found in the KV cache (not recomputed).")
    queue_and_prefill_s: float = Field(description="Submission to first token of the segment.")
    decode_s: float
    api_duration_s: float | None
    api_ok: bool | None
    api_error: str | None = Field(
        default=None, description="Why the segment's API call failed (none if it did not)."
    )


class TraceResponse(BaseModel):
    request_id: str = Field(description="The server's id of the request.")
    client_request_id: str | None = Field(
        default=None, description="The `request_id` the client sent, if any."
    )
    model: str
    ttft_s: float
    latency_s: float
    segments: list[TraceSegmentResult]

    @classmethod
    def from_outcome(
        cls, outcome: TraceOutcome, model: str, client_request_id: str | None = None
    ) -> TraceResponse:
        return cls(
            request_id=outcome.request_id,
            client_request_id=client_request_id,
            model=model,
            ttft_s=outcome.ttft_s,
            latency_s=outcome.latency_s,
            segments=[
                TraceSegmentResult(
                    index=s.index,
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    cached_tokens=s.cached_tokens,
                    queue_and_prefill_s=s.first_token_at - s.started_at,
                    decode_s=s.finished_at - s.first_token_at,
                    api_duration_s=s.api_call.duration_s if s.api_call else None,
                    api_ok=s.api_call.ok if s.api_call else None,
                    api_error=s.api_call.error if s.api_call else None,
                )
                for s in outcome.segments
            ],
        )
