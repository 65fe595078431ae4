"""Admission by predicted memory and the Keep strategy, in `lamps_core` (no engine).

Costs as in test_policies: M = 1000 B/token, T_fwd(C) = 0.01 + 0.001·C s, T_swap(C) = 0.0001·C s.
"""

from __future__ import annotations

import pytest

from lamps_core.admission import AdmissionGate, KeepEvictionEstimate
from lamps_core.policies import make_policy
from lamps_core.policies.infercept import blocks_of
from lamps_core.policy import EngineView, PausedCall, QueuedRequest, Strategy
from lamps_core.waste import discard_waste, min_waste_strategy, strategy_wastes
from tests.test_policies import COSTS, trace_meta

K, D, P = Strategy.KEEP, Strategy.DISCARD, Strategy.PRESERVE


def view(total: int = 100, running: int = 3, running_tokens: int = 1000) -> EngineView:
    return EngineView(
        now=100.0,
        running_tokens=running_tokens,
        free_blocks=0,
        total_blocks=total,
        block_size=16,
        running_requests=running,
    )


def test_gate_admits_only_what_fits_at_the_promised_peaks() -> None:
    gate = AdmissionGate(margin=0.1)
    assert gate.admits(10, 80, 100, running=3)  # 90 <= 90
    assert not gate.admits(11, 80, 100, running=3)
    # An idle engine admits anything: a segment predicted too large must still run.
    assert gate.admits(500, 0, 100, running=0)


def test_gate_margin_grows_with_preemptions_and_decays_with_admissions() -> None:
    gate = AdmissionGate(margin=0.0, min_margin=0.0, step=0.05, decay=0.5, max_margin=0.1)
    assert gate.admits(100, 0, 100, running=1)
    gate.missed()
    assert not gate.admits(100, 0, 100, running=1)  # 5 % now kept back
    for _ in range(3):
        gate.missed()
    assert gate.margin == pytest.approx(0.1)  # capped
    gate.admitted()
    assert gate.margin == pytest.approx(0.05)


def test_gate_opens_while_nothing_is_preempted_and_closes_at_the_first_preemption() -> None:
    """Where memory is slack no prediction is ever missed: the gate drifts to an overcommit
    and admits requests whose predicted peaks add up past the cache (vLLM would admit them:
    their blocks are free now). One preemption closes it to a real margin at once."""
    gate = AdmissionGate()
    assert not gate.admits(30, 90, 100, running=5)  # 120 predicted > 100
    for _ in range(500):
        gate.admitted()
    assert gate.margin < -0.3
    assert gate.admits(30, 90, 100, running=5)  # overcommitted: predictions are upper bounds
    gate.missed()
    assert gate.margin == pytest.approx(gate.step)
    assert not gate.admits(10, 90, 100, running=5)  # 100 > 98


def test_gate_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        AdmissionGate(margin=1.5)
    with pytest.raises(ValueError):
        AdmissionGate(margin=0.5, max_margin=0.3)


def test_eviction_estimate_follows_recent_outcomes() -> None:
    estimate = KeepEvictionEstimate(prior=0.5, prior_weight=4.0, forget=0.1)
    assert estimate.probability == pytest.approx(0.5)
    for _ in range(50):
        estimate.observe(evicted=False)
    low = estimate.probability
    assert low < 0.05
    for _ in range(50):
        estimate.observe(evicted=True)
    assert estimate.probability > 0.95


def test_keep_waste_is_the_eviction_chance_times_a_discard() -> None:
    wastes = strategy_wastes(400, 5.0, 1000, 1400, COSTS, keep_evict_p=0.25)
    assert wastes[K] == pytest.approx(0.25 * discard_waste(400, 1000, COSTS))
    assert list(wastes) == [P, K, Strategy.SWAP, D]  # tie order
    # A long call: keeping beats holding the blocks, and beats a certain recompute.
    assert min_waste_strategy(400, 5.0, 1000, 1400, COSTS, allow_swap=False, keep_evict_p=0.25) is K
    # Certain eviction: keep is exactly a discard, and ties go to keep (the cheaper to undo).
    assert min_waste_strategy(400, 5.0, 1000, 1400, COSTS, allow_swap=False, keep_evict_p=1.0) is K
    # Without the option nothing is kept.
    assert min_waste_strategy(400, 5.0, 1000, 1400, COSTS, allow_swap=False) is D


