"""The fleet placement rule (lamps_core/placement.py) on hand-built replica views.

Units: replicas of 1 GB of KV cache drain 1e9 byte·s per second, so a backlog of `n`·1e9 byte·s
is `n` seconds of work.
"""

from __future__ import annotations

import itertools

import pytest

from lamps_core.placement import (
    Demand,
    Reason,
    ReplicaView,
    chat_demand,
    finish_time_s,
    place,
    script_demand,
)
from tests.test_policies import COSTS  # M = 1000 B/token, T_fwd = 0.01 + 0.001·C s

GB = 1e9
SMALL = Demand(memory_time=0.5 * GB, peak_kv_bytes=0.01 * GB)


def view(replica_id: str, committed_s: float = 0.0, **overrides: object) -> ReplicaView:
    fields: dict[str, object] = {
        "replica_id": replica_id,
        "kv_capacity_bytes": GB,
        "kv_in_use_bytes": 0.0,
        "kv_paused_bytes": 0.0,
        "committed_memory_time": committed_s * GB,
        "drain_rate": GB,
        "stats_time": 100.0,
    }
    fields.update(overrides)
    return ReplicaView(**fields)  # type: ignore[arg-type]


def test_a_replica_holding_long_preserved_requests_loses_to_an_idle_peer() -> None:
    # Eight requests preserved through 60 s calls at 100 MB each: 48 GB·s committed, and most
    # of the cache held; the peer holds nothing.
    busy = view(
        "a",
        kv_in_use_bytes=0.8 * GB,
        kv_paused_bytes=0.8 * GB,
        committed_memory_time=8 * 0.1 * GB * 60,
    )
    idle = view("b")
    placement = place(SMALL, [busy, idle], max_backlog_s=100.0)
    assert placement.replica_id == "b"
    assert placement.reason is Reason.SOONEST
    assert placement.ranked == ("b", "a")  # the busy one is still a fallback


def test_the_finish_time_counts_committed_sent_and_own_memory_time_over_the_drain() -> None:
    replica = view("a", committed_s=2.0, sent_memory_time=1.0 * GB, drain_rate=0.5 * GB)
    assert finish_time_s(replica, SMALL) == pytest.approx((2.0 + 1.0 + 0.5) / 0.5)


def test_a_faster_drain_beats_a_smaller_backlog() -> None:
    # Twice the backlog on a replica with three times the memory finishes sooner.
    small = view("a", committed_s=1.0, kv_capacity_bytes=GB, drain_rate=GB)
    large = view("b", committed_s=2.0, kv_capacity_bytes=3 * GB, drain_rate=3 * GB)
    assert place(SMALL, [small, large]).replica_id == "b"


def test_stale_stats_plus_own_sent_counts_spread_a_burst() -> None:
    # Stats say "a" is emptier by 1 s of work; they do not change during the burst, the router's
    # own sent counts do. Without them all ten go to "a"; with them the burst is shared.
    stats = {"a": 1.0, "b": 2.0}
    sent = {"a": 0.0, "b": 0.0}
    counts = {"a": 0, "b": 0}
    chosen = []
    for _ in range(10):
        views = [
            view(rid, stats[rid], sent_memory_time=sent[rid], sent_since_stats=counts[rid])
            for rid in ("a", "b")
        ]
        placement = place(SMALL, views)
        assert placement.replica_id is not None
        chosen.append(placement.replica_id)
        sent[placement.replica_id] += SMALL.memory_time
        counts[placement.replica_id] += 1
    # "a" gets the first two (evening out the 1 s), then they alternate: 6 and 4.
    assert chosen[:2] == ["a", "a"]
    assert chosen.count("a") == 6 and chosen.count("b") == 4
    # Without the sent counts the emptiest-looking replica takes everything.
    blind = [place(SMALL, [view("a", 1.0), view("b", 2.0)]).replica_id for _ in range(10)]
    assert set(blind) == {"a"}


