"""Every config in cluster/ is one its tool accepts, and names an application our builder takes."""

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
