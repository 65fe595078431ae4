"""Admission by predicted memory, the Keep strategy and the policy guard, on the real engine
(tiny dummy model, 255 blocks of 16 tokens: tests/engine_harness.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript
from lamps_vllm.trace_replay import TraceOutcome, run_trace
from tests.engine_harness import EngineHarness
from tests.test_engine_policies import run_all
from tests.test_engine_strategies import BLOCK, DECODE, PROMPT, REUSABLE, filler, replay
from tool_workers.tools import ToolResult
from tool_workers.worker import ToolWorker

# One segment growing from 100 to 400 tokens: 25 blocks at its peak. Twelve of them want 300
# blocks, more than the 255 there are, though their prompts (7 blocks each) fit at once.
GROWING = TraceScript.model_validate(
    {"segments": [{"prompt_tokens": 100, "completion_tokens": 300}]}
)


def _counter(h: EngineHarness, key: str) -> int:
    return int(h.stats.scheduler.get(key, 0))


def run_growing(h: EngineHarness, variant: str, n: int = 12) -> list[TraceOutcome]:
    return run_all(h, variant, [GROWING] * n)


def settle(h: EngineHarness) -> None:
    time.sleep(0.3)  # the engine publishes its figures with each step's statistics


def test_admission_by_predicted_memory_avoids_preemptions(harness: EngineHarness) -> None:
    settle(harness)
    before = _counter(harness, "preemptions")
    greedy = run_growing(harness, "lamps-no-admission")
    settle(harness)
    greedy_preemptions = _counter(harness, "preemptions") - before

    before, refused = _counter(harness, "preemptions"), _counter(harness, "admission_refused")
    gated = run_growing(harness, "lamps")
    settle(harness)
    assert greedy_preemptions > 0  # vLLM's admission: blocks free now, preempt when they grow
    assert _counter(harness, "preemptions") == before  # every promise kept
    assert _counter(harness, "admission_refused") > refused  # the gate did hold requests back
    for outcome in greedy + gated:
        assert [s.completion_tokens for s in outcome.segments] == [300]
    assert harness.stats.kv_blocks_used == 0


def test_keep_holds_blocks_until_the_continuation_takes_them(harness: EngineHarness) -> None:
    outcome, during = replay(harness, "keep")
    assert during["kept_requests"] == 1
    assert during["preserved_blocks"] == -(-(PROMPT + DECODE) // BLOCK)
    assert during["used"] >= (PROMPT + DECODE) // BLOCK
    assert outcome.segments[1].cached_tokens == REUSABLE


def test_kept_blocks_are_given_back_when_memory_is_needed(harness: EngineHarness) -> None:
    before = _counter(harness, "kept_given_back")

    # Eight requests growing to 536 tokens want 8 x 34 blocks, more than the 241 left beside
    # the kept request's 14: they all run only if it gives its blocks back.
    def crowd() -> Any:
        return filler(harness, requests=8, prompt_tokens=496, concurrently=8, decode=40)

    outcome, during = replay(harness, "keep", crowd)
    assert during["kept_given_back"] == before + 1, during
    assert during["kept_requests"] == 0
    assert [s.completion_tokens for s in outcome.segments] == [DECODE, 8]
    settle(harness)
    assert harness.stats.kv_blocks_used == 0


def test_a_repeated_request_id_frees_the_first_hold(harness: EngineHarness) -> None:
    """Two augmented requests under one id at once (the serving layer never sends this; the
    engine must still not lose blocks to it): both pause preserved, the second hold replaces the
    first, which is freed, and nothing is held once both are done."""
    from tests.test_engine_strategies import SCRIPT

    shared_id = f"dup-{uuid.uuid4().hex}"
    worker = ToolWorker(redis_url=None)

    async def slow_call(name: str, args: dict[str, Any], record_as: str | None) -> ToolResult:
        await asyncio.sleep(1.0)  # both pause before either resumes
        return await worker.call(name, args, record_as)

    async def go() -> list[TraceOutcome]:
        return await asyncio.gather(
            *(
                run_trace(
                    harness.engine,
                    harness.vocab_size,
                    2048,
                    shared_id,
                    SCRIPT,
                    slow_call,
                    policy_variant="preserve",
                )
                for _ in range(2)
            )
        )

    before = _counter(harness, "preserve_released_replaced")
    outcomes = harness.run(go())
    settle(harness)
    assert _counter(harness, "preserve_released_replaced") == before + 1
    assert harness.stats.scheduler["preserved_requests"] == 0
    assert harness.stats.kv_blocks_used == 0
    for outcome in outcomes:
        assert [s.completion_tokens for s in outcome.segments] == [DECODE, 8]


def test_a_failing_policy_is_counted_and_the_engine_serves_on(harness: EngineHarness) -> None:
    """Estimates the policy refuses (a negative duration, as a corrupted Redis could hold) make
    it raise inside the engine core: counted, the request served, the engine alive."""
    before = _counter(harness, "policy_errors")
    meta = RequestMeta(
        request_id=f"bad-{uuid.uuid4().hex}",
        arrival_time=time.time(),
        api_estimates={"qa": -1.0},
        policy_variant="lamps-estimates",
    )
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    async def go() -> int:
        params = SamplingParams(
            max_tokens=5, min_tokens=5, ignore_eos=True, extra_args=meta.to_extra_args()
        )
        tokens = 0
        async for output in harness.engine.generate(
            TokensPrompt(prompt_token_ids=list(range(1000, 1040))), params, f"{meta.request_id}-s0"
        ):
            tokens = len(output.outputs[0].token_ids)
        return tokens

    assert harness.run(go()) == 5
    settle(harness)
    assert _counter(harness, "policy_errors") > before
    outcome, _ = replay(harness, "lamps")  # and the next request is served as usual
    assert [s.completion_tokens for s in outcome.segments] == [DECODE, 8]


def abandon_during_call(h: EngineHarness, variant: str) -> dict[str, Any]:
    """Start SCRIPT under `variant`, cancel it while its call runs (a client gone), and return
    the engine's figures read during the call."""
    from tests.test_engine_strategies import SCRIPT

    in_call = asyncio.Event()

    async def never_returns(name: str, args: dict[str, Any], record_as: str | None) -> ToolResult:
        in_call.set()
        await asyncio.sleep(3600)
        raise AssertionError("cancelled long before")

    async def go() -> dict[str, Any]:
        task = asyncio.create_task(
            run_trace(
                h.engine,
                h.vocab_size,
                2048,
                f"gone-{uuid.uuid4().hex}",
                SCRIPT,
                never_returns,
                policy_variant=variant,
                holds=h.holds,
            )
        )
        await in_call.wait()
        await asyncio.sleep(0.5)  # the swap-out copy and a step's statistics
        during = {"used": h.stats.kv_blocks_used, **h.stats.scheduler}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        return during

    return h.run(go())


