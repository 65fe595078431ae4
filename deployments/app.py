"""The application a Serve config names (`import_path: deployments.app:build_app`): an ingress in
front of engine replicas, which hand tool calls to tool workers.

Per-deployment resources, replica counts and autoscaling are defaults here; a Serve config's
`deployments:` section overrides them by deployment name, as with any Serve application.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application

from deployments.access import ApiKeys, checked_keys
from deployments.engine_replica import EngineReplica
from deployments.ingress import Ingress, IngressSettings
from lamps_vllm.engine import EngineSettings
from tool_workers.registry import default_registry
from tool_workers.worker import ToolWorker

REDIS_PASSWORD_ENV = "LAMPS_REDIS_PASSWORD"

PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AppArgs(BaseModel):
    """The `args:` of the application in a Serve config."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineSettings
    redis_url: str | None = Field(
        default=None, description="Tool statistics and metrics store; none: nothing recorded."
    )
    http_allowlist: list[str] = Field(default_factory=list, description="Hosts http_get may reach.")
    http_allow_ips: list[str] = Field(
        default_factory=list,
        description="CIDRs http_get may connect to although not public (loopback, private...).",
    )
    tool_timeout_s: PositiveSeconds | None = Field(
        default=None, description="Every tool call's limit; none: each tool's own."
    )
    tool_timeouts_s: dict[str, PositiveSeconds] = Field(
        default_factory=dict, description="Per-tool limits, over `tool_timeout_s`."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys for every HTTP route but /health (and LAMPS_API_KEYS); none: "
        "open, allowed only on a loopback HTTP host.",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys for /v1/admin/... (and LAMPS_ADMIN_API_KEYS); none: those "
        "routes are off.",
    )
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
    max_routing_wait_s: PositiveSeconds | None = Field(
        default=None,
        description="Longest a request waits at Serve's router for an engine replica (every "
        "one full: the fleet router backs off, or all queues are at max_ongoing_requests), "
        "then 429; none: as long as it takes.",
    )

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _strong_keys(cls, keys: list[str]) -> list[str]:
        return checked_keys(keys, "api keys")

    def tool_timeouts(self) -> dict[str, float]:
        """Each tool's call limit; an unknown tool name or a bad CIDR fails here, at deploy."""
        return default_registry(
            self.http_allowlist,
            self.max_simulated_duration_s,
            http_allow_ips=self.http_allow_ips,
            tool_timeout_s=self.tool_timeout_s,
            tool_timeouts_s=self.tool_timeouts_s,
        ).timeouts()


def build_app(args: dict[str, Any]) -> Application:
    app_args = AppArgs.model_validate(args)
    engine = app_args.engine.model_copy(update={"model": _resolve(app_args.engine.model)})
    redis_url = with_redis_password(app_args.redis_url, os.environ.get(REDIS_PASSWORD_ENV))
    tool_timeouts_s = app_args.tool_timeouts()

    tool_worker = serve.deployment(
        ToolWorker,
        name="ToolWorker",
        # Calls mostly wait (on a remote API or a simulated duration): many fit one replica.
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(
        redis_url,
        app_args.http_allowlist,
        app_args.max_simulated_duration_s,
        http_allow_ips=app_args.http_allow_ips,
        tool_timeout_s=app_args.tool_timeout_s,
        tool_timeouts_s=app_args.tool_timeouts_s,
    )

    engine_replica = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        # The engine batches internally; admit enough to keep its batch full.
        max_ongoing_requests=4 * engine.max_num_seqs,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(engine.model_dump(mode="json"), tool_worker, redis_url, tool_timeouts_s)

    ingress_settings = IngressSettings(
        served_model_name=engine.served_model_name,
        max_model_len=engine.max_model_len,
        default_max_tokens=app_args.default_max_tokens,
        default_max_tool_calls=app_args.default_max_tool_calls,
        max_tool_calls_limit=app_args.max_tool_calls_limit,
        policy_variants=list(engine.scheduler.policy_variants) if engine.scheduler else [],
        max_body_bytes=app_args.max_body_bytes,
        max_in_flight_requests=app_args.max_in_flight_requests,
        max_routing_wait_s=app_args.max_routing_wait_s,
        api_keys=ApiKeys.from_keys(app_args.api_keys, app_args.admin_api_keys),
    )
    return serve.deployment(
        Ingress,
        name="Ingress",
        # Well above the in-flight limit: requests past it must reach the ingress to get a
        # quick 429, not wait in Serve's queue in front of it.
        max_ongoing_requests=max(1000, 4 * app_args.max_in_flight_requests),
        ray_actor_options={"num_cpus": 0.1},
    ).bind(engine_replica, tool_worker, ingress_settings.model_dump(mode="json"), redis_url)


def with_redis_password(url: str | None, password: str | None) -> str | None:
    """`url` with `password` in it, unless it has one already: the configs name the Redis
    host, the password comes from the environment (a secret, not a config file)."""
    if url is None or not password:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def _resolve(path: Path) -> Path:
    # Relative model paths in a config are relative to the project (LAMPS_HOME), wherever
    # Serve happens to run the builder.
    if path.is_absolute():
        return path
    return Path(os.environ.get("LAMPS_HOME", os.getcwd())) / path
