"""How many engine replicas a fleet needs, from the memory its replicas hold and are promised.

Each replica reports its memory pressure: the KV its running, waiting and paused requests hold or
are predicted to need (in the device cache, or swapped to the host pool), over its KV capacity
(`deployments.engine_replica.EngineReplica.record_autoscaling_stats`). A pressure of 1 is a full
cache with nothing waiting; above 1, requests wait for memory.

The fleet needs `sum of pressures / target` replicas: the count at which the same demand would
sit at `target` on each (a replica that has not reported yet, one just started, adds no demand).
Memory, not queue length, is what an augmented LLM's requests wait for (a request in a 60 s tool
call with its KV kept is one ongoing request to Serve's default policy, yet holds its memory as
surely as one that decodes), so this is what to scale on. Serve applies the deployment's bounds
and its upscale / downscale delays to the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TARGET_PRESSURE = 0.7  # headroom for bursts and for requests growing as they decode


def replicas_for_memory(
    pressures: Sequence[float], current: int, target: float = DEFAULT_TARGET_PRESSURE
) -> float:
    """Replicas that would bring the memory pressure to `target` on each (not rounded, not
    bounded). `pressures`: the replicas that reported; none: stay at `current`."""
    if not 0 < target <= 1:
        raise ValueError(f"target pressure must be in (0, 1], got {target}")
    if current <= 0 or not pressures:
        return float(current)
    return sum(max(0.0, p) for p in pressures) / target
