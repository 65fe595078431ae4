"""Where `lamps bench` sends its requests: through the real Serve deployment (a local stack from
a Serve config), or straight into an engine in this process (a GPU machine without Ray).
Both run the same trace-replay code in front of the same engine and scheduler plugin.

The policies a run compares are the engine's policy variants, written into its config before it
starts (`with_policy_variants`); a request names its variant by label, nothing more."""

from __future__ import annotations

import contextlib
import copy
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from deployments.api_models import ChatResponse, TraceResponse
from lamps.bench_sessions import play_conversation
from lamps_core.call_durations import ApiEstimate
from lamps_core.trace import TraceScript
from lamps_vllm.config import PolicyVariant, SchedulerPluginConfig
from lamps_vllm.engine import EngineSettings, start_engine
from lamps_vllm.holds import HoldControl
from lamps_vllm.trace_replay import run_trace
from tool_workers.stats import (
    API_ESTIMATES_REFRESH_S,
    DEFAULT_MAX_SAMPLES,
    ToolDurationEstimate,
    engine_api_estimates,
    merge_distributions,
    merge_estimates,
)
from tool_workers.tools import ToolResult
from tool_workers.worker import ToolWorker


class ReplayTarget(Protocol):
    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse: ...

    async def reset_prefix_cache(self) -> bool | None: ...

    async def scheduler_stats(self) -> dict[str, Any]: ...

    # Optional, sampled by steady runs where a target has it (`lamps.bench.engine_state`):
    # `engine_stats()`, the engine's queue and KV use now (`waiting`, `running`,
    # `kv_blocks_used`, `kv_blocks_total`, `preserved_blocks` where known), None where the
    # target cannot say (a fleet).


