"""Serve's custom autoscaling (Serve 2.60 `AutoscalingPolicy`) for the engine replicas: scale on
memory pressure (`lamps_core.autoscaling`), not on ongoing requests.

In a Serve config::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      upscale_delay_s: 30
      downscale_delay_s: 300
      policy:
        policy_function: deployments.autoscaling.MemoryPressurePolicy
        policy_kwargs: {target_pressure: 0.7}
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

from lamps_core.autoscaling import DEFAULT_TARGET_PRESSURE, replicas_for_memory

# The metric EngineReplica.record_autoscaling_stats reports, averaged by Serve over
# look_back_period_s per replica.
KV_PRESSURE = "kv_pressure"


class MemoryPressurePolicy:
    """Serve instantiates it once with `policy_kwargs` and calls it every control loop tick."""

    def __init__(self, target_pressure: float = DEFAULT_TARGET_PRESSURE) -> None:
        replicas_for_memory([], 1, target_pressure)  # a bad target fails at deploy time
        self.target_pressure = target_pressure

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        by_replica = (ctx.aggregated_metrics or {}).get(KV_PRESSURE) or {}
        pressures = [float(by_replica[r]) for r in ctx.running_replicas if r in by_replica]
        desired = replicas_for_memory(pressures, ctx.current_num_replicas, self.target_pressure)
        return desired, ctx.policy_state
