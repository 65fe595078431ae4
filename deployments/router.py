"""The fleet router: a Ray Serve request router that places each request on the engine replica
where its predicted memory-time finishes soonest (lamps_core/placement.py), from the statistics
each replica reports (`EngineReplica.record_routing_stats`).

Thin on purpose: this module turns Serve's objects into the rule's views and back. What it owns:
- the ledger of what it sent to each replica since that replica's last statistics (stats are up
  to `request_routing_stats_period_s` old; the ledger keeps a burst from piling onto the
  replica that looked emptiest);
- the session map (which replica took a conversation's last turn), for affinity;
- turning a pending request (a chat plan, a trace script) into its predicted demand.

Use it in a Serve config (docs/fleet.md):

    request_router_config:
      request_router_class: deployments.router.MemoryAwareRouter
      request_router_kwargs: {max_backlog_s: 30, affinity_margin_s: 0}
      request_routing_stats_period_s: 0.5

`request_router_kwargs` are checked by `RouterOptions` (unknown or out-of-range values fail the
deployment, and tests/test_cluster_configs.py checks every shipped config against it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from lamps_core.api_types import CHARS_PER_TOKEN  # a prompt's length without its tokenizer
from lamps_core.costs import EngineCosts
from lamps_core.placement import (
    DEFAULT_AFFINITY_MARGIN_S,
    DEFAULT_MAX_BACKLOG_S,
    Demand,
    Reason,
    ReplicaView,
    chat_demand,
    place,
    script_demand,
)

if TYPE_CHECKING:
    from ray.serve._private.common import RequestMetadata

logger = logging.getLogger("ray.serve")

# Until a replica has measured its costs: roughly a small model on a CPU. Only the ratio
# between requests matters when every replica uses the same figures.
FALLBACK_COSTS = EngineCosts(
    kv_bytes_per_token=1,
    fwd_intercept_s=0.01,
    fwd_slope_s=0.0001,
    swap_slope_s=0.00001,
    decode_step_s=0.02,
)
# A forced call of a tool the replicas report no estimate for (no records yet).
DEFAULT_CALL_S = 2.0
MAX_SESSIONS = 10_000  # sessions remembered for affinity, least recently used dropped


@dataclass(frozen=True, slots=True)
class _Sent:
    at: float  # router's time.time()
    memory_time: float


class SentLedger:
    """What this router sent each replica, kept until statistics taken after it arrive. Keyed
    by request, so that a request ranked again (its first choice was full) counts once."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[str, _Sent]] = defaultdict(dict)
        self._where: dict[str, str] = {}  # request id -> replica id

    def record(self, replica_id: str, request_id: str, memory_time: float, at: float) -> None:
        previous = self._where.pop(request_id, None)
        if previous is not None:
            self._sent.get(previous, {}).pop(request_id, None)
        self._sent[replica_id][request_id] = _Sent(at, memory_time)
        self._where[request_id] = replica_id

    def discard(self, request_id: str) -> None:
        replica_id = self._where.pop(request_id, None)
        if replica_id is not None:
            self._sent.get(replica_id, {}).pop(request_id, None)

    def move(self, request_id: str, replica_id: str) -> None:
        """The request went elsewhere than recorded: count it there, at the same time."""
        previous = self._where.get(request_id)
        if previous is None or previous == replica_id:
            return
        entry = self._sent.get(previous, {}).pop(request_id, None)
        if entry is not None:
            self.record(replica_id, request_id, entry.memory_time, entry.at)

    def since(self, replica_id: str, stats_time: float) -> tuple[int, float]:
        """(count, memory-time) sent after `stats_time`; older entries are dropped, since the
        statistics already count them. The replica's clock against ours: a skew of a few ms
        between nodes moves an entry by one report at most."""
        entries = self._sent.get(replica_id, {})
        for request_id in [r for r, s in entries.items() if s.at < stats_time]:
            del entries[request_id]
            self._where.pop(request_id, None)
        return len(entries), sum(s.memory_time for s in entries.values())

    def forget(self, replica_id: str) -> None:
        for request_id in self._sent.pop(replica_id, {}):
            self._where.pop(request_id, None)


