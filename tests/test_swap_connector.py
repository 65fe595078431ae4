"""The Swap strategy's KV connector (`lamps_vllm.swap_connector`) on a real vLLM engine.

One engine for the module: the engine core runs in this process (so the test reads the scheduler
and the connector's scheduler side directly) and the worker in its own process (so copy jobs and
their acknowledgements really cross processes). A test-only scheduler subclass asks for the swap
the way the LAMPS plugin does, from `_free_request`.

The model is the tiny config of `data/models/tiny-dummy` with random weights of the usual scale
(std 0.02) saved to a temporary folder, not `load_format="dummy"`: vLLM's dummy weights
(uniform ±1e-3) make every logit equal, so the output does not depend on the context at all and
could not reveal a wrong copy. With these weights it does (`test_output_depends_on_the_prefix`),
and the tests also compare the KV bytes of the blocks directly.

`test_host_pool_round_trip` checks the copy code alone (no engine) in the KV cache layouts of other
backends (FlashAttention's block dimension 1, kernel blocks smaller than engine blocks, permuted
strides), which the CPU engine does not use.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from lamps_core.request_meta import RequestMeta
from lamps_vllm.swap_connector import HostPool

PROJECT_DIR = Path(__file__).resolve().parent.parent
MODEL_SRC = PROJECT_DIR / "data" / "models" / "tiny-dummy"
BLOCK = 16
KV_CACHE_BYTES = 32 << 20  # 8,192 tokens: 512 blocks of 16
HOST_POOL_BYTES = 4 << 20  # 64 blocks of 64 KiB (4 layers x 2 KV heads x 64 x 2 x fp32)
TEST_KEY = "lamps_swap_test"  # extra_args key: what the test scheduler does at the segment end
SEGMENT_END = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


@dataclass
class Held:
    engine_request_id: str
    blocks: list[Any]  # KVCacheBlock objects the scheduler holds a reference on
    num_tokens: int  # tokens with written KV
    token_ids: list[int]
    segment_index: int


class SwapTestScheduler(Scheduler):
    """Stands in for the LAMPS plugin: at a segment end, `extra_args[TEST_KEY]` says "swap"
    (mark for swap before vLLM frees the request) or "hold" (keep a reference on the blocks, as
    Preserve does, to swap them out later with `swap_out_held`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.block_log: dict[str, list[int]] = {}  # engine request id -> its block ids
        self.marked: dict[str, bool] = {}  # logical id -> mark_for_swap's answer
        self.held: dict[str, Held] = {}

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        rid = request.request_id
        self.block_log[rid] = list(self.kv_cache_manager.get_block_ids(rid)[0])
        params = request.sampling_params
        extra = (params.extra_args if params is not None else None) or {}
        action = extra.get(TEST_KEY)
        if action and request.status in SEGMENT_END:
            meta = RequestMeta.from_extra_args(extra)
            assert meta is not None
            if action == "swap":
                self.marked[meta.request_id] = self.connector.mark_for_swap(
                    rid, meta.request_id, request.num_tokens
                )
            elif action == "hold":
                blocks = list(self.kv_cache_manager.get_blocks(rid).blocks[0])
                self.kv_cache_manager.block_pool.touch(blocks)
                self.held[meta.request_id] = Held(
                    rid,
                    blocks,
                    request.num_computed_tokens,
                    list(request.all_token_ids),
                    meta.segment_index,
                )
        return super()._free_request(request, *args, **kwargs)


def _kv_digest_fn():
    # Defined in a closure so cloudpickle sends it by value to the worker process.
    def kv_block_digests(worker: Any, block_ids: list[int]) -> list[str]:
        import hashlib

        kvs = worker.model_runner.kv_caches
        num_blocks = worker.model_runner.kv_cache_config.num_blocks
        out = []
        for b in block_ids:
            h = hashlib.sha256()
            for kv in kvs:
                dim = 0 if kv.shape[0] == num_blocks else 1
                h.update(kv.select(dim, b).contiguous().cpu().numpy().tobytes())
            out.append(h.hexdigest())
        return out

    return kv_block_digests


@dataclass
class Engine:
    llm: LLM
    sched: SwapTestScheduler

    @property
    def conn(self) -> Any:
        return self.sched.connector

    def free_blocks(self) -> int:
        return self.sched.kv_cache_manager.block_pool.get_num_free_blocks()

    def generate(self, prompt: list[int], sp: SamplingParams) -> Any:
        return self.llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]

    def drain(self, max_steps: int = 50) -> int:
        """Step the engine until no copy is pending and no finished request waits for one (the
        served engine's busy loop does this by itself; `LLM.generate` stops at its last output)."""
        for step in range(max_steps):
            if not self.conn.swap_stats().pending_jobs and not self.sched.requests:
                return step
            self.llm.llm_engine.step()
        raise AssertionError(f"copies still pending: {self.conn.swap_stats()}")

    def blocks_of(self, out: Any) -> list[int]:
        """Block ids the request of an output had when it was freed (engine ids carry a suffix)."""
        (blocks,) = [
            b for k, b in self.sched.block_log.items() if k.startswith(f"{out.request_id}-")
        ]
        return blocks

    def digests(self, block_ids: list[int]) -> list[str]:
        return self.llm.collective_rpc(_kv_digest_fn(), args=(block_ids,))[0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path_factory.mktemp("tiny-random")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(MODEL_SRC)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (MODEL_SRC / name).exists():
            shutil.copy(MODEL_SRC / name, model_dir / name)

    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
        # Engine core in this process; the worker still runs in its own ("mp" executor).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        block_size=BLOCK,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_prefix_caching=True,
        distributed_executor_backend="mp",
        scheduler_cls=SwapTestScheduler,
        seed=0,
        kv_transfer_config={
            "kv_connector": "LampsSwapConnector",
            "kv_connector_module_path": "lamps_vllm.swap_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"host_pool_bytes": HOST_POOL_BYTES},
        },
    )
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    assert isinstance(sched, SwapTestScheduler)
    try:
        yield Engine(llm, sched)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm, sched
        # An engine core in this process froze the GC heap and cached vLLM's environment
        # variables: undo both so later engines in this process see their own settings.
        gc.unfreeze()
        gc.collect()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import vllm.envs

        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()


