"""Building the vLLM engine an engine replica serves: settings, engine arguments, start-up."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.request_meta import RequestMeta
from lamps_vllm.config import SchedulerPluginConfig
from lamps_vllm.stats import EngineStatsLogger

logger = logging.getLogger(__name__)

_SCHEDULERS = {
    False: "lamps_vllm.scheduler.LampsScheduler",
    True: "lamps_vllm.scheduler.LampsAsyncScheduler",
}


class EngineSettings(BaseModel):
    """What an engine replica serves and how; set per deployment in the Serve config."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="Hugging Face model folder.")
    served_model_name: str = Field(description="The name clients put in `model`.")
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description="`dummy` gives random weights: for tests and benchmarks."
    )
    dtype: str = "float32"
    max_model_len: int = Field(default=4096, ge=64)
    kv_cache_bytes: int = Field(default=1 << 30, ge=1 << 20, description="KV cache size.")
    kv_cache_bytes_by_rank: list[Annotated[int, Field(ge=1 << 20)]] | None = Field(
        default=None,
        min_length=1,
        description="Replicas of one deployment with KV caches of different sizes (a fleet of "
        "mixed cards, or a benchmark of one): the replica of rank r takes entry r modulo the "
        "list's length, in place of kv_cache_bytes.",
    )
    block_size: int | None = Field(
        default=None, description="KV block size; vLLM's default when unset."
    )
    max_num_seqs: int = Field(default=64, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(
        default=True, description="Skip compilation (slow to start on CPU)."
    )
    async_scheduling: bool = Field(default=False, description="True on GPUs.")
    seed: int = 0
    swap_pool_bytes: int | None = Field(
        default=None,
        ge=1 << 20,
        description="Host memory for swapped-out KV caches (the Swap strategy); none: no swap.",
    )
    swap_copy_stream: bool = Field(
        default=True,
        description="On GPUs, copy swapped-out KV on a CUDA stream of its own, overlapping the "
        "forward pass (false: on the compute stream).",
    )
    skip_tokenizer_init: bool = Field(
        default=False, description="Token-id prompts only (dummy models without a tokenizer)."
    )
    scheduler: SchedulerPluginConfig | None = Field(
        default_factory=SchedulerPluginConfig,
        description="The LAMPS scheduler plugin; null runs vLLM's own scheduler (baselines).",
    )

    def for_rank(self, rank: int) -> EngineSettings:
        """These settings as the replica of `rank` in its deployment runs them."""
        if not self.kv_cache_bytes_by_rank:
            return self
        sizes = self.kv_cache_bytes_by_rank
        return self.model_copy(update={"kv_cache_bytes": sizes[rank % len(sizes)]})

    def engine_args(self) -> AsyncEngineArgs:
        return AsyncEngineArgs(
            model=str(self.model),
            served_model_name=self.served_model_name,
            load_format=self.load_format,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            seed=self.seed,
            # Our stat logger (passed to AsyncLLM) still gets the scheduler's statistics; vLLM's
            # own loggers stay off (they would also misread our keys in kv_connector_stats).
            disable_log_stats=True,
            skip_tokenizer_init=self.skip_tokenizer_init,
            scheduler_cls=_SCHEDULERS[self.async_scheduling] if self.scheduler else None,
            additional_config=self.scheduler.to_additional_config() if self.scheduler else {},
            kv_transfer_config=self._swap_connector(),
        )

    def _swap_connector(self) -> KVTransferConfig | None:
        if self.swap_pool_bytes is None or self.scheduler is None:
            return None
        return KVTransferConfig(
            kv_connector="LampsSwapConnector",
            kv_connector_module_path="lamps_vllm.swap_connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "host_pool_bytes": self.swap_pool_bytes,
                "copy_stream": self.swap_copy_stream,
            },
        )


async def start_engine(settings: EngineSettings) -> tuple[AsyncLLM, EngineStatsLogger]:
    """Start the engine (its core runs in a child process), let its scheduler measure what
    prefills and decode steps cost, and return it with its statistics."""
    stats = EngineStatsLogger()
    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(settings.engine_args(), stat_loggers=[stats.factory])
    await warm_up(engine, settings.max_model_len)
    logger.info(
        "engine for %s started and measured in %.1f s",
        settings.served_model_name,
        time.monotonic() - started,
    )
    return engine, stats


async def warm_up(engine: AsyncLLM, max_model_len: int, remeasure: bool = False) -> None:
    """Prefills of a few sizes, one at a time, then a short decode: the steps the scheduler
    plugin fits T_fwd and the decode step time on (lamps_vllm.profiling). `remeasure` makes the
    plugin drop what it measured before (costs refreshed on request)."""
    vocab = engine.model_config.get_vocab_size()
    rng = random.Random(0)
    sizes = [n for n in (32, 128, 512, 1024) if n < max_model_len]
    # Three of each size: the first pass at a new shape can be slow (kernels picked, memory
    # touched), and the fit takes each size's median.
    runs = [(n, 1) for n in sizes for _ in range(3)] + [(16, 24)]
    for i, (prompt_tokens, decode_tokens) in enumerate(runs):
        # Fresh random prompts: a prefix-cache hit would time a shorter prefill than asked.
        prompt = [rng.randrange(1000, vocab) for _ in range(prompt_tokens)]
        meta = RequestMeta(request_id="lamps-warm-up", arrival_time=time.time(), reprofile=True)
        params = SamplingParams(
            max_tokens=decode_tokens,
            min_tokens=decode_tokens,
            ignore_eos=True,
            extra_args=meta.to_extra_args() if remeasure and i == 0 else None,
        )
        async for _ in engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"lamps-warm-up-{i}"
        ):
            pass
