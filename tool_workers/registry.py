"""Tool lookup by name, the OpenAI ``tools`` list, and argument validation."""

from __future__ import annotations

import math
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

    def set_timeouts(
        self, default_s: float | None = None, per_tool_s: Mapping[str, float] | None = None
    ) -> None:
        """Limit every tool's calls to ``default_s`` (none: each tool keeps its own limit), then
        the tools named in ``per_tool_s`` to theirs. A name we do not have is a config error:
        a typo would otherwise leave that tool on a limit nobody chose."""
        per_tool_s = dict(per_tool_s or {})
        unknown = sorted(set(per_tool_s) - set(self._tools))
        if unknown:
            hint = (
                " (simulated_api is a tool only with enable_benchmark_endpoints: true)"
                if SimulatedApi.name in unknown
                else ""
            )
            raise ValueError(
                f"tool_timeouts_s names unknown tools {unknown}; tools: "
                f"{', '.join(self.names())}{hint}"
            )
        for seconds in [default_s, *per_tool_s.values()]:
            if seconds is not None and not 0 < seconds < math.inf:
                raise ValueError(f"a tool timeout must be a positive number of seconds: {seconds}")
        for tool in self._tools.values():
            limit = per_tool_s.get(tool.name, default_s)
            if limit is not None:
                tool.set_timeout(limit)

    def timeouts(self) -> dict[str, float]:
        """Each tool's call limit in seconds (what its caller waits for, plus a margin)."""
        return {name: tool.timeout_s for name, tool in self._tools.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)


def default_registry(
    http_allowlist: Iterable[str] = (),
    max_simulated_duration_s: float = DEFAULT_MAX_DURATION_S,
    *,
    http_allow_ips: Iterable[str] = (),
    tool_timeout_s: float | None = None,
    tool_timeouts_s: Mapping[str, float] | None = None,
    simulated_api: bool = True,
) -> ToolRegistry:
    """calculator, http_get (restricted to ``http_allowlist`` host names, and to public addresses
    or ``http_allow_ips``) and, with ``simulated_api``, the simulated API, with their call limits
    (``set_timeouts``).

    The simulated API is a benchmark's tool (trace replay runs its calls): a deployment leaves it
    out unless its config turns the benchmark endpoints on (``AppArgs``, off by default). It is
    on by default here because in-process benchmark code builds its own registry."""
    tools: list[Tool[Any]] = [Calculator(), HttpGet(http_allowlist, allow_ips=http_allow_ips)]
    if simulated_api:
        tools.append(SimulatedApi(max_simulated_duration_s))
    registry = ToolRegistry(tools)
    registry.set_timeouts(tool_timeout_s, tool_timeouts_s)
    return registry
