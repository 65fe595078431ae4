"""Tool calls in model output: the constraint that forces one (OpenAI's `tool_choice`), and the
parsing of what the model wrote.

Calls use the Hermes format our chat template teaches
(`<tool_call>{"name", "arguments"}</tool_call>`), parsed with vLLM's own Hermes parser. A forced
call is constrained by a JSON schema to the bare `{"name", "arguments"}` object, so the
whole output is the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

TOOL_CALL_START = Hermes2ProToolParser.tool_call_start_token
TOOL_CALL_END = Hermes2ProToolParser.tool_call_end_token

ToolMode = Literal["none", "auto", "required"] | str  # a str other than these names a function


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]
    content: str  # text the model wrote before the call


def forced_call_constraint(tools: list[dict[str, Any]], mode: ToolMode) -> StructuredOutputsParams:
    """JSON schema allowing exactly one call to one of `tools` (or to the function `mode` names)."""
    chosen = [t for t in tools if mode == "required" or t["function"]["name"] == mode]
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    return StructuredOutputsParams(json=schema)


def parse_forced_call(text: str) -> ParsedToolCall | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut off by max_tokens before the JSON closed
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return None
    return ParsedToolCall(str(call.get("name")), call["arguments"], content="")


def parse_hermes_call(text: str, parser: Hermes2ProToolParser) -> ParsedToolCall | None:
    """The first tool call in free text, if any (generation stops at its closing tag)."""
    # The parser's request argument only matters when streaming.
    info = parser.extract_tool_calls(text, request=None)  # type: ignore[arg-type]
    if not info.tools_called or not info.tool_calls:
        return None
    call = info.tool_calls[0].function
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(call.name, arguments, content=info.content or "")


def visible_prefix(text: str) -> str:
    """The part of streamed text that can be shown: everything before a tool call starts,
    holding back a tail that might be the beginning of `<tool_call>`."""
    start = text.find(TOOL_CALL_START)
    if start >= 0:
        return text[:start]
    for keep in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-keep:]):
            return text[:-keep]
    return text