# ---- helpers --------------------------------------------------------------------------------


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def params(
    logical: str, segment: int, max_tokens: int, action: str | None = None, logprobs: int = 0
) -> SamplingParams:
    extra = RequestMeta(
        request_id=logical, arrival_time=time.time(), segment_index=segment
    ).to_extra_args()
    if action:
        extra[TEST_KEY] = action
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        logprobs=logprobs or None,
        extra_args=extra,
    )


def answer(out: Any) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """Output token ids and, per position, the top logprobs (exact floats)."""
    completion = out.outputs[0]
    lps = [sorted((k, v.logprob) for k, v in d.items()) for d in completion.logprobs or []]
    return list(completion.token_ids), lps


def evict_prefix_cache(engine: Engine, seed: int) -> None:
    """An unrelated workload that cycles more tokens through the KV cache than it holds."""
    capacity = engine.sched.kv_cache_manager.block_pool.num_gpu_blocks * BLOCK
    n, i = 0, 0
    while n < capacity * 1.2:
        engine.generate(tokens(seed * 1000 + i, 1800), params(f"filler-{seed}-{i}", 0, 1))
        n += 1800
        i += 1


API_TOKENS = 7  # tokens "returned by the API", appended to the continuation's prompt
PROMPT_TOKENS = 400
SEGMENT_TOKENS = 40
# Whole blocks with written KV at the end of segment 0 (its last sampled token has none).
SAVED_TOKENS = (PROMPT_TOKENS + SEGMENT_TOKENS - 1) // BLOCK * BLOCK


