"""The Swap strategy as a vLLM V1 KV connector: copy a paused request's KV blocks out of the
engine's KV cache into a host-memory pool, let vLLM free the blocks, and copy them back into newly
allocated blocks when the request's continuation arrives, so it skips re-prefilling that prefix.

Loaded with::

    kv_transfer_config={
        "kv_connector": "LampsSwapConnector",
        "kv_connector_module_path": "lamps_vllm.swap_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_pool_bytes": 8 << 30},
    }

vLLM builds two instances: the scheduler side (engine-core process, `scheduler.connector`) and the
worker side (each worker process). They share nothing but what vLLM carries between them each step:
`build_connector_meta` (scheduler -> worker: copy jobs) and `get_finished` /
`build_connector_worker_meta` (worker -> scheduler: which jobs are done).

Who does what, and when
-----------------------
* The scheduler side owns the *bookkeeping* of the host pool: it is cut into slots of one engine
  block each (all layers), and the scheduler side hands slots out and takes them back. So the byte
  budget is enforced exactly, without asking the worker. The worker side owns the *bytes*: one
  host tensor per worker (pinned when the KV cache lives on a GPU), allocated once in
  `register_kv_caches`. `host_pool_bytes` is therefore a budget per worker (per GPU under TP).
* Swap out, finished request (`mark_for_swap`): the plugin marks the request just before vLLM
  frees it; `request_finished` then reserves slots, queues a copy-out job and returns
  `(True, None)`, so vLLM keeps the blocks. The job goes to the worker in the next step's metadata;
  the worker copies in `start_load_kv` and reports the request as finished sending in that same
  step's `get_finished`; vLLM then frees the blocks (`_update_from_kv_xfer_finished`).
* Swap out, blocks the plugin holds itself (`swap_out_held`): the same job, but nothing is reported
  to vLLM (the request is not vLLM's any more); the worker acknowledges the job in its worker
  metadata and the scheduler side calls the plugin's `on_done` (in `update_connector_output`).
  `has_pending_push_work` keeps the engine stepping while such a job is outstanding.
* Swap in: `get_num_new_matched_tokens` finds the entry by the logical id in
  `extra_args["lamps"]` (for a later `segment_index` than the saved one), finds how many whole
  saved blocks the prompt repeats (all of them for prompt = old prompt + output + API tokens; the
  blocks before the first difference otherwise; none: the entry is dropped), and reports those
  beyond the local prefix-cache hit; `update_state_after_alloc` turns that into a
  copy-in job (host slots -> the request's new blocks). The load is asynchronous by default
  (`load_kv_async=True`): vLLM parks the request in WAITING_FOR_REMOTE_KVS with its blocks
  allocated, the worker starts the copy in `start_load_kv` on a stream of its own and reports the
  request in `get_finished`'s `finished_recving` once the copy has ended, and vLLM schedules it
  in the next step. Other requests' forward passes do not wait for it (on the H100, copy-ins on
  the compute stream took 11-14 % of step time; the end-to-end latency difference measured was
  within the spread, docs/benchmarks.md). A scheduler plugin may choose the
  synchronous load per request (`load_async_for`): the copy then runs on the compute stream
  ahead of the forward pass that reads it. The slots go back to the pool when the worker
  acknowledges the job. If the prefix cache already covers the entry, nothing is loaded and the
  entry is dropped.

Why the copy-out runs in `start_load_kv` (the step after the request finished): the blocks of a
finished or held request are still allocated to it, so nothing writes them until they are freed,
and they are freed only after the worker has reported the copy. `start_load_kv` runs in every step
(also in steps without a forward pass, via `kv_connector_no_forward`), before the forward pass and
after vLLM zeroes newly allocated blocks, and copy-outs run before copy-ins there, so a
continuation that arrives before the copy-out was acknowledged can already be loaded in the same
step.

On a GPU, copy-outs run on a stream of their own, so they overlap the forward pass instead of
delaying it (INFERCEPT's point: a swap is cheap only if it hides behind compute): the copy stream
first waits for an event recorded on the compute stream (every earlier write to the blocks is
done), and a job is reported done only once the event recorded after its copy has completed,
polled without blocking in `get_finished`, so its blocks are freed (and its slots of a later
copy-in released) only after the bytes have moved. Asynchronous copy-ins run on a second stream
(the other copy engine), after the same kind of event (the blocks' previous owner may still be
read by a forward pass in flight) and after any copy-out still in flight (a continuation can
arrive before its own copy-out has finished). All jobs of one kind in one step are one copy
(one gather and one transfer per layer and run of slots), not one per request.
`copy_stream: false` in the connector's extra config puts all copies on the compute stream.

Not supported: hybrid KV cache groups (HMA: Mamba, sliding-window mixes) -- vLLM turns the hybrid
manager off for a connector without `SupportsHMA`; the cross-layer KV layout
(`prefer_cross_layer_blocks` stays False).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

META_KEY = "lamps"  # lamps_core.request_meta.META_KEY; not imported to keep workers light
HOST_POOL_BYTES_KEY = "host_pool_bytes"
COPY_STREAM_KEY = "copy_stream"
LOAD_ASYNC_KEY = "load_async"
DEFAULT_HOST_POOL_BYTES = 1 << 30


# ================================================================================================
# vLLM adapter: everything that depends on vLLM's internals (checked on 0.26.0 and 0.27.0).
# ================================================================================================


def _logical_of(request: Request) -> tuple[str, int] | None:
    """(logical request id, segment index) from `SamplingParams.extra_args["lamps"]`."""
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    if not extra or not isinstance(extra.get(META_KEY), dict):
        return None
    meta = extra[META_KEY]
    if "request_id" not in meta:
        return None
    return str(meta["request_id"]), int(meta.get("segment_index", 0))


def _valid_kv_tokens(request: Request) -> int:
    """Tokens of a finished request whose KV is written. Under async scheduling
    `num_computed_tokens` counts a token still in flight; leave it out."""
    in_flight = getattr(request, "num_in_flight_tokens", 0) or 0
    return max(0, request.num_computed_tokens - in_flight)


def _first_group_block_ids(blocks: KVCacheBlocks) -> list[int]:
    return list(blocks.get_block_ids()[0])


def _bytes_per_block(kv_cache_config: KVCacheConfig) -> int:
    """KV bytes of one engine block over all layers of this worker (both sides use this, so they
    agree on the number of host slots)."""
    total = sum(t.size for t in kv_cache_config.kv_cache_tensors)
    return max(1, total // kv_cache_config.num_blocks)


def _block_layout(kv: torch.Tensor, num_blocks: int) -> tuple[int, int]:
    """(block dimension, kernel blocks per engine block) of one layer's KV cache tensor.

    The block dimension differs by backend: CPU `(num_blocks, kv_heads, block_size, 2*head)`,
    FlashAttention `(2, num_blocks, block_size, kv_heads, head)`, FlashInfer/MLA block first.
    Some backends split an engine block into several kernel blocks (the dimension is then a
    multiple of `num_blocks`). Works on the logical shape, so stride orders do not matter."""
    for dim in (0, 1):
        if dim < kv.dim() and kv.shape[dim] == num_blocks:
            return dim, 1
    for dim in (0, 1):
        if dim < kv.dim() and kv.shape[dim] > num_blocks and kv.shape[dim] % num_blocks == 0:
            return dim, kv.shape[dim] // num_blocks
    raise ValueError(f"no block dimension of size {num_blocks} in KV cache shape {tuple(kv.shape)}")


class HostPool:
    """The worker's host copy of swapped blocks, and the two copies (KV cache <-> pool).

    One tensor `(layers, slots, kernel blocks per block, *per-kernel-block shape)`: a slot holds one
    engine block of every layer, and a run of consecutive slots of one layer is contiguous, so a
    copy to or from the GPU is one `cudaMemcpyAsync` per layer and run. Pinned when the KV cache
    is on a GPU, so `non_blocking=True` copies are really asynchronous."""

    def __init__(self, kv_caches: list[torch.Tensor], num_blocks: int, num_slots: int) -> None:
        layers: list[torch.Tensor] = []
        seen: set[int] = set()
        for t in kv_caches:
            if t.data_ptr() not in seen:  # layers that share one KV cache
                seen.add(t.data_ptr())
                layers.append(t)
        first = layers[0]
        for t in layers:
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError("LampsSwapConnector needs one KV cache shape for all layers")
        self.layers = layers
        self.block_dim, self.sub = _block_layout(first, num_blocks)
        dim = self.block_dim
        self.rest = tuple(first.shape[:dim]) + tuple(first.shape[dim + 1 :])
        self.device = first.device
        self.bytes_per_block = sum(t.numel() * t.element_size() for t in layers) // num_blocks
        self.pinned = first.device.type == "cuda" and torch.cuda.is_available()
        self.host = torch.empty(
            (len(layers), num_slots, self.sub, *self.rest),
            dtype=first.dtype,
            pin_memory=self.pinned,
        )

    def describe(self) -> str:
        return (
            f"{len(self.layers)} KV tensors of shape {tuple(self.layers[0].shape)} (block dim "
            f"{self.block_dim}, {self.sub} kernel blocks per block), host pool "
            f"{tuple(self.host.shape)} {self.host.numel() * self.host.element_size() / 2**20:.1f} "
            f"MiB{' pinned' if self.pinned else ''}"
        )

    def _kernel_ids(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.long)
        if self.sub > 1:
            ids = (ids[:, None] * self.sub + torch.arange(self.sub)[None, :]).reshape(-1)
        if self.pinned:
            # From pageable memory a copy to the GPU first waits for its stream to drain, which
            # would hold the host until the forward pass queued before it is done.
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids.to(self.device)

    @staticmethod
    def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
        """(position in the job, first slot, length) of each run of consecutive slots."""
        runs: list[tuple[int, int, int]] = []
        for i, s in enumerate(slots):
            if runs and runs[-1][1] + runs[-1][2] == s:
                p, f, n = runs[-1]
                runs[-1] = (p, f, n + 1)
            else:
                runs.append((i, s, 1))
        return runs

    def copy_out(self, block_ids: list[int], slots: list[int]) -> None:
        """KV cache blocks `block_ids[i]` -> host slots `slots[i]`."""
        n, sub, dim = len(block_ids), self.sub, self.block_dim
        kid = self._kernel_ids(block_ids)
        runs = self._runs(slots)
        if dim == 0 and not self.pinned:
            # KV cache in host memory (CPU backend), blocks first: gather straight into the pool.
            for layer, kv in enumerate(self.layers):
                for pos, slot, length in runs:
                    dst = self.host[layer, slot : slot + length].view(length * sub, *self.rest)
                    torch.index_select(kv, 0, kid[pos * sub : (pos + length) * sub], out=dst)
            return
        for layer, kv in enumerate(self.layers):
            blocks = kv.index_select(dim, kid).movedim(dim, 0)
            blocks = blocks.reshape(n, sub, *self.rest)
            for pos, slot, length in runs:
                self.host[layer, slot : slot + length].copy_(
                    blocks[pos : pos + length], non_blocking=self.pinned
                )

    def copy_in(self, block_ids: list[int], slots: list[int]) -> None:
        """Host slots `slots[i]` -> KV cache blocks `block_ids[i]`."""
        n, sub, dim = len(block_ids), self.sub, self.block_dim
        kid = self._kernel_ids(block_ids)
        runs = self._runs(slots)
        for layer, kv in enumerate(self.layers):
            parts = [
                self.host[layer, slot : slot + length].to(self.device, non_blocking=self.pinned)
                for _, slot, length in runs
            ]
            blocks = parts[0] if len(parts) == 1 else torch.cat(parts)
            kv.index_copy_(dim, kid, blocks.reshape(n * sub, *self.rest).movedim(0, dim))


def _merged(jobs: list[SwapJob]) -> tuple[list[int], list[int]]:
    """The blocks and slots of several jobs as one copy: one gather and one transfer per layer
    and run of slots for the whole step, not per request (small copies waste the bus)."""
    if len(jobs) == 1:
        return jobs[0].block_ids, jobs[0].host_slots
    return (
        [b for job in jobs for b in job.block_ids],
        [s for job in jobs for s in job.host_slots],
    )


# ================================================================================================
# Messages between the two sides (pickled by vLLM with the scheduler output / model output).
# ================================================================================================


@dataclass
class SwapJob:
    job_id: int
    block_ids: list[int]  # engine blocks (first KV cache group)
    host_slots: list[int]  # same length
    # Copy-outs of a finished request: the engine request id to report as finished sending.
    finished_req_id: str | None = None
    # Asynchronous copy-ins: the engine request id to report as finished receiving.
    loading_req_id: str | None = None


@dataclass
class LampsSwapMetadata(KVConnectorMetadata):
    swap_out: list[SwapJob] = field(default_factory=list)
    swap_in: list[SwapJob] = field(default_factory=list)


@dataclass
class LampsSwapWorkerMetadata(KVConnectorWorkerMetadata):
    done: Counter[int] = field(default_factory=Counter)  # job id -> workers that finished it
    seconds_out: float = 0.0
    seconds_in: float = 0.0

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LampsSwapWorkerMetadata)
        return LampsSwapWorkerMetadata(
            done=self.done + other.done,
            seconds_out=max(self.seconds_out, other.seconds_out),
            seconds_in=max(self.seconds_in, other.seconds_in),
        )


# ================================================================================================
# Scheduler-side state.
# ================================================================================================


@dataclass
class _Entry:
    logical_id: str
    segment_index: int
    token_ids: list[int]  # the tokens whose KV is saved: whole blocks only
    host_slots: list[int]
    saved: bool = False  # the copy-out was acknowledged
    dropped: bool = False
    created: float = field(default_factory=time.time)


@dataclass
class _Inflight:
    kind: str  # "out" | "in"
    entry: _Entry
    num_blocks: int
    on_done: Callable[[], None] | None = None
    acks: int = 0
    loaded_async: bool = False


@dataclass
class SwapStats:
    swapped_out_requests: int = 0
    swapped_in_requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    host_pool_bytes_in_use: int = 0
    host_pool_bytes: int = 0
    entries: int = 0
    refused: int = 0  # swap requests that did not fit (or had no whole block)
    served_by_prefix_cache: int = 0  # continuations whose saved prefix was still cached locally
    dropped: int = 0  # entries dropped: prompt mismatch, released by the hold table, reset
    pending_jobs: int = 0
    tokens_in: int = 0  # tokens loaded from the host pool (whole blocks)
    loaded_async: int = 0  # continuations loaded while other requests ran (`load_async_for`)
    seconds_out: float = 0.0  # worker time spent copying out / in (slowest worker per step)
    seconds_in: float = 0.0


class LampsSwapConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        assert kv_cache_config is not None, "LampsSwapConnector needs the KV cache config"
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        self._bytes_per_block = _bytes_per_block(kv_cache_config)
        pool_bytes = int(
            self._kv_transfer_config.get_from_extra_config(
                HOST_POOL_BYTES_KEY, DEFAULT_HOST_POOL_BYTES
            )
        )
        self._num_slots = pool_bytes // self._bytes_per_block
        self._pool_bytes = self._num_slots * self._bytes_per_block
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler_side(vllm_config)
        else:
            self._init_worker_side(
                bool(self._kv_transfer_config.get_from_extra_config(COPY_STREAM_KEY, True))
            )
        logger.info(
            "LampsSwapConnector (%s): %d host slots of %d bytes (%d tokens each), %.1f MiB",
            role.name,
            self._num_slots,
            self._bytes_per_block,
            self._block_size,
            self._pool_bytes / 2**20,
        )

    @property
    def requires_kv_delivery(self) -> bool:
        # Best effort: a dropped swap is a future recompute, never a wrong answer.
        return False

    # ============================================================================================
    # Scheduler side
    # ============================================================================================

    def _init_scheduler_side(self, vllm_config: VllmConfig) -> None:
        self._free_slots: list[int] = list(range(self._num_slots))  # sorted
        self._entries: dict[str, _Entry] = {}
        self._marked: dict[str, str] = {}  # engine request id -> logical id
        # engine request id -> (logical id, local hit, external tokens, loaded asynchronously)
        self._plans: dict[str, tuple[str, int, int, bool]] = {}
        self._next_job = 0
        self._out_jobs: list[SwapJob] = []
        self._in_jobs: list[SwapJob] = []
        self._inflight: dict[int, _Inflight] = {}
        self._workers = max(1, vllm_config.parallel_config.world_size)
        self._stats = SwapStats(host_pool_bytes=self._pool_bytes)
        load_async = bool(self._kv_transfer_config.get_from_extra_config(LOAD_ASYNC_KEY, True))
        # Whether a request's saved KV loads while other requests run (see the module's
        # docstring); a scheduler plugin may replace this with its own rule per request.
        self.load_async_for: Callable[[Request], bool] = lambda request: load_async

    # ---- host slots -----------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return max(0, num_tokens) // self._block_size

    def _alloc_slots(self, n: int) -> list[int] | None:
        if n > len(self._free_slots):
            return None
        slots, self._free_slots = self._free_slots[:n], self._free_slots[n:]
        return slots

    def _release_slots(self, slots: list[int]) -> None:
        for s in slots:
            bisect.insort(self._free_slots, s)
        slots.clear()

    def _entry_busy(self, entry: _Entry) -> bool:
        return any(job.entry is entry for job in self._inflight.values())

    def _drop_entry(self, entry: _Entry, count: bool = True) -> None:
        if self._entries.get(entry.logical_id) is entry:
            del self._entries[entry.logical_id]
        if entry.dropped:
            return
        entry.dropped = True
        if count:
            self._stats.dropped += 1
        if not self._entry_busy(entry):
            self._release_slots(entry.host_slots)
        # else: freed when the worker acknowledges the job that still uses the slots

    def _new_job_id(self) -> int:
        self._next_job += 1
        return self._next_job

    # ---- API for the scheduler plugin -----------------------------------------------------------

    def can_swap(self, num_tokens: int) -> bool:
        """Whether a context of `num_tokens` tokens fits in the host pool now (whole blocks)."""
        n = self._blocks_for(num_tokens - 1)  # the last sampled token has no KV yet
        return 0 < n <= len(self._free_slots)

    def mark_for_swap(
        self, engine_request_id: str, logical_id: str, num_tokens: int | None = None
    ) -> bool:
        """Swap this request out when vLLM frees it (call just before). With `num_tokens`
        (`request.num_tokens`) it answers False when the entry cannot fit; the final check is in
        `request_finished`, which then frees the blocks as usual (Discard)."""
        if num_tokens is not None and not self.can_swap(num_tokens):
            self._stats.refused += 1
            return False
        self._marked[engine_request_id] = logical_id
        return True

    def swap_out_held(
        self,
        engine_request_id: str,
        logical_id: str,
        block_ids: list[int],
        num_tokens: int,
        token_ids: list[int],
        on_done: Callable[[], None],
        segment_index: int = 0,
    ) -> bool:
        """Copy out blocks the plugin holds itself (`num_tokens` tokens with written KV, the first
        `num_tokens` of `token_ids`); `on_done()` is called on the scheduler side once the copy is
        done, and the plugin then frees the blocks. False (and no call) when it does not fit."""
        n = min(self._blocks_for(num_tokens), len(block_ids), self._blocks_for(len(token_ids)))
        entry = self._new_entry(logical_id, segment_index, token_ids, n)
        if entry is None:
            return False
        self._queue_out(entry, block_ids[:n], finished_req_id=None, on_done=on_done)
        logger.debug("swap out (held) %s: %d blocks", engine_request_id, n)
        return True

    def drop_logical(self, logical_id: str) -> bool:
        """Drop the saved KV of augmented request `logical_id` (its continuation will not come);
        slots still being copied go back when the copy is acknowledged."""
        entry = self._entries.get(logical_id)
        if entry is None:
            return False
        self._drop_entry(entry)
        return True

    def has_entry(self, logical_id: str) -> bool:
        return logical_id in self._entries

    def swap_stats(self) -> SwapStats:
        s = self._stats
        s.host_pool_bytes_in_use = (self._num_slots - len(self._free_slots)) * self._bytes_per_block
        s.entries = len(self._entries)
        s.pending_jobs = len(self._out_jobs) + len(self._in_jobs) + len(self._inflight)
        return SwapStats(**vars(s))

    @property
    def bytes_per_block(self) -> int:
        return self._bytes_per_block

    # ---- swap out -------------------------------------------------------------------------------

    def _new_entry(
        self, logical_id: str, segment_index: int, token_ids: list[int], n_blocks: int
    ) -> _Entry | None:
        old = self._entries.get(logical_id)
        if old is not None:  # a stale entry of an earlier segment
            self._drop_entry(old)
        slots = self._alloc_slots(n_blocks) if n_blocks > 0 else None
        if slots is None:
            self._stats.refused += 1
            return None
        entry = _Entry(
            logical_id=logical_id,
            segment_index=segment_index,
            token_ids=list(token_ids[: n_blocks * self._block_size]),
            host_slots=slots,
        )
        self._entries[logical_id] = entry
        return entry

    def _queue_out(
        self,
        entry: _Entry,
        block_ids: list[int],
        finished_req_id: str | None,
        on_done: Callable[[], None] | None,
    ) -> None:
        job = SwapJob(self._new_job_id(), list(block_ids), list(entry.host_slots), finished_req_id)
        self._out_jobs.append(job)
        self._inflight[job.job_id] = _Inflight("out", entry, len(block_ids), on_done)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        logical_id = self._marked.pop(request.request_id, None)
        if logical_id is None:
            return False, None
        logical = _logical_of(request)
        segment_index = logical[1] if logical and logical[0] == logical_id else 0
        n = min(self._blocks_for(_valid_kv_tokens(request)), len(block_ids))
        entry = self._new_entry(logical_id, segment_index, request.all_token_ids, n)
        if entry is None:
            return False, None
        self._queue_out(entry, block_ids[:n], finished_req_id=request.request_id, on_done=None)
        return True, None

    # ---- swap in --------------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        logical = _logical_of(request)
        if logical is None:
            return 0, False
        entry = self._entries.get(logical[0])
        if entry is None or logical[1] <= entry.segment_index:
            return 0, False
        matched = self._matched_tokens(entry.token_ids, request.prompt_token_ids)
        if matched == 0:
            logger.info("swap entry of %s does not match its continuation; dropped", logical[0])
            self._drop_entry(entry)
            return 0, False
        # Whole blocks only, and leave at least one prompt token to compute.
        limit = min(matched, (request.num_tokens - 1) // self._block_size * self._block_size)
        external = 0
        if num_computed_tokens % self._block_size == 0:
            external = max(0, limit - num_computed_tokens)
        is_async = external > 0 and self.load_async_for(request)
        self._plans[request.request_id] = (logical[0], num_computed_tokens, external, is_async)
        return external, is_async

    def _matched_tokens(self, saved: list[int], prompt: Any) -> int:
        """Leading whole blocks of `saved` that the prompt repeats, in tokens. KV at a position
        depends only on the tokens up to it, so a continuation that diverges from the saved
        context (a chat template re-rendering the last turn, say) still reuses the blocks before
        the first difference."""
        if prompt is None:
            return 0
        bs = self._block_size
        n = 0
        while n + bs <= len(saved) and list(prompt[n : n + bs]) == saved[n : n + bs]:
            n += bs
        return n

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        plan = self._plans.pop(request.request_id, None)
        if plan is None:
            return
        logical_id, local, planned, is_async = plan
        entry = self._entries.get(logical_id)
        if entry is None:
            return
        external = min(num_external_tokens, planned)
        if external <= 0:
            # The local prefix cache covered the saved blocks: nothing to load.
            self._stats.served_by_prefix_cache += 1
            self._drop_entry(entry, count=False)
            return
        first = local // self._block_size
        n = external // self._block_size
        dst = _first_group_block_ids(blocks)[first : first + n]
        src = entry.host_slots[first : first + n]
        assert len(dst) == n and len(src) == n, (len(dst), len(src), n)
        self._stats.tokens_in += external
        del self._entries[logical_id]  # consumed; slots freed when the copy-in is acknowledged
        # vLLM parks a request it was told loads asynchronously until it is reported received.
        job = SwapJob(
            self._new_job_id(), dst, src, loading_req_id=request.request_id if is_async else None
        )
        self._in_jobs.append(job)
        self._inflight[job.job_id] = _Inflight("in", entry, n, loaded_async=is_async)

    # ---- per step -------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LampsSwapMetadata(swap_out=self._out_jobs, swap_in=self._in_jobs)
        self._out_jobs, self._in_jobs = [], []
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, LampsSwapWorkerMetadata):
            return
        self._stats.seconds_out += meta.seconds_out
        self._stats.seconds_in += meta.seconds_in
        for job_id, count in meta.done.items():
            job = self._inflight.get(job_id)
            if job is None:
                continue
            job.acks += count
            if job.acks >= self._workers:
                del self._inflight[job_id]
                self._job_done(job)

    def _job_done(self, job: _Inflight) -> None:
        entry = job.entry
        nbytes = job.num_blocks * self._bytes_per_block
        if job.kind == "out":
            entry.saved = True
            self._stats.swapped_out_requests += 1
            self._stats.bytes_out += nbytes
            if entry.dropped:
                self._release_slots(entry.host_slots)
            if job.on_done is not None:
                try:
                    job.on_done()
                except Exception:
                    logger.exception("swap-out on_done callback failed")
        else:
            self._stats.swapped_in_requests += 1
            self._stats.loaded_async += job.loaded_async
            self._stats.bytes_in += nbytes
            entry.dropped = True
            self._release_slots(entry.host_slots)

    def has_pending_push_work(self) -> bool:
        # Keeps the engine stepping while a copy is queued or unacknowledged (needed for
        # `swap_out_held`, whose request vLLM no longer tracks).
        return bool(self._out_jobs or self._in_jobs or self._inflight)

    def reset_cache(self) -> bool:
        for entry in list(self._entries.values()):
            self._drop_entry(entry)
        return True

    # ============================================================================================
    # Worker side
    # ============================================================================================

    def _init_worker_side(self, copy_stream: bool) -> None:
        self._pool: HostPool | None = None
        self._sent: set[str] = set()
        self._received: set[str] = set()
        self._done: Counter[int] = Counter()
        self._events: list[Any] = []  # CUDA events around this step's compute-stream copies
        self._seconds_out = 0.0
        self._seconds_in = 0.0
        self._use_copy_stream = copy_stream
        # Made once the KV cache is known to be on a GPU: one stream per direction, so a
        # copy-out and a copy-in use the GPU's two copy engines at once.
        self._copy_stream: Any = None
        self._load_stream: Any = None
        # Copies under way on those streams: (start event, end event, their jobs).
        self._copying_out: list[tuple[Any, Any, list[SwapJob]]] = []
        self._copying_in: list[tuple[Any, Any, list[SwapJob]]] = []

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._pool = HostPool(list(kv_caches.values()), self._num_blocks, self._num_slots)
        if self._pool.bytes_per_block != self._bytes_per_block:
            logger.warning(
                "KV bytes per block: %d in the tensors, %d in the KV cache config",
                self._pool.bytes_per_block,
                self._bytes_per_block,
            )
        if self._pool.pinned and self._use_copy_stream:
            self._copy_stream = torch.cuda.Stream(device=self._pool.device)
            self._load_stream = torch.cuda.Stream(device=self._pool.device)
        logger.info(
            "LampsSwapConnector worker: %s; copies on %s",
            self._pool.describe(),
            "streams of their own" if self._copy_stream is not None else "the compute stream",
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, LampsSwapMetadata) or not (meta.swap_out or meta.swap_in):
            return
        assert self._pool is not None, "register_kv_caches was not called"
        loads = [job for job in meta.swap_in if job.loading_req_id is not None]
        swap_in = [job for job in meta.swap_in if job.loading_req_id is None]
        swap_out = meta.swap_out
        if self._copy_stream is not None:
            self._start_on_stream(self._copy_stream, swap_out, self._copying_out, copy_in=False)
            swap_out = []
            if swap_in:
                # A copy-in may read slots a copy-out still writes (its continuation came early).
                compute = torch.cuda.current_stream(self._pool.device)
                for _, end, _ in self._copying_out:
                    compute.wait_event(end)
        if swap_out or swap_in:
            self._copy_on_compute_stream(swap_out, swap_in)
        if loads:
            if self._load_stream is not None:
                self._start_on_stream(self._load_stream, loads, self._copying_in, copy_in=True)
            else:  # host memory (or no copy streams): the copy is done when it returns
                t0 = time.perf_counter()
                self._pool.copy_in(*_merged(loads))
                if not self._pool.pinned:
                    self._seconds_in += time.perf_counter() - t0
                self._mark_done(loads)

    def _copy_on_compute_stream(self, swap_out: list[SwapJob], swap_in: list[SwapJob]) -> None:
        """Copies ahead of this step's forward pass, copy-outs first: a continuation may be
        loaded in the same step as its copy-out."""
        assert self._pool is not None
        on_gpu = self._pool.pinned
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if on_gpu else []
        t0 = time.perf_counter()
        if events:
            events[0].record()
        if swap_out:
            self._pool.copy_out(*_merged(swap_out))
        t1 = time.perf_counter()
        if events:
            events[1].record()
        if swap_in:
            self._pool.copy_in(*_merged(swap_in))
        t2 = time.perf_counter()
        if events:
            # `get_finished` waits for these before anything is reported done.
            events[2].record()
            self._events = events
        else:  # synchronous copies in host memory
            self._seconds_out += t1 - t0
            self._seconds_in += t2 - t1
        self._mark_done(swap_out)
        self._mark_done(swap_in)

    def _mark_done(self, jobs: list[SwapJob]) -> None:
        for job in jobs:
            self._done[job.job_id] += 1
            if job.finished_req_id is not None:
                self._sent.add(job.finished_req_id)
            if job.loading_req_id is not None:
                self._received.add(job.loading_req_id)

    def _start_on_stream(
        self,
        stream: Any,
        jobs: list[SwapJob],
        under_way: list[tuple[Any, Any, list[SwapJob]]],
        copy_in: bool,
    ) -> None:
        """Copies on a side stream, after everything the compute stream has queued so far (the
        blocks' last writes, or last reads by their previous owner); copy-ins also after the
        copy-outs under way (they may still write the slots read here). The jobs are done when
        `_poll` sees them end."""
        if not jobs:
            return
        assert self._pool is not None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self._pool.device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            if copy_in:
                for _, copied_out, _ in self._copying_out:
                    stream.wait_event(copied_out)
            start.record(stream)
            if copy_in:
                self._pool.copy_in(*_merged(jobs))
            else:
                self._pool.copy_out(*_merged(jobs))
            end.record(stream)
        under_way.append((start, end, jobs))

    def _poll(self, under_way: list[tuple[Any, Any, list[SwapJob]]]) -> float:
        """Marks the jobs whose copies have ended done (without waiting); their seconds."""
        seconds = 0.0
        still: list[tuple[Any, Any, list[SwapJob]]] = []
        for start, end, jobs in under_way:
            if end.query():
                seconds += start.elapsed_time(end) / 1e3
                self._mark_done(jobs)
            else:
                still.append((start, end, jobs))
        under_way[:] = still
        return seconds

    def _wait_copies(self) -> None:
        if self._events:
            start, mid, end = self._events
            end.synchronize()
            self._seconds_out += start.elapsed_time(mid) / 1e3
            self._seconds_in += mid.elapsed_time(end) / 1e3
            self._events = []
        if self._copying_out:
            self._seconds_out += self._poll(self._copying_out)
        if self._copying_in:
            self._seconds_in += self._poll(self._copying_in)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._wait_copies()
        sent, self._sent = self._sent or None, set()
        received, self._received = self._received or None, set()
        return sent, received

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        self._wait_copies()
        if not self._done and not self._seconds_out and not self._seconds_in:
            return None
        meta = LampsSwapWorkerMetadata(
            done=self._done, seconds_out=self._seconds_out, seconds_in=self._seconds_in
        )
        self._done, self._seconds_out, self._seconds_in = Counter(), 0.0, 0.0
        return meta
