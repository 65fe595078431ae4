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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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
    enable_benchmark_endpoints: bool = Field(
        default=False,
        description="Trace replay (POST /v1/traces, the handle's `replay`) and the "
        "simulated_api tool: what `lamps bench` drives. Off, /v1/traces is 404 and "
        "simulated_api is not a tool of this server: a client could otherwise make the "
        "engine run scripted work of its choosing and the scheduler learn durations it made up.",
    )

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _strong_keys(cls, keys: list[str]) -> list[str]:
        return checked_keys(keys, "api keys")

    @model_validator(mode="after")
    def _default_max_tokens_fits(self) -> AppArgs:
        # A request's max_tokens must leave room for a prompt (HTTP 400 otherwise): the
        # server's own default must too, or every request that gives none would be refused.
        if self.default_max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be below "
                f"engine.max_model_len ({self.engine.max_model_len})"
            )
        return self

    def tool_timeouts(self) -> dict[str, float]:
        """Each tool's call limit; an unknown tool name or a bad CIDR fails here, at deploy."""
        return default_registry(
            self.http_allowlist,
            self.max_simulated_duration_s,
            http_allow_ips=self.http_allow_ips,
            tool_timeout_s=self.tool_timeout_s,
            tool_timeouts_s=self.tool_timeouts_s,
            simulated_api=self.enable_benchmark_endpoints,
        ).timeouts()

    def tool_worker_options(self) -> dict[str, Any]:
        """The ToolWorker's arguments after `redis_url` (its registry, as `tool_timeouts`)."""
        return {
            "http_allowlist": self.http_allowlist,
            "max_simulated_duration_s": self.max_simulated_duration_s,
            "http_allow_ips": self.http_allow_ips,
            "tool_timeout_s": self.tool_timeout_s,
            "tool_timeouts_s": self.tool_timeouts_s,
            "simulated_api": self.enable_benchmark_endpoints,
        }

    def ingress_settings(self) -> IngressSettings:
        engine = self.engine
        return IngressSettings(
            served_model_name=engine.served_model_name,
            max_model_len=engine.max_model_len,
            default_max_tokens=self.default_max_tokens,
            default_max_tool_calls=self.default_max_tool_calls,
            max_tool_calls_limit=self.max_tool_calls_limit,
            policy_variants=list(engine.scheduler.policy_variants) if engine.scheduler else [],
            max_body_bytes=self.max_body_bytes,
            max_in_flight_requests=self.max_in_flight_requests,
            max_routing_wait_s=self.max_routing_wait_s,
            api_keys=ApiKeys.from_keys(self.api_keys, self.admin_api_keys),
            enable_benchmark_endpoints=self.enable_benchmark_endpoints,
        )


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
    ).bind(redis_url, **app_args.tool_worker_options())

    engine_replica = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        # The engine batches internally; admit enough to keep its batch full.
        max_ongoing_requests=4 * engine.max_num_seqs,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(
        engine.model_dump(mode="json"),
        tool_worker,
        redis_url,
        tool_timeouts_s,
        replay_enabled=app_args.enable_benchmark_endpoints,
    )

    ingress_settings = app_args.ingress_settings()
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
