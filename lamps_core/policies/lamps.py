"""LAMPS: rank waiting requests by the memory-over-time of their remaining work (`scoring.py`),
handle each API call with the strategy predicted for it, and promote starving requests.

Beyond the paper, for vLLM V1 (both on by default, each an option for ablations):
- `admission`: a segment is admitted only if it fits at its predicted peak beside what running
  segments and preserved calls are promised (`admission.AdmissionGate`), so running requests are
  not preempted and recomputed when they grow.
- `keep`: a fourth strategy, Keep (`Strategy.KEEP`): the blocks stay until memory is needed, then
  go back to the prefix cache, latest predicted return first. Its waste is the learned chance of
  eviction times a Discard's (`admission.KeepEvictionEstimate`). A call whose plan is Swap or
  Discard is kept too when its pause finds memory slack (`SLACK_FREE_SHARE`), and takes its
  plan's strategy only if memory is needed before it returns: where memory is slack LAMPS then
  costs what Preserve costs, nothing.
- `swap_in_async` (every policy's attribute, an option here): a swapped-out context is copied
  back while other requests run, and the continuation joins the batch a step later
  (`lamps_vllm/swap_connector.py`); off, the copy runs ahead of the forward pass that reads it.

A request's score depends only on its context, its prediction and the engine load when it was
scored, so it is computed once per (engine request, context length, predictor version) and reused:
a re-rank costs a dictionary lookup and the starvation test per request. The queue is re-ranked
every `rerank_every_steps` steps because waiting time enters the order only through the guard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from lamps_core.admission import DEFAULT_MIN_MARGIN, AdmissionGate, KeepEvictionEstimate
from lamps_core.call_durations import ApiEstimate
from lamps_core.costs import EngineCosts
from lamps_core.policies.infercept import (
    SwapBudget,
    blocks_of,
    check_swap_budget,
    release_option,
)
from lamps_core.policy import (
    EngineView,
    PausedCall,
    Priority,
    QueuedRequest,
    SchedulingPolicy,
    Strategy,
)
from lamps_core.predictors import (
    DEFAULT_API_S,
    DEFAULT_API_TOKENS,
    DEFAULT_DECODE_TOKENS,
    PredictionDefaults,
    Predictor,
    make_predictor,
)
from lamps_core.scoring import remaining_service_s, score_remaining
from lamps_core.starvation import (
    DEFAULT_MAX_PASSED_OVER,
    RANKED,
    StarvationGuard,
    promoted_priority,
)
from lamps_core.waste import argmin_strategy, min_waste_strategy, strategy_wastes

DEFAULT_RERANK_EVERY_STEPS = 10
# Plans of requests that finish without a call are popped only by `forget`; past this many the
# oldest half goes (a dropped plan is only recomputed, never wrong).
_MAX_PLANS = 1 << 15
# A plan's strategy stands at the pause unless the segment's real context is this far (relative)
# from the peak the plan predicted: the waste comparison it came from rested on a wrong length.
REPLAN_CONTEXT_ERROR = 0.25
# A pause finds memory slack when at least this share of the KV cache is free: then a call the
# plan would swap or discard is kept instead (its blocks stay until memory is needed, and then
# go to the planned strategy). The waste formulas price memory-time as if it were always
# scarce; where it is not, swapping costs copies on the critical path and buys nothing
# (measured on the H100: half the calls swapped with memory to spare, LAMPS 1.04-1.11x every
# baseline's mean). Keeping them is also how the eviction estimate learns that kept blocks
# survive: a call never kept teaches it nothing.
SLACK_FREE_SHARE = 0.25
# Promoted augmented requests remembered (by logical id) so a promotion lasts until the request
# finishes, across its segments, re-ranks and preemptions; the oldest go past this many.
_MAX_PROMOTED = 1 << 14


@dataclass(frozen=True, slots=True)
class _Plan:
    """What was predicted for a queued request when it was scored."""

    context_tokens: int  # the context it was scored at; a preempted request comes back longer
    version: tuple[int, int, int]  # predictor version, keep estimate bucket, costs version
    priority: Priority
    next_call: Strategy | None  # the predicted strategy of the call ending this segment
    next_call_s: float  # its predicted duration
    service_s: float  # predicted remaining service (decode and calls), for the latency guard
    peak_tokens: int  # context when this segment ends: what admission promises it


class LampsPolicy(SchedulingPolicy):
    name = "lamps"

    def __init__(
        self,
        *,
        costs: EngineCosts,
        predictor: str | Predictor = "oracle",
        noise: float | None = None,
        seed: int = 0,
        default_decode_tokens: int = DEFAULT_DECODE_TOKENS,
        default_api_s: float = DEFAULT_API_S,
        default_api_tokens: int = DEFAULT_API_TOKENS,
        swap: bool = True,
        swap_budget_tokens: int | None = None,
        max_wait_s: float | None = None,
        max_passed_over: int | None = DEFAULT_MAX_PASSED_OVER,
        max_queued_s: float | None = None,
        max_latency_s: float | None = None,
        rerank_every_steps: int = DEFAULT_RERANK_EVERY_STEPS,
        admission: bool = True,
        keep: bool = True,
        swap_in_async: bool = True,
        slack_free_share: float | None = SLACK_FREE_SHARE,
        admission_min_margin: float = DEFAULT_MIN_MARGIN,
    ) -> None:
        """`slack_free_share`: the free share of the cache at a pause above which a call the plan
        would swap or discard is kept instead (None: never; the plan always stands).
        `admission_min_margin`: the lowest margin the admission gate decays to (negative: an
        overcommit while nothing is preempted; 0: never more than the predicted peaks)."""
        if not isinstance(rerank_every_steps, int) or rerank_every_steps < 0:
            raise ValueError(f"rerank_every_steps must be an int >= 0, got {rerank_every_steps!r}")
        self.costs = costs
        # The costs the current plans were scored with, and their version (see `_version`).
        self._planned_costs = costs
        self._costs_version = 0
        defaults = PredictionDefaults(default_decode_tokens, default_api_s, default_api_tokens)
        self.predictor = make_predictor(predictor, noise=noise, seed=seed, defaults=defaults)
        self.allow_swap = swap
        self.swap_budget_tokens = check_swap_budget(swap_budget_tokens)
        self.guard = StarvationGuard(max_wait_s, max_passed_over, max_queued_s, max_latency_s)
        self._is_starving = self.guard.is_starving
        # An instance value shadowing the interface's class default: it is an option here.
        self.rerank_every_steps = rerank_every_steps
        if slack_free_share is not None and not 0.0 <= slack_free_share <= 1.0:
            raise ValueError(f"slack_free_share must be in [0, 1] or None, got {slack_free_share}")
        self.slack_free_share = slack_free_share
        self.gate = (
            AdmissionGate(min_margin=admission_min_margin, margin=max(admission_min_margin, 0.0))
            if admission
            else None
        )
        self.keep_estimate = KeepEvictionEstimate() if keep else None
        # A refused swap is better kept than dropped: kept blocks cost nothing until needed.
        self.swap_refused_strategy = Strategy.KEEP if keep else Strategy.DISCARD
        self.swap_in_async = swap_in_async
        self._plans: dict[str, _Plan] = {}
        # Predicted durations of calls under way: engine request id -> (predictor version, s).
        self._call_s: dict[str, tuple[int, float]] = {}
        # Augmented requests promoted by the starvation guard (logical id, else engine id).
        self._promoted: dict[str, None] = {}
        # Calls kept because memory was slack at their pause: the strategy their plan had,
        # which they take if memory is needed before they return.
        self._kept_instead: dict[str, Strategy] = {}
        self._counts: Counter[str] = Counter()

    def update_api_estimates(self, estimates: Mapping[str, ApiEstimate]) -> None:
        """New per-API-type mean durations for an estimates predictor (no-op for the others)."""
        self.predictor.update(estimates)

    def _keep_evict_p(self) -> float | None:
        return None if self.keep_estimate is None else self.keep_estimate.probability

    def _version(self) -> tuple[int, int, int]:
        # Plans are rescored when the predictor changes, when the eviction estimate moves to
        # another twentieth, or when the engine's measured costs move materially (finer changes
        # would rescore every waiting request too often: the fit moves a little at every
        # prefill-only step).
        p = self._keep_evict_p()
        return (self.predictor.version, -1 if p is None else round(p * 20), self._costs_version)

    def update_costs(self, costs: EngineCosts) -> None:
        self.costs = costs
        if _costs_moved(self._planned_costs, costs):
            self._planned_costs = costs
            self._costs_version += 1

    def forget(self, engine_request_id: str) -> None:
        """Drops what is remembered of a finished engine request."""
        self._plans.pop(engine_request_id, None)
        self._call_s.pop(engine_request_id, None)

    # Ranking

    def counters(self) -> Mapping[str, int]:
        return self._counts

    def priority(self, request: QueuedRequest, engine: EngineView) -> Priority:
        # Runs for every waiting request at every re-rank: kept to a lookup and the guard's test.
        key = request.meta.request_id if request.meta is not None else request.engine_request_id
        if key in self._promoted:  # promoted until it finishes, as in the paper
            return promoted_priority(request)
        plan = self._current_plan(request, engine)
        if self._is_starving(request, engine, plan.service_s):
            self._promote(key)
            return promoted_priority(request)
        return plan.priority

    def _promote(self, key: str) -> None:
        self._counts["promoted"] += 1
        if len(self._promoted) >= _MAX_PROMOTED:
            for oldest in list(islice(self._promoted, _MAX_PROMOTED // 2)):
                del self._promoted[oldest]
        self._promoted[key] = None

    def _current_plan(self, request: QueuedRequest, engine: EngineView) -> _Plan:
        plan = self._plans.get(request.engine_request_id)
        if (
            plan is None
            or plan.context_tokens != request.context_tokens
            or plan.version != self._version()
        ):
            plan = self._plan(request, engine)
        return plan

    def _plan(self, request: QueuedRequest, engine: EngineView) -> _Plan:
        prediction = self.predictor.predict(request.meta, request.generated_tokens)
        scored = score_remaining(
            request.context_tokens,
            prediction,
            self.costs,
            other_tokens=engine.running_tokens,
            allow_swap=self.allow_swap,
            keep_evict_p=self._keep_evict_p(),
        )
        plan = _Plan(
            context_tokens=request.context_tokens,
            version=self._version(),
            priority=(
                RANKED,
                scored.memory_time,
                request.arrival_time,
                request.engine_request_id,
            ),
            next_call=scored.next_call,
            next_call_s=prediction.api_s,
            service_s=remaining_service_s(prediction, self.costs),
            peak_tokens=request.context_tokens + prediction.decode_tokens,
        )
        if len(self._plans) >= _MAX_PLANS:
            for stale in list(islice(self._plans, _MAX_PLANS // 2)):
                del self._plans[stale]
        self._plans[request.engine_request_id] = plan
        return plan

    # Admission

    def admission_tokens(self, request: QueuedRequest, engine: EngineView) -> int | None:
        # Requests that did not come through our serving layer carry no prediction to promise.
        if self.gate is None or request.meta is None:
            return None
        return self._current_plan(request, engine).peak_tokens

    def admits(self, peak_blocks: int, committed_blocks: int, engine: EngineView) -> bool:
        if self.gate is None:
            return True
        admitted = self.gate.admits(
            peak_blocks, committed_blocks, engine.total_blocks, running=engine.running_requests
        )
        if admitted:
            self.gate.admitted()
        return admitted

    def on_preemption(self) -> None:
        if self.gate is not None:
            self.gate.missed()

    def on_keep_outcome(self, evicted: bool) -> None:
        if self.keep_estimate is not None:
            self.keep_estimate.observe(evicted)

    # Calls

    def strategy_for_call(self, call: PausedCall, engine: EngineView) -> Strategy:
        # The strategy predicted when the request was ranked (from its predicted pre-call length),
        # applied at once: preserved first only when Preserve is the prediction. The engine's
        # state overrules the plan in one case: the segment ended far from the predicted length
        # (`REPLAN_CONTEXT_ERROR`), so the wastes are compared again with the real context and
        # the load now. A stale plan (another predictor, keep estimate or costs) is not used.
        plan = self._plans.pop(call.engine_request_id, None)
        version = self.predictor.version
        why_not = _why_not_planned(plan, self._version(), call.context_tokens)
        self._counts["calls_as_planned" if why_not is None else f"calls_replanned_{why_not}"] += 1
        if plan is not None and plan.next_call is not None and why_not is None:
            strategy, call_s = plan.next_call, plan.next_call_s
        else:
            call_s = self.predictor.call_duration(call.meta)
            tokens = call.context_tokens
            strategy = min_waste_strategy(
                tokens,
                call_s,
                engine.running_tokens,
                engine.running_tokens + tokens,
                self.costs,
                allow_swap=self.allow_swap,
                keep_evict_p=self._keep_evict_p(),
            )
        if strategy in (Strategy.SWAP, Strategy.DISCARD) and self._memory_slack(engine):
            self._kept_instead[call.engine_request_id] = strategy
            self._counts["calls_kept_while_slack"] += 1
            strategy = Strategy.KEEP
        if strategy in (Strategy.PRESERVE, Strategy.KEEP):
            self._call_s[call.engine_request_id] = (version, call_s)
        return strategy

    def _memory_slack(self, engine: EngineView) -> bool:
        share = self.slack_free_share
        if share is None or self.keep_estimate is None or engine.total_blocks <= 0:
            return False
        return engine.free_blocks >= share * engine.total_blocks

    def _predicted_call_s(self, call: PausedCall) -> float:
        version = self.predictor.version
        known = self._call_s.get(call.engine_request_id)
        if known is not None and known[0] == version:
            return known[1]
        seconds = self.predictor.call_duration(call.meta)
        self._call_s[call.engine_request_id] = (version, seconds)
        return seconds

    def _review_call_s(self, call: PausedCall, elapsed_s: float) -> float:
        """The call duration a review weighs preserving by. With a learned distribution of the
        call's duration, the time it still has to go given how long it has run,
        `E[D - e | D > e]`: a call past its tool's fast mode is priced as a slow one, and the
        seconds it has held its blocks are spent whatever is decided now. Without one, a call
        that has outlived its prediction lasts at least as long as it has run: past that point
        LAMPS falls back to INFERCEPT's elapsed-time estimate. Either way, never past the call's
        deadline (its timeout): a call 25 s into a 30-s timeout has at most 5 s to go."""
        remaining = self.predictor.remaining_call_s(call.meta, elapsed_s)
        if remaining is None:
            remaining = max(self._predicted_call_s(call), elapsed_s)
        if call.deadline is not None:  # no call outlives its timeout
            remaining = min(remaining, max(call.deadline - (call.paused_at + elapsed_s), 0.0))
        return remaining

    def review_paused(
        self, paused: Sequence[PausedCall], engine: EngineView, blocks_needed: int
    ) -> list[tuple[PausedCall, Strategy]]:
        costs, running = self.costs, engine.running_tokens
        moves, freed = self._release_kept(paused, engine, blocks_needed)
        candidates: list[tuple[dict[Strategy, float], PausedCall]] = []
        for call in paused:
            if call.strategy is not Strategy.PRESERVE:
                continue
            api_s = self._review_call_s(call, engine.now - call.paused_at)
            tokens = call.context_tokens
            wastes = strategy_wastes(
                tokens, api_s, running, running + tokens, costs, allow_swap=self.allow_swap
            )
            candidates.append((wastes, call))
        self._forget_calls_except(paused)

        budget = SwapBudget(self.swap_budget_tokens)
        held: list[tuple[dict[Strategy, float], PausedCall]] = []
        # 1. Preserved calls whose predicted strategy is no longer Preserve (a longer estimate, an
        #    overrun, a heavier batch) go to it; most wasteful first, so they get the swap budget.
        candidates.sort(
            key=lambda wc: (-wc[0][Strategy.PRESERVE], wc[1].paused_at, wc[1].engine_request_id)
        )
        for wastes, call in candidates:
            if argmin_strategy(wastes) is not Strategy.PRESERVE:
                target, releasing = release_option(
                    call, engine, costs, allow_swap=self.allow_swap, budget=budget
                )
                # Over the swap budget the fallback is discard, which may not beat preserving.
                if releasing < wastes[Strategy.PRESERVE]:
                    if target is Strategy.SWAP:
                        budget.take(call.context_tokens)
                    moves.append((call, target))
                    freed += blocks_of(call.context_tokens, engine.block_size)
                    continue
            held.append((wastes, call))
        if freed >= blocks_needed:
            return moves

        # 2. Memory is needed. The artifact "demotes paused requests whose waste is below the
        #    current maximum to their predicted strategy": the preserved calls are those predicted
        #    to be cheapest kept, so what is ranked is the waste their demotion costs (the best of
        #    discard and swap). Demoting cheapest first frees memory for the least waste, and the
        #    call whose demotion costs the current maximum goes last, only if nothing else covers
        #    `blocks_needed` (unlike the artifact, which would never free it, a single preserved
        #    call can still be freed).
        held.sort(
            key=lambda wc: (
                min(w for s, w in wc[0].items() if s is not Strategy.PRESERVE),
                wc[1].paused_at,
                wc[1].engine_request_id,
            )
        )
        for _, call in held:
            if freed >= blocks_needed:
                break
            target, _ = release_option(
                call, engine, costs, allow_swap=self.allow_swap, budget=budget
            )
            if target is Strategy.SWAP:
                budget.take(call.context_tokens)
            moves.append((call, target))
            freed += blocks_of(call.context_tokens, engine.block_size)
        return moves

    def _release_kept(
        self, paused: Sequence[PausedCall], engine: EngineView, blocks_needed: int
    ) -> tuple[list[tuple[PausedCall, Strategy]], int]:
        """Kept calls cost nothing until memory is needed; then they go first, the one predicted
        to return last first, so a call about to return still finds its blocks."""
        kept = [call for call in paused if call.strategy is Strategy.KEEP]
        if blocks_needed <= 0 or not kept:
            return [], 0
        kept.sort(key=lambda c: (-(c.paused_at + self._predicted_call_s(c)), c.engine_request_id))
        moves: list[tuple[PausedCall, Strategy]] = []
        freed = 0
        for call in kept:
            if freed >= blocks_needed:
                break
            # A call kept because memory was slack goes to its plan's strategy; a call kept by
            # its plan goes back to the prefix cache, where its continuation may still find it.
            planned = self._kept_instead.pop(call.engine_request_id, Strategy.DISCARD)
            target = Strategy.SWAP if planned is Strategy.SWAP and self.allow_swap else planned
            moves.append((call, target))
            freed += blocks_of(call.context_tokens, engine.block_size)
        return moves, freed

    def _forget_calls_except(self, paused: Sequence[PausedCall]) -> None:
        # Durations of calls no longer paused (returned, or no longer preserved) are not needed.
        live = {call.engine_request_id for call in paused}
        if len(self._call_s) > len(paused):
            self._call_s = {rid: v for rid, v in self._call_s.items() if rid in live}
        if len(self._kept_instead) > len(paused):
            self._kept_instead = {r: s for r, s in self._kept_instead.items() if r in live}


# A cost that moved by more than this (relative) since the plans were scored rescores them.
COST_CHANGE_RESCORES = 0.10


def _costs_moved(planned: EngineCosts, now: EngineCosts) -> bool:
    for name in ("fwd_intercept_s", "fwd_slope_s", "swap_slope_s", "decode_step_s"):
        before, after = getattr(planned, name), getattr(now, name)
        if abs(after - before) > COST_CHANGE_RESCORES * max(abs(before), 1e-12):
            return True
    return planned.kv_bytes_per_token != now.kv_bytes_per_token


def _why_not_planned(
    plan: _Plan | None, version: tuple[int, int, int], context_tokens: int
) -> str | None:
    """Why a pause cannot take its plan's strategy (a counter's suffix); None: it can."""
    if plan is None:
        return "unranked"
    if plan.version != version:
        return "stale"  # made under another predictor version, keep estimate or costs
    if plan.next_call is None:
        return "unforeseen"  # its prediction had no call at the end of this segment
    if abs(context_tokens - plan.peak_tokens) > REPLAN_CONTEXT_ERROR * max(plan.peak_tokens, 1):
        return "length"
    return None
