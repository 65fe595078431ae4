"""Tool-call statistics in Redis, shared by all tool workers of a deployment.

Per tool we keep the recent durations (a capped list, newest first) for duration
estimates and running counters for Prometheus. An estimate carries the recency-weighted
distribution the scheduler conditions a running call on
(``lamps_core.call_durations``); ``engine_api_estimates`` builds what the engine is sent.
Redis is a best-effort side channel here: an outage drops records (counted in
``dropped_records``) but never fails a tool call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, RedisError

from lamps_core.call_durations import (
    ApiEstimate,
    CallDurationSummary,
    is_call_duration,
    summarize_durations,
)
from lamps_core.request_meta import MAX_API_ESTIMATES
from tool_workers.tools import ToolResult

__all__ = [
    "StatsUnavailableError",
    "ToolCallCounts",
    "ToolDurationEstimate",
    "ToolStatsStore",
    "engine_api_estimates",
    "merge_distributions",
    "merge_estimates",
    "percentile",
    "while_loading",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SAMPLES = 1000
# How often an engine replica re-reads the estimates (and the engine-only bench re-summarises).
API_ESTIMATES_REFRESH_S = 5.0
# Short timeouts: a record is awaited on the tool-call path, so a hung Redis must
# cost the caller at most about a second, not redis-py's default retry schedule.
_SOCKET_TIMEOUT_S = 1.0

_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

# After a restart Redis answers every command with LOADING until it has read its append-only
# file back (milliseconds for a small one, seconds for a large one). That is not an outage: a
# record or a read waits it out this long, retrying from 50 ms, doubling up to 400 ms, and only
# then counts it as one. Bounded, because a record is awaited on the tool-call path.
LOADING_WAIT_S = 1.5
_LOADING_FIRST_RETRY_S = 0.05
_LOADING_MAX_RETRY_S = 0.4

T = TypeVar("T")


async def while_loading(operation: Callable[[], Awaitable[T]], wait_s: float = LOADING_WAIT_S) -> T:
    """``operation()``, tried again with a short backoff while Redis is loading its data
    (``BusyLoadingError``) for about ``wait_s`` seconds at most; then its BusyLoadingError
    (a RedisError, so callers handle it as an outage). Retrying is safe: a loading Redis refuses
    a command (a MULTI/EXEC block whole) without applying any of it."""
    deadline = time.monotonic() + wait_s
    delay = _LOADING_FIRST_RETRY_S
    while True:
        try:
            return await operation()
        except BusyLoadingError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, _LOADING_MAX_RETRY_S)


class StatsUnavailableError(RuntimeError):
    """Reading statistics failed because Redis is unreachable or misbehaving."""


class ToolDurationEstimate(BaseModel):
    """Duration statistics of a tool over its recent calls; count=0 and None values without data.

    ``distribution`` is recency-weighted (the newest calls count most); the other figures weigh
    every kept call alike."""

    tool: str
    count: int = 0
    mean_s: float | None = None
    p50_s: float | None = None
    p90_s: float | None = None
    last_s: float | None = None
    distribution: CallDurationSummary | None = None

    @classmethod
    def from_samples(
        cls, tool: str, newest_first: Sequence[float], timeout_s: float | None = None
    ) -> ToolDurationEstimate:
        # What is not a duration (a corrupted record: NaN, negative, absurd) is not learned from.
        newest_first = [v for v in newest_first if is_call_duration(v)]
        if not newest_first:
            return cls(tool=tool)
        ordered = sorted(newest_first)
        return cls(
            tool=tool,
            count=len(ordered),
            mean_s=math.fsum(ordered) / len(ordered),
            p50_s=percentile(ordered, 0.5),
            p90_s=percentile(ordered, 0.9),
            last_s=newest_first[0],
            distribution=summarize_durations(
                newest_first,
                timeout_s=timeout_s
                if timeout_s is not None and is_call_duration(timeout_s)
                else None,
            ),
        )


def _parse_samples(raw: Iterable[str]) -> list[float]:
    """Redis list entries as floats; an entry that is not a number is left out."""
    values = []
    for entry in raw:
        try:
            values.append(float(entry))
        except ValueError:
            continue
    return values


def merge_estimates(
    last: Mapping[str, float], fresh: Mapping[str, ToolDurationEstimate]
) -> dict[str, float]:
    """The last estimates updated by the fresh ones that have data. A tool missing from Redis
    (restarted empty, flushed) keeps its last estimate: a replica never trades what it learned
    for nothing, which would make the scheduler treat every call as of unknown length."""
    merged = dict(last)
    merged.update({name: e.mean_s for name, e in fresh.items() if e.count and e.mean_s})
    return merged


def merge_distributions(
    last: Mapping[str, CallDurationSummary], fresh: Mapping[str, ToolDurationEstimate]
) -> dict[str, CallDurationSummary]:
    """The last distributions updated by the fresh ones that have data: like the means, a tool
    missing from Redis (restarted empty, flushed) keeps what was learned of it."""
    merged = dict(last)
    merged.update({name: e.distribution for name, e in fresh.items() if e.distribution})
    return merged


def engine_api_estimates(
    means: Mapping[str, float], distributions: Mapping[str, CallDurationSummary]
) -> dict[str, ApiEstimate]:
    """What the scheduler is sent per API type (``RequestMeta.api_estimates``): the learned
    distribution where there is one, else the mean; at most ``MAX_API_ESTIMATES`` types (the
    names are the server's own, see ``ToolWorker.estimates``, so the cap only guards a bug)."""
    merged: dict[str, ApiEstimate] = {**means, **distributions}
    if len(merged) > MAX_API_ESTIMATES:
        logger.warning(
            "tool stats: %d API types, sending the first %d", len(merged), MAX_API_ESTIMATES
        )
        merged = dict(sorted(merged.items())[:MAX_API_ESTIMATES])
    return merged


class ToolCallCounts(BaseModel):
    """Monotonic counters for Prometheus (counter semantics: they only grow)."""

    tool: str
    calls_ok: int = 0
    calls_failed: int = 0
    duration_s_total: float = 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class ToolStatsStore:
    """Async Redis-backed store; use it from one event loop (redis.asyncio's rule)."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = "lamps",
        max_samples: int = DEFAULT_MAX_SAMPLES,
        loading_wait_s: float = LOADING_WAIT_S,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.namespace = namespace
        self.max_samples = max_samples
        self.loading_wait_s = loading_wait_s
        self.dropped_records = 0
        self._failing = False
        self._redis = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            # One immediate retry re-dials a pooled connection that died when Redis
            # restarted. Not on timeouts: a slow Redis may still apply the first
            # attempt (a double record), and each retry adds a full timeout to the call.
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        )

    def _tools_key(self) -> str:
        return f"{self.namespace}:tools"

    def _durations_key(self, tool: str) -> str:
        return f"{self.namespace}:tool:{tool}:durations"

    def _counts_key(self, tool: str) -> str:
        return f"{self.namespace}:tool:{tool}:calls"

    async def record(self, result: ToolResult) -> bool:
        """Record one call; returns False (and counts a dropped record) if Redis failed.

        "Dropped" means "not confirmed": after a timeout a slow Redis may still apply it.

        Failed calls' durations are kept too: for scheduling what matters is how
        long a request waited on the tool, whether or not the tool succeeded.
        """
        counts_key = self._counts_key(result.tool)
        durations_key = self._durations_key(result.tool)

        async def write() -> None:
            # transaction=True (MULTI/EXEC): readers never see a call counted but not listed.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self._tools_key(), result.tool)
                pipe.hincrby(counts_key, "calls_ok" if result.ok else "calls_failed", 1)
                pipe.hincrbyfloat(counts_key, "duration_s_total", result.duration_s)
                pipe.lpush(durations_key, repr(result.duration_s))
                pipe.ltrim(durations_key, 0, self.max_samples - 1)
                await pipe.execute()

        try:
            await while_loading(write, self.loading_wait_s)
        except _REDIS_FAILURES as exc:
            self.dropped_records += 1
            if not self._failing:
                # Warn once per outage, not once per call.
                logger.warning(
                    "tool stats: Redis unavailable, dropping records until it is back: %s",
                    exc,
                )
                self._failing = True
            return False
        if self._failing:
            logger.info(
                "tool stats: Redis is back (%d records dropped so far)",
                self.dropped_records,
            )
            self._failing = False
        return True

    async def estimate(self, tool: str) -> ToolDurationEstimate:
        try:
            raw = await while_loading(
                lambda: self._redis.lrange(self._durations_key(tool), 0, -1), self.loading_wait_s
            )
        except _REDIS_FAILURES as exc:
            raise StatsUnavailableError(f"cannot read tool stats from Redis: {exc}") from exc
        return ToolDurationEstimate.from_samples(tool, _parse_samples(raw))

    async def known_tools(self) -> list[str]:
        """Tools that have at least one record (in this namespace)."""
        try:
            names = await while_loading(
                lambda: self._redis.smembers(self._tools_key()), self.loading_wait_s
            )
        except _REDIS_FAILURES as exc:
            raise StatsUnavailableError(f"cannot read tool stats from Redis: {exc}") from exc
        return sorted(names)

    async def all_estimates(
        self, tools: Iterable[str] | None = None, timeouts_s: Mapping[str, float] | None = None
    ) -> dict[str, ToolDurationEstimate]:
        """Estimates for ``tools`` (default: every tool with records), in one round trip;
        ``timeouts_s`` (tool -> call limit) bounds their distributions."""
        names = list(tools) if tools is not None else await self.known_tools()

        async def read() -> list[list[str]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.lrange(self._durations_key(name), 0, -1)
                return await pipe.execute()

        try:
            lists = await while_loading(read, self.loading_wait_s)
        except _REDIS_FAILURES as exc:
            raise StatsUnavailableError(f"cannot read tool stats from Redis: {exc}") from exc
        limits = timeouts_s or {}
        return {
            name: ToolDurationEstimate.from_samples(name, _parse_samples(raw), limits.get(name))
            for name, raw in zip(names, lists, strict=True)
        }

    async def summary(self, tools: Iterable[str] | None = None) -> dict[str, ToolCallCounts]:
        """Per-tool counters (calls ok, calls failed, total seconds) for Prometheus."""
        names = list(tools) if tools is not None else await self.known_tools()

        async def read() -> list[dict[str, str]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._counts_key(name))
                return await pipe.execute()

        try:
            hashes = await while_loading(read, self.loading_wait_s)
        except _REDIS_FAILURES as exc:
            raise StatsUnavailableError(f"cannot read tool stats from Redis: {exc}") from exc
        return {
            name: ToolCallCounts(
                tool=name,
                calls_ok=int(h.get("calls_ok", 0)),
                calls_failed=int(h.get("calls_failed", 0)),
                duration_s_total=float(h.get("duration_s_total", 0.0)),
            )
            for name, h in zip(names, hashes, strict=True)
        }

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _REDIS_FAILURES:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
