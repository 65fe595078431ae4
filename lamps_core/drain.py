"""A replica's drain rate, measured: how much of its committed memory-time it retires per second.

The committed memory-time a replica reports is priced with its profiled decode step time `δ`
(`EngineCosts.decode_step_s`: the median of its last 256 decode-only steps, cached on disk across
restarts, and refreshed only by steps that decode alone, which are rare under load). A replica
holding its whole cache retires `capacity` byte·s of that priced memory-time per second only if
its decode steps really take `δ`. They can take longer: bigger batches, and on a shared CPU each
engine gets less of it. And two replicas of one model can carry profiles taken under different
loads: on this project's 2-core CPU, two replicas of the tiny model were priced at 9.3 and
38.6 ms a step under the same trace (docs/fleet.md, "Replicas of different sizes"). The rate
the placement rule divides by is therefore

    drain = capacity · min(1, δ / step)

with `step` the engine time per decode-only step measured over the last seconds (`StepMeter`).
A replica slower than its profile has its backlog counted at the step time it runs at now,
whatever its profile priced it at. One faster than its profile keeps its capacity: it steps
fast because it holds little, and more work would slow it. Without a measurement (an idle or
new replica, or one whose every step prefilled) the rate is the capacity, as before.

Why decode-only steps: a step that also prefills is slower by the prefill of the requests the
router itself sent there. Counted, it pushed arrivals away from the replica taking the larger
share, undoing the weighting by memory: in the what-if model (bench/fleet_sim.py, a mixed fleet
of 131,072- and 16,384-token caches) memory / pow2 went from 0.83 to 0.91 on toolbench, and to
1.09 on `multi` with 4 replicas.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Below this many steps in the window the measurement says too little: no correction.
MIN_STEPS = 8
# The window the step time is measured over: long enough for tens of steps on a CPU engine
# (50-100 ms a step under load), short enough to follow load that changes within seconds.
WINDOW_S = 5.0
# A replica measured this much slower than priced is still some use: no rate reaches zero.
MIN_SPEED = 0.01


def drain_rate(capacity_bytes: float, priced_step_s: float, measured_step_s: float | None) -> float:
    """byte·s of priced memory-time retired per second (module docstring). Without a
    measurement, or with a meaningless one, the capacity."""
    if capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
    if (
        measured_step_s is None
        or not (math.isfinite(measured_step_s) and measured_step_s > 0)
        or not (math.isfinite(priced_step_s) and priced_step_s > 0)
    ):
        return capacity_bytes
    return capacity_bytes * max(MIN_SPEED, min(1.0, priced_step_s / measured_step_s))


@dataclass(frozen=True, slots=True)
class _Reading:
    at: float  # monotonic seconds
    steps: int  # cumulative
    step_s: float  # cumulative engine seconds in those steps


class StepMeter:
    """Engine seconds per step over the last `window_s`, from cumulative counters read at each
    statistics report (the scheduler's `decode_only_steps` and `time_decode_only_step_s`)."""

    def __init__(self, window_s: float = WINDOW_S, min_steps: int = MIN_STEPS) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._window_s = window_s
        self._min_steps = min_steps
        self._readings: deque[_Reading] = deque()

    def observe(self, at: float, steps: int, step_s: float) -> float | None:
        """Add a reading; the step time over the window, or None when too few steps ran."""
        if self._readings and (
            steps < self._readings[-1].steps or step_s < self._readings[-1].step_s
        ):
            self._readings.clear()  # the counters started over (a new engine)
        self._readings.append(_Reading(at, steps, step_s))
        # Keep one reading at or before the window's start, so the window is covered whole.
        while len(self._readings) > 2 and self._readings[1].at <= at - self._window_s:
            self._readings.popleft()
        first, last = self._readings[0], self._readings[-1]
        counted = last.steps - first.steps
        if counted < self._min_steps:
            return None
        return (last.step_s - first.step_s) / counted
