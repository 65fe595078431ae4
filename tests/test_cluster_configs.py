"""Every config in cluster/ is one its tool accepts, names an application our builder takes, routes
engine requests with a router that accepts its settings, and runs Redis with a password and
persistence, reachable from the cluster only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve._private.utils import import_attr
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import RequestRouter
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs
from deployments.router import MemoryAwareRouter

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    configs = [(p.name, yaml.safe_load(p.read_text())) for p in CLUSTER.glob("serve-*.yaml")]
    for doc in yaml.safe_load_all((CLUSTER / "kuberay-rayservice.yaml").read_text()):
        if doc["kind"] == "RayService":
            configs.append(("kuberay serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return configs


@pytest.mark.parametrize(
    ("name", "config"), serve_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_serve_config_deploys_our_app(name: str, config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    assert app.import_path == "deployments.app:build_app"
    AppArgs.model_validate(app.args)
    deployment_names = {d.name for d in app.deployments}
    assert deployment_names <= {"EngineReplica", "Ingress", "ToolWorker"}
    for deployment in app.deployments:
        if isinstance(deployment.request_router_config, dict):
            check_router_settings(deployment.name, deployment.request_router_config)


def check_router_settings(deployment: str, settings: dict[str, Any]) -> None:
    """What Serve does with `request_router_config` when it deploys: Ray's own model, the class
    imported by its path, `initialize_state(**request_router_kwargs)` on a real instance."""
    config = RequestRouterConfig.model_validate(settings)
    assert isinstance(config.request_router_class, str)
    router_class = import_attr(config.request_router_class)
    assert issubclass(router_class, RequestRouter)
    router = router_class(DeploymentID(deployment, "lamps"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**config.request_router_kwargs)


FLEET_CONFIGS = ["serve-gpu.yaml", "kuberay serveConfigV2"]


@pytest.mark.parametrize("name", FLEET_CONFIGS)
def test_gpu_configs_route_engine_requests_by_memory(name: str) -> None:
    config = dict(serve_configs())[name]
    [app] = config["applications"]
    [engine] = [d for d in app["deployments"] if d["name"] == "EngineReplica"]
    router = engine["request_router_config"]
    assert import_attr(router["request_router_class"]) is MemoryAwareRouter
    # Stats older than a second make the router lean on its own counts for too long.
    assert router["request_routing_stats_period_s"] <= 1.0
    assert AppArgs.model_validate(app["args"]).max_routing_wait_s is not None  # 429, not forever


def test_router_settings_that_the_router_refuses_fail_the_check() -> None:
    good = {"request_router_class": "deployments.router.MemoryAwareRouter"}
    check_router_settings("EngineReplica", good)
    for kwargs in ({"max_backlog_s": 0}, {"affinity_margin_s": -1}, {"max_backlog": 30}):
        with pytest.raises(ValueError, match="MemoryAwareRouter options"):
            check_router_settings("EngineReplica", {**good, "request_router_kwargs": kwargs})
    with pytest.raises((ImportError, AttributeError)):
        check_router_settings("EngineReplica", {"request_router_class": "deployments.router.Nope"})


def test_kuberay_runs_the_same_application_as_serve_gpu() -> None:
    configs = dict(serve_configs())
    assert configs["kuberay serveConfigV2"] == configs["serve-gpu.yaml"]


def test_ray_up_deploys_serve_gpu_with_the_heads_redis() -> None:
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    [deploy] = [c for c in config["head_start_ray_commands"] if "serve run" in c]
    assert "~/lamps/cluster/serve-gpu.yaml" in deploy
    assert "redis://lamps-redis:6379/0#redis://$(hostname -I" in deploy
    assert "--non-blocking" in deploy
    # After `ray start`: the application needs the running cluster.
    commands = config["head_start_ray_commands"]
    assert commands.index(deploy) > max(i for i, c in enumerate(commands) if "ray start" in c)


def test_cluster_launcher_config_is_valid() -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()), schema)


def test_cluster_redis_is_private_persistent_and_keyed() -> None:
    """`ray up`: Redis bound to the head's private address and loopback (never 0.0.0.0), with
    a password that Ray and our replicas are given, an append-only file; the API keys reach the
    ingress from the environment (serve-gpu.yaml binds HTTP to 0.0.0.0)."""
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    [redis] = [c for c in config["head_start_ray_commands"] if c.startswith("redis-server")]
    assert "0.0.0.0" not in redis and '--bind "$(hostname -I' in redis
    assert "--requirepass" in redis and "--appendonly yes" in redis
    [head] = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    [worker] = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert "--redis-password=" in head
    for command in (head, worker):
        for env in ("LAMPS_REDIS_PASSWORD=", "LAMPS_API_KEYS=", "LAMPS_ADMIN_API_KEYS="):
            assert env in command
    assert "~/.lamps-redis-password" in config["file_mounts"].values()


def test_kuberay_redis_is_private_persistent_and_keyed() -> None:
    text = (CLUSTER / "kuberay-rayservice.yaml").read_text()
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    [redis] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == "lamps-redis-data"
    assert docs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"] == {"app": "lamps-redis"}
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    assert "secretKeyRef" in cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        [container] = pod["template"]["spec"]["containers"]
        names = {e["name"] for e in container["env"]}
        assert {"LAMPS_REDIS_PASSWORD", "LAMPS_API_KEYS", "LAMPS_ADMIN_API_KEYS"} <= names


def test_benchmark_endpoints_are_on_in_the_bench_configs_only() -> None:
    """Trace replay and the simulated API let a client script the engine's work and the call
    durations the scheduler learns: only `lamps bench`'s configs turn them on. Every other
    config says so explicitly (the default is off too)."""
    for name, config in serve_configs():
        [app] = config["applications"]
        args = AppArgs.model_validate(app["args"])
        bench = name.startswith("serve-bench-")
        assert args.enable_benchmark_endpoints is bench, name
        assert "enable_benchmark_endpoints" in app["args"], name
        assert args.ingress_settings().enable_benchmark_endpoints is bench
        assert args.tool_worker_options()["simulated_api"] is bench
        assert ("simulated_api" in args.tool_timeouts()) is bench
    engine = {"model": "m", "served_model_name": "m"}
    assert AppArgs.model_validate({"engine": engine}).enable_benchmark_endpoints is False
