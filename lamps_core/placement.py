"""Where a fleet of engine replicas places a request: the replica on which the request's own
predicted memory-time finishes soonest, given the memory-time already committed there.

The unit is LAMPS's rank (`scoring.score_remaining(...).memory_time`): byte·seconds of KV cache
a request holds over its remaining work. A replica can hold at most its KV capacity at any
moment, so it retires at most `capacity` byte·s of memory-time per second: its drain rate.
A request sent to replica `r` therefore finishes its memory-time no earlier than

    finish_r = (committed_r + sent_since_stats_r + own) / drain_r          (seconds)

with `committed_r` the memory-time the replica reported for its running, waiting and paused
requests, and `sent_since_stats_r` the memory-time this router sent there after those stats
were taken (stats are seconds old; without it a burst would all go to the replica that looked
emptiest). The rule picks the smallest `finish_r` among healthy replicas that can hold the
request's peak KV at all, ties broken by replica id; a replica holding this session's context
(`affinity`) wins while its free KV holds the request's peak (the turn starts there at once,
continuous batching, and finds its context: another replica could only add the re-prefill), and
otherwise unless its finish time exceeds the best one by more than what the context it holds
saves (`Demand.reuse_s`: the measured prefill time of the request's prompt) plus
`affinity_margin_s` (an extra allowance, none by default). Finish times alone moved sessions
about: between two reports a replica serving short chat turns can look idle for a moment, and
a fleet of sessions then hopped to it and back, recomputing their contexts (docs/fleet.md,
"Sessions");
and when every replica's finish time exceeds `max_backlog_s`, nothing is placed: the caller
backs off (queues the request and retries) instead of piling more work on a full fleet. A replica
with no backlog at all (nothing committed, nothing sent) is never full: a request too large for
the bound on its own would otherwise wait forever on an idle fleet.

No Ray, no vLLM: docs/fleet.md explains the rule; deployments/router.py feeds it Serve's
replica statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from lamps_core.costs import EngineCosts
from lamps_core.policy import Strategy
from lamps_core.scoring import call_memory_time, decode_memory_time

# A guess, not a measurement: a replica that needs more than this many seconds at full memory
# to retire what it already has (plus the request) is "full". Long enough that a busy replica
# keeps a queue (an idle GPU is worse than a short wait), short enough that a request waits at
# the router, where any replica that frees up can take it, rather than behind one replica's
# backlog. Tune per deployment.
DEFAULT_MAX_BACKLOG_S = 30.0
# The session's replica is worth the re-prefill its context would cost elsewhere, which each
# request's demand carries (`Demand.reuse_s`, from the engine's measured `T_fwd`); this is an
# allowance on top, for what that misses (a preserved or swapped copy also spares the wait for
# a slot to prefill in). None by default: docs/fleet.md.
DEFAULT_AFFINITY_MARGIN_S = 0.0


@dataclass(frozen=True, slots=True)
class Demand:
    """What the request to place is predicted to cost."""

    memory_time: float  # byte·s, the request's own remaining memory-over-time
    peak_kv_bytes: float  # the most KV it holds at once (its predicted peak context · M)
    # Seconds of prefill the request skips where its context is held (`T_fwd` of its prompt,
    # the engine's measured cost): what its session's replica is worth over another.
    reuse_s: float = 0.0

    def __post_init__(self) -> None:
        _check_non_negative("memory_time", self.memory_time)
        _check_non_negative("peak_kv_bytes", self.peak_kv_bytes)
        _check_non_negative("reuse_s", self.reuse_s)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as the router sees it: its last statistics plus what the router itself sent
    since they were taken."""

    replica_id: str
    kv_capacity_bytes: float  # the KV cache on the device
    kv_in_use_bytes: float  # device KV allocated now (preserved and kept blocks included)
    kv_paused_bytes: float  # KV held for requests paused in a call: device (preserved, kept)
    # and host (swapped); what a session's next turn may find again
    committed_memory_time: float  # byte·s of running, waiting and paused requests
    drain_rate: float  # byte·s retired per second; at most kv_capacity_bytes
    stats_time: float  # when the statistics were taken (the replica's clock, time.time())
    sent_since_stats: int = 0  # requests the router sent after stats_time
    sent_memory_time: float = 0.0  # their predicted memory-time, byte·s
    healthy: bool = True
    affinity: bool = False  # holds this request's session context (prefix cache or paused KV)

    def __post_init__(self) -> None:
        for name in (
            "kv_capacity_bytes",
            "kv_in_use_bytes",
            "kv_paused_bytes",
            "committed_memory_time",
            "sent_memory_time",
        ):
            _check_non_negative(name, getattr(self, name))
        if not (math.isfinite(self.drain_rate) and self.drain_rate > 0):
            raise ValueError(f"drain_rate must be a finite number > 0, got {self.drain_rate}")
        if self.sent_since_stats < 0:
            raise ValueError(f"sent_since_stats must be >= 0, got {self.sent_since_stats}")


class Reason(StrEnum):
    SOONEST = "soonest"  # the smallest finish time
    AFFINITY = "affinity"  # the session's replica, within the margin of the soonest
    BACKOFF = "backoff"  # every eligible replica is over the backlog bound
    NO_REPLICA = "no_replica"  # no healthy replica can hold the request's peak


