"""The engine replica: one vLLM engine (one GPU in production, CPU here) serving augmented
requests, whose tool calls it hands to the tool workers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.autoscaling import KV_PRESSURE
from deployments.errors import BenchmarkEndpointsDisabledError
from deployments.metrics import EngineStatsBoard, host_pool_gauges
from lamps_core.call_durations import ApiEstimate, CallDurationSummary
from lamps_core.length_model import OutputLengthPredictor
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import ChatEvent, ChatPlan, run_chat
from lamps_vllm.config import LengthModelConfig
from lamps_vllm.engine import EngineSettings, start_engine, warm_up
from lamps_vllm.errors import UnknownPolicyVariantError, unknown_variant_message
from lamps_vllm.holds import HoldControl
from lamps_vllm.trace_replay import TraceOutcome, run_trace
from tool_workers.simulated_api import SimulatedApi
from tool_workers.stats import (
    API_ESTIMATES_REFRESH_S,
    ToolStatsStore,
    engine_api_estimates,
    merge_distributions,
    merge_estimates,
)
from tool_workers.tools import ToolArgumentsError, ToolResult, UnknownToolError
from tool_workers.worker import recorded_name

logger = logging.getLogger(__name__)

# How often an idle engine's holds are checked against their deadlines (_expire_idle_holds).
HOLD_EXPIRY_CHECK_S = 30.0
# A tool worker's own deadline for a call is the tool's timeout; we wait this much longer
# (its Redis record, Ray's round trip) before giving up on a worker that does not answer.
TOOL_CALL_GRACE_S = 5.0
DEFAULT_TOOL_TIMEOUT_S = 30.0
# Where the scheduler plugin reports no committed memory-time (no plugin), the replica's estimate
# is its held and waiting KV times this: how long, about, the memory held now stays held (a
# decode of a few hundred tokens, or a short call) (docs/fleet.md).
ROUTING_HORIZON_S = 5.0


class EngineReplica:
    async def __init__(
        self,
        engine: dict[str, Any],
        tool_worker: DeploymentHandle,
        redis_url: str | None,
        tool_timeouts_s: Mapping[str, float] | None = None,
        replay_enabled: bool = True,
    ) -> None:
        rank = serve.get_replica_context().rank.rank
        self.settings = EngineSettings.model_validate(engine).for_rank(rank)
        self._tools = tool_worker
        self._tool_timeouts_s = dict(tool_timeouts_s or {})
        # Trace replay is for benchmarks (`enable_benchmark_endpoints`); refused here too, for
        # callers of this deployment's handle that bypass the ingress.
        self._replay_enabled = replay_enabled
        # Calls that fail outside the worker (it died, it hung) are recorded from here.
        self._tool_stats = ToolStatsStore(redis_url) if redis_url else None
        self._replica_id = _replica_id()
        self._engine, self._stats = await start_engine(self.settings)
        # The engine's hold table, where the plugin runs: every request ends by telling it.
        self._holds = HoldControl(self._engine) if self.settings.scheduler is not None else None
        # None without a tokenizer (`skip_tokenizer_init`: trace replay of token ids only);
        # vLLM 0.26 raises where 0.27 answers None.
        self._tokenizer = (
            None if self.settings.skip_tokenizer_init else self._engine.get_tokenizer()
        )
        self._vocab_size = self._engine.model_config.get_vocab_size()
        self._max_model_len = self.settings.max_model_len
        self._paused_in_tool_calls = 0
        self._requests_received = 0  # chat and trace requests routed here, since start
        self._board = EngineStatsBoard(redis_url) if redis_url else None
        self._api_estimates: dict[str, float] = {}  # means, by tool and API type
        self._api_durations: dict[str, CallDurationSummary] = {}  # learned distributions
        # What the scheduler is sent with every request: both of the above, built at refresh.
        self._scheduler_estimates: dict[str, ApiEstimate] = {}
        self._estimates_version = 0  # raised at every change: the engine keeps the newest
        self._background = [
            asyncio.create_task(self._publish_stats(self._replica_id)),
            asyncio.create_task(self._refresh_api_estimates()),
        ]
        # Chat segments' decode-length forecasts; none without the plugin (nobody reads them).
        self._lengths: OutputLengthPredictor | None = None
        self._lengths_path: Path | None = None
        if self.settings.scheduler is not None:
            self._background.append(asyncio.create_task(self._expire_idle_holds()))
            length_config = self.settings.scheduler.length_model
            self._lengths, self._lengths_path = load_length_predictor(length_config)
            self._background.append(asyncio.create_task(self._refit_lengths(length_config)))

    async def chat(self, plan: ChatPlan) -> AsyncIterator[ChatEvent]:
        """Stream the events of one chat request (text deltas, tool executions, outcome)."""
        self._requests_received += 1
        # Means and learned distributions (RequestMeta.api_estimates validates both).
        plan.api_estimates = self._scheduler_estimates or None
        plan.api_estimates_version = self._estimates_version
        names = (t["function"]["name"] for t in plan.tools)
        plan.call_timeouts_s = {name: self._call_limit_s(name) for name in names}
        async for event in run_chat(
            self._engine,
            self._tokenizer,
            self._max_model_len,
            plan,
            self._call_tool,
            self._lengths,
            self._holds,
        ):
            yield event

    async def replay(
        self,
        request_id: str,
        script: TraceScript,
        arrival_time: float,
        policy_variant: str | None = None,
    ) -> TraceOutcome:
        if not self._replay_enabled:
            raise BenchmarkEndpointsDisabledError(
                "trace replay is off: it is for benchmarks (enable_benchmark_endpoints)"
            )
        self._check_variant(policy_variant)
        self._requests_received += 1
        return await run_trace(
            self._engine,
            self._vocab_size,
            self._max_model_len,
            request_id,
            script,
            self._call_tool,
            arrival_time,
            policy_variant,
            self._scheduler_estimates or None,  # means and distributions, as in `chat`
            self._call_limit_s(SimulatedApi.name),
            self._holds,
            self._estimates_version,
        )

    def _check_variant(self, label: str | None) -> None:
        # The ingress checks too; this replica's own config is the truth (another caller of
        # the handle, or an ingress built from another config, must not reach the scheduler
        # with a label it does not have).
        if label is None:
            return
        scheduler = self.settings.scheduler
        variants = scheduler.policy_variants if scheduler is not None else {}
        if label not in variants:
            raise UnknownPolicyVariantError(unknown_variant_message(label, list(variants)))

    def stats(self) -> dict[str, Any]:
        snap = self._stats.snapshot
        return {
            "running_requests": snap.running_requests,
            "waiting_requests": snap.waiting_requests,
            "paused_in_tool_calls": self._paused_in_tool_calls,
            "kv_blocks_total": snap.kv_blocks_total,
            "kv_blocks_used": snap.kv_blocks_used,
            "kv_blocks_free": snap.kv_blocks_free,
            "prefix_cache_queries": snap.prefix_cache_queries,
            "prefix_cache_hits": snap.prefix_cache_hits,
            "prompt_tokens": snap.prompt_tokens,
            "generation_tokens": snap.generation_tokens,
            **host_pool_gauges(snap.scheduler),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """What the fleet router (deployments/router.py) places requests by; Serve's controller
        calls it every `request_routing_stats_period_s` and hands the dict to every router.

        KV figures are in bytes (tokens · M, M from the plugin's costs; 1 byte per token on an
        engine without the plugin, so replicas of one deployment still compare). The committed
        memory-time is the plugin's (`scoring.committed_memory_time`: the scores of running and
        waiting requests and the rest of each hold); where it has none (no plugin, or its
        computation failed) it is estimated here: the KV held now plus the waiting requests at
        the running requests' mean size, held for ROUTING_HORIZON_S. Cheap: it reads the last
        snapshot."""
        snap = self._stats.snapshot
        ours = snap.scheduler
        block_size = int(ours.get("block_size") or self.settings.block_size or 16)
        per_token = int((ours.get("costs") or {}).get("kv_bytes_per_token") or 1)
        per_block = block_size * per_token
        in_use = snap.kv_blocks_used * per_block
        swapped = int((ours.get("swap") or {}).get("host_pool_bytes_in_use") or 0)
        paused = int(ours.get("preserved_blocks") or 0) * per_block + swapped
        mean_request = in_use / snap.running_requests if snap.running_requests else 0.0
        waiting = snap.waiting_requests * mean_request  # the KV the queue will take, roughly
        committed = ours.get("committed_memory_time")
        estimated = committed is None
        if estimated:
            committed = (in_use + waiting) * ROUTING_HORIZON_S
        return {
            "stats_time": time.time(),  # wall clock: routers on other nodes compare with theirs
            "replica": self._replica_id,
            # Where the router's choices went (logs, tests); the rule does not read it.
            "requests_received": self._requests_received,
            "kv_bytes_per_token": per_token,
            "kv_capacity_bytes": snap.kv_blocks_total * per_block,
            "kv_in_use_bytes": in_use,
            "kv_paused_bytes": paused,
            "kv_preserved_blocks": int(ours.get("preserved_blocks") or 0),
            "kv_swapped_bytes": swapped,
            "kv_waiting_bytes": waiting,
            "committed_memory_time": committed,
            "committed_estimated": estimated,  # not the plugin's sum of scores (docs/fleet.md)
            "running_requests": snap.running_requests,
            "waiting_requests": snap.waiting_requests,
            "paused_in_tool_calls": self._paused_in_tool_calls,
            "costs": dict(ours.get("costs") or {}),
            # Mean call seconds per tool: the router's forecast of a forced chat call.
            "api_estimates": dict(self._api_estimates),
            "healthy": not self._engine.errored,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (deployments/autoscaling.py): this replica's memory
        pressure, the KV its requests hold or wait for (device cache, host pool, and the waiting
        requests at the running ones' mean size) over its KV capacity."""
        routing = self.record_routing_stats()
        capacity = routing["kv_capacity_bytes"]
        demand = (
            routing["kv_in_use_bytes"] + routing["kv_waiting_bytes"] + routing["kv_swapped_bytes"]
        )
        return {KV_PRESSURE: demand / capacity if capacity else 0.0}

    def metrics_snapshot(self) -> dict[str, Any]:
        """`stats()` labelled with this replica and its model: what `/metrics` shows, asked
        of the replica itself so that it does not depend on Redis."""
        model = self.settings.served_model_name
        return {"replica": self._replica_id, "model": model, **self.stats()}

    def api_estimates(self) -> dict[str, float]:
        """The mean call durations (s) per tool and API type the scheduler is given."""
        return dict(self._api_estimates)

    def length_model_stats(self) -> dict[str, Any]:
        """The output-length model: fitted or not, what it was trained on, what is buffered."""
        lengths = self._lengths
        if lengths is None:
            return {"enabled": False}
        model = lengths.model
        return {
            "enabled": True,
            "fitted": model is not None,
            "trained_on": model.examples if model is not None else 0,
            "buffered": lengths.buffered,
            "new_examples": lengths.new_examples,
            "path": str(self._lengths_path) if self._lengths_path else None,
        }

    async def holds(self) -> dict[str, int]:
        """What the engine holds for paused requests now, and its blocks in use and host-pool
        bytes, read from the engine itself (not the last step's statistics). Empty without
        the scheduler plugin."""
        return await self._holds.snapshot() if self._holds is not None else {}

    def scheduler_stats(self) -> dict[str, Any]:
        """The scheduler plugin's figures: policy, engine costs, strategy counts, held memory."""
        return dict(self._stats.snapshot.scheduler)

    async def measure_costs(self) -> dict[str, Any]:
        """Measure the engine's costs afresh (a warm-up the scheduler times) and return them."""
        await warm_up(self._engine, self._max_model_len, remeasure=True)
        await asyncio.sleep(0.1)  # the last step's statistics reach the stat logger
        return dict(self._stats.snapshot.scheduler.get("costs", {}))

    async def reset_prefix_cache(self) -> bool:
        """Forget cached KV blocks (between benchmark runs, so one cannot help the next)."""
        return await self._engine.reset_prefix_cache()

    async def check_health(self) -> None:
        await self._engine.check_health()

    def _call_limit_s(self, name: str) -> float:
        """The longest a call of tool `name` can last here: its timeout, then the grace this
        replica waits for the worker before failing the call. The scheduler's bound on it."""
        return self._tool_timeouts_s.get(name, DEFAULT_TOOL_TIMEOUT_S) + TOOL_CALL_GRACE_S

    async def _call_tool(
        self, name: str, arguments: dict[str, Any], record_as: str | None
    ) -> ToolResult:
        """Run one call on a tool worker. Never raises: a failed call becomes a failed result
        the model (and the client) sees, so a broken tool cannot lose the request."""
        self._paused_in_tool_calls += 1
        started = datetime.now(UTC)
        t0 = time.monotonic()
        limit_s = self._call_limit_s(name)
        ran = True
        try:
            call = self._tools.call.remote(name, arguments, record_as)
            return await asyncio.wait_for(call, timeout=limit_s)
        except (UnknownToolError, ToolArgumentsError) as exc:
            # The model asked for something the server does not offer: the call never ran.
            error, ran = str(getattr(exc, "cause", None) or exc), False
        except TimeoutError:
            error = f"the tool worker did not answer within {limit_s:g} s"
        except Exception as exc:  # whatever happened to the worker, the request goes on
            logger.warning("tool worker failed on %s: %r", name, exc)
            error = _worker_failure(exc)
        finally:
            self._paused_in_tool_calls -= 1
        result = ToolResult(
            tool=recorded_name(name, record_as),
            ok=False,
            error=error,
            started_at=started,
            duration_s=time.monotonic() - t0,
        )
        if ran and self._tool_stats is not None:
            await self._tool_stats.record(result)  # the worker could not: count it here
        return result

    async def _publish_stats(self, replica_id: str) -> None:
        if self._board is None:
            return
        while True:
            await self._board.publish(replica_id, self.settings.served_model_name, self.stats())
            await asyncio.sleep(1.0)

    async def _refresh_api_estimates(self) -> None:
        """What calls of each tool take (mean and learned distribution), from the tool workers'
        Redis records; it travels to the scheduler with every request
        (RequestMeta.api_estimates)."""
        while True:
            try:
                estimates = await self._tools.estimates.remote()
                self._api_estimates = merge_estimates(self._api_estimates, estimates)
                self._api_durations = merge_distributions(self._api_durations, estimates)
                scheduler_estimates = engine_api_estimates(self._api_estimates, self._api_durations)
                if scheduler_estimates != self._scheduler_estimates:
                    self._scheduler_estimates = scheduler_estimates
                    self._estimates_version += 1
            except Exception as exc:  # Redis or the worker down: keep the last estimates
                logger.warning("cannot refresh tool duration estimates: %s", exc)
            await asyncio.sleep(API_ESTIMATES_REFRESH_S)

    async def _expire_idle_holds(self) -> None:
        """Deadlines on a timer: the plugin checks its holds' deadlines when the engine steps,
        so an idle engine would keep a hold whose continuation never came. While the last
        statistics show holds and nothing running or waiting, ask the engine (a utility call)
        to let go of those past their deadline."""
        while True:
            await asyncio.sleep(HOLD_EXPIRY_CHECK_S)
            snap = self._stats.snapshot
            if not snap.scheduler.get("holds") or snap.running_requests or snap.waiting_requests:
                continue
            try:
                assert self._holds is not None
                await self._holds.expire()
            except Exception:  # the engine is gone: then nothing is held either
                logger.warning("could not ask the engine to expire its holds", exc_info=True)

    async def _refit_lengths(self, config: LengthModelConfig) -> None:
        """Refit the output-length model on what completed segments taught it, off the request
        path (a worker thread), and save it where the config says."""
        lengths = self._lengths
        assert lengths is not None
        while True:
            await asyncio.sleep(config.refit_every_s)
            if lengths.new_examples < config.min_new_examples:
                continue
            try:
                await asyncio.to_thread(lengths.refit)
                if self._lengths_path is not None:  # the buffer too, fitted or not yet
                    await asyncio.to_thread(lengths.save, self._lengths_path)
            except Exception:  # the last model (or the prior) keeps serving
                logger.exception("refitting the output-length model failed")

    def __del__(self) -> None:
        # Serve calls this on shutdown: stop the engine-core process with the replica.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def load_length_predictor(
    config: LengthModelConfig,
) -> tuple[OutputLengthPredictor, Path | None]:
    """The predictor the config names (a fresh one, starting from the prior, when its file does
    not exist yet) and where to save it. A file that cannot be read is left alone: the replica
    starts from the prior and learns in memory only, rather than overwrite it."""
    if config.path is None:
        return OutputLengthPredictor(buffer_size=config.buffer_size), None
    path = Path(config.path)
    if not path.is_absolute():  # relative to the project, as the model folder is
        path = Path(os.environ.get("LAMPS_HOME", os.getcwd())) / path
    if not path.exists():
        return OutputLengthPredictor(buffer_size=config.buffer_size), path
    try:
        return OutputLengthPredictor.load(path, buffer_size=config.buffer_size), path
    except Exception as exc:
        logger.warning("cannot read the output-length model %s (%s); not saving over it", path, exc)
        return OutputLengthPredictor(buffer_size=config.buffer_size), None


def _worker_failure(exc: Exception) -> str:
    """What the model and the client read when the worker, not the tool, failed: short, no
    Ray traceback."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        return f"the tool worker failed: {type(cause).__name__}: {str(cause)[:200]}"
    if isinstance(exc, RayActorError):
        return f"the tool worker was lost during the call ({type(exc).__name__})"
    return f"the tool worker is unavailable ({type(exc).__name__})"


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RuntimeError:  # constructed outside Serve (tests of the class itself)
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
