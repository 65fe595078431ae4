"""ToolWorker: validates, runs, times and records tool calls.

A plain class so it can be tested without Ray; the serving layer wraps it as a
Ray Serve deployment or actor. Caller mistakes (unknown tool, bad arguments) raise
so the HTTP layer can answer 4xx before any generation; everything that goes
wrong while a tool runs becomes a failed ToolResult, so a request is never lost
to a tool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from tool_workers.registry import ToolRegistry, default_registry
from tool_workers.simulated_api import DEFAULT_MAX_DURATION_S, SIMULATED_API_TYPES, SimulatedApi
from tool_workers.stats import ToolCallCounts, ToolDurationEstimate, ToolStatsStore
from tool_workers.tools import ToolError, ToolOutput, ToolResult

__all__ = ["ToolWorker", "recorded_name"]

logger = logging.getLogger(__name__)


class ToolWorker:
    """Runs tools by name. Use one instance per event loop (the Redis client is loop-bound)."""

    def __init__(
        self,
        redis_url: str | None,
        http_allowlist: Iterable[str] = (),
        max_simulated_duration_s: float = DEFAULT_MAX_DURATION_S,
        *,
        http_allow_ips: Iterable[str] = (),
        tool_timeout_s: float | None = None,
        tool_timeouts_s: Mapping[str, float] | None = None,
        simulated_api: bool = True,
        namespace: str = "lamps",
        registry: ToolRegistry | None = None,
    ) -> None:
        # `simulated_api`: see default_registry (a deployment passes its config's choice).
        self.registry = registry or default_registry(
            http_allowlist,
            max_simulated_duration_s,
            http_allow_ips=http_allow_ips,
            tool_timeout_s=tool_timeout_s,
            tool_timeouts_s=tool_timeouts_s,
            simulated_api=simulated_api,
        )
        # No Redis URL: tools still run, nothing is recorded and estimates are empty.
        self.stats = ToolStatsStore(redis_url, namespace=namespace) if redis_url else None

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI ``tools`` list for every registered tool."""
        return self.registry.schemas()

    def timeouts(self) -> dict[str, float]:
        """Each tool's call limit in seconds."""
        return self.registry.timeouts()

    async def call(
        self, name: str, arguments: Mapping[str, Any] | str, record_as: str | None = None
    ) -> ToolResult:
        """Run tool ``name``; failures while running come back as ok=False, never raised.

        ``record_as`` files the call's statistics under another name: a simulated call standing
        in for an API type of a trace is learned as that API type. Only the fixed
        ``SIMULATED_API_TYPES`` are taken (Redis keys stay bounded, a real tool's estimate stays
        its own); any other name is ignored and the call recorded under ``name``.
        """
        tool = self.registry.get(name)
        args = tool.parse_arguments(arguments)
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        try:
            out = _valid_output(name, await asyncio.wait_for(tool(args), timeout=tool.timeout_s))
        except ToolError as exc:
            result = self._failed(name, str(exc), started_at, start)
        except TimeoutError:
            result = self._failed(
                name, f"tool timed out after {tool.timeout_s:g} s", started_at, start
            )
        except Exception as exc:
            # A bug in a tool must not lose the request: report it to the model, log it for us.
            logger.exception("tool %s raised", name)
            result = self._failed(
                name,
                f"internal tool error: {type(exc).__name__}: {exc}",
                started_at,
                start,
            )
        else:
            result = ToolResult(
                tool=name,
                ok=True,
                output=out.output,
                duration_s=time.perf_counter() - start,
                started_at=started_at,
                num_tokens=out.num_tokens,
            )
        result = result.model_copy(update={"tool": recorded_name(name, record_as)})
        if self.stats is not None:
            await self.stats.record(result)  # never raises on Redis trouble
        return result

    async def record_failure(self, result: ToolResult) -> None:
        """Record a call that failed outside the worker (its actor lost mid-call, no answer in
        time): the caller knows of it, the worker never could."""
        if self.stats is not None:
            await self.stats.record(result)

    @staticmethod
    def _failed(name: str, error: str, started_at: datetime, start: float) -> ToolResult:
        return ToolResult(
            tool=name,
            ok=False,
            error=error,
            duration_s=time.perf_counter() - start,
            started_at=started_at,
        )

    async def estimates(self) -> dict[str, ToolDurationEstimate]:
        """Duration estimates of every tool and API type with records (calls filed under
        `record_as` included: the API types of traces), each with its learned distribution.

        Only the server's own names are read: this registry's tools and the fixed
        ``SIMULATED_API_TYPES``. Whatever else the Redis namespace holds (another deployment's
        tools, a stray key) never reaches the scheduler, so what it is sent stays bounded.

        Raises StatsUnavailableError if Redis cannot be read.
        """
        if self.stats is None:
            return {}
        allowed = self.recorded_names()
        names = [name for name in await self.stats.known_tools() if name in allowed]
        return await self.stats.all_estimates(names, self.timeouts_by_recorded_name())

    def recorded_names(self) -> frozenset[str]:
        """The names calls can be recorded under (see ``recorded_name``): the simulated API
        types only where the simulated API is a tool here (records an earlier benchmark left
        in a shared Redis do not reach a server that runs no simulated calls)."""
        names = frozenset(self.registry.names())
        return names | SIMULATED_API_TYPES if SimulatedApi.name in names else names

    def timeouts_by_recorded_name(self) -> dict[str, float]:
        """Each recorded name's call limit (s): what bounds its learned duration."""
        # A simulated API type is recorded from simulated_api calls: that tool's limit bounds it.
        limits = self.registry.timeouts()
        simulated = limits.get("simulated_api")
        if simulated is not None:
            for api_type in SIMULATED_API_TYPES:
                limits.setdefault(api_type, simulated)
        return limits

    async def summary(self) -> dict[str, ToolCallCounts]:
        """Per-tool call counters for Prometheus; raises StatsUnavailableError if Redis fails."""
        if self.stats is None:
            return {}
        return await self.stats.summary(self.registry.names())

    @property
    def dropped_records(self) -> int:
        return self.stats.dropped_records if self.stats is not None else 0

    async def close(self) -> None:
        if self.stats is not None:
            await self.stats.close()


def recorded_name(name: str, record_as: str | None) -> str:
    """The name a call of tool ``name`` is recorded under: ``record_as`` only for a simulated
    call standing in for one of the fixed ``SIMULATED_API_TYPES`` (Redis keys stay bounded, a
    real tool's estimate stays its own); any other name is ignored."""
    if record_as is None or record_as == name:
        return name
    if record_as in SIMULATED_API_TYPES and name == "simulated_api":
        return record_as
    logger.warning("call of %s not recorded as %r (not a simulated API type)", name, record_as[:64])
    return name


def _valid_output(name: str, out: object) -> ToolOutput:
    # A tool that returns something else (None, a bare string, a dict) has a bug: the model
    # gets a clear error instead of the request failing on it later.
    if isinstance(out, ToolOutput):
        return out
    logger.error("tool %s returned %s, not a ToolOutput", name, type(out).__name__)
    raise ToolError(f"the tool returned an invalid result ({type(out).__name__})")