@dataclass(frozen=True, slots=True)
class Placement:
    replica_id: str | None  # None: back off
    reason: Reason
    # Every replica that may take the request, best first (the chosen one leads): a caller
    # whose first choice refuses (its queue is full) tries the next. Empty when backing off.
    ranked: tuple[str, ...]
    finish_s: dict[str, float]  # the finish time of each eligible replica, for logs and tests

    @property
    def backoff(self) -> bool:
        return self.replica_id is None


def finish_time_s(replica: ReplicaView, demand: Demand) -> float:
    """Seconds until `demand`'s memory-time is retired on `replica` if sent there now."""
    backlog = replica.committed_memory_time + replica.sent_memory_time + demand.memory_time
    return backlog / replica.drain_rate


def _has_room(replica: ReplicaView, demand: Demand) -> bool:
    """The replica's free KV (at its last report) holds the request's peak: it need not wait
    for memory there."""
    return replica.kv_capacity_bytes - replica.kv_in_use_bytes >= demand.peak_kv_bytes


def _idle(replica: ReplicaView) -> bool:
    return replica.committed_memory_time == 0 and replica.sent_memory_time == 0


def place(
    demand: Demand,
    replicas: Iterable[ReplicaView],
    *,
    max_backlog_s: float = DEFAULT_MAX_BACKLOG_S,
    affinity_margin_s: float = DEFAULT_AFFINITY_MARGIN_S,
) -> Placement:
    """The placement rule (module docstring). Deterministic: the same views give the same
    answer, whatever their order."""
    if not max_backlog_s > 0:
        raise ValueError(f"max_backlog_s must be > 0, got {max_backlog_s}")
    _check_non_negative("affinity_margin_s", affinity_margin_s)
    # A replica whose whole cache cannot hold the request's peak would preempt it forever.
    eligible = [r for r in replicas if r.healthy and demand.peak_kv_bytes <= r.kv_capacity_bytes]
    if not eligible:
        return Placement(None, Reason.NO_REPLICA, (), {})
    finish = {r.replica_id: finish_time_s(r, demand) for r in eligible}
    # Ties go to the lower id: deterministic, and independent of the order Serve lists them in.
    order = sorted(eligible, key=lambda r: (finish[r.replica_id], r.replica_id))
    # An idle replica takes any request that fits its cache: waiting cannot make room there.
    open_ = [r for r in order if finish[r.replica_id] <= max_backlog_s or _idle(r)]
    if not open_:
        return Placement(None, Reason.BACKOFF, (), finish)
    best = open_[0]
    chosen, reason = best, Reason.SOONEST
    # The lowest id among affinity replicas, if several claim the session (should not happen).
    sticky = sorted((r for r in open_ if r.affinity), key=lambda r: r.replica_id)
    if (
        sticky
        and sticky[0] is not best
        and (
            _has_room(sticky[0], demand)
            or finish[sticky[0].replica_id]
            <= finish[best.replica_id] + demand.reuse_s + affinity_margin_s
        )
    ):
        chosen, reason = sticky[0], Reason.AFFINITY
    ranked = (chosen.replica_id, *(r.replica_id for r in open_ if r is not chosen))
    return Placement(chosen.replica_id, reason, ranked, finish)


# ---- predicting a request's demand --------------------------------------------------------------


def script_demand(
    segments: Sequence[tuple[int, int, float | None, int]], costs: EngineCosts
) -> Demand:
    """The demand of a request whose segments are known (a trace script): each segment as
    (context tokens at its start, tokens decoded, call seconds or None, tokens the call
    returns). Calls are priced as Preserve (the context held for the whole call): the most a
    call can cost, since the replica's policy picks the cheapest strategy, so the router never
    underestimates a request with long calls."""
    total = 0.0
    peak = 0
    for context, decoded, api_s, _returned in segments:
        total += decode_memory_time(context, decoded, costs)
        peak = max(peak, context + decoded)
        if api_s is not None:
            total += call_memory_time(context + decoded, api_s, Strategy.PRESERVE, costs)
    return Demand(total, peak * costs.kv_bytes_per_token)


def chat_demand(
    prompt_tokens: int,
    max_tokens: int,
    costs: EngineCosts,
    *,
    expected_calls: int = 0,
    call_s: float = 0.0,
) -> Demand:
    """The demand of a chat turn before the model has said anything: its prompt, decoding up to
    `max_tokens`, and `expected_calls` calls of `call_s` each held at the prompt's size (a
    forced call is one, `auto` may be none). An upper bound on the decode (max_tokens), like
    the per-tool estimates the replica's own policy uses before a request runs."""
    decode = decode_memory_time(prompt_tokens, max_tokens, costs)
    calls = expected_calls * call_memory_time(prompt_tokens, call_s, Strategy.PRESERVE, costs)
    peak = (prompt_tokens + max_tokens) * costs.kv_bytes_per_token
    return Demand(decode + calls, peak, reuse_s=costs.t_fwd(prompt_tokens))


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
