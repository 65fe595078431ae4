"""Engine statistics seen from the replica: vLLM hands every scheduler step's stats to the
stat loggers registered on `AsyncLLM`; this one keeps the latest for metrics and routing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from lamps_vllm.scheduler import STATS_KEY


@dataclass
class EngineStatsSnapshot:
    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # tokens looked up, cumulative
    prefix_cache_hits: int = 0  # tokens found, cumulative
    prompt_tokens: int = 0  # cumulative
    generation_tokens: int = 0  # cumulative
    preemptions: int = 0  # cumulative, vLLM's own count (engines without the plugin too)
    # The scheduler plugin's own figures (policy, preserved requests and blocks, strategy
    # counts), which reach us inside SchedulerStats.kv_connector_stats.
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used


class EngineStatsLogger:
    """Owns the snapshot; `factory` is what `AsyncLLM(stat_loggers=[...])` wants."""

    def __init__(self) -> None:
        self.snapshot = EngineStatsSnapshot()

    def factory(self, vllm_config: VllmConfig, engine_index: int = 0) -> StatLoggerBase:
        return _Recorder(self.snapshot, vllm_config)


class _Recorder(StatLoggerBase):
    def __init__(self, snapshot: EngineStatsSnapshot, vllm_config: VllmConfig) -> None:
        self._snapshot = snapshot
        self._vllm_config = vllm_config

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        snap = self._snapshot
        # The block count is known only once the engine has profiled memory.
        snap.kv_blocks_total = self._vllm_config.cache_config.num_gpu_blocks or 0
        if scheduler_stats is not None:
            snap.running_requests = scheduler_stats.num_running_reqs
            snap.waiting_requests = (
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            )
            snap.kv_blocks_used = round(scheduler_stats.kv_cache_usage * snap.kv_blocks_total)
            snap.prefix_cache_queries += scheduler_stats.prefix_cache_stats.queries
            snap.prefix_cache_hits += scheduler_stats.prefix_cache_stats.hits
            ours = (scheduler_stats.kv_connector_stats or {}).get(STATS_KEY)
            if ours is not None:
                snap.scheduler = dict(ours)
        if iteration_stats is not None:
            snap.prompt_tokens += iteration_stats.num_prompt_tokens
            snap.generation_tokens += iteration_stats.num_generation_tokens
            snap.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)

    def log_engine_initialized(self) -> None:
        pass