def test_a_session_stays_where_its_context_is_while_that_replica_has_room() -> None:
    """Its free KV holds the turn's peak: the turn starts there at once, so however much
    emptier another replica looks (a replica between short turns can look idle for a moment),
    moving would only add the re-prefill. Without room, finish times decide."""
    best = view("a", committed_s=0.0)
    roomy = view("b", committed_s=20.0, kv_in_use_bytes=0.9 * GB, affinity=True)
    placement = place(SMALL, [best, roomy])
    assert (placement.replica_id, placement.reason) == ("b", Reason.AFFINITY)
    full = view("b", committed_s=20.0, kv_in_use_bytes=0.995 * GB, affinity=True)
    assert place(SMALL, [best, full]).replica_id == "a"  # 0.005 GB free < 0.01 GB peak
    # Room does not override the backlog bound.
    assert place(SMALL, [best, roomy], max_backlog_s=10.0).replica_id == "a"


# The tests of the finish-time allowance below give the session's replica no free KV (`FULL`):
# with room, it would win whatever the finish times.
FULL = GB


def test_affinity_wins_within_the_margin() -> None:
    best = view("a", committed_s=1.0)
    sticky = view("b", committed_s=1.8, kv_in_use_bytes=FULL, affinity=True)
    placement = place(SMALL, [best, sticky], affinity_margin_s=1.0)
    assert placement.replica_id == "b"
    assert placement.reason is Reason.AFFINITY
    assert placement.ranked == ("b", "a")


def test_affinity_loses_beyond_the_margin() -> None:
    best = view("a", committed_s=1.0)
    sticky = view("b", committed_s=2.2, kv_in_use_bytes=FULL, affinity=True)
    placement = place(SMALL, [best, sticky], affinity_margin_s=1.0)
    assert placement.replica_id == "a"
    assert placement.reason is Reason.SOONEST


def test_the_prefill_a_held_context_saves_is_the_affinity_allowance() -> None:
    """Without any configured margin, a session's replica may be behind the best by what its
    context would cost to prefill elsewhere (`Demand.reuse_s`), and no more."""
    best = view("a", committed_s=1.0)
    reuses = Demand(SMALL.memory_time, SMALL.peak_kv_bytes, reuse_s=0.5)

    def held(committed_s: float) -> ReplicaView:
        return view("b", committed_s, kv_in_use_bytes=FULL, affinity=True)

    assert place(reuses, [best, held(1.4)]).reason is Reason.AFFINITY
    assert place(reuses, [best, held(1.6)]).replica_id == "a"
    assert place(SMALL, [best, held(1.4)]).replica_id == "a"  # nothing held
    # A chat turn's allowance is the engine's measured prefill of its prompt.
    turn = chat_demand(3000, 50, COSTS)
    assert turn.reuse_s == pytest.approx(COSTS.t_fwd(3000)) and turn.reuse_s > 0
    with pytest.raises(ValueError, match="reuse_s"):
        Demand(1.0, 1.0, reuse_s=-1.0)


def test_an_affinity_replica_over_the_backlog_bound_is_not_chosen() -> None:
    best = view("a", committed_s=9.0)
    sticky = view("b", committed_s=9.8, affinity=True)  # within the margin, but full
    placement = place(SMALL, [best, sticky], max_backlog_s=10.0, affinity_margin_s=5.0)
    assert placement.replica_id == "a"
    assert placement.ranked == ("a",)


def test_every_replica_full_backs_off() -> None:
    placement = place(SMALL, [view("a", 29.8), view("b", 40.0)], max_backlog_s=30.0)
    assert placement.backoff
    assert placement.replica_id is None
    assert placement.reason is Reason.BACKOFF
    assert placement.ranked == ()
    assert placement.finish_s["a"] == pytest.approx(30.3)
    # The same fleet takes a request small enough to fit under the bound.
    tiny = Demand(memory_time=0.1 * GB, peak_kv_bytes=0.0)
    assert place(tiny, [view("a", 29.8), view("b", 40.0)], max_backlog_s=30.0).replica_id == "a"


