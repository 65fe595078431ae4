"""Tool calls in model output: the constraint that forces one (OpenAI's `tool_choice`), and the
parsing of what the model wrote.

Calls use the Hermes format our chat template teaches
(`<tool_call>{"name", "arguments"}</tool_call>`), parsed with vLLM's own Hermes parser. A forced
call is constrained by a JSON schema to the bare `{"name", "arguments"}` object, so the
whole output is the call.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Literal

import xgrammar
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

TOOL_CALL_START = Hermes2ProToolParser.tool_call_start_token
TOOL_CALL_END = Hermes2ProToolParser.tool_call_end_token

ToolMode = Literal["none", "auto", "required"] | str  # a str other than these names a function

# What a closing tag may follow in model output; a tokenizer can merge the tag's first
# characters with it ("}</" or " </" as one token), which gives another token sequence.
_BEFORE_CALL_END = ("", " ", "\n", "}", "}}", '"', '"}', "}\n", ".", "\n\n")


# Shapes a forced call's string arguments must take while decoding (not what the tool accepts,
# which is more): a calculator expression is numbers joined by at least one operator, with one
# level of parentheses. Without it the 135M embedded model writes "1234.5678" for "1234*5678".
_NUMBER = r"[0-9]+(\.[0-9]{1,4})?"
_OPERATOR = r" ?(\*\*|//|[-+*/%]) ?"
_TERM = rf"(\( ?{_NUMBER}({_OPERATOR}{_NUMBER})+ ?\)|{_NUMBER})"
DECODING_PATTERNS: dict[tuple[str, str], str] = {
    ("calculator", "expression"): rf"^ ?-?{_TERM}({_OPERATOR}-?{_TERM})+ ?$",
}


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]
    content: str  # text the model wrote before the call


def forced_call_constraint(tools: list[dict[str, Any]], mode: ToolMode) -> StructuredOutputsParams:
    """JSON schema allowing exactly one call to one of `tools` (or to the function `mode` names).

    Two things keep a small model (SmolLM2-135M) on track (tests/test_serving_chat.py holds
    it to correct calculator calls):
    * the JSON is compact, exactly as the template's in-context calls are written
      (`{"name": ..., "arguments": {...}}`); with free whitespace the model drifts into
      indented JSON and loops inside strings. vLLM only exposes that switch engine-wide
      (`disable_any_whitespace` in a request is ignored), so the schema is compiled here with
      xgrammar into a grammar without free whitespace, falling back to the JSON schema;
    * string arguments with a known shape get a `pattern`: the calculator's expression must
      be numbers joined by at least one operator, which stops "3.5" for "3.5 * 4" and
      "1234.5678" for "1234*5678".
    """
    chosen = [t for t in tools if mode == "required" or t["function"]["name"] == mode]
    alternatives = []
    for t in chosen:
        name = t["function"]["name"]
        # A copy: the caller's tool schemas stay as they are.
        parameters = json.loads(json.dumps(t["function"].get("parameters") or {"type": "object"}))
        for arg, prop in (parameters.get("properties") or {}).items():
            pattern = DECODING_PATTERNS.get((name, arg))
            if pattern and isinstance(prop, dict) and prop.get("type") == "string":
                # The pattern bounds the length itself; xgrammar cannot combine both.
                prop.pop("minLength", None)
                prop.pop("maxLength", None)
                prop["pattern"] = pattern
        alternatives.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "arguments": parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    try:
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception:  # a schema xgrammar cannot compile: vLLM's own JSON-schema path
        return StructuredOutputsParams(json=schema)
    return StructuredOutputsParams(grammar=str(grammar))


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


@functools.cache
def call_end_token_ids(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """The token sequences that end `TOOL_CALL_END` in output, for the engine to stop an `auto`
    turn at (vLLM's stop strings are checked in its frontend, which then aborts the request: the
    scheduler could not tell that from a client leaving). Each is the shortest run of tokens at
    the end of `prefix + TOOL_CALL_END` that still spells the whole tag. A tokenization missing
    here still stops at the stop string, as an abort."""
    found: dict[tuple[int, ...], None] = {}
    for prefix in _BEFORE_CALL_END:
        ids = tokenizer.encode(prefix + TOOL_CALL_END, add_special_tokens=False)
        for start in range(len(ids) - 1, -1, -1):
            if TOOL_CALL_END in tokenizer.decode(ids[start:]):
                found[tuple(ids[start:])] = None
                break
    return tuple(found)
