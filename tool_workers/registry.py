"""Tool lookup by name, the OpenAI ``tools`` list, and argument validation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from tool_workers.calculator import Calculator
from tool_workers.http_get import HttpGet
from tool_workers.simulated_api import DEFAULT_MAX_DURATION_S, SimulatedApi
from tool_workers.tools import Tool, ToolArgumentsError, UnknownToolError

__all__ = ["ToolArgumentsError", "ToolRegistry", "UnknownToolError", "default_registry"]


class ToolRegistry:
    """Tools by name; registration order is the order of ``schemas()``."""

    def __init__(self, tools: Iterable[Tool[Any]] = ()) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool[Any]) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> Tool[Any]:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownToolError(name, self.names()) from None

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI chat-completions ``tools`` list.

        Entries are ``{"type": "function", "function": {name, description, parameters}}``.
        """
        return [{"type": "function", "function": t.function_schema()} for t in self._tools.values()]

    def validate_arguments(self, name: str, args: Mapping[str, Any] | str) -> BaseModel:
        """Validated arguments for tool ``name``; raises UnknownToolError or ToolArgumentsError."""
        return self.get(name).parse_arguments(args)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)


def default_registry(
    http_allowlist: Iterable[str] = (),
    max_simulated_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> ToolRegistry:
    """calculator, http_get (restricted to ``http_allowlist``) and simulated_api."""
    return ToolRegistry(
        [
            Calculator(),
            HttpGet(http_allowlist),
            SimulatedApi(max_simulated_duration_s),
        ]
    )