def test_the_sent_counts_alone_can_fill_the_fleet() -> None:
    # Stats show empty replicas, but the router already sent 40 s of work to each.
    views = [view(rid, sent_memory_time=40 * GB, sent_since_stats=80) for rid in ("a", "b")]
    assert place(SMALL, views, max_backlog_s=30.0).backoff


def test_unhealthy_replicas_are_skipped_even_when_emptiest() -> None:
    views = [view("a", healthy=False), view("b", committed_s=5.0)]
    placement = place(SMALL, views)
    assert placement.replica_id == "b"
    assert "a" not in placement.ranked and "a" not in placement.finish_s
    # An unhealthy session replica is no exception.
    views = [view("a", healthy=False, affinity=True), view("b", committed_s=5.0)]
    assert place(SMALL, views, affinity_margin_s=100.0).replica_id == "b"


def test_no_healthy_replica_and_no_replica_big_enough_are_reported() -> None:
    assert place(SMALL, [view("a", healthy=False)]).reason is Reason.NO_REPLICA
    assert place(SMALL, []).reason is Reason.NO_REPLICA
    huge = Demand(memory_time=1.0, peak_kv_bytes=2 * GB)
    placement = place(huge, [view("a"), view("b", kv_capacity_bytes=4 * GB, committed_s=20.0)])
    assert placement.replica_id == "b"  # the only cache that can hold its peak
    assert place(huge, [view("a")]).reason is Reason.NO_REPLICA


def test_ties_are_broken_by_replica_id_whatever_the_order() -> None:
    views = [view("c", 1.0), view("a", 1.0), view("b", 1.0)]
    for order in itertools.permutations(views):
        placement = place(SMALL, order)
        assert placement.replica_id == "a"
        assert placement.ranked == ("a", "b", "c")
    # Two affinity replicas (a stale session map): the lower id, in every order.
    sticky = [view("z", 1.5, affinity=True), view("y", 1.5, affinity=True), view("a", 1.0)]
    for order in itertools.permutations(sticky):
        assert place(SMALL, order, affinity_margin_s=1.0).replica_id == "y"


def test_invalid_views_and_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="drain_rate"):
        view("a", drain_rate=0.0)
    with pytest.raises(ValueError, match="committed_memory_time"):
        view("a", committed_memory_time=float("nan"))
    with pytest.raises(ValueError, match="memory_time"):
        Demand(memory_time=-1.0, peak_kv_bytes=0.0)
    with pytest.raises(ValueError, match="max_backlog_s"):
        place(SMALL, [view("a")], max_backlog_s=0.0)


def test_script_demand_prices_decodes_and_calls_held_for_their_duration() -> None:
    # 100 tokens + 10 decoded, a 2 s call returning 5, then 115 + 20 decoded.
    demand = script_demand([(100, 10, 2.0, 5), (115, 20, None, 0)], COSTS)
    decode_1 = 0.01 * 10 * (100 + 5) * 1000
    call = 2.0 * 110 * 1000
    decode_2 = 0.01 * 20 * (115 + 10) * 1000
    assert demand.memory_time == pytest.approx(decode_1 + call + decode_2)
    assert demand.peak_kv_bytes == 135 * 1000
    # A longer call costs more: the router sees a long-call request as heavy.
    longer = script_demand([(100, 10, 20.0, 5), (115, 20, None, 0)], COSTS)
    assert longer.memory_time > demand.memory_time + 17 * 110 * 1000


def test_chat_demand_counts_the_expected_calls() -> None:
    plain = chat_demand(200, 50, COSTS)
    assert plain.memory_time == pytest.approx(0.01 * 50 * (200 + 25) * 1000)
    assert plain.peak_kv_bytes == 250 * 1000
    forced = chat_demand(200, 50, COSTS, expected_calls=1, call_s=3.0)
    assert forced.memory_time == pytest.approx(plain.memory_time + 3.0 * 200 * 1000)
