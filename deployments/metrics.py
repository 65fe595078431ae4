"""Metrics across processes: each engine replica publishes its engine statistics to Redis every
second (with a short expiry, so a dead replica drops out), the tool workers record every call
there, and the ingress renders all of it in Prometheus' text format for `GET /metrics`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.exceptions import RedisError

from tool_workers.stats import LOADING_WAIT_S, ToolCallCounts, while_loading

logger = logging.getLogger(__name__)

_STATS_TTL_S = 5
_ENGINE_GAUGES = {
    "running_requests": "Requests the engine is generating for.",
    "waiting_requests": "Requests queued in the engine (the scheduler's waiting queues).",
    "paused_in_tool_calls": "Requests paused while a tool call runs.",
    "kv_blocks_total": "KV cache blocks of the engine.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_free": "KV cache blocks free.",
    "host_pool_used_bytes": "Bytes of the host swap pool holding swapped-out KV caches.",
    "host_pool_capacity_bytes": "Size of the host swap pool in bytes (0: the engine has none).",
    "host_pool_entries": "Swapped-out KV caches in the host swap pool.",
}
_ENGINE_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "prompt_tokens": "Prompt tokens processed.",
    "generation_tokens": "Tokens generated.",
}


def host_pool_gauges(scheduler: Mapping[str, Any]) -> dict[str, int]:
    """The host swap pool's gauges from the scheduler plugin's statistics (an engine replica's
    `EngineStatsSnapshot.scheduler`, whose `swap` is the connector's `SwapStats`): zeros for an
    engine without a swap pool, or before its first step."""
    swap = scheduler.get("swap") or {}
    return {
        "host_pool_used_bytes": int(swap.get("host_pool_bytes_in_use") or 0),
        "host_pool_capacity_bytes": int(swap.get("host_pool_bytes") or 0),
        "host_pool_entries": int(swap.get("entries") or 0),
    }


class EngineStatsBoard:
    def __init__(
        self, redis_url: str, namespace: str = "lamps", loading_wait_s: float = LOADING_WAIT_S
    ) -> None:
        self._prefix = f"{namespace}:engine:"
        self._redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self._warned = False
        # How long `collect` (GET /metrics) waits out a Redis loading its data after a restart.
        self._loading_wait_s = loading_wait_s

    async def publish(self, replica_id: str, model: str, stats: dict[str, Any]) -> None:
        try:
            await self._redis.set(
                self._prefix + replica_id, json.dumps({"model": model, **stats}), ex=_STATS_TTL_S
            )
            self._warned = False
        except (RedisError, OSError) as exc:
            if not self._warned:  # once per outage, not once a second
                logger.warning("cannot publish engine stats to Redis: %s", exc)
                self._warned = True

    async def collect(self) -> dict[str, dict[str, Any]]:
        """Replica id -> its latest published statistics."""

        async def read() -> tuple[list[str], list[str | None]]:
            keys = [key async for key in self._redis.scan_iter(match=self._prefix + "*")]
            return keys, (await self._redis.mget(keys) if keys else [])

        keys, values = await while_loading(read, self._loading_wait_s)
        return {
            key.removeprefix(self._prefix): json.loads(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }


def render_prometheus(
    engines: dict[str, dict[str, Any]],
    tools: dict[str, ToolCallCounts],
    redis_up: bool,
) -> bytes:
    families: list[Any] = []
    # A figure a replica does not publish (one of an older version, mid-upgrade) is left out
    # for that replica rather than failing the scrape.
    for name, doc in _ENGINE_GAUGES.items():
        family = GaugeMetricFamily(f"lamps_engine_{name}", doc, labels=["replica", "model"])
        for replica, stats in engines.items():
            if name in stats:
                family.add_metric([replica, stats["model"]], stats[name])
        families.append(family)
    for name, doc in _ENGINE_COUNTERS.items():
        family = CounterMetricFamily(f"lamps_engine_{name}", doc, labels=["replica", "model"])
        for replica, stats in engines.items():
            if name in stats:
                family.add_metric([replica, stats["model"]], stats[name])
        families.append(family)
    calls = CounterMetricFamily("lamps_tool_calls", "Tool calls made.", labels=["tool", "outcome"])
    seconds = CounterMetricFamily(
        "lamps_tool_call_seconds", "Time spent in tool calls.", labels=["tool"]
    )
    for tool, counts in tools.items():
        calls.add_metric([tool, "ok"], counts.calls_ok)
        calls.add_metric([tool, "failed"], counts.calls_failed)
        seconds.add_metric([tool], counts.duration_s_total)
    up = GaugeMetricFamily("lamps_redis_up", "Whether the metrics store answered.")
    up.add_metric([], 1.0 if redis_up else 0.0)
    families += [calls, seconds, up]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
