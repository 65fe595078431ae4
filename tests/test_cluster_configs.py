"""Every config in cluster/ is one its tool accepts, names an application our builder takes, and
runs Redis with a password and persistence, reachable from the cluster only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs

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
    assert "0.0.0.0" not in redis and "--bind \"$(hostname -I" in redis
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