def replica_view(
    replica_id: str,
    stats: Mapping[str, Any],
    ledger: SentLedger,
    *,
    affinity: bool,
    fallback_capacity: float,
) -> ReplicaView:
    """One replica's view from its `record_routing_stats` dict. A replica without statistics
    yet (just started) looks empty, at the fleet's capacity, with every send counted."""
    stats_time = float(stats.get("stats_time") or 0.0)
    capacity = float(stats.get("kv_capacity_bytes") or 0.0) or fallback_capacity
    count, sent = ledger.since(replica_id, stats_time)
    return ReplicaView(
        replica_id=replica_id,
        kv_capacity_bytes=capacity,
        kv_in_use_bytes=float(stats.get("kv_in_use_bytes") or 0.0),
        kv_paused_bytes=float(stats.get("kv_paused_bytes") or 0.0),
        committed_memory_time=float(stats.get("committed_memory_time") or 0.0),
        # A replica retires at most its whole cache's worth of byte·s per second.
        drain_rate=capacity,
        stats_time=stats_time,
        sent_since_stats=count,
        sent_memory_time=sent,
        healthy=bool(stats.get("healthy", True)),
        affinity=affinity,
    )


def costs_from_stats(all_stats: Sequence[Mapping[str, Any]]) -> EngineCosts:
    """The first replica's measured costs (replicas of one deployment run the same model)."""
    for stats in all_stats:
        try:
            return EngineCosts.from_dict(stats["costs"])
        except (KeyError, TypeError, ValueError):
            continue
    return FALLBACK_COSTS


def session_key(metadata: RequestMetadata) -> str | None:
    """The session of a request to the engine replica: the conversation's key, which the ingress
    computed from a chat turn's messages and sent as the call's Serve `session_id`. Only chat
    turns have one (a trace script is one request); a handle call gets no `session_id` unless
    its caller names one, and the only caller of the engine's chat is the ingress."""
    if metadata.call_method != "chat":
        return None
    return metadata.session_id or None


