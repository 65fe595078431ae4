"""The memory-pressure scaling rule, and Serve's wrapper applying bounds and delays to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import KV_PRESSURE, MemoryPressurePolicy
from lamps_core.autoscaling import replicas_for_memory


def test_replicas_follow_mean_pressure_over_target() -> None:
    assert replicas_for_memory([0.9, 0.9], 2, 0.6) == pytest.approx(3.0)  # grow
    assert replicas_for_memory([0.1, 0.2], 2, 0.6) == pytest.approx(0.5)  # shrink
    assert replicas_for_memory([], 3, 0.6) == 3.0  # nothing reported: stay
    with pytest.raises(ValueError):
        replicas_for_memory([0.5], 1, 1.5)


def context(pressures: list[float | None], current: int, config: AutoscalingConfig) -> Any:
    deployment = DeploymentID(name="EngineReplica", app_name="lamps")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(current)]
    reported = {r: p for r, p in zip(replicas, pressures, strict=True) if p is not None}
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name="EngineReplica",
        app_name="lamps",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=replicas,
        total_num_requests=1.0,  # Serve's own signal says nothing is happening
        total_queued_requests=0.0,
        aggregated_metrics={KV_PRESSURE: reported},
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_serve_scales_up_on_memory_while_requests_are_few() -> None:
    config = AutoscalingConfig(
        min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0
    )
    policy = _apply_autoscaling_config(MemoryPressurePolicy(target_pressure=0.6))
    # One ongoing request to Serve's count, but both caches are 90 % held: a third replica.
    replicas, _ = policy(context([0.9, 0.9], 2, config))
    assert replicas == 3
    # A replica that has not reported yet (just started) adds no demand: 0.9 / 0.6, two.
    replicas, _ = policy(context([0.9, None], 2, config))
    assert replicas == 2
    # Demand gone: one replica. (Serve's deployment state clips to min/max_replicas after.)
    assert policy(context([0.05, 0.05], 2, config))[0] == 1


@pytest.mark.parametrize("config", ["serve-gpu.yaml", "kuberay-rayservice.yaml"])
def test_shipped_configs_scale_engines_on_memory(config: str) -> None:
    text = (Path(__file__).resolve().parent.parent / "cluster" / config).read_text()
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    loaded = next((doc for doc in docs if doc.get("kind") == "RayService"), docs[0])
    if "spec" in loaded:  # the RayService embeds the Serve config as text
        loaded = yaml.safe_load(loaded["spec"]["serveConfigV2"])
    deployments = loaded["applications"][0]["deployments"]
    engine = next(d for d in deployments if d["name"] == "EngineReplica")
    autoscaling = AutoscalingConfig.model_validate(engine["autoscaling_config"])
    policy = autoscaling.policy
    assert policy.policy_function == "deployments.autoscaling.MemoryPressurePolicy"
    built = MemoryPressurePolicy(**policy.policy_kwargs)
    assert 0 < built.target_pressure <= 1
