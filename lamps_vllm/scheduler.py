"""The scheduler plugin (`scheduler_cls`): vLLM's scheduler with a `lamps_core` policy deciding
the order of waiting requests and the handling of requests that stop for an API call.

KV block bookkeeping stays vLLM's; this class only swaps the waiting queues for policy-ordered
ones and consults the policy when a request pauses. `LampsScheduler` is for engines without async
scheduling (the CPU backend); `LampsAsyncScheduler` for GPUs, where subclassing the synchronous
scheduler would turn async scheduling off.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from lamps_core.policies import make_policy
from lamps_core.policy import PausedCall, QueuedRequest, Strategy
from lamps_core.request_meta import RequestMeta
from lamps_vllm.config import SchedulerPluginConfig
from lamps_vllm.request_queue import PolicyRequestQueue

logger = logging.getLogger(__name__)

# Finishes that end a segment normally; aborted requests are not pausing for an API call.
_SEGMENT_END = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


class LampsScheduler(Scheduler):
    """vLLM's scheduler with the waiting order and API-call handling of a `lamps_core` policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = SchedulerPluginConfig.from_additional_config(self.vllm_config.additional_config)
        self.lamps_policy = make_policy(config.policy, **config.policy_options)
        self._lamps_meta: dict[str, RequestMeta | None] = {}
        self._lamps_steps = 0
        self.lamps_strategy_counts: Counter[Strategy] = Counter()
        self.waiting = PolicyRequestQueue(self.lamps_policy, self._queued_view)
        self.skipped_waiting = PolicyRequestQueue(self.lamps_policy, self._queued_view)
        logger.info("LAMPS scheduler running policy %r", config.policy)

    def _meta(self, request: Request) -> RequestMeta | None:
        # Parsed once per engine request: the queue asks for views on every insertion.
        if request.request_id not in self._lamps_meta:
            params = request.sampling_params
            extra = params.extra_args if params is not None else None
            self._lamps_meta[request.request_id] = RequestMeta.from_extra_args(extra)
        return self._lamps_meta[request.request_id]

    def _queued_view(self, request: Request) -> QueuedRequest:
        meta = self._meta(request)
        return QueuedRequest(
            engine_request_id=request.request_id,
            arrival_time=meta.arrival_time if meta else request.arrival_time,
            context_tokens=request.num_tokens,
            meta=meta,
        )

    def _rerank_if_due(self) -> None:
        every = self.lamps_policy.rerank_every_steps
        self._lamps_steps += 1
        if every and self._lamps_steps % every == 0:
            now = time.time()
            self.waiting.rerank(now)
            self.skipped_waiting.rerank(now)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self._rerank_if_due()
        return super().schedule(*args, **kwargs)

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._on_request_freed(request)
        return super()._free_request(request, *args, **kwargs)

    def _on_request_freed(self, request: Request) -> None:
        meta = self._lamps_meta.pop(request.request_id, None)
        if meta is None or not meta.ends_in_api_call or request.status not in _SEGMENT_END:
            return
        call = PausedCall(request.request_id, request.num_tokens, meta)
        strategy = self.lamps_policy.strategy_for_call(call)
        self.lamps_strategy_counts[strategy] += 1
        if strategy is not Strategy.DISCARD:
            # Holding or moving blocks past the end of an engine request needs the KV connector
            # of the strategy work; until a policy can ask for it, blocks are freed as vLLM does.
            logger.warning("strategy %s not available in this engine; discarding", strategy)


class LampsAsyncScheduler(LampsScheduler, AsyncScheduler):
    """The same on engines with async scheduling (the MRO puts AsyncScheduler under ours)."""
