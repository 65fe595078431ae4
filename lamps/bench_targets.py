"""Where `lamps bench` sends its requests: through the real Serve deployment (a local stack from
a Serve config), or straight into an engine in this process (a GPU machine without Ray).
Both run the same trace-replay code in front of the same engine and scheduler plugin.

The policies a run compares are the engine's policy variants, written into its config before it
starts (`with_policy_variants`); a request names its variant by label, nothing more."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from deployments.api_models import TraceResponse
from lamps_core.trace import TraceScript
from lamps_vllm.config import PolicyVariant, SchedulerPluginConfig
from lamps_vllm.engine import EngineSettings, start_engine
from lamps_vllm.trace_replay import run_trace
from tool_workers.worker import ToolWorker


class ReplayTarget(Protocol):
    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse: ...

    async def reset_prefix_cache(self) -> None: ...

    async def scheduler_stats(self) -> dict[str, Any]: ...


class EngineTarget:
    """An engine in this process; tool calls go to an in-process tool worker (no Redis)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._tools = ToolWorker(redis_url=None)

    async def start(self) -> None:
        self._engine, self._stats = await start_engine(self.settings)
        self._vocab = self._engine.model_config.get_vocab_size()

    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse:
        outcome = await run_trace(
            self._engine,
            self._vocab,
            self.settings.max_model_len,
            request_id,
            script,
            self._tools.call,
            policy_variant=variant,
        )
        return TraceResponse.from_outcome(outcome, self.settings.served_model_name)

    async def reset_prefix_cache(self) -> None:
        await self._engine.reset_prefix_cache()

    async def scheduler_stats(self) -> dict[str, Any]:
        snapshot = self._stats.snapshot
        # vLLM's own preemption count where no plugin reports one (the stock control).
        return {"preemptions": snapshot.preemptions, **snapshot.scheduler}

    def close(self) -> None:
        self._engine.shutdown()


class DeploymentTarget:
    """The application of a Serve config, deployed by a local stack: requests go through the
    ingress's Python handle, the engine replica is asked for its scheduler's figures."""

    def __init__(self, app_name: str = "lamps") -> None:
        from ray import serve  # not needed (nor installed) where only EngineTarget runs

        self._ingress = serve.get_app_handle(app_name)
        self._engine = serve.get_deployment_handle("EngineReplica", app_name)

    async def replay(
        self, request_id: str, script: TraceScript, variant: str | None
    ) -> TraceResponse:
        # `request_id` travels as the client's id only; the server gives the request its own.
        request = {"request_id": request_id, "segments": script.segments, "policy": variant}
        return await self._ingress.replay.remote(request)

    async def reset_prefix_cache(self) -> None:
        await self._engine.reset_prefix_cache.remote()

    async def scheduler_stats(self) -> dict[str, Any]:
        return await self._engine.scheduler_stats.remote()


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
    return EngineSettings.model_validate(engine)


def with_policy_variants(
    config: dict[str, Any], variants: Mapping[str, PolicyVariant | dict[str, Any]]
) -> dict[str, Any]:
    """A copy of a Serve config whose (first) application's engine has `variants` as its policy
    variants, validated: what a run must set before the engine or the Serve stack starts, since
    an engine builds its policies at start-up only."""
    config = copy.deepcopy(config)
    engine = config["applications"][0]["args"]["engine"]
    if "scheduler" in engine and engine["scheduler"] is None:
        raise SystemExit("this config runs vLLM's own scheduler: it has no policies to compare")
    scheduler = dict(engine.get("scheduler") or {})
    scheduler["policy_variants"] = {
        label: v.model_dump() if isinstance(v, PolicyVariant) else dict(v)
        for label, v in variants.items()
    }
    try:
        SchedulerPluginConfig.model_validate(scheduler)
    except ValidationError as exc:
        raise SystemExit(f"policies: {exc}") from None
    engine["scheduler"] = scheduler
    return config