def queued(engine_id: str, context: int, meta_segments: list[tuple[int, float | None, int]]):
    meta = trace_meta(engine_id, meta_segments, prompt=context)
    return QueuedRequest(
        engine_request_id=engine_id,
        arrival_time=0.0,
        context_tokens=context,
        generated_tokens=0,
        queued_at=0.0,
        waited_before_s=0.0,
        passed_over=0,
        meta=meta,
    )


def test_lamps_promises_each_segment_its_predicted_peak() -> None:
    policy = make_policy("lamps", costs=COSTS)
    request = queued("a", 100, [(60, 1.0, 5), (10, None, 0)])
    assert policy.admission_tokens(request, view()) == 160  # the context the call starts at
    engine = view(total=100)
    assert policy.admits(blocks_of(160, 16), 91, engine) is False  # 10 + 91 > 100
    assert policy.admits(blocks_of(160, 16), 80, engine) is True
    off = make_policy("lamps", costs=COSTS, admission=False)
    assert off.admission_tokens(request, view()) is None
    assert make_policy("vllm").admission_tokens(request, view()) is None


def test_lamps_preemptions_tighten_admission() -> None:
    policy = make_policy("lamps", costs=COSTS)
    engine = view(total=100)
    assert policy.admits(10, 89, engine)  # 99 <= 100
    policy.on_preemption()
    assert not policy.admits(10, 89, engine)  # 99 > 98


def paused_call(engine_id: str, context: int, api_s: float, paused_at: float) -> PausedCall:
    meta = trace_meta(engine_id, [(10, api_s, 0), (5, None, 0)], prompt=context - 10)
    return PausedCall(engine_id, context, paused_at, Strategy.KEEP, meta)


def test_kept_calls_stay_until_memory_is_needed_then_latest_return_goes_first() -> None:
    policy = make_policy("lamps", costs=COSTS)
    soon = paused_call("soon", 160, api_s=1.0, paused_at=99.0)  # back at 100
    late = paused_call("late", 160, api_s=30.0, paused_at=95.0)  # back at 125
    middle = paused_call("middle", 160, api_s=10.0, paused_at=99.0)  # back at 109
    calls = [soon, late, middle]
    assert policy.review_paused(calls, view(), 0) == []
    assert policy.review_paused(calls, view(), 10) == [(late, D)]
    assert policy.review_paused(calls, view(), 11) == [(late, D), (middle, D)]


def test_lamps_chooses_keep_while_evictions_are_rare_and_learns_when_they_are_not() -> None:
    policy = make_policy("lamps", costs=COSTS, swap=False)
    meta = trace_meta("r", [(10, 20.0, 0), (5, None, 0)], prompt=390)
    call = PausedCall("r-s0", 400, 100.0, Strategy.DISCARD, meta)
    for _ in range(100):
        policy.on_keep_outcome(evicted=False)
    assert policy.strategy_for_call(call, view()) is K
    for _ in range(200):
        policy.on_keep_outcome(evicted=True)
    # Evicted nearly always: keeping is a discard, still tied at worst (ties go to keep) ...
    assert policy.strategy_for_call(call, view()) is K
    # ... and a short call that holds little is preserved instead.
    short = PausedCall("s-s0", 400, 100.0, Strategy.DISCARD, trace_meta("s", [(10, 0.001, 0)]))
    assert policy.strategy_for_call(short, view()) is P


def test_a_call_planned_for_swap_is_kept_while_memory_is_slack_and_swapped_when_needed() -> None:
    """The waste formulas price memory as scarce: a long call on a large context is planned
    for Swap. Where the cache is mostly free nobody needs its blocks: it is kept, and takes its
    plan's Swap only when memory is needed before it returns."""
    policy = make_policy("lamps", costs=COSTS)
    context = 1600

    def pause(engine_id: str, free_blocks: int) -> tuple[PausedCall, Strategy]:
        call = paused_call(engine_id, context, api_s=30.0, paused_at=100.0)
        engine = view(total=200)
        engine.free_blocks = free_blocks
        return call, policy.strategy_for_call(call, engine)

    _, tight = pause("tight", free_blocks=10)
    assert tight is Strategy.SWAP  # the plan, where memory is scarce
    slack_call, slack = pause("slack", free_blocks=150)
    assert slack is K
    slack_call.strategy = K
    assert policy.counters()["calls_kept_while_slack"] == 1
    engine = view(total=200)
    assert policy.review_paused([slack_call], engine, blocks_needed=0) == []  # nobody needs it
    moves = policy.review_paused([slack_call], engine, blocks_needed=5)
    assert moves == [(slack_call, Strategy.SWAP)]
