"""The INFERCEPT, SJF and LAMPS policies and their registry, on hand-built queues.

Costs: M = 1000 B/token, T_fwd(C) = 0.01 + 0.001·C s, T_swap(C) = 0.0001·C s, one decode step
0.01 s, saturation 384 tokens; blocks of 16 tokens.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from lamps_core.call_durations import CallDurationSummary
from lamps_core.costs import EngineCosts
from lamps_core.policies import POLICY_NAMES, UnknownPolicyError, make_policy
from lamps_core.policies.fcfs_discard import VllmPolicy
from lamps_core.policies.lamps import LampsPolicy
from lamps_core.policy import EngineView, PausedCall, QueuedRequest, SchedulingPolicy, Strategy
from lamps_core.predictors import ToolEstimatePredictor
from lamps_core.request_meta import RequestMeta
from lamps_core.starvation import PROMOTED
from lamps_core.trace import TraceSegment
from lamps_core.waste import min_waste_strategy

COSTS = EngineCosts(
    kv_bytes_per_token=1000,
    fwd_intercept_s=0.01,
    fwd_slope_s=0.001,
    swap_slope_s=0.0001,
    decode_step_s=0.01,
)
P, S, D = Strategy.PRESERVE, Strategy.SWAP, Strategy.DISCARD


def engine(now: float = 100.0, running: int = 1000) -> EngineView:
    return EngineView(
        now=now, running_tokens=running, free_blocks=0, total_blocks=1000, block_size=16
    )


def trace_meta(
    request_id: str, segments: list[tuple[int, float | None, int]], prompt: int = 100
) -> RequestMeta:
    """Segments as (completion tokens, api seconds or None, returned tokens) from `prompt`."""
    built = []
    context = prompt
    for completion, api_s, returned in segments:
        built.append(
            TraceSegment(
                prompt_tokens=context,
                completion_tokens=completion,
                api_time=api_s,
                api_token_length=returned if api_s is not None else None,
            )
        )
        context += completion + returned
    return RequestMeta(
        request_id=request_id,
        arrival_time=0.0,
        ends_in_api_call=built[0].has_api_call,
        remaining_segments=built,
    )


def queued(
    rid: str,
    arrival: float = 0.0,
    context: int = 100,
    meta: RequestMeta | None = None,
    passed_over: int = 0,
    queued_at: float | None = None,
    waited_before_s: float = 0.0,
) -> QueuedRequest:
    return QueuedRequest(
        engine_request_id=rid,
        arrival_time=arrival,
        context_tokens=context,
        generated_tokens=0,
        queued_at=arrival if queued_at is None else queued_at,
        waited_before_s=waited_before_s,
        passed_over=passed_over,
        meta=meta,
    )


def paused(
    rid: str,
    context: int,
    paused_at: float,
    strategy: Strategy = P,
    meta: RequestMeta | None = None,
) -> PausedCall:
    return PausedCall(rid, context, paused_at, strategy, meta)


def order(policy: SchedulingPolicy, requests: list[QueuedRequest], view: EngineView) -> list[str]:
    return [r.engine_request_id for r in sorted(requests, key=lambda r: policy.priority(r, view))]


# Registry


def test_registry_knows_every_policy_and_keeps_vllm() -> None:
    assert {"vllm", "infercept", "sjf", "lamps"} <= set(POLICY_NAMES)
    assert isinstance(make_policy("vllm"), VllmPolicy)
    assert isinstance(make_policy("vllm", costs=COSTS), VllmPolicy)  # costs it does not need
    lamps = make_policy("lamps", costs=COSTS.to_dict(), predictor="noisy", noise=0.1, seed=3)
    assert isinstance(lamps, LampsPolicy) and lamps.costs == COSTS


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lamps", {"nosie": 0.1}, "'nosie' for policy 'lamps'"),
        ("infercept", {"predictor": "oracle"}, "'predictor' for policy 'infercept'"),
        ("vllm", {"swap": False}, "'swap' for policy 'vllm'"),
        ("lamps", {"max_wait_s": "soon"}, "option 'max_wait_s'"),
        ("sjf", {"swap_budget_tokens": 1.5}, "option 'swap_budget_tokens'"),
        ("lamps", {"predictor": "noisy"}, "needs the option noise"),
        ("sjf", {"noise": 0.2}, "not 'oracle'"),
        ("lamps", {"rerank_every_steps": -1}, "rerank_every_steps"),
        ("lamps", {"max_passed_over": -5}, "max_passed_over"),
    ],
)
def test_bad_options_are_named(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, costs=COSTS, **options)


def test_missing_costs_and_unknown_policy_are_errors() -> None:
    with pytest.raises(ValueError, match="needs the engine's costs"):
        make_policy("lamps")
    with pytest.raises(UnknownPolicyError, match="known: vllm, infercept, sjf, lamps"):
        make_policy("lifo", costs=COSTS)


# INFERCEPT


def test_infercept_is_fcfs_by_augmented_arrival_with_ids_breaking_ties() -> None:
    policy = make_policy("infercept", costs=COSTS)
    requests = [queued("b", arrival=2.0), queued("c", arrival=1.0), queued("a", arrival=2.0)]
    assert order(policy, requests, engine()) == ["c", "a", "b"]
    assert policy.strategy_for_call(paused("x", 400, 100.0), engine()) is P


def test_infercept_leaves_preserve_once_elapsed_time_passes_break_even() -> None:
    # C = 400, 1000 tokens running: W_D = 502 000, W_S = 112 000, W_P = elapsed·400 000.
    no_swap = make_policy("infercept", costs=COSTS, swap=False)  # break-even 1.255 s
    call = paused("x", 400, paused_at=100.0)
    assert no_swap.review_paused([call], engine(now=101.2), 0) == []
    assert no_swap.review_paused([call], engine(now=101.3), 0) == [(call, D)]
    with_swap = make_policy("infercept", costs=COSTS)  # break-even 0.28 s
    assert with_swap.review_paused([call], engine(now=100.25), 0) == []
    assert with_swap.review_paused([call], engine(now=100.3), 0) == [(call, S)]
    # Calls already discarded or swapped are not its business.
    assert with_swap.review_paused([paused("y", 400, 0.0, D)], engine(), 0) == []


def test_infercept_swap_budget_goes_to_the_most_wasteful_call() -> None:
    policy = make_policy("infercept", costs=COSTS, swap_budget_tokens=500)
    oldest = paused("a", 400, paused_at=90.0)  # W_P = 4 000 000: swapped
    middle = paused("c", 400, paused_at=95.0)  # 2 000 000 > W_D: discarded, budget gone
    recent = paused("b", 400, paused_at=99.0)  # 400 000 < W_D: kept until the next review
    moves = policy.review_paused([recent, middle, oldest], engine(now=100.0), 0)
    assert moves == [(oldest, S), (middle, D)]


def test_infercept_frees_preserved_calls_to_cover_blocks_needed() -> None:
    policy = make_policy("infercept", costs=COSTS)
    # All under break-even; W_P = 16 000, 32 000, 24 000; blocks 10, 20, 30.
    x = paused("x", 160, paused_at=99.9)
    y = paused("y", 320, paused_at=99.9)
    z = paused("z", 480, paused_at=99.95)
    assert policy.review_paused([x, y, z], engine(now=100.0), 0) == []
    # Most wasteful first until 25 blocks are covered: y (20), then z (30).
    assert policy.review_paused([x, y, z], engine(now=100.0), 25) == [(y, S), (z, S)]
    assert len(policy.review_paused([x, y, z], engine(now=100.0), 60)) == 3


# SJF and LAMPS on a crafted queue

# A decodes 10 + 5 tokens around a 2 s call; B decodes 20 + 5 around a 5 s call. With 2000 tokens
# running and no swap path, A's call is cheapest preserved (W_P 220 000 < W_D 246 600) and B's
# discarded (W_D 267 800 < W_P 600 000). LAMPS scores (byte·s):
#   A: 0.01·10·(100+5)·1000 + 2·110·1000 + 0.01·5·(110+2.5)·1000 = 10 500 + 220 000 + 5 625
#   B: 0.01·20·(100+10)·1000 + 0.13·120·1000 + 0.01·5·(120+2.5)·1000 = 22 000 + 15 600 + 6 125
SHORT_LONG_CALL = trace_meta("A", [(10, 2.0, 0), (5, None, 0)])
LONGER_SHORT_HOLD = trace_meta("B", [(20, 5.0, 0), (5, None, 0)])
BUSY = engine(running=2000)


def crafted_queue() -> list[QueuedRequest]:
    return [
        queued("A-s0", arrival=1.0, meta=SHORT_LONG_CALL),
        queued("B-s0", arrival=2.0, meta=LONGER_SHORT_HOLD),
    ]


def test_sjf_ranks_by_predicted_remaining_decode() -> None:
    policy = make_policy("sjf", costs=COSTS, swap=False)
    assert order(policy, crafted_queue(), BUSY) == ["A-s0", "B-s0"]  # 15 < 25 tokens


def test_lamps_ranks_a_long_preserved_call_behind_a_longer_request_that_discards() -> None:
    # The paper's three strategies (Keep is ours, and would make B's call a cheap keep).
    policy = make_policy("lamps", costs=COSTS, swap=False, keep=False)
    a, b = crafted_queue()
    assert policy.priority(a, BUSY)[1] == pytest.approx(236_125)
    assert policy.priority(b, BUSY)[1] == pytest.approx(43_725)
    assert order(policy, [a, b], BUSY) == ["B-s0", "A-s0"]
    # Each call gets the strategy its ranking predicted, applied at once.
    assert policy.strategy_for_call(paused("A-s0", 110, 100.0, meta=SHORT_LONG_CALL), BUSY) is P
    assert policy.strategy_for_call(paused("B-s0", 120, 100.0, meta=LONGER_SHORT_HOLD), BUSY) is D


def test_lamps_breaks_score_ties_by_arrival_then_id() -> None:
    policy = make_policy("lamps", costs=COSTS)
    same = trace_meta("x", [(10, None, 0)])
    requests = [
        queued("b", arrival=1.0, meta=same),
        queued("a", arrival=1.0, meta=same),
        queued("c", arrival=0.5, meta=same),
    ]
    assert order(policy, requests, engine()) == ["c", "a", "b"]


def test_starvation_guard_promotes_a_request_that_never_ran() -> None:
    policy = make_policy("lamps", costs=COSTS, max_passed_over=100, max_wait_s=None)
    huge = trace_meta("H", [(5000, None, 0)], prompt=4000)
    small = trace_meta("s", [(5, None, 0)])
    never_ran = queued("H-s0", arrival=5.0, context=4000, meta=huge, passed_over=101)
    older_starving = queued("O-s0", arrival=1.0, context=4000, meta=huge, passed_over=150)
    fresh = queued("s-s0", arrival=9.0, meta=small)
    order_now = order(policy, [fresh, never_ran, older_starving], engine())
    assert order_now == ["O-s0", "H-s0", "s-s0"]  # promoted first, by arrival among them
    # At the threshold, not past it: not promoted (asked of a policy that has not promoted H).
    not_yet = make_policy("lamps", costs=COSTS, max_passed_over=100, max_wait_s=None)
    at_threshold = queued("H-s0", arrival=5.0, context=4000, meta=huge, passed_over=100)
    assert order(not_yet, [at_threshold, fresh], engine()) == ["s-s0", "H-s0"]


def test_starvation_guard_by_age_and_disabled() -> None:
    huge = trace_meta("H", [(5000, None, 0)], prompt=4000)
    old = queued("H-s0", arrival=0.0, context=4000, meta=huge)
    fresh = queued("s-s0", arrival=99.0, meta=trace_meta("s", [(5, None, 0)]))
    by_age = make_policy("lamps", costs=COSTS, max_wait_s=60.0)
    assert order(by_age, [fresh, old], engine(now=50.0)) == ["s-s0", "H-s0"]
    assert order(by_age, [fresh, old], engine(now=100.0)) == ["H-s0", "s-s0"]
    off = make_policy("lamps", costs=COSTS, max_wait_s=None, max_passed_over=None)
    old.passed_over = 10**6
    assert order(off, [fresh, old], engine(now=1e6)) == ["s-s0", "H-s0"]


def test_starvation_guard_bounds_the_wait_summed_over_segments() -> None:
    # A resumed segment queued 2 s ago whose earlier segments waited 7 s: 9 s in all. Ranked
    # by memory it goes last; a 8 s bound on the summed wait puts it first, a 10 s one does not.
    heavy = trace_meta("H", [(5000, None, 0)], prompt=4000)
    resumed = queued("H-s3", arrival=0.0, context=4000, meta=heavy, queued_at=98.0)
    resumed.waited_before_s = 7.0
    fresh = queued("s-s0", arrival=99.0, meta=trace_meta("s", [(5, None, 0)]))
    now = engine(now=100.0)
    bounded = make_policy("lamps", costs=COSTS, max_queued_s=8.0, max_passed_over=None)
    assert order(bounded, [fresh, resumed], now) == ["H-s3", "s-s0"]
    looser = make_policy("lamps", costs=COSTS, max_queued_s=10.0, max_passed_over=None)
    assert order(looser, [fresh, resumed], now) == ["s-s0", "H-s3"]
    resumed.waited_before_s = 0.0  # the same 2 s without the earlier waits: not starving
    unpromoted = make_policy("lamps", costs=COSTS, max_queued_s=8.0, max_passed_over=None)
    assert order(unpromoted, [fresh, resumed], now) == ["s-s0", "H-s3"]
    with pytest.raises(ValueError, match="max_queued_s"):
        make_policy("lamps", costs=COSTS, max_queued_s=-1.0)


def test_latency_guard_promotes_requests_about_to_miss_the_bound() -> None:
    # With 10 ms decode steps "long" has 70 tokens and 14 s of calls left (14.7 s), "light" 0.1 s.
    long_meta = trace_meta("L", [(20, 9.0, 0), (30, 5.0, 0), (20, None, 0)])
    light_meta = trace_meta("s", [(10, None, 0)])
    policy = make_policy("lamps", costs=COSTS, max_latency_s=15.0, max_passed_over=None)
    now = engine(now=100.0)
    long_new = queued("L-s0", arrival=99.9, meta=long_meta)  # 0.1 + 14.7 s: not yet
    light_old = queued("s-s0", arrival=90.0, meta=light_meta)  # 10 + 0.1 s: never at risk
    assert order(policy, [light_old, long_new], now) == ["s-s0", "L-s0"]
    long_aged = queued("L-s0", arrival=99.0, meta=long_meta)  # 1 + 14.7 s: promoted
    assert order(policy, [light_old, long_aged], now) == ["L-s0", "s-s0"]
    # Promoted ones go first come first served: "N" has the least slack but arrived last.
    latest = queued("N-s0", arrival=99.9, meta=trace_meta("N", [(20, 30.0, 0)]))
    assert order(policy, [latest, light_old, long_aged], now) == ["L-s0", "N-s0", "s-s0"]


def test_lamps_rerank_period_is_an_option() -> None:
    assert make_policy("lamps", costs=COSTS).rerank_every_steps == 10
    assert make_policy("lamps", costs=COSTS, rerank_every_steps=3).rerank_every_steps == 3
    assert SchedulingPolicy.rerank_every_steps == 0  # the interface default is untouched
    assert make_policy("sjf", costs=COSTS).rerank_every_steps == 0


def test_lamps_rescores_when_tool_estimates_change() -> None:
    estimates = ToolEstimatePredictor()
    policy = make_policy("lamps", costs=COSTS, predictor=estimates, swap=False, keep=False)
    typed = RequestMeta(
        request_id="t",
        arrival_time=0.0,
        ends_in_api_call=True,
        remaining_segments=[
            TraceSegment(
                prompt_tokens=100,
                completion_tokens=10,
                api_time=0.1,
                api_token_length=0,
                api_type="slow_tool",
            ),
            TraceSegment(prompt_tokens=110, completion_tokens=5),
        ],
    )
    request = queued("t-s0", meta=typed)
    before = policy.priority(request, BUSY)
    assert policy.priority(request, BUSY) == before  # cached, same answer
    policy.update_api_estimates({"slow_tool": 2.0})  # A's numbers: preserved for 2 s
    assert policy.priority(request, BUSY)[1] == pytest.approx(236_125)
    assert policy.priority(request, BUSY) != before


def test_lamps_review_demotes_calls_whose_prediction_is_not_preserve() -> None:
    # Predicted 0.01 s: preserve (W_P 4 000). Once it has run 0.3 s the estimate is 0.3 s and
    # swap (W_S 112 000 < 120 000) wins, as INFERCEPT would decide.
    policy = make_policy("lamps", costs=COSTS)
    short = trace_meta("q", [(300, 0.01, 0), (5, None, 0)])
    call = paused("q-s0", 400, paused_at=100.0, meta=short)
    assert policy.strategy_for_call(call, engine(now=100.0)) is P
    assert policy.review_paused([call], engine(now=100.1), 0) == []
    assert policy.review_paused([call], engine(now=100.3), 0) == [(call, S)]


def test_lamps_frees_cheapest_demotions_first_when_memory_is_needed() -> None:
    # Both predicted preserve (0.01 s calls). Demoting x (swap, W_S 37 120) is cheaper than z
    # (W_S 142 080), so x goes first and covers the 10 blocks; INFERCEPT would take z.
    policy = make_policy("lamps", costs=COSTS)
    x = paused("x", 160, 100.0, meta=trace_meta("x", [(60, 0.01, 0), (5, None, 0)]))
    z = paused("z", 480, 100.0, meta=trace_meta("z", [(380, 0.01, 0), (5, None, 0)]))
    view = engine(now=100.005)
    assert policy.review_paused([z, x], view, 0) == []
    assert policy.review_paused([z, x], view, 10) == [(x, S)]
    assert policy.review_paused([z, x], view, 11) == [(x, S), (z, S)]
    infercept = make_policy("infercept", costs=COSTS)
    assert infercept.review_paused([z, x], view, 10) == [(z, S)]


def test_lamps_forgets_finished_requests() -> None:
    policy = make_policy("lamps", costs=COSTS)
    assert isinstance(policy, LampsPolicy)
    request, _ = crafted_queue()
    policy.priority(request, BUSY)
    assert request.engine_request_id in policy._plans
    policy.forget(request.engine_request_id)
    assert request.engine_request_id not in policy._plans


def test_lamps_uses_its_plan_at_the_pause_unless_the_length_was_far_off() -> None:
    policy = make_policy("lamps", costs=COSTS, swap=False, keep=False)
    a = queued("A-s0", arrival=1.0, meta=SHORT_LONG_CALL)
    policy.priority(a, BUSY)  # ranked: A's call is planned Preserve (2 s call, 110 tokens)
    idle = engine(running=0)
    # Decided afresh on the now idle engine, the call would be discarded (nobody stalls)...
    assert min_waste_strategy(110, 2.0, 0, 110, COSTS, allow_swap=False) is D
    # ...but the plan stands: the segment ended at the length it was planned for.
    assert policy.strategy_for_call(paused("A-s0", 110, 100.0, meta=SHORT_LONG_CALL), idle) is P
    assert policy.counters()["calls_as_planned"] == 1
    # A segment that ended far from its predicted length (here 3x) is decided afresh.
    policy.priority(a, BUSY)
    assert policy.strategy_for_call(paused("A-s0", 330, 100.0, meta=SHORT_LONG_CALL), idle) is D
    assert policy.counters()["calls_replanned_length"] == 1


def test_lamps_promotion_lasts_until_the_request_finishes() -> None:
    policy = make_policy("lamps", costs=COSTS, max_passed_over=100)
    meta = trace_meta("starved", [(10, 1.0, 0), (50, None, 0)])
    first = queued("starved-s0", arrival=1.0, meta=meta, passed_over=101)
    assert policy.priority(first, BUSY)[0] == PROMOTED
    # Its next segment (a new engine request, not passed over yet) is still promoted, as is the
    # same segment re-ranked after a preemption reset its count.
    later = queued("starved-s1", arrival=1.0, context=120, meta=meta, passed_over=0)
    assert policy.priority(later, BUSY)[0] == PROMOTED
    other = queued("fresh-s0", arrival=2.0, meta=trace_meta("fresh", [(10, None, 0)]))
    assert policy.priority(other, BUSY)[0] != PROMOTED
    assert policy.counters()["promoted"] == 1


def test_lamps_rescores_when_the_engine_costs_move_materially() -> None:
    policy = make_policy("lamps", costs=COSTS, swap=False, keep=False)
    a = queued("A-s0", arrival=1.0, meta=SHORT_LONG_CALL)
    first = policy.priority(a, BUSY)
    # A 1 % change of a cost (the fit drifting as steps come in) keeps the scores...
    policy.update_costs(replace(COSTS, decode_step_s=COSTS.decode_step_s * 1.01))
    assert policy.priority(a, BUSY) == first
    # ...3x slower decode steps make every request's remaining decode dearer: rescored.
    policy.update_costs(replace(COSTS, decode_step_s=COSTS.decode_step_s * 3))
    assert policy.priority(a, BUSY)[1] > first[1]


# A tool that usually answers in 0.01 s and one call in 16 takes 4 s: mean 0.259375 s.
MOSTLY_FAST = CallDurationSummary(atoms_s=(0.01,) * 15 + (4.0,), max_s=4.0, count=160)


def test_lamps_review_prices_a_call_past_the_fast_mode_by_its_learned_remaining_time() -> None:
    # Context 400 among 1000 running tokens: W_S = 112 000, W_P = 400 000 · T. Preserved at the
    # pause (mean 0.259 s: W_P 103 750). 0.1 s later the fast mode is over: E[D - 0.1 | D > 0.1]
    # = 3.9 s (W_P 1 560 000): swap. With only the same mean, the elapsed-time fallback would
    # keep it (max(0.259, 0.1) s: W_P 103 750).
    call_meta = RequestMeta(request_id="q", arrival_time=0.0, ends_in_api_call=True, api_type="qa")
    learned = make_policy("lamps", costs=COSTS, predictor="estimates", keep=False)
    learned.update_api_estimates({"qa": MOSTLY_FAST})
    call = paused("q-s0", 400, paused_at=100.0, meta=call_meta)
    assert learned.strategy_for_call(call, engine(now=100.0)) is P
    assert learned.predictor.remaining_call_s(call_meta, 0.1) == pytest.approx(3.9)
    # Still inside the fast mode (5 ms): every atom is possible, 0.254 s to go: preserved.
    assert learned.review_paused([call], engine(now=100.005), 0) == []
    assert learned.review_paused([call], engine(now=100.1), 0) == [(call, S)]

    mean_only = make_policy("lamps", costs=COSTS, predictor="estimates", keep=False)
    mean_only.update_api_estimates({"qa": MOSTLY_FAST.mean_s})
    assert mean_only.strategy_for_call(call, engine(now=100.0)) is P
    assert mean_only.review_paused([call], engine(now=100.1), 0) == []
    assert mean_only.review_paused([call], engine(now=100.3), 0) == [(call, S)]  # overrun


def test_lamps_review_never_prices_a_call_past_its_timeout() -> None:
    # Context 400 among 1000 running tokens: W_S = 112 000, W_P = 400 000 · T. Predicted 0.1 s;
    # 0.5 s in, the elapsed-time fallback says 0.5 s more (W_P 200 000): swap. A call whose
    # timeout ends 0.6 s after its pause has at most 0.1 s left (W_P 40 000): it stays.
    call_meta = RequestMeta(request_id="q", arrival_time=0.0, ends_in_api_call=True, api_type="qa")
    policy = make_policy("lamps", costs=COSTS, predictor="estimates", keep=False)
    policy.update_api_estimates({"qa": 0.1})
    unbounded = paused("q-s0", 400, paused_at=100.0, meta=call_meta)
    bounded = replace(unbounded, engine_request_id="q-s1", deadline=100.6)
    for call in (unbounded, bounded):
        assert policy.strategy_for_call(call, engine(now=100.0)) is P
    assert policy.review_paused([unbounded, bounded], engine(now=100.5), 0) == [(unbounded, S)]
    # Past its deadline a call has nothing left to hold for: never a negative duration.
    assert policy.review_paused([bounded], engine(now=101.0), 0) == []


def test_a_chat_segment_carries_the_longest_call_it_may_make() -> None:
    from lamps_vllm.chat_session import ChatPlan, _sampling_params

    tools = [
        {"type": "function", "function": {"name": name, "parameters": {}}}
        for name in ("calculator", "search")
    ]
    plan = ChatPlan(
        request_id="c",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,
        tool_choice="auto",
        max_tokens=16,
        max_tool_calls=1,
        call_timeouts_s={"calculator": 10.0, "search": 35.0},
    )

    def timeout(mode: str) -> float | None:
        params = _sampling_params(plan, mode, 16, 0, 0.0, None)
        meta = RequestMeta.from_extra_args(params.extra_args)
        assert meta is not None
        return meta.call_timeout_s

    assert timeout("calculator") == 10.0  # the forced tool's own limit
    assert timeout("auto") == 35.0  # whichever it picks, no longer than the slowest
    assert timeout("required") == 35.0
    assert timeout("none") is None  # no call can end this segment