class LearnedDurations:
    """Call durations learned in this process, as an engine replica learns them from the tool
    workers' Redis records: the last `DEFAULT_MAX_SAMPLES` per recorded name, summarised the
    same way (`ToolDurationEstimate.from_samples`, `engine_api_estimates`) and refreshed every
    `API_ESTIMATES_REFRESH_S`. The engine-only target has no Redis; without this its
    `estimates` predictor would know no duration at all (every call the 1-s default)."""

    def __init__(
        self,
        timeouts: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._samples: dict[str, deque[float]] = {}
        self._timeouts = dict(timeouts or {})  # per recorded name, as the worker's records
        self._clock = clock
        self._estimates: dict[str, ApiEstimate] = {}
        self._refreshed_at: float | None = None
        self.version = 0  # raised at every change, as the replica's (RequestMeta's)

    def record(self, result: ToolResult) -> None:
        samples = self._samples.setdefault(result.tool, deque(maxlen=DEFAULT_MAX_SAMPLES))
        samples.appendleft(result.duration_s)  # newest first, as Redis keeps them

    def estimates(self) -> dict[str, ApiEstimate] | None:
        """What a replay sends the scheduler (`RequestMeta.api_estimates`); None before any."""
        now = self._clock()
        if self._refreshed_at is None or now - self._refreshed_at >= API_ESTIMATES_REFRESH_S:
            learned = {
                name: ToolDurationEstimate.from_samples(
                    name, list(samples), self._timeouts.get(name)
                )
                for name, samples in self._samples.items()
            }
            estimates = engine_api_estimates(
                merge_estimates({}, learned), merge_distributions({}, learned)
            )
            if estimates != self._estimates:
                self._estimates = estimates
                self.version += 1
            self._refreshed_at = now
        return self._estimates or None


class EngineTarget:
    """An engine in this process; tool calls go to an in-process tool worker (no Redis), whose
    call durations are learned here (`LearnedDurations`)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._tools = ToolWorker(redis_url=None)
        self.durations = LearnedDurations(self._tools.timeouts_by_recorded_name())

    async def start(self) -> None:
        self._engine, self._stats = await start_engine(self.settings)
        self._vocab = self._engine.model_config.get_vocab_size()
        self._holds = HoldControl(self._engine) if self.settings.scheduler is not None else None

    async def _call_tool(
        self, name: str, arguments: Mapping[str, Any] | str, record_as: str | None = None
    ) -> ToolResult:
        result = await self._tools.call(name, arguments, record_as)
        self.durations.record(result)
        return result

    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse:
        outcome = await run_trace(
            self._engine,
            self._vocab,
            self.settings.max_model_len,
            request_id,
            script,
            self._call_tool,
            policy_variant=variant,
            api_estimates=self.durations.estimates(),
            holds=self._holds,
            api_estimates_version=self.durations.version,
        )
        return TraceResponse.from_outcome(outcome, self.settings.served_model_name)

    async def reset_prefix_cache(self) -> bool:
        """False while blocks are in use (vLLM then leaves the cache as it is)."""
        return bool(await self._engine.reset_prefix_cache())

    async def scheduler_stats(self) -> dict[str, Any]:
        snapshot = self._stats.snapshot
        # vLLM's own preemption count where no plugin reports one (the stock control).
        return {"preemptions": snapshot.preemptions, **snapshot.scheduler}

    async def engine_stats(self) -> dict[str, Any]:
        """The last step's figures, as the replica's `stats()` reports them (no copy, no call)."""
        snap = self._stats.snapshot
        return {
            "waiting": snap.waiting_requests,
            "running": snap.running_requests,
            "kv_blocks_used": snap.kv_blocks_used,
            "kv_blocks_total": snap.kv_blocks_total,
            "preserved_blocks": snap.scheduler.get("preserved_blocks"),
        }

    def close(self) -> None:
        self._engine.shutdown()


class DeploymentTarget:
    """The application of a Serve config, deployed by a local stack: requests go through the
    ingress's Python handle, the engine replica is asked for its scheduler's figures. With
    `sessions`, each script is played as a conversation of chat turns (lamps/bench_sessions.py),
    under the engine's own policy: a chat request names no variant."""

    def __init__(self, app_name: str = "lamps", sessions: bool = False) -> None:
        from ray import serve  # not needed (nor installed) where only EngineTarget runs

        self._ingress = serve.get_app_handle(app_name)
        self._engine = serve.get_deployment_handle("EngineReplica", app_name)
        self._sessions = sessions

    async def chat(self, request: dict[str, Any]) -> ChatResponse:
        return await self._ingress.chat.remote(request)

    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse:
        if self._sessions:
            return await play_conversation(self, request_id, script)
        # `request_id` travels as the client's id only; the server gives the request its own.
        request = {"request_id": request_id, "segments": script.segments, "policy": variant}
        return await self._ingress.replay.remote(request)

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._engine.reset_prefix_cache.remote())

    async def scheduler_stats(self) -> dict[str, Any]:
        return await self._engine.scheduler_stats.remote()

    async def engine_stats(self) -> dict[str, Any] | None:
        """The engine replica's `stats()` (queue, running requests, KV blocks), renamed as
        `EngineTarget.engine_stats` has them."""
        stats = await self._engine.stats.remote()
        return {
            "waiting": stats.get("waiting_requests", 0),
            "running": stats.get("running_requests", 0),
            "kv_blocks_used": stats.get("kv_blocks_used", 0),
            "kv_blocks_total": stats.get("kv_blocks_total", 0),
        }


class FleetTarget(DeploymentTarget):
    """The application with several engine replicas behind a router (`lamps bench --router`):
    every request asks for policy variant `variant` (the run's label is the router's). The
    replicas cannot be addressed one by one through a handle, so a fleet run reports no scheduler
    counters (one replica's would pass for all) and resets no prefix cache: request ids, and so
    prompts, are new in every run anyway."""

    def __init__(self, variant: str, app_name: str = "lamps", sessions: bool = False) -> None:
        super().__init__(app_name, sessions)
        self._variant = variant

    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse:
        return await super().replay(request_id, script, self._variant)

    async def reset_prefix_cache(self) -> None:
        return None

    async def scheduler_stats(self) -> dict[str, Any]:
        return {}

    async def engine_stats(self) -> dict[str, Any] | None:
        return None  # one replica's figures would pass for the fleet's


@contextlib.asynccontextmanager
async def engine_target(settings: EngineSettings) -> AsyncIterator[EngineTarget]:
    target = EngineTarget(settings)
    await target.start()
    try:
        yield target
    finally:
        target.close()


def bench_engine_settings(config: dict[str, Any], project_dir: Path) -> EngineSettings:
    """The engine settings of a Serve config's (first) application, model path resolved."""
    engine = dict(config["applications"][0]["args"]["engine"])
    model = Path(engine["model"])
    engine["model"] = model if model.is_absolute() else project_dir / model
    try:
        return EngineSettings.model_validate(engine)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"engine settings: {problems}") from None


