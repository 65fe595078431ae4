"""What every tool shares: the error types, the result model and the Tool base class.

A tool is an async callable taking its validated pydantic arguments model. Its
OpenAI function schema is derived from that model, so the schema the engine shows
the model (and constrains decoding to) cannot drift from what we validate.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "Tool",
    "ToolArgs",
    "ToolArgumentsError",
    "ToolError",
    "ToolOutput",
    "ToolResult",
    "UnknownToolError",
    "format_validation_error",
    "openai_parameters_schema",
]


class ToolError(Exception):
    """A tool ran and failed (bad expression, refused host, ...).

    The worker turns it into a failed ToolResult whose error is this message, so
    the message is written for the model to read.
    """


class UnknownToolError(LookupError):
    """The caller asked for a tool we do not have (the caller's error: answer 4xx)."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown tool {name!r}; known tools: {', '.join(self.known) or '(none)'}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions cross Ray process boundaries pickled; the default reduce would
        # call __init__ with the message only.
        return (type(self), (self.name, self.known))


class ToolArgumentsError(ValueError):
    """Arguments for a known tool do not validate (the caller's error: answer 4xx)."""

    def __init__(self, tool: str, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.tool = tool
        self.message = message
        # JSON-safe pydantic error dicts (loc, msg, type) for the HTTP layer to return.
        self.errors = errors or []
        super().__init__(f"invalid arguments for tool {tool!r}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tool, self.message, self.errors))

    @classmethod
    def from_validation_error(cls, tool: str, exc: ValidationError) -> ToolArgumentsError:
        errors = [
            {
                "loc": list(e["loc"]),
                "msg": e["msg"].removeprefix("Value error, "),
                "type": e["type"],
            }
            for e in exc.errors(include_url=False)
        ]
        return cls(tool, format_validation_error(exc), errors)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, 'field.path: message', without pydantic's URLs."""
    parts = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(arguments)"
        # Our validators raise ValueError; pydantic's "Value error, " prefix is noise to the reader.
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class ToolArgs(BaseModel):
    """Base for tool argument models: unknown keys are refused, not silently dropped.

    extra="forbid" also puts additionalProperties: false in the schema, which
    constrained decoding needs to stop the model inventing keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolOutput(BaseModel):
    """What a tool returns; the worker adds timing to make a ToolResult."""

    output: str
    num_tokens: int | None = None


class ToolResult(BaseModel):
    """The outcome of one tool call, successful or not."""

    tool: str
    ok: bool
    output: str = ""
    error: str | None = None
    duration_s: float = Field(ge=0)
    started_at: datetime  # UTC, timezone-aware
    num_tokens: int | None = None


ArgsT = TypeVar("ArgsT", bound=ToolArgs)


class Tool(ABC, Generic[ArgsT]):
    """An async tool with a pydantic arguments model.

    Subclasses set ``name``, ``description`` and ``args_model`` (an instance
    attribute where it depends on configuration) and implement ``__call__``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    args_model: type[ArgsT]
    # The worker cancels a call that runs longer than this.
    timeout_s: float = 30.0

    def set_timeout(self, seconds: float) -> None:
        """Change the call limit (app args `tool_timeout_s`, `tool_timeouts_s`); tools with
        deadlines of their own (a request inside the call) follow it here."""
        self.timeout_s = seconds

    @abstractmethod
    async def __call__(self, args: ArgsT) -> ToolOutput: ...

    def parse_arguments(self, raw: Mapping[str, Any] | str) -> ArgsT:
        """Validate raw arguments (a dict, or the JSON text a model emits)."""
        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolArgumentsError(
                    self.name, f"arguments are not valid JSON: {exc}"
                ) from None
        if not isinstance(raw, Mapping):
            raise ToolArgumentsError(
                self.name, f"arguments must be a JSON object, not {type(raw).__name__}"
            )
        try:
            return self.args_model.model_validate(dict(raw))
        except ValidationError as exc:
            raise ToolArgumentsError.from_validation_error(self.name, exc) from None

    def function_schema(self) -> dict[str, Any]:
        """The OpenAI function definition: ``{name, description, parameters}``."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": openai_parameters_schema(self.args_model),
        }


def openai_parameters_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of ``model`` with $refs inlined and titles dropped.

    Guided-decoding backends handle $ref unevenly, and titles are noise in the
    prompt; our argument models are small and never recursive, so inlining is safe.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    resolved = _inline(schema, defs)
    assert isinstance(resolved, dict)
    return resolved


def _inline(node: Any, defs: dict[str, Any], *, in_properties: bool = False) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].removeprefix("#/$defs/")]
        merged = {
            **copy.deepcopy(target),
            **{k: v for k, v in node.items() if k != "$ref"},
        }
        return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if in_properties:
            # Keys here are argument names (one may well be called "title"): keep all.
            out[key] = _inline(value, defs)
        elif key in ("title", "discriminator"):
            # discriminator is OpenAPI, not JSON Schema, and its mapping points into the
            # $defs we just inlined; oneOf with const tags already says the same thing.
            continue
        elif key == "properties":
            out[key] = _inline(value, defs, in_properties=True)
        else:
            out[key] = _inline(value, defs)
    return out