def test_a_request_abandoned_in_its_call_frees_its_blocks_at_once(harness: EngineHarness) -> None:
    before = _counter(harness, "preserve_released_done")
    during = abandon_during_call(harness, "preserve")
    assert during["preserved_requests"] == 1
    settle(harness)
    assert _counter(harness, "preserve_released_done") == before + 1
    assert harness.stats.scheduler["preserved_requests"] == 0
    assert harness.stats.kv_blocks_used == 0


def test_a_request_abandoned_in_its_call_frees_its_host_copy(harness: EngineHarness) -> None:
    before = _counter(harness, "swap_released_done")
    during = abandon_during_call(harness, "swap")
    assert during["swap"]["host_pool_bytes_in_use"] > 0
    settle(harness)
    assert _counter(harness, "swap_released_done") == before + 1
    assert harness.stats.scheduler["swap"]["host_pool_bytes_in_use"] == 0
    assert harness.stats.kv_blocks_used == 0


LONG_CALL = TraceScript.model_validate(
    {
        "segments": [
            {
                "prompt_tokens": PROMPT,
                "completion_tokens": DECODE,
                "api_time": 2.0,
                "api_token_length": 8,
            },
            {"prompt_tokens": PROMPT + DECODE + 8, "completion_tokens": 8},
        ]
    }
)


def test_an_idle_engine_lets_go_of_old_holds_when_the_timer_asks(harness: EngineHarness) -> None:
    """Deadlines are checked when the engine steps; an idle one does not step, so the replica's
    timer asks the engine (a utility call) to expire its holds. Here the engine is asked as if
    it were past the deadline (`max_preserve_s` after the pause). Preserved blocks and a
    swapped-out copy both go; the requests still finish (recomputing)."""

    async def expire_while_idle() -> None:
        await asyncio.sleep(1.0)  # both held for a second, nothing running
        late = time.time() + harness.settings.scheduler.max_preserve_s
        assert await harness.holds.expire(at=late) == 1

    expired = _counter(harness, "preserve_released_expired")
    swap_expired = _counter(harness, "swap_released_expired")
    preserved, during = replay(harness, "preserve", expire_while_idle, script=LONG_CALL)
    assert during["preserved_requests"] == 0 and during["used"] == 0
    assert _counter(harness, "preserve_released_expired") == expired + 1
    swapped, during = replay(harness, "swap", expire_while_idle, script=LONG_CALL)
    assert during["swap"]["host_pool_bytes_in_use"] == 0 and during["swap"]["entries"] == 0
    assert _counter(harness, "swap_released_expired") == swap_expired + 1
    for outcome in (preserved, swapped):
        assert [s.completion_tokens for s in outcome.segments] == [DECODE, 8]
    settle(harness)
    assert harness.stats.kv_blocks_used == 0


def test_call_estimates_never_go_back_to_an_older_version(harness: EngineHarness) -> None:
    """A segment of an older request carries the estimates of its start: installed after a
    newer request's, it would put older figures back and make every plan stale. The engine
    keeps the newest version it has seen."""
    worker = ToolWorker(redis_url=None)
    one = TraceScript.model_validate({"segments": [{"prompt_tokens": 16, "completion_tokens": 2}]})
    base = _counter(harness, "api_estimates_version")

    def send(version: int, qa_s: float) -> int:
        harness.run(
            run_trace(
                harness.engine,
                harness.vocab_size,
                2048,
                f"est-{uuid.uuid4().hex}",
                one,
                worker.call,
                policy_variant="lamps-estimates",
                api_estimates={"qa": qa_s},
                api_estimates_version=version,
                holds=harness.holds,
            )
        )
        settle(harness)
        return _counter(harness, "api_estimates_version")

    newer = base + 10
    assert send(newer, 2.0) == newer
    assert send(newer - 5, 9.0) == newer  # an older snapshot arrives late: not installed
    assert send(newer + 1, 3.0) == newer + 1
