"""bench/fleet_sim.py, the routers' what-if model: it conserves requests, its memory router
avoids a replica with a large committed backlog and sends a small replica less, and a tight KV
budget preempts."""

from __future__ import annotations

from bench.fleet_sim import ReplicaShape, latency_summary, simulate
from bench.workloads import get_workload
from lamps_core.trace import TraceScript, TraceSegment


def script(prompt: int, decode: int, calls: int, call_s: float) -> TraceScript:
    segments = [
        TraceSegment(prompt_tokens=prompt + i * (decode + 8), completion_tokens=decode,
                     api_time=call_s, api_token_length=8)
        for i in range(calls)
    ]  # fmt: skip
    last = prompt + calls * (decode + 8)
    return TraceScript(segments=[*segments, TraceSegment(prompt_tokens=last, completion_tokens=4)])


def test_every_request_finishes_once_after_its_own_calls() -> None:
    trace = get_workload("toolbench")(40, 20.0, 0, time_scale=0.05)
    scripts = [(r.request_id, r.arrival_time or 0.0, r.script) for r in trace.requests]
    for router in ("memory", "pow2"):
        done = simulate(scripts, router, 2)
        assert len(done) == 40 and all(r.finish_s is not None for r in done)
        for r in done:
            calls = sum(s.api_time or 0.0 for s in r.script.segments[:-1])
            assert r.finish_s - r.arrival_s >= calls  # type: ignore[operator]
        mean, p99 = latency_summary(done)
        assert 0 < mean <= p99


def test_the_memory_router_sends_new_work_away_from_a_committed_backlog() -> None:
    # One huge request first (long context, long calls), then small ones: pow2 with two
    # replicas balances counts and puts every other small one beside the huge one; the memory
    # router keeps them off its replica.
    huge = ("huge", 0.0, script(8000, 50, 4, 30.0))
    small = [(f"s{i}", 0.1 + 0.01 * i, script(100, 10, 1, 0.5)) for i in range(6)]
    sharing = {}
    for router in ("memory", "pow2"):
        done = {r.request_id: r for r in simulate([huge, *small], router, 2, seed=1)}
        # A small request that shared the huge one's replica finished later than alone.
        sharing[router] = sum(done[f"s{i}"].finish_s or 0.0 for i in range(6))
    assert sharing["memory"] < sharing["pow2"]


def test_a_kv_budget_too_small_for_the_batch_preempts() -> None:
    scripts = [(f"r{i}", 0.0, script(600, 200, 1, 0.2)) for i in range(8)]
    tight = ReplicaShape(kv_tokens=4000)
    done = simulate(scripts, "pow2", 1, shape=tight)
    assert all(r.finish_s is not None for r in done)
    assert sum(r.preempted for r in done) > 0
    roomy = simulate(scripts, "pow2", 1)
    assert sum(r.preempted for r in roomy) == 0
    assert latency_summary(done)[0] > latency_summary(roomy)[0]


def test_a_fleet_of_mixed_sizes_preempts_less_under_the_memory_router() -> None:
    # Two replicas, one with an eighth of the other's KV. Counting requests in flight (pow2)
    # gives the small one half of a burst, and it preempts; pricing memory against each
    # replica's capacity sends it less.
    scripts = [(f"r{i}", 0.01 * i, script(600, 200, 1, 0.2)) for i in range(32)]
    mixed = [ReplicaShape(kv_tokens=32_000), ReplicaShape(kv_tokens=4_000)]
    preempted = {
        router: sum(r.preempted for r in simulate(scripts, router, 2, mixed, seed=2))
        for router in ("memory", "pow2")
    }
    assert preempted["pow2"] > 0
    assert preempted["memory"] < preempted["pow2"]
