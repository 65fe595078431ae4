"""The scheduler plugin (`scheduler_cls`): vLLM's scheduler with a `lamps_core` policy deciding
the order of waiting requests and what a request's KV cache does while its API call runs.

KV block bookkeeping stays vLLM's. This class swaps the waiting queues for policy-ordered ones,
and when a segment ends in an API call it applies the policy's strategy to the finished engine
request's blocks:
- Discard: freed as vLLM frees them (they stay findable in the prefix cache until reused);
- Preserve: not freed; the request's block table is kept under its engine id until the next
  segment of the same augmented request has been scheduled (and has taken those blocks from the
  prefix cache), or until the policy demotes the call to free memory.
- Keep: held like Preserve, but promised to nobody: admission does not count the blocks, and
  when memory is needed the policy gives them back first (to the prefix cache, where the
  continuation may still find them).
Admission: a waiting segment whose policy predicts its peak context (`admission_tokens`) gets
blocks only if the policy `admits` it beside the blocks promised to running segments (their
predicted peaks) and to preserved calls. It is gated where vLLM allocates a waiting request's
slots, so a refusal looks to vLLM like a full cache: it stops admitting for this step.
Every policy call runs behind a guard: a policy that raises is logged and counted, and the step
goes on with first-come-first-served order and Discard, never taking the engine down.
`LampsScheduler` is for engines without async scheduling (the CPU backend); `LampsAsyncScheduler`
for GPUs, where subclassing the synchronous scheduler would turn async scheduling off.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm import envs
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from lamps_core.call_durations import ApiEstimate
from lamps_core.policies import make_policy, policy_options
from lamps_core.policies.infercept import blocks_of
from lamps_core.policy import (
    EngineView,
    PausedCall,
    Priority,
    QueuedRequest,
    SchedulingPolicy,
    Strategy,
)
from lamps_core.predictors import Predictor, ToolEstimatePredictor
from lamps_core.request_meta import RequestMeta
from lamps_core.scoring import committed_memory_time
from lamps_vllm.config import SchedulerPluginConfig
from lamps_vllm.hold_table import Hold, HoldTable
from lamps_vllm.holds import CONTROL_METHOD
from lamps_vllm.parent_watch import exit_with_parent
from lamps_vllm.profiling import StepProfiler, cost_cache_file, host_copy_seconds_per_byte
from lamps_vllm.request_queue import PolicyRequestQueue
from lamps_vllm.swap_connector import LampsSwapConnector

logger = logging.getLogger(__name__)

# Finishes that end a segment normally; aborted requests are not pausing for an API call.
_SEGMENT_END = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
# `Request.stop_reason` of a segment the plugin ended at a tool call's closing tokens.
CALL_END_STOP_REASON = "tool_call"
STATS_KEY = "lamps"  # our statistics ride in SchedulerStats.kv_connector_stats under this key
_HELD = (Strategy.PRESERVE, Strategy.KEEP)  # strategies whose blocks the plugin holds
# Statuses of a request vLLM is about to start (or restart) from the waiting queue.
_ADMITTING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)
# The default policy's key among `_policies`: outside the variant label alphabet, so no clash.
_DEFAULT_POLICY_KEY = "(default)"
_COMMITTED_EVERY_S = 0.25  # the fleet router reads the replicas' statistics every 0.5 s
# Up to this many requests in the engine, a change of shape recomputes the committed
# memory-time at once (about 15 us a request, bench/policy_cost.py: under 1 ms); past it, a
# recomputation every step a request came or went would cost a GPU step's worth.
_COMMITTED_AT_ONCE_MAX_REQUESTS = 64


@dataclass(slots=True)
class _Tracked:
    """What the plugin remembers of an engine request while it is in the scheduler."""

    meta: RequestMeta | None
    queued_at: float  # when it last entered the waiting queue (arrival, or a preemption)
    scheduling_steps_at_queue: int
    waited_s: float = 0.0  # in the queue before it was last scheduled (it may be preempted)


class LampsScheduler(Scheduler):
    """vLLM's scheduler with the waiting order and API-call handling of a `lamps_core` policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        exit_with_parent()  # an orphaned engine core would hold the KV cache forever
        self.lamps_config = SchedulerPluginConfig.from_additional_config(
            self.vllm_config.additional_config
        )
        self.lamps_profiler = StepProfiler(
            kv_bytes_per_token=self._kv_bytes_per_token(),
            swap_seconds_per_byte=(
                1.0 / self.lamps_config.swap_bytes_per_s
                if self.lamps_config.swap_bytes_per_s
                else host_copy_seconds_per_byte()
            ),
            cache_file=cost_cache_file(
                Path(envs.VLLM_CACHE_ROOT),
                self.vllm_config.model_config.model,
                self.vllm_config.model_config.dtype,
                self.block_size,
                self.vllm_config.device_config.device_type,
            ),
        )
        self._step_started: dict[int, tuple[float, int, int, int]] = {}
        self._api_estimates: dict[str, ApiEstimate] = {}
        self._held_block_seconds = 0.0
        self._held_since = time.monotonic()
        self._last_output_at = 0.0
        self._policies: dict[str, SchedulingPolicy] = {}
        self._rerank_every = 0  # steps between re-ranks, kept by `_policy`
        # Every policy this engine runs is built here, once: a request can only name one of
        # them (`RequestMeta.policy_variant`), never have one made for it.
        self.lamps_policy = self._policy(
            _DEFAULT_POLICY_KEY, self.lamps_config.policy, self.lamps_config.policy_options
        )
        for label, variant in self.lamps_config.policy_variants.items():
            self._policy(label, variant.policy, variant.policy_options)
        self._tracked: dict[str, _Tracked] = {}
        # Everything held for paused calls, on the device or in the host pool, by owner.
        self.holds = HoldTable(
            self._free_request_blocks,
            self.connector.drop_logical if self._can_swap() else None,
            self.lamps_config.max_preserve_s,
        )
        self._api_estimates_version = -1  # of the estimates installed (RequestMeta's)
        self._stats_due = False  # a control call changed what is held: publish a step's stats
        # Committed memory-time for the fleet router (`_committed_memory_time`); the tool
        # estimates predict it under policies without a predictor of their own.
        self._estimates = ToolEstimatePredictor()
        self._committed: float | None = None
        self._committed_at = -math.inf
        self._committed_shape = (0, 0, 0)
        self._pausing: tuple[PausedCall, Strategy] | None = None  # set during _free_request
        self._steps = 0
        self._scheduling_steps = 0  # steps in which some waiting request was scheduled
        self.lamps_counts: Counter[str] = Counter()
        self.lamps_times: Counter[str] = Counter()  # seconds, by what they were spent on
        self.waiting = PolicyRequestQueue(self._priority, self._engine_view)
        self.skipped_waiting = PolicyRequestQueue(self._priority, self._engine_view)
        # Admission: predicted peak context (tokens) of each admitted engine request, and the
        # blocks promised this step (None: not yet counted in this step).
        self._peaks: dict[str, int] = {}
        self._committed_blocks: int | None = None
        self._running_tokens: int | None = None  # C_batch, summed once a step
        # Admitted requests whose swapped-out KV is being copied back (WAITING_FOR_REMOTE_KVS,
        # then waiting for their first step): they hold blocks and their peak is promised.
        self._loading: dict[str, Request] = {}
        self._allocate_slots = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._gated_allocate_slots  # type: ignore[method-assign]
        if self._can_swap():
            self.connector.load_async_for = self._swap_in_async
        install_control()
        logger.info("LAMPS scheduler running policy %r", self.lamps_config.policy)

    # ---- policies ----

    def _policy(self, key: str, name: str, options: dict[str, Any]) -> SchedulingPolicy:
        """Build policy `name` and keep it under `key` (start-up only)."""
        if "swap" in policy_options(name) and not self._can_swap():
            options = {**options, "swap": False}  # no swap path in this engine
        policy = make_policy(name, costs=self.lamps_profiler.costs, **options)
        policy.update_api_estimates(self._api_estimates)
        self._policies[key] = policy
        # The most frequent re-rank any policy in use asks for; 0 is "never", not "most often".
        self._rerank_every = min(
            (p.rerank_every_steps for p in self._policies.values() if p.rerank_every_steps),
            default=0,
        )
        return policy

    def _can_swap(self) -> bool:
        return isinstance(self.connector, LampsSwapConnector)

    def _policy_for(self, meta: RequestMeta | None) -> SchedulingPolicy:
        """The policy variant the request names (a benchmark switching policies on one engine),
        else the engine's default."""
        if meta is None or meta.policy_variant is None:
            return self.lamps_policy
        policy = self._policies.get(meta.policy_variant)
        if policy is None or meta.policy_variant == _DEFAULT_POLICY_KEY:
            # The serving layer refuses unknown labels; one that still arrives gets the default
            # rather than an error in the engine core. Counted per lookup, logged the first time.
            self.lamps_counts["unknown_policy_variant"] += 1
            if self.lamps_counts["unknown_policy_variant"] == 1:
                logger.warning(
                    "unknown policy variant %r; using %r (variants: %s)",
                    meta.policy_variant[:64],
                    self.lamps_config.policy,
                    ", ".join(self.lamps_config.policy_variants) or "none",
                )
            return self.lamps_policy
        return policy

    def _swap_in_async(self, request: Request) -> bool:
        """Whether the request's swapped-out KV is loaded while other requests run (its
        policy's choice; a benchmark compares both on one engine)."""
        return self._policy_for(self._track(request).meta).swap_in_async

    def _priority(self, request: Request, engine: EngineView) -> Priority:
        view = self._queued_view(request)
        try:
            return self._policy_for(view.meta).priority(view, engine)
        except Exception:
            self._policy_failed("priority")
            # After every ranked request (their first element is a small rank), oldest first.
            return (math.inf, view.arrival_time, view.engine_request_id)

    def _policy_failed(self, what: str) -> None:
        """A policy raised: logged (with the traceback, once per kind) and counted; the caller
        falls back to vLLM's behaviour for this decision."""
        first = not self.lamps_counts[f"policy_errors_{what}"]
        self.lamps_counts["policy_errors"] += 1
        self.lamps_counts[f"policy_errors_{what}"] += 1
        if first:
            logger.exception("scheduling policy failed in %s; falling back for this step", what)
        else:
            logger.warning("scheduling policy failed in %s again; falling back", what)

    # ---- engine costs, measured on the steps this scheduler runs ----

    def _kv_bytes_per_token(self) -> int:
        groups = self.kv_cache_config.kv_cache_groups
        per_block = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups)
        return per_block // self.block_size

    def _step_scheduled(self, output: SchedulerOutput) -> None:
        scheduled = output.num_scheduled_tokens
        prefill = sum(n for n in scheduled.values() if n > 1)
        decoding = [rid for rid, n in scheduled.items() if n == 1]
        decode = len(decoding)
        requests = self.requests
        context = sum(requests[rid].num_computed_tokens for rid in decoding if rid in requests)
        self.lamps_counts["prefill_tokens"] += prefill
        self.lamps_counts["decode_tokens"] += decode
        # decode_tokens / decode_steps is the mean decode batch: what the engine's tokens/s
        # with calls is compared with (the same engine without calls at that batch).
        self.lamps_counts["decode_steps"] += 1 if decode else 0
        self._step_started[id(output)] = (time.perf_counter(), prefill, decode, context)

    def _step_finished(self, output: SchedulerOutput) -> None:
        started = self._step_started.pop(id(output), None)
        now = time.perf_counter()
        if started is not None and (started[1] or started[2]):
            # With async scheduling the next step is scheduled before this one's output
            # returns: its time runs from the later of its scheduling and the last output.
            seconds = now - max(started[0], self._last_output_at)
            self.lamps_times["step_s"] += seconds
            if self.lamps_profiler.observe(started[1], started[2], seconds, started[3]):
                for policy in self._policies.values():
                    policy.update_costs(self.lamps_profiler.costs)
        self._last_output_at = now

    def update_from_output(self, scheduler_output: SchedulerOutput, *args: Any) -> Any:
        self._step_finished(scheduler_output)
        return super().update_from_output(scheduler_output, *args)

    # ---- views for the policy ----

    def _engine_view(self) -> EngineView:
        pool = self.kv_cache_manager.block_pool
        if self._running_tokens is None:
            # Summed once a step: admission asks for a view per waiting request it considers.
            self._running_tokens = sum(r.num_tokens for r in self.running)
        return EngineView(
            now=time.time(),
            running_tokens=self._running_tokens,
            free_blocks=pool.get_num_free_blocks(),
            total_blocks=pool.num_gpu_blocks - 1,  # less vLLM's null block
            block_size=self.block_size,
            running_requests=len(self.running),
        )

    def _track(self, request: Request) -> _Tracked:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            params = request.sampling_params
            meta = RequestMeta.from_extra_args(params.extra_args if params else None)
            tracked = _Tracked(meta, time.time(), self._scheduling_steps)
            self._tracked[request.request_id] = tracked
        return tracked

    def _queued_view(self, request: Request) -> QueuedRequest:
        tracked = self._track(request)
        meta = tracked.meta
        return QueuedRequest(
            engine_request_id=request.request_id,
            arrival_time=meta.arrival_time if meta else request.arrival_time,
            context_tokens=request.num_tokens,
            generated_tokens=request.num_output_tokens,
            queued_at=tracked.queued_at,
            waited_before_s=tracked.waited_s + (meta.waited_s if meta else 0.0),
            passed_over=self._scheduling_steps - tracked.scheduling_steps_at_queue,
            meta=meta,
        )

    # ---- the step ----

    def add_request(self, request: Request) -> None:
        meta = self._track(request).meta
        if meta is not None and meta.reprofile:
            self.lamps_profiler.refresh()
        if meta is not None and self._newer_estimates(meta):
            assert meta.api_estimates is not None
            self._api_estimates = dict(meta.api_estimates)
            try:
                self._estimates.update(self._api_estimates)
            except Exception:  # as for the policies below: the last good estimates stay
                self._policy_failed("update_api_estimates")
            for policy in self._policies.values():
                try:
                    policy.update_api_estimates(self._api_estimates)
                except Exception:  # estimates a policy cannot use: it keeps its last ones
                    self._policy_failed("update_api_estimates")
        super().add_request(request)

    def _newer_estimates(self, meta: RequestMeta) -> bool:
        """Whether the request brings call estimates newer than those installed: by version when
        the serving layer numbers them (a segment of an older request carries an older snapshot,
        which must not replace a newer one), else by content."""
        if not meta.api_estimates:
            return False
        if meta.api_estimates_version is None:
            return meta.api_estimates != self._api_estimates
        if meta.api_estimates_version <= self._api_estimates_version:
            return False
        self._api_estimates_version = meta.api_estimates_version
        return meta.api_estimates != self._api_estimates

    # ---- the serving layer's control of holds (a vLLM utility call, `holds.py`) ----

    def lamps_control(self, command: str, argument: str | float | None = None) -> Any:
        """`done` OWNER: the augmented request is over, what is held for it goes; `expire`
        [AT]: holds whose deadline has passed (at time AT, default now) go; `snapshot`: what
        is held, and the engine's own block and host-pool counts."""
        if command == "done" and isinstance(argument, str):
            released = self._release(argument, reason="done") is not None
            self._stats_due |= released
            return released
        if command == "expire":
            expired = self._expire_holds(float(argument) if argument is not None else None)
            self._stats_due |= expired > 0
            return expired
        if command == "snapshot":
            pool = self.kv_cache_manager.block_pool
            return {
                **self.holds.snapshot(),
                # Blocks not free; cached free blocks (the prefix cache) count as free.
                "kv_blocks_used": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
                "host_pool_bytes": (
                    self.connector.swap_stats().host_pool_bytes_in_use if self._can_swap() else 0
                ),
                "waiting": self._num_waiting(),
                "running": len(self.running),
            }
        raise ValueError(f"unknown control command {command!r}")

    def has_requests(self) -> bool:
        # After a control call let go of something on an idle engine, one (empty) step makes
        # and publishes statistics, so /metrics and the router see the memory free.
        return super().has_requests() or self._stats_due

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        started = time.perf_counter()
        self._steps += 1
        self._stats_due = False  # this step's statistics are made as it ends
        self._committed_blocks = None
        self._running_tokens = None
        every = self._rerank_every
        if every and self._steps % every == 0:
            view = self._engine_view()
            self.waiting.rerank(view)
            self.skipped_waiting.rerank(view)
        if self.holds:
            self._expire_holds()
            self._review_preserved()
        before_vllm = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        after_vllm = time.perf_counter()
        self._step_scheduled(output)
        if output.scheduled_new_reqs or output.scheduled_cached_reqs.resumed_req_ids:
            self._left_queue(output)
        if output.scheduled_new_reqs:
            self._scheduling_steps += 1
            self._release_resumed(output)
        # The profile of where a step's time goes (docs/benchmarks.md): ours around vLLM's
        # scheduling (admission inside it is timed in `_admit`), and vLLM's scheduling itself.
        done = time.perf_counter()
        self.lamps_times["plugin_s"] += (before_vllm - started) + (done - after_vllm)
        self.lamps_times["schedule_s"] += done - started
        return output

    def _select_waiting_queue_for_scheduling(self) -> Any:
        """vLLM parks requests that wait for something (a grammar, KV being loaded) in
        `skipped_waiting` and, under FCFS, serves that queue first. Both queues are ours and
        ranked by the policy: the better-ranked head goes first, so a forced-call segment or a
        swapped-in resume is served in the policy's order like any other."""
        waiting, skipped = self.waiting, self.skipped_waiting
        if waiting and skipped:
            return waiting if waiting.head_entry() <= skipped.head_entry() else skipped
        return waiting or skipped or None

    def _waiting_head(self) -> Request | None:
        """The best-ranked waiting request of both queues."""
        queue = self._select_waiting_queue_for_scheduling()
        return queue.peek_request() if queue is not None else None

    def _num_waiting(self) -> int:
        return len(self.waiting) + len(self.skipped_waiting)

    def _left_queue(self, output: SchedulerOutput) -> None:
        """Requests scheduled from the waiting queue: their wait so far is banked."""
        now = time.time()
        started = [new.req_id for new in output.scheduled_new_reqs]
        for req_id in (*started, *output.scheduled_cached_reqs.resumed_req_ids):
            self._loading.pop(req_id, None)
            tracked = self._tracked.get(req_id)
            if tracked is not None:
                tracked.waited_s += now - tracked.queued_at
                tracked.queued_at = now

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Back in the queue: it waits afresh, on top of what it waited before it ran.
        self.lamps_counts["preemptions"] += 1
        tracked = self._tracked.get(request.request_id)
        if tracked is not None:
            tracked.queued_at = time.time()
            tracked.scheduling_steps_at_queue = self._scheduling_steps
        if self._peaks.pop(request.request_id, None) is not None:
            # It outgrew what it was admitted with (or others did): admission was too generous.
            self._committed_blocks = None
            try:
                self._policy_for(tracked.meta if tracked else None).on_preemption()
            except Exception:
                self._policy_failed("on_preemption")
        super()._preempt_request(request, *args, **kwargs)

    # ---- admission by predicted memory ----

    def _gated_allocate_slots(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        """vLLM's `allocate_slots`, asked first whether a waiting request may start: None (what
        a full cache returns) makes vLLM stop admitting for this step."""
        if (
            request.status in _ADMITTING
            and request.request_id not in self._loading  # admitted when its load started
            and not self._admit(request)
        ):
            return None
        blocks = self._allocate_slots(request, *args, **kwargs)
        if blocks is not None and kwargs.get("delay_cache_blocks"):  # an asynchronous load
            self._loading[request.request_id] = request
        return blocks

    def _admit(self, request: Request) -> bool:
        started = time.perf_counter()
        try:
            return self._admits(request)
        finally:
            self.lamps_times["plugin_s"] += time.perf_counter() - started

    def _admits(self, request: Request) -> bool:
        view = self._queued_view(request)
        policy = self._policy_for(view.meta)
        engine = self._engine_view()
        try:
            peak = policy.admission_tokens(view, engine)
            if peak is None:
                return True
            peak_blocks = blocks_of(peak, self.block_size)
            committed = self._promised_blocks() - self._own_preserved_blocks(view.meta)
            if not policy.admits(peak_blocks, committed, engine):
                self.lamps_counts["admission_refused"] += 1
                return False
        except Exception:
            self._policy_failed("admission")
            return True
        self._peaks[request.request_id] = peak
        self._committed_blocks = committed + peak_blocks
        return True

    def _own_preserved_blocks(self, meta: RequestMeta | None) -> int:
        """Blocks preserved for the request's own previous segment: its peak counts them
        already (the continuation takes them over), so they are not promised twice."""
        hold = self.holds.get(meta.request_id) if meta is not None else None
        return hold.num_blocks if hold is not None and hold.promised else 0

    def _promised_blocks(self) -> int:
        """Blocks promised to running segments (their predicted peak, or what they hold if they
        have outgrown it or had no prediction) and to preserved calls; kept calls promise none.
        Counted once a step, then kept up to date as requests are admitted."""
        if self._committed_blocks is None:
            bs, peaks = self.block_size, self._peaks
            running = sum(
                blocks_of(max(r.num_tokens, peaks.get(r.request_id, 0)), bs)
                for r in (*self.running, *self._loading.values())
            )
            self._committed_blocks = running + self.holds.promised_blocks()
        return self._committed_blocks

    def _blocks_needed(self) -> int:
        """Blocks short of letting every running request grow a block and the head of the
        waiting queue start: what preserved KV caches stand in the way of."""
        manager = self.kv_cache_manager
        free = manager.block_pool.get_num_free_blocks()
        wanted = len(self.running)
        head = self._waiting_head()
        if head is not None and head.request_id not in self._loading:  # loading: has its blocks
            wanted += blocks_of(head.num_tokens, self.block_size)
            # `prefix_cache_lookup_enabled` is vLLM 0.27's; 0.26 (the GPU machines) has its body.
            if manager.enable_caching and not head.skip_reading_prefix_cache:
                # Prefix hits on blocks in use cost no free block: the head shares them (a
                # continuation takes over its own preserved or kept blocks; any request may share
                # a prefix another request holds). A hit on a cached free block leaves the free
                # pool when taken: it counts as a new one. vLLM's own lookup, read-only (unlike
                # `get_computed_blocks`, which may emit cache events); one KV cache group, as
                # `blocks_of` above assumes.
                hits, _, _ = manager.coordinator.find_longest_cache_hit(
                    head.block_hashes, head.num_tokens - 1
                )
                wanted -= sum(1 for block in hits[0] if block.ref_cnt > 0)
        return max(0, wanted - free)

    def _expire_holds(self, at: float | None = None) -> int:
        """Let go of every hold past its deadline: its continuation never came."""
        expired = self.holds.expired(time.time() if at is None else at)
        for owner in expired:
            self._release(owner, reason="expired")
        return len(expired)

    def _review_preserved(self) -> None:
        """The policies review the calls held on the device (preserved or kept): preserved
        ones at every step (a policy may move one as its call runs on), kept ones only when
        memory is needed (they cost nothing until then; at load a replica keeps hundreds)."""
        if not self.holds.device_blocks():
            return
        needed = self._blocks_needed()
        if needed <= 0 and not self.holds.has_promised():
            return
        # Each paused call is reviewed by the policy that paused it.
        by_policy: dict[int, tuple[SchedulingPolicy, list[PausedCall]]] = {}
        for hold in self.holds.on_device():
            policy = self._policy_for(hold.call.meta)
            by_policy.setdefault(id(policy), (policy, []))[1].append(hold.call)
        engine = self._engine_view()
        decisions = []
        for policy, calls in by_policy.values():
            try:
                decisions += policy.review_paused(calls, engine, needed)
            except Exception:
                self._policy_failed("review_paused")
                decisions += [(call, Strategy.DISCARD) for call in calls]
        for call, strategy in decisions:
            if strategy in (Strategy.PRESERVE, Strategy.KEEP) or call.meta is None:
                continue
            if call.strategy is Strategy.KEEP:
                if strategy is Strategy.SWAP and self._swap_out_preserved(call.meta.request_id):
                    self.lamps_counts["kept_swapped"] += 1
                    self._keep_outcome(call, evicted=True)
                    continue
                self.lamps_counts["kept_given_back"] += 1
                self._release(call.meta.request_id, reason="given back")
            elif strategy is Strategy.SWAP and self._swap_out_preserved(call.meta.request_id):
                self.lamps_counts["demoted_to_swap"] += 1
            else:
                self.lamps_counts["demoted_to_discard"] += 1
                self._release(call.meta.request_id, reason="demoted to discard")

    def _swap_out_preserved(self, logical_id: str) -> bool:
        """Copy a preserved request's blocks to the host pool; they are freed once copied."""
        if not self._can_swap():
            return False
        hold = self.holds.get(logical_id)
        if hold is None or hold.request is None:
            return False
        request = hold.request
        meta = hold.call.meta
        accepted = self.connector.swap_out_held(
            request.request_id,
            logical_id,
            list(self.kv_cache_manager.get_block_ids(request.request_id)[0]),
            request.num_computed_tokens,
            list(request.all_token_ids),
            on_done=lambda: self._free_request_blocks(request),
            segment_index=meta.segment_index if meta else 0,
        )
        if accepted:
            # The connector frees the blocks after the copy; the hold moves to the host.
            self._account_held_memory()
            self.holds.moved_to_host(logical_id)
            self._committed_blocks = None
        return accepted

    def _release_resumed(self, output: SchedulerOutput) -> None:
        """The next segment of a preserved request has its blocks now (its prefix-cache lookup
        took them, raising their reference counts): drop the paused segment's hold."""
        for new in output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            meta = tracked.meta if tracked is not None else None
            if meta is not None and meta.request_id in self.holds:
                self._release(meta.request_id, reason="resumed")

    def _release(self, owner: str, reason: str) -> Hold | None:
        """The one way a hold ends (`HoldTable.release`), counted by strategy and reason."""
        self._account_held_memory()
        hold = self.holds.release(owner, reason)
        if hold is None:
            return None
        self._committed_blocks = None
        call = hold.call
        kind = "swap" if hold.on_host else call.strategy.value
        self.lamps_counts[f"{kind}_released_{reason.split()[0]}"] += 1
        if call.strategy is Strategy.KEEP and reason in ("resumed", "given back"):
            self._keep_outcome(call, evicted=reason != "resumed")
        return hold

    def _keep_outcome(self, call: PausedCall, evicted: bool) -> None:
        try:  # the outcome the policy's eviction estimate learns from
            self._policy_for(call.meta).on_keep_outcome(evicted=evicted)
        except Exception:
            self._policy_failed("on_keep_outcome")

    # ---- segment ends ----

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], *args: Any, **kwargs: Any
    ) -> tuple[list[int], bool]:
        new_token_ids, stopped = super()._update_request_with_output(
            request, new_token_ids, *args, **kwargs
        )
        if not stopped:
            tracked = self._tracked.get(request.request_id)
            ends = tracked.meta.call_end_token_ids if tracked and tracked.meta else None
            if ends and _ends_with_any(request.output_token_ids, ends):
                # The model closed a tool call of its own: end the segment here, as a stop
                # token would, so that the call goes to the policy like a forced one.
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = CALL_END_STOP_REASON
                stopped = True
        return new_token_ids, stopped

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._pausing = self._pause_strategy(request)
        try:
            return super()._free_request(request, *args, **kwargs)
        finally:
            self._pausing = None

    def _pause_strategy(self, request: Request) -> tuple[PausedCall, Strategy] | None:
        self._loading.pop(request.request_id, None)
        if self._peaks.pop(request.request_id, None) is not None:
            self._committed_blocks = None
        tracked = self._tracked.pop(request.request_id, None)
        meta = tracked.meta if tracked else None
        try:
            return self._call_strategy(request, meta)
        finally:  # after the policy had its plan for this segment's call
            for policy in self._policies.values():
                policy.forget(request.request_id)

    def _call_strategy(
        self, request: Request, meta: RequestMeta | None
    ) -> tuple[PausedCall, Strategy] | None:
        if meta is None or request.status not in _SEGMENT_END:
            return None
        if not (meta.ends_in_api_call or request.stop_reason == CALL_END_STOP_REASON):
            return None
        if meta.request_id in self.holds:
            # A hold of an earlier pause whose continuation never came: it goes before this
            # pause files its own under the same owner.
            self._release(meta.request_id, reason="replaced")
        paused_at = time.time()
        call = PausedCall(
            engine_request_id=request.request_id,
            context_tokens=request.num_tokens,
            paused_at=paused_at,
            strategy=Strategy.DISCARD,
            meta=meta,
            # The call starts as the segment ends: its timeout runs from about now.
            deadline=paused_at + meta.call_timeout_s if meta.call_timeout_s else None,
        )
        policy = self._policy_for(meta)
        engine = self._engine_view()
        if request in self.running:  # vLLM removes stopped requests after this step's outputs
            # The pausing request is not "other" load for its own decision.
            engine.running_tokens = max(0, engine.running_tokens - request.num_tokens)
            engine.running_requests = max(0, engine.running_requests - 1)
        try:
            strategy = policy.strategy_for_call(call, engine)
        except Exception:
            self._policy_failed("strategy_for_call")
            strategy = Strategy.DISCARD
        if strategy is Strategy.SWAP and not (
            self._can_swap()
            and self.connector.mark_for_swap(
                request.request_id, meta.request_id, request.num_tokens
            )
        ):
            # No swap path, or the host pool is full: what the policy says instead.
            self.lamps_counts["swap_refused"] += 1
            strategy = policy.swap_refused_strategy
        if strategy in _HELD and not self.cache_config.enable_prefix_caching:
            # The continuation finds preserved blocks only through the prefix cache.
            strategy = Strategy.DISCARD
        call.strategy = strategy
        if strategy is Strategy.SWAP:  # the connector copies it out as vLLM frees the blocks
            self.holds.hold_on_host(meta.request_id, call)
        self.lamps_counts[f"calls_{strategy.value}"] += 1
        return call, strategy

    def _free_blocks(self, request: Request) -> None:
        pausing = self._pausing
        if pausing is None or pausing[1] not in _HELD:
            super()._free_blocks(request)
            return
        call, _ = pausing
        assert call.meta is not None
        # Keep the block table: only the request object leaves the scheduler.
        del self.requests[request.request_id]
        blocks = self.kv_cache_manager.get_block_ids(request.request_id)
        self._account_held_memory()
        self.holds.hold_on_device(call.meta.request_id, call, request, sum(len(g) for g in blocks))
        self._committed_blocks = None

    def _account_held_memory(self) -> None:
        """Integrate the blocks held for paused requests over time, up to now: the memory
        waste of Preserve (INFERCEPT's "memory wasted during calls"), in block-seconds."""
        now = time.monotonic()
        held = self.holds.device_blocks()
        self._held_block_seconds += held * (now - self._held_since)
        self._held_since = now

    # ---- statistics ----

    def make_stats(self, *args: Any, **kwargs: Any) -> Any:
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            self._account_held_memory()
            held = self.holds.snapshot()
            ours = {
                "policy": self.lamps_config.policy,
                "block_size": self.block_size,
                "costs": self.lamps_profiler.costs.to_dict(),
                "preserved_requests": held["device_holds"],
                "preserved_blocks": held["device_blocks"],
                "kept_requests": held["kept_holds"],
                "holds": held["holds"],
                "api_estimates_version": self._api_estimates_version,
                "preserved_block_seconds": self._held_block_seconds,
                **self.lamps_counts,
                **{f"time_{k}": v for k, v in self.lamps_times.items()},
                **self._policy_counters(),
            }
            committed = self._committed_memory_time()
            if committed is not None:
                ours["committed_memory_time"] = committed
            if self._can_swap():
                ours["swap"] = asdict(self.connector.swap_stats())
            stats.kv_connector_stats = {**(stats.kv_connector_stats or {}), STATS_KEY: ours}
        return stats

    def _committed_memory_time(self) -> float | None:
        """The memory-time this engine has promised (`scoring.committed_memory_time`), for the
        fleet router: recomputed every `_COMMITTED_EVERY_S` (stats are made every step; the
        router reads them twice a second), and at once when requests come, go, pause or resume
        while few are in the engine, by the default policy's predictor when it has one, else
        by the tool estimates. None if that failed (counted; the replica then estimates it)."""
        now = time.monotonic()
        # At once on a change while the engine holds few requests: a drained engine makes no
        # more statistics, so its last ones must not be a quarter second old. Under load a
        # change comes nearly every step, and the figure at most a quarter second old.
        # Kept calls commit nothing: only preserved ones change the sum.
        shape = (len(self.running), self._num_waiting(), self.holds.promised_blocks())
        few = len(self.running) + self._num_waiting() <= _COMMITTED_AT_ONCE_MAX_REQUESTS
        fresh = now - self._committed_at < _COMMITTED_EVERY_S
        if fresh and (shape == self._committed_shape or not few):
            return self._committed
        self._committed_at, self._committed_shape = now, shape
        policy = self._policies[_DEFAULT_POLICY_KEY]
        predictor = getattr(policy, "predictor", None)
        if not isinstance(predictor, Predictor):
            predictor = self._estimates
        requests = [
            (r.num_tokens, r.num_output_tokens, tracked.meta if tracked else None)
            for r in (*self.running, *self.waiting, *self.skipped_waiting)
            for tracked in (self._tracked.get(r.request_id),)
        ]
        wall = time.time()
        holds = (
            [
                (h.num_blocks * self.block_size, wall - h.call.paused_at, h.call.meta)
                for h in self.holds.on_device()
                if h.promised
            ]
            if self.holds.has_promised()
            else []
        )
        try:
            self._committed = committed_memory_time(
                requests,
                holds,
                predictor,
                self.lamps_profiler.costs,
                other_tokens=sum(r.num_tokens for r in self.running),
            )
        except Exception:
            self._policy_failed("committed_memory_time")
            self._committed = None
        return self._committed

    def _policy_counters(self) -> dict[str, int]:
        """The policies' own counts, summed over the variants, as policy_<name>."""
        total: Counter[str] = Counter()
        for policy in self._policies.values():
            total.update(policy.counters())
        return {f"policy_{name}": n for name, n in total.items()}


def install_control() -> None:
    """Give vLLM's EngineCore the utility method the serving layer calls (`holds.py`), in the
    engine-core process this scheduler runs in: utility calls reach the engine between steps,
    answer, and never enter the queues as requests would."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, CONTROL_METHOD, None) is not None:
        return

    def lamps_control(self: Any, command: str, owner: str | None = None) -> Any:
        control = getattr(self.scheduler, CONTROL_METHOD, None)
        if control is None:
            raise RuntimeError("this engine does not run the LAMPS scheduler plugin")
        return control(command, owner)

    setattr(EngineCore, CONTROL_METHOD, lamps_control)


def _ends_with_any(tokens: Any, endings: list[list[int]]) -> bool:
    """Whether `tokens` (a list, or vLLM's constant list view) ends with one of `endings`."""
    for ending in endings:
        n = len(ending)
        if n and len(tokens) >= n and list(tokens[-n:]) == ending:
            return True
    return False


class LampsAsyncScheduler(LampsScheduler, AsyncScheduler):
    """The same on engines with async scheduling (the MRO puts AsyncScheduler under ours)."""