def reference(engine: Engine, seed: int) -> tuple[list[int], list[int], Any, list[str]]:
    """Segment 0 and its continuation without any swap (the prefix cache holds the blocks):
    (segment-0 output, continuation prompt, continuation output, KV digests of the saved blocks).

    Segment 0 starts and ends with an empty prefix cache, so the swapped run computes its KV the
    same way, to the bit: a prefix-cache hit on the prompt would recompute the prompt's last block
    as a short prefill, whose float rounding differs from a long prefill's (measured: logprobs
    then differ by ~1e-6), and the comparison would be between different KV, not a bad copy."""
    assert engine.llm.reset_prefix_cache()
    prompt = tokens(seed, PROMPT_TOKENS)
    seg0 = engine.generate(prompt, params(f"ref-{seed}", 0, SEGMENT_TOKENS))
    out0 = list(seg0.outputs[0].token_ids)
    digests = engine.digests(engine.blocks_of(seg0)[: SAVED_TOKENS // BLOCK])
    cont = prompt + out0 + tokens(seed + 1, API_TOKENS)
    ref = engine.generate(cont, params(f"ref-{seed}", 1, 16, logprobs=5))
    assert ref.num_cached_tokens == SAVED_TOKENS, "the reference should be a prefix-cache hit"
    assert engine.llm.reset_prefix_cache()
    return out0, cont, ref, digests


# ---- tests ----------------------------------------------------------------------------------


def _layouts(num_blocks: int) -> dict[str, list[Any]]:
    """KV cache tensors (two layers) in the layouts of several backends, logical shapes."""
    import torch

    def filled(shape: tuple[int, ...]) -> Any:
        return torch.randn(shape)

    # The logical (N, H, bs, 2D) view of a physically (N, bs, H, 2D) tensor, as a stride order
    # other than the identity gives it.
    permuted = [filled((num_blocks, 16, 2, 128)).permute(0, 2, 1, 3) for _ in range(2)]
    return {
        "cpu (N, H, bs, 2D)": [filled((num_blocks, 2, 16, 128)) for _ in range(2)],
        "flash (2, N, bs, H, D)": [filled((2, num_blocks, 16, 2, 64)) for _ in range(2)],
        "kernel blocks (2N, H, bs/2, 2D)": [filled((2 * num_blocks, 2, 8, 128)) for _ in range(2)],
        "permuted strides": permuted,
    }


@pytest.mark.parametrize("layout", list(_layouts(4)))
def test_host_pool_round_trip(layout: str) -> None:
    """Blocks copied out to scattered host slots and back into other blocks arrive intact, in
    every layout (the block dimension is found from the shape)."""
    import torch

    num_blocks = 12
    layers = _layouts(num_blocks)[layout]
    original = [t.clone() for t in layers]
    pool = HostPool(layers, num_blocks, num_slots=16)
    pool.copy_out([5, 2, 9, 11], [3, 4, 10, 0])  # three runs of slots
    for t in layers:
        t.zero_()
    pool.copy_in([1, 7, 8], [3, 4, 10])
    pool.copy_in([0], [0])
    dim, sub = pool.block_dim, pool.sub
    for before, after in zip(original, layers, strict=True):
        for src, dst in ((5, 1), (2, 7), (9, 8), (11, 0)):
            a = before.narrow(dim, src * sub, sub)
            b = after.narrow(dim, dst * sub, sub)
            assert torch.equal(a, b), (layout, src, dst)
        assert not after.narrow(dim, 2 * sub, sub).any()  # untouched blocks stay as they were
    assert pool.bytes_per_block == 2 * 2 * 16 * 128 * 4


def test_output_depends_on_the_prefix(engine: Engine) -> None:
    """Positive control: changing one early token changes the answer's logprobs, so comparing
    answers detects KV that was not copied exactly."""
    prompt = tokens(1, 300)
    changed = list(prompt)
    changed[3] = 12345
    a = answer(engine.generate(prompt, params("ctl", 0, 8, logprobs=5)))
    b = answer(engine.generate(changed, params("ctl", 0, 8, logprobs=5)))
    assert a[1] != b[1]


def swap_segment0(engine: Engine, logical: str, cont: list[int], out0: list[int]) -> Any:
    seg0 = engine.generate(cont[:PROMPT_TOKENS], params(logical, 0, SEGMENT_TOKENS, "swap"))
    assert list(seg0.outputs[0].token_ids) == out0
    assert engine.sched.marked[logical] is True
    assert engine.conn.has_entry(logical)
    return seg0


def test_swap_out_then_prefix_cache_serves_continuation(engine: Engine) -> None:
    conn = engine.conn
    engine.drain()
    out0, cont, ref, ref_digests = reference(engine, seed=10)
    before = conn.swap_stats()
    free0 = engine.free_blocks()

    seg0 = swap_segment0(engine, "s10", cont, out0)
    assert engine.free_blocks() < free0, "blocks are kept until copied out"
    assert engine.digests(engine.blocks_of(seg0)[: SAVED_TOKENS // BLOCK]) == ref_digests

    steps = engine.drain()
    after = conn.swap_stats()
    nbytes = SAVED_TOKENS // BLOCK * conn.bytes_per_block
    # 4 layers x 2 KV heads x 64 dims x (K, V) x 4 bytes per token, 16 tokens per block
    assert conn.bytes_per_block == 4 * 2 * 64 * 2 * 4 * BLOCK
    assert steps == 1, "copied out in the next engine step"
    assert engine.free_blocks() == free0, "blocks freed after the copy-out"
    assert after.swapped_out_requests == before.swapped_out_requests + 1
    assert after.bytes_out - before.bytes_out == nbytes
    assert after.host_pool_bytes_in_use == nbytes
    assert after.entries == 1

    # The blocks are still in the prefix cache: the continuation is served from it, and the host
    # entry is dropped without a copy-in.
    got = engine.generate(cont, params("s10", 1, 16, logprobs=5))
    engine.drain()
    final = conn.swap_stats()
    assert got.num_cached_tokens == SAVED_TOKENS
    assert answer(got) == answer(ref)
    assert final.served_by_prefix_cache == before.served_by_prefix_cache + 1
    assert final.swapped_in_requests == before.swapped_in_requests
    assert final.host_pool_bytes_in_use == 0 and final.entries == 0


@pytest.mark.parametrize("load_async", [True, False], ids=["async load", "load before the step"])
def test_swap_in_after_prefix_cache_eviction(
    engine: Engine, load_async: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of loading give the continuation the same KV bytes and the same answer: the
    asynchronous one parks the request in vLLM until the worker reports the copy received."""
    conn = engine.conn
    monkeypatch.setattr(conn, "load_async_for", lambda request: load_async)
    engine.drain()
    out0, cont, ref, ref_digests = reference(engine, seed=20)
    before = conn.swap_stats()
    free0 = engine.free_blocks()

    seg0 = swap_segment0(engine, "s20", cont, out0)
    seg0_blocks = engine.blocks_of(seg0)[: SAVED_TOKENS // BLOCK]
    assert engine.digests(seg0_blocks) == ref_digests  # still held: not copied out yet
    engine.drain()
    assert engine.free_blocks() == free0
    out_stats = conn.swap_stats()

    t0 = time.perf_counter()
    evict_prefix_cache(engine, seed=20)
    engine.drain()
    filler_s = time.perf_counter() - t0
    assert engine.digests(seg0_blocks) != ref_digests, "the filler reused those blocks"
    assert conn.swap_stats().entries == 1

    got = engine.generate(cont, params("s20", 1, 16, logprobs=5))
    engine.drain()
    after = conn.swap_stats()
    nbytes = SAVED_TOKENS // BLOCK * conn.bytes_per_block
    # All saved blocks came from the host pool: a prefix-cache hit would have shortened the load.
    assert after.swapped_in_requests == before.swapped_in_requests + 1
    assert after.loaded_async - before.loaded_async == int(load_async)
    assert after.bytes_in - before.bytes_in == nbytes
    assert after.served_by_prefix_cache == before.served_by_prefix_cache
    assert got.num_cached_tokens == SAVED_TOKENS
    # The same KV bytes, and the same answer as with the prefix cache holding the blocks.
    assert engine.digests(engine.blocks_of(got)[: SAVED_TOKENS // BLOCK]) == ref_digests
    assert answer(got) == answer(ref)
    assert after.host_pool_bytes_in_use == 0 and after.entries == 0
    print(
        f"\nswap of {SAVED_TOKENS} tokens ({nbytes} bytes): "
        f"out {(out_stats.seconds_out - before.seconds_out) * 1e3:.2f} ms, "
        f"in {(after.seconds_in - out_stats.seconds_in) * 1e3:.2f} ms; filler {filler_s:.1f} s"
    )


def test_swap_out_held_blocks(engine: Engine) -> None:
    """Preserve demoted to Swap: the plugin holds the blocks itself, asks for a copy-out, and
    frees them in `on_done`."""
    conn = engine.conn
    sched = engine.sched
    engine.drain()
    _, cont, ref, ref_digests = reference(engine, seed=30)
    before = conn.swap_stats()
    free0 = engine.free_blocks()

    engine.generate(cont[:PROMPT_TOKENS], params("s30", 0, SEGMENT_TOKENS, "hold"))
    assert engine.drain() == 0, "nothing pending: vLLM is done with the request"
    held = sched.held.pop("s30")
    assert held.num_tokens == PROMPT_TOKENS + SEGMENT_TOKENS - 1
    block_ids = [b.block_id for b in held.blocks]
    assert engine.free_blocks() == free0 - len(block_ids), "the plugin holds the blocks"

    done: list[bool] = []

    def on_done() -> None:
        sched.kv_cache_manager.block_pool.free_blocks(held.blocks)
        done.append(True)

    assert conn.swap_out_held(
        held.engine_request_id,
        "s30",
        block_ids,
        held.num_tokens,
        held.token_ids,
        on_done,
        segment_index=held.segment_index,
    )
    assert not done
    assert sched.has_requests(), "the engine's busy loop keeps stepping until the copy is done"
    assert engine.drain() >= 1
    assert done == [True]
    assert engine.free_blocks() == free0
    assert (
        conn.swap_stats().bytes_out - before.bytes_out
        == SAVED_TOKENS // BLOCK * conn.bytes_per_block
    )

    assert engine.llm.reset_prefix_cache()  # nothing of it left in the KV cache
    got = engine.generate(cont, params("s30", 1, 16, logprobs=5))
    engine.drain()
    after = conn.swap_stats()
    assert got.num_cached_tokens == SAVED_TOKENS
    assert after.bytes_in - before.bytes_in == SAVED_TOKENS // BLOCK * conn.bytes_per_block
    assert engine.digests(engine.blocks_of(got)[: SAVED_TOKENS // BLOCK]) == ref_digests
    assert answer(got) == answer(ref)
    assert after.host_pool_bytes_in_use == 0 and after.entries == 0


def test_refused_when_the_pool_is_full(engine: Engine) -> None:
    conn = engine.conn
    engine.drain()
    before = conn.swap_stats()
    free0 = engine.free_blocks()
    assert not conn.can_swap(1500)  # 93 blocks > 64 host slots
    engine.generate(tokens(40, 1500), params("s40", 0, 4, "swap"))
    assert engine.sched.marked["s40"] is False
    assert not engine.sched.requests, "a refused swap frees the blocks at once (Discard)"
    assert engine.free_blocks() == free0
    after = conn.swap_stats()
    assert after.refused == before.refused + 1
    assert after.entries == 0 and after.host_pool_bytes_in_use == 0


def test_diverging_continuation_loads_the_matching_blocks(engine: Engine) -> None:
    """A continuation that repeats only part of the saved context (say, a chat template that
    re-renders the last turn) loads the whole blocks before the first difference."""
    conn = engine.conn
    engine.drain()
    prompt = tokens(50, 200)
    seg0 = engine.generate(prompt, params("s50", 0, 20, "swap"))
    saved = engine.digests(engine.blocks_of(seg0)[: 219 // BLOCK])
    engine.drain()
    assert engine.llm.reset_prefix_cache()
    before = conn.swap_stats()
    cont = prompt + list(seg0.outputs[0].token_ids)[:5] + tokens(52, 30)  # differs at 205
    matched = 205 // BLOCK * BLOCK
    got = engine.generate(cont, params("s50", 1, 4))
    engine.drain()
    after = conn.swap_stats()
    assert got.num_cached_tokens == matched
    assert after.tokens_in - before.tokens_in == matched
    assert engine.digests(engine.blocks_of(got)[: matched // BLOCK]) == saved[: matched // BLOCK]
    assert after.host_pool_bytes_in_use == 0 and after.entries == 0


def test_unrelated_prompt_drops_the_entry(engine: Engine) -> None:
    conn = engine.conn
    engine.drain()
    engine.generate(tokens(60, 200), params("s60", 0, 20, "swap"))
    engine.drain()
    assert conn.has_entry("s60")
    before = conn.swap_stats()
    got = engine.generate(tokens(61, 260), params("s60", 1, 4))  # not its continuation
    engine.drain()
    after = conn.swap_stats()
    assert got.num_cached_tokens == 0
    assert not conn.has_entry("s60")
    assert after.dropped == before.dropped + 1
    assert after.swapped_in_requests == before.swapped_in_requests
    assert after.host_pool_bytes_in_use == 0
