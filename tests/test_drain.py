"""The measured drain rate (lamps_core/drain.py) and what it changes in placement."""

from __future__ import annotations

import pytest

from lamps_core.drain import MIN_SPEED, StepMeter, drain_rate
from lamps_core.placement import Demand, ReplicaView, place

GB = 1e9


def test_a_replica_stepping_as_priced_drains_at_its_capacity() -> None:
    assert drain_rate(4 * GB, 0.010, None) == 4 * GB
    assert drain_rate(4 * GB, 0.010, 0.010) == pytest.approx(4 * GB)


def test_the_drain_follows_the_measured_step_time() -> None:
    assert drain_rate(4 * GB, 0.010, 0.080) == pytest.approx(0.5 * GB)
    assert drain_rate(4 * GB, 0.010, 1e6) == pytest.approx(4 * GB * MIN_SPEED)


def test_a_replica_faster_than_priced_keeps_its_capacity() -> None:
    """It steps fast because it holds little; its cache, not its speed, bounds what it takes."""
    assert drain_rate(4 * GB, 0.010, 0.005) == 4 * GB


def test_replicas_priced_apart_compare_at_their_measured_step_times() -> None:
    """Two replicas of one model, profiles taken under different loads (9 and 36 ms), both
    measured at 40 ms a step now: the same work priced on each finishes at the same time."""
    work_tokens_s = 1e9  # byte·s of KV per second of step time, the same work on both
    fast_profile, slow_profile = 0.009, 0.036
    finish = [
        work_tokens_s * priced / drain_rate(GB, priced, 0.040)
        for priced in (fast_profile, slow_profile)
    ]
    assert finish[0] == pytest.approx(finish[1])


@pytest.mark.parametrize("measured", [0.0, -1.0, float("nan"), float("inf")])
def test_a_meaningless_measurement_changes_nothing(measured: float) -> None:
    assert drain_rate(GB, 0.010, measured) == GB
    assert drain_rate(GB, 0.0, 0.05) == GB  # no priced step time: nothing to compare with


def test_the_meter_measures_over_its_window_and_needs_enough_steps() -> None:
    meter = StepMeter(window_s=5.0, min_steps=8)
    assert meter.observe(0.0, 0, 0.0) is None
    assert meter.observe(1.0, 4, 0.2) is None  # 4 steps: too few
    assert meter.observe(2.0, 10, 0.5) == pytest.approx(0.05)
    # Ten seconds later the first readings are out of the window: only the slow steps count.
    meter.observe(9.0, 10, 0.5)
    assert meter.observe(12.0, 30, 2.5) == pytest.approx(0.1)


def test_the_meter_says_nothing_for_an_idle_engine() -> None:
    meter = StepMeter(window_s=5.0, min_steps=8)
    meter.observe(0.0, 0, 0.0)
    assert meter.observe(1.0, 20, 1.0) == pytest.approx(0.05)
    meter.observe(7.0, 20, 1.0)
    assert meter.observe(13.0, 20, 1.0) is None


def test_the_meter_starts_over_when_the_counters_do() -> None:
    meter = StepMeter(window_s=5.0, min_steps=8)
    meter.observe(0.0, 100, 5.0)
    meter.observe(1.0, 200, 10.0)
    assert meter.observe(2.0, 3, 0.1) is None  # a new engine: no negative step time
    assert meter.observe(3.0, 13, 0.6) == pytest.approx(0.05)


def _replica(replica_id: str, capacity: float, committed: float, drain: float) -> ReplicaView:
    return ReplicaView(
        replica_id=replica_id,
        kv_capacity_bytes=capacity,
        kv_in_use_bytes=0.0,
        kv_paused_bytes=0.0,
        committed_memory_time=committed,
        drain_rate=drain,
        stats_time=0.0,
    )


def test_a_large_replica_that_steps_slowly_stops_taking_the_work() -> None:
    """As measured on CPU (docs/fleet.md): a replica with four times the cache, priced at 9 ms
    a step but stepping at 87 ms, took most requests under the capacity rate; measured, its
    smaller peer that steps as priced gets them."""
    demand = Demand(memory_time=0.5 * GB, peak_kv_bytes=0.01 * GB)
    large_rate = drain_rate(4 * GB, 0.009, 0.087)
    small_rate = drain_rate(1 * GB, 0.040, 0.045)
    by_capacity = place(demand, [_replica("a", 4 * GB, 5 * GB, 4 * GB), _replica("b", GB, GB, GB)])
    measured = place(
        demand,
        [_replica("a", 4 * GB, 5 * GB, large_rate), _replica("b", GB, GB, small_rate)],
    )
    assert by_capacity.replica_id == "a"
    assert measured.replica_id == "b"
