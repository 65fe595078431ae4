"""Each strategy does to a paused request's KV blocks what it says, on the real engine: Preserve
keeps them resident and out of the prefix cache's reach until the request resumes, Discard
frees them, memory pressure demotes preserved requests, and a drained engine is empty."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript
from lamps_vllm.scheduler import CALL_END_STOP_REASON
from lamps_vllm.trace_replay import TraceOutcome, run_trace
from tests.engine_harness import EngineHarness
from tool_workers.tools import ToolResult
from tool_workers.worker import ToolWorker

BLOCK = 16
PROMPT, DECODE = 200, 24  # the paused request holds 224 tokens in 14 blocks
# KV exists for every token but the last one sampled (never fed back): 223 tokens, of which
# the prefix cache can serve the 13 full blocks.
REUSABLE = (PROMPT + DECODE - 1) // BLOCK * BLOCK
SCRIPT = TraceScript.model_validate(
    {
        "segments": [
            {
                "prompt_tokens": PROMPT,
                "completion_tokens": DECODE,
                "api_time": 0.05,
                "api_token_length": 8,
            },
            {"prompt_tokens": PROMPT + DECODE + 8, "completion_tokens": 8},
        ]
    }
)
# Policy variants of the harness engine (tests/engine_harness.py): `fixed` with each strategy.
PRESERVE = "preserve"
DISCARD = "discard"
SWAP = "swap"
PRESERVE_THEN_SWAP = "preserve-then-swap"


async def filler(
    h: EngineHarness, requests: int, prompt_tokens: int, concurrently: int, decode: int = 2
) -> None:
    """Unrelated requests with fresh prompts: they take blocks, and evict cached ones."""
    rng = random.Random()

    async def one() -> None:
        prompt = [rng.randrange(1000, h.vocab_size) for _ in range(prompt_tokens)]
        params = SamplingParams(max_tokens=decode, min_tokens=decode, ignore_eos=True)
        async for _ in h.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"filler-{uuid.uuid4().hex}"
        ):
            pass

    for start in range(0, requests, concurrently):
        await asyncio.gather(*(one() for _ in range(min(concurrently, requests - start))))


def replay(
    h: EngineHarness, policy: str, during_call: Any = None, script: TraceScript = SCRIPT
) -> tuple[TraceOutcome, dict[str, Any]]:
    """Replay `script`; `during_call` runs while the request is paused, then the engine's
    figures are read, still inside the pause."""
    worker = ToolWorker(redis_url=None)
    seen: dict[str, Any] = {}

    async def call_tool(name: str, args: dict[str, Any], record_as: str | None) -> ToolResult:
        if during_call is not None:
            await during_call()
        await asyncio.sleep(0.2)  # let the engine publish a step's statistics
        seen.update(used=h.stats.kv_blocks_used, **h.stats.scheduler)
        return await worker.call(name, args, record_as)

    async def go() -> TraceOutcome:
        return await run_trace(
            h.engine,
            h.vocab_size,
            2048,
            f"req-{uuid.uuid4().hex}",
            script,
            call_tool,
            policy_variant=policy,
            holds=h.holds,
        )

    return h.run(go()), seen


def test_preserve_keeps_blocks_resident_through_the_call(harness: EngineHarness) -> None:
    outcome, during = replay(harness, PRESERVE)
    assert during["preserved_requests"] == 1
    assert during["preserved_blocks"] == -(-(PROMPT + DECODE) // BLOCK)
    assert during["used"] >= (PROMPT + DECODE) // BLOCK
    resumed = outcome.segments[1]
    assert resumed.cached_tokens == REUSABLE


def test_discard_frees_blocks_during_the_call(harness: EngineHarness) -> None:
    _, during = replay(harness, DISCARD)
    assert during["preserved_requests"] == 0
    assert during["used"] == 0


def test_preserved_blocks_survive_eviction_pressure(harness: EngineHarness) -> None:
    # Sequential fillers cycle the whole free pool (16 x 30 blocks > 256): a discarded request's
    # cached blocks are evicted, a preserved request's are not.
    def churn() -> Any:
        return filler(harness, requests=16, prompt_tokens=480, concurrently=2)

    discarded, _ = replay(harness, DISCARD, churn)
    preserved, during = replay(harness, PRESERVE, churn)
    assert discarded.segments[1].cached_tokens == 0  # recomputed in full
    assert preserved.segments[1].cached_tokens == REUSABLE
    assert during["preserved_requests"] == 1


def test_memory_pressure_demotes_preserved_requests(harness: EngineHarness) -> None:
    before = harness.stats.scheduler.get("demoted_to_discard", 0)

    # Eight concurrent requests growing to 496 + 40 tokens want 8 x 34 blocks, more than the 241
    # left beside the preserved request's 14: they all run only if it gives its blocks up.
    def crowd() -> Any:
        return filler(harness, requests=8, prompt_tokens=496, concurrently=8, decode=40)

    outcome, during = replay(harness, PRESERVE, crowd)
    assert during.get("demoted_to_discard") == before + 1, during
    assert during["preserved_requests"] == 0
    assert [s.completion_tokens for s in outcome.segments] == [DECODE, 8]


def test_swap_frees_blocks_and_brings_the_kv_back(harness: EngineHarness) -> None:
    def churn() -> Any:  # evicts anything the prefix cache still had of the request
        return filler(harness, requests=16, prompt_tokens=480, concurrently=2)

    before = harness.stats.scheduler.get("swap", {}).get("bytes_in", 0)
    loaded_async = harness.stats.scheduler.get("swap", {}).get("loaded_async", 0)
    outcome, during = replay(harness, SWAP, churn)
    bytes_per_token = harness.stats.scheduler["costs"]["kv_bytes_per_token"]
    assert during["preserved_requests"] == 0
    assert during["used"] == 0  # copied out, then freed
    assert during["swap"]["host_pool_bytes_in_use"] == REUSABLE * bytes_per_token
    # The continuation's prefix came back from the host pool (the churn evicted the cache).
    assert outcome.segments[1].cached_tokens == REUSABLE
    assert harness.stats.scheduler["swap"]["bytes_in"] - before == REUSABLE * bytes_per_token
    # The policy's default: loaded while other requests ran (vLLM parked the continuation).
    assert harness.stats.scheduler["swap"]["loaded_async"] == loaded_async + 1


def test_memory_pressure_swaps_preserved_requests_out(harness: EngineHarness) -> None:
    before = harness.stats.scheduler.get("demoted_to_swap", 0)

    def crowd() -> Any:
        return filler(harness, requests=8, prompt_tokens=496, concurrently=8, decode=40)

    outcome, during = replay(harness, PRESERVE_THEN_SWAP, crowd)
    assert during.get("demoted_to_swap") == before + 1, during
    assert during["preserved_requests"] == 0
    assert outcome.segments[1].cached_tokens == REUSABLE


def test_drained_engine_holds_nothing(harness: EngineHarness) -> None:
    async def many() -> None:
        await asyncio.gather(
            *(
                run_trace(
                    harness.engine,
                    harness.vocab_size,
                    2048,
                    f"drain-{i}",
                    SCRIPT,
                    lambda n, a, r: ToolWorker(None).call(n, a, r),
                    policy_variant=(PRESERVE, DISCARD, SWAP)[i % 3],
                )
                for i in range(6)
            )
        )
        await filler(harness, requests=1, prompt_tokens=16, concurrently=1)  # one more step

    harness.run(many())
    assert harness.stats.kv_blocks_used == 0
    assert harness.stats.scheduler["preserved_requests"] == 0
    assert harness.stats.scheduler["swap"]["host_pool_bytes_in_use"] == 0
    assert harness.stats.scheduler["swap"]["pending_jobs"] == 0
    assert harness.stats.running_requests == 0 and harness.stats.waiting_requests == 0


def test_costs_are_measured_on_this_engine(harness: EngineHarness) -> None:
    costs = harness.stats.scheduler["costs"]
    # 4 layers x 2 KV heads x 64 dims x key and value x 4 bytes (float32)
    assert costs["kv_bytes_per_token"] == 4 * 2 * 64 * 2 * 4
    # Measured by the start-up prefills, not the placeholder of an unmeasured engine. (The
    # tiny model's prefills cost nearly the same at any size: the slope may fit to ~0.)
    assert (costs["fwd_intercept_s"], costs["fwd_slope_s"]) != (0.01, 1e-4)
    assert costs["fwd_intercept_s"] > 0 and costs["fwd_slope_s"] >= 0
    assert 0 < costs["decode_step_s"] < 1.0 and costs["decode_step_s"] != 0.02
    assert costs["swap_slope_s"] > 0


def test_a_call_the_model_closes_itself_goes_to_the_policy(harness: EngineHarness) -> None:
    """An `auto` chat turn: the engine ends the segment at the call's closing tokens (not the
    frontend's stop string, which would abort it) and the policy decides for the call."""
    prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1040)))

    async def generate(meta: RequestMeta | None) -> Any:
        params = SamplingParams(
            max_tokens=12,
            ignore_eos=True,
            temperature=0.0,
            extra_args=meta.to_extra_args() if meta else None,
        )
        final = None
        async for output in harness.engine.generate(prompt, params, f"auto-{uuid.uuid4().hex}"):
            final = output
        return final.outputs[0]

    free_run = harness.run(generate(None))
    tokens = list(free_run.token_ids)
    closing = tokens[4:6]  # as if the model wrote its closing tag there
    stop_at = next(i for i in range(2, 7) if tokens[i - 2 : i] == closing)
    before = harness.stats.scheduler.get("calls_discard", 0)
    meta = RequestMeta(
        request_id=f"auto-{uuid.uuid4().hex}",
        arrival_time=time.time(),
        call_end_token_ids=[[7, 7, 7], closing],
        policy_variant=DISCARD,
    )
    paused = harness.run(generate(meta))
    assert list(paused.token_ids) == tokens[:stop_at]
    assert (paused.finish_reason, paused.stop_reason) == ("stop", CALL_END_STOP_REASON)
    harness.run(asyncio.sleep(0.2))  # a step's statistics reach the stat logger
    assert harness.stats.scheduler["calls_discard"] == before + 1