def conversation_key(messages: Sequence[Any]) -> str | None:
    """A conversation's key: its messages up to and including the first user message, which
    every later turn repeats (what Ray's prefix-aware router matches on, without a tree). The
    ingress computes it once per turn and gives it to Serve as the call's `session_id`, which
    our router and Serve's consistent-hash router key on."""
    if not messages:
        return None
    head: list[Any] = []
    for message in messages:
        head.append(message)
        if isinstance(message, Mapping) and message.get("role") == "user":
            break
    blob = json.dumps(head, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def call_estimates_from_stats(all_stats: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean call seconds per tool as the replicas last reported them (`api_estimates` of
    `record_routing_stats`, from the tool workers' records; every replica reads the same)."""
    for stats in all_stats:
        estimates = stats.get("api_estimates")
        if isinstance(estimates, Mapping) and estimates:
            return {
                str(name): float(seconds)
                for name, seconds in estimates.items()
                if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0
            }
    return {}


def forced_call_s(
    tool_choice: str, tools: Sequence[Mapping[str, Any]], estimates: Mapping[str, float]
) -> float:
    """The predicted duration of the call a chat turn is forced to make: the named tool's
    estimate, or for `required` the longest of the offered tools' (an upper bound, like
    `max_tokens` for the decode); DEFAULT_CALL_S for a tool without records."""
    if tool_choice != "required":
        return estimates.get(tool_choice, DEFAULT_CALL_S)
    names = [str((t.get("function") or {}).get("name")) for t in tools]
    return max((estimates.get(n, DEFAULT_CALL_S) for n in names), default=DEFAULT_CALL_S)


def request_demand(
    call_method: str,
    args: Sequence[Any],
    costs: EngineCosts,
    call_estimates: Mapping[str, float] | None = None,
) -> Demand:
    """The predicted demand of a call on EngineReplica; zero for the small control calls
    (stats, health, ...), which go wherever the backlog is least. `call_estimates`: mean
    seconds per tool, for a forced call."""
    if call_method == "chat" and args:
        plan = args[0]
        chars = sum(len(str(m.get("content") or "")) for m in getattr(plan, "messages", []))
        tool_choice = str(getattr(plan, "tool_choice", "auto"))
        tools = getattr(plan, "tools", None) or []
        forced = tool_choice not in ("auto", "none") and bool(tools)
        return chat_demand(
            max(1, math.ceil(chars / CHARS_PER_TOKEN)),
            int(getattr(plan, "max_tokens", 0) or 0),
            costs,
            expected_calls=1 if forced else 0,
            call_s=forced_call_s(tool_choice, tools, call_estimates or {}) if forced else 0.0,
        )
    if call_method == "replay" and len(args) >= 2:
        segments = [
            (s.prompt_tokens, s.completion_tokens, s.api_time, s.api_token_length or 0)
            for s in getattr(args[1], "segments", [])
        ]
        return script_demand(segments, costs)
    return Demand(0.0, 0.0)


class RouterOptions(BaseModel):
    """The router's `request_router_kwargs` in a Serve config."""

    model_config = ConfigDict(extra="forbid")

    max_backlog_s: float = Field(
        default=DEFAULT_MAX_BACKLOG_S,
        gt=0,
        allow_inf_nan=False,
        description="A replica whose finish time for the request would exceed this is full; "
        "when all are, the request waits at the router (docs/fleet.md).",
    )
    affinity_margin_s: float = Field(
        default=DEFAULT_AFFINITY_MARGIN_S,
        ge=0,
        allow_inf_nan=False,
        description="How much later than the best one a conversation's own replica may finish "
        "and still take its next turn, on top of the prefill its held context saves (the "
        "request's `T_fwd` from the replicas' measured costs).",
    )


class MemoryAwareRouter(RequestRouter):
    """Serve's router API: `choose_replicas` returns ranked groups (one replica each, best
    first; Serve tries the next when one's queue is full) or nothing with `should_backoff`
    set, which makes Serve wait (exponential backoff) and ask again: the request queues at
    the router until a replica's backlog falls under the bound.

    Not FIFOMixin: with it, Serve hands the replica chosen for one request to the oldest
    pending one, whose demand and session may be nothing alike (a long-call request placed
    where a short chat turn's context is). Here each request goes where its own rank says."""

    def initialize_state(self, **kwargs: Any) -> None:
        try:
            options = RouterOptions.model_validate(kwargs)
        except ValidationError as exc:
            raise ValueError(f"MemoryAwareRouter options: {exc}") from None
        self._max_backlog_s = options.max_backlog_s
        self._affinity_margin_s = options.affinity_margin_s
        self._ledger = SentLedger()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        # The session of each request between choose_replicas and on_request_routed.
        self._pending_sessions: OrderedDict[str, str] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # Every answer here is final for this attempt: back off before asking again.
        pending_request.routing_context.should_backoff = True
        method = pending_request.metadata.call_method
        all_stats = [r.routing_stats or {} for r in candidate_replicas]
        costs = costs_from_stats(all_stats)
        demand = request_demand(
            method, pending_request.args, costs, call_estimates_from_stats(all_stats)
        )
        key = session_key(pending_request.metadata)
        sticky = self._sessions.get(key) if key is not None else None
        capacities = [float(s.get("kv_capacity_bytes") or 0.0) for s in all_stats]
        cap = max(capacities) or 1.0
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        # Ranked again (its first choice was full): its own earlier count must not weigh on it.
        request_id = pending_request.metadata.internal_request_id
        self._ledger.discard(request_id)
        views = [
            replica_view(rid, stats, self._ledger, affinity=rid == sticky, fallback_capacity=cap)
            for rid, stats in zip(by_id, all_stats, strict=True)
        ]
        placement = place(
            demand,
            views,
            max_backlog_s=self._max_backlog_s,
            affinity_margin_s=self._affinity_margin_s,
        )
        if placement.reason is Reason.NO_REPLICA:
            # Nothing healthy is big enough: Serve's own choice, so that the replica's error
            # reaches the client instead of the request waiting forever.
            return [sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)]
        if placement.backoff:
            return []
        # Counted now, against the first choice: Serve reports where a request went only
        # under its rejection protocol (on_request_routed), and the next request may be
        # ranked before that. A first choice that was full is corrected there, or by the
        # next ranking of this request, which replaces this entry.
        self._ledger.record(placement.ranked[0], request_id, demand.memory_time, time.time())
        if key is not None:
            self._remember(self._pending_sessions, request_id, key)
            self._remember(self._sessions, key, placement.ranked[0])
        return [[by_id[rid]] for rid in placement.ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """Move the request's count and its session to the replica that took it."""
        request_id = pending_request.metadata.internal_request_id
        self._ledger.move(request_id, replica_id.unique_id)
        key = self._pending_sessions.pop(request_id, None)
        if key is not None:
            self._remember(self._sessions, key, replica_id.unique_id)

    @staticmethod
    def _remember(table: OrderedDict[str, str], key: str, value: str) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_SESSIONS:
            table.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ledger.forget(replica_id.unique_id)
