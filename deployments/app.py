"""The application a Serve config names (`import_path: deployments.app:build_app`): an ingress in
front of engine replicas, which hand tool calls to tool workers.

Per-deployment resources, replica counts and autoscaling are defaults here; a Serve config's
`deployments:` section overrides them by deployment name, as with any Serve application.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from deployments.engine_replica import EngineReplica
from deployments.ingress import Ingress, IngressSettings
from lamps_vllm.engine import EngineSettings
from tool_workers.worker import ToolWorker


class AppArgs(BaseModel):
    """The `args:` of the application in a Serve config."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineSettings
    redis_url: str | None = Field(
        default=None, description="Tool statistics and metrics store; none: nothing recorded."
    )
    http_allowlist: list[str] = Field(default_factory=list, description="Hosts http_get may reach.")
    max_simulated_duration_s: float = Field(default=600.0, gt=0)
    default_max_tokens: int = Field(default=256, ge=1)
    default_max_tool_calls: int = Field(default=4, ge=0)
    max_tool_calls_limit: int = Field(default=32, ge=0)
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Larger HTTP request bodies get 413, unread."
    )
    max_in_flight_requests: int = Field(
        default=256,
        ge=1,
        description="Chat and trace requests an ingress replica runs at once; more get 429.",
    )


def build_app(args: dict[str, Any]) -> Application:
    app_args = AppArgs.model_validate(args)
    engine = app_args.engine.model_copy(update={"model": _resolve(app_args.engine.model)})
    redis_url = app_args.redis_url

    tool_worker = serve.deployment(
        ToolWorker,
        name="ToolWorker",
        # Calls mostly wait (on a remote API or a simulated duration): many fit one replica.
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(redis_url, app_args.http_allowlist, app_args.max_simulated_duration_s)

    engine_replica = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        # The engine batches internally; admit enough to keep its batch full.
        max_ongoing_requests=4 * engine.max_num_seqs,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(engine.model_dump(mode="json"), tool_worker, redis_url)

    ingress_settings = IngressSettings(
        served_model_name=engine.served_model_name,
        max_model_len=engine.max_model_len,
        default_max_tokens=app_args.default_max_tokens,
        default_max_tool_calls=app_args.default_max_tool_calls,
        max_tool_calls_limit=app_args.max_tool_calls_limit,
        policy_variants=list(engine.scheduler.policy_variants) if engine.scheduler else [],
        max_body_bytes=app_args.max_body_bytes,
        max_in_flight_requests=app_args.max_in_flight_requests,
    )
    return serve.deployment(
        Ingress,
        name="Ingress",
        # Well above the in-flight limit: requests past it must reach the ingress to get a
        # quick 429, not wait in Serve's queue in front of it.
        max_ongoing_requests=max(1000, 4 * app_args.max_in_flight_requests),
        ray_actor_options={"num_cpus": 0.1},
    ).bind(engine_replica, tool_worker, ingress_settings.model_dump(), redis_url)


def _resolve(path: Path) -> Path:
    # Relative model paths in a config are relative to the project (LAMPS_HOME), wherever
    # Serve happens to run the builder.
    if path.is_absolute():
        return path
    return Path(os.environ.get("LAMPS_HOME", os.getcwd())) / path