def with_engine_settings(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of a Serve config whose (first) application's engine has each `KEY=VALUE` of
    `overrides` set (the value read as YAML): `lamps bench --engine-setting`. Only fields of
    `EngineSettings` are accepted; its validation then checks the values."""
    config = copy.deepcopy(config)
    engine = config["applications"][0]["args"]["engine"]
    for item in overrides:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise SystemExit(f"--engine-setting {item!r}: expected KEY=VALUE")
        if key not in EngineSettings.model_fields:
            raise SystemExit(f"--engine-setting {item!r}: {key!r} is not an engine setting")
        try:
            engine[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SystemExit(f"--engine-setting {item!r}: the value is not YAML") from None
    return config


def with_policy_variants(
    config: dict[str, Any],
    variants: Mapping[str, PolicyVariant | dict[str, Any]],
    default: PolicyVariant | None = None,
) -> dict[str, Any]:
    """A copy of a Serve config whose (first) application's engine has `variants` as its policy
    variants, validated: what a run must set before the engine or the Serve stack starts, since
    an engine builds its policies at start-up only. With `default`, that policy also becomes the
    engine's own, for requests that name no variant (chat turns: `lamps bench --sessions`)."""
    config = copy.deepcopy(config)
    engine = config["applications"][0]["args"]["engine"]
    if "scheduler" in engine and engine["scheduler"] is None:
        raise SystemExit("this config runs vLLM's own scheduler: it has no policies to compare")
    scheduler = dict(engine.get("scheduler") or {})
    scheduler["policy_variants"] = {
        label: v.model_dump() if isinstance(v, PolicyVariant) else dict(v)
        for label, v in variants.items()
    }
    if default is not None:
        scheduler["policy"] = default.policy
        scheduler["policy_options"] = dict(default.policy_options)
    try:
        SchedulerPluginConfig.model_validate(scheduler)
    except ValidationError as exc:
        raise SystemExit(f"policies: {exc}") from None
    engine["scheduler"] = scheduler
    return config


# The routers a fleet run (`lamps bench --router`) can compare, as Serve's request_router_config
# names them. Ray 2.60's others need what our replicas lack: the capacity-queue router a
# CapacityQueue deployment of its own, Ray Serve LLM's prefix-aware and KV-aware routers the
# `ray[llm]` extras (pyarrow) and vLLM's KV events. `hash` (Serve's consistent-hash router) keys
# on Serve's session id: a chat turn's is its conversation's key (the ingress sets it), so it
# keeps conversations together; a trace has none, and it hashes a fresh id: uniform placement.
ROUTERS: dict[str, dict[str, Any]] = {
    "memory": {
        "request_router_class": "deployments.router.MemoryAwareRouter",
        "request_routing_stats_period_s": 0.5,
    },
    "pow2": {
        "request_router_class": (
            "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter"
        ),
    },
    "round-robin": {
        "request_router_class": "ray.serve.experimental.round_robin_router.RoundRobinRouter",
    },
    "hash": {
        "request_router_class": (
            "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
        ),
    },
}


def parse_routers(text: str) -> list[str]:
    routers = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(routers) - set(ROUTERS))
    if unknown or not routers:
        raise SystemExit(
            f"unknown router(s) {', '.join(unknown) or '(none)'}; known: {', '.join(ROUTERS)}"
        )
    return routers


def with_fleet(config: dict[str, Any], replicas: int, router: str) -> dict[str, Any]:
    """A copy of a Serve config whose engine deployment runs `replicas` replicas behind
    `router` (one of `ROUTERS`), sharing the CPUs the config gave its one replica (a CPU
    machine runs them all; on GPUs the replicas' `num_gpus` is what places them)."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    deployments = app.setdefault("deployments", [])
    engine = next((d for d in deployments if d.get("name") == "EngineReplica"), None)
    if engine is None:
        engine = {"name": "EngineReplica"}
        deployments.append(engine)
    engine.pop("autoscaling_config", None)
    engine["num_replicas"] = replicas
    actor = dict(engine.get("ray_actor_options") or {})
    actor["num_cpus"] = float(actor.get("num_cpus", 1)) / replicas
    engine["ray_actor_options"] = actor
    engine["request_router_config"] = dict(ROUTERS[router])
    return config
