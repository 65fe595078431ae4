"""What the scheduler plugin tells a policy about the engine when it plans, on the real engine
(tiny dummy model, 255 blocks of 16 tokens: tests/engine_harness.py):

- A request pausing for a call is not "other" load in its own strategy decision: alone on the
  engine, its Discard stalls nobody, so LAMPS discards a call whose Preserve would waste more
  than a lone recompute; counted as other load, the recompute would seem to stall its own
  context and the call would be preserved.
- The blocks the head of the waiting queue needs (`_blocks_needed`, which decides how many
  preserved calls are demoted) leave out its prefix hits on blocks in use: a continuation's own
  held blocks, or a prefix another paused request holds. Counted as new, they would look like a
  shortage and a preserved call would be demoted for nothing. Hits on blocks that are only
  cached (free, as a discarded call's are) do count: taking them takes them off the free pool,
  and left out, the head would wait for memory no demotion makes.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from lamps_core.costs import EngineCosts
from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript, TraceSegment
from lamps_core.waste import discard_waste, preserve_waste
from lamps_vllm.trace_replay import TraceOutcome, filler_ids, run_trace
from tests.engine_harness import EngineHarness
from tool_workers.tools import ToolResult
from tool_workers.worker import ToolWorker

BLOCK = 16
TOTAL_BLOCKS = 255


def _counter(h: EngineHarness, key: str) -> int:
    return int(h.stats.scheduler.get(key, 0))


def settle(h: EngineHarness) -> None:
    time.sleep(0.3)  # the engine publishes its figures with each step's statistics


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


# ---- the pausing request and its own strategy ----

# A lone segment of 1500 + 8 tokens pauses; its trace predicted 1000 decode tokens, so the context
# is far (> 25 %) from the plan's and LAMPS compares the wastes again at the pause, with the load
# the plugin reports then.
ALONE_PROMPT, ALONE_DECODE, PREDICTED_DECODE = 1500, 8, 1000
# LAMPS without Swap and Keep (tests/engine_harness.py): Preserve against Discard only.
PRESERVE_OR_DISCARD = "lamps-preserve-or-discard"


def test_the_pausing_request_is_not_other_load_for_its_own_call(harness: EngineHarness) -> None:
    settle(harness)
    assert harness.stats.kv_blocks_used == 0, "a test before this one left blocks in use"
    costs = EngineCosts.coerce(harness.stats.scheduler["costs"])
    context = ALONE_PROMPT + ALONE_DECODE
    # Discard's waste with nothing else running (its own recompute), and as it would be if its
    # own context counted as other running tokens, stalled by each recompute chunk. With a linear
    # T_fwd the second is at least 3x the first (3.5x to 5x as measured on this CPU engine).
    alone = discard_waste(context, 0, costs)
    self_counted = discard_waste(context, context, costs)
    # The call's duration puts Preserve's waste at their geometric mean, at least sqrt(3) = 1.7x
    # from each (checked at 1.5x): the costs the engine measures meanwhile may drift that much
    # before either side of the comparison flips.
    api_s = math.sqrt(alone * self_counted) / (context * costs.kv_bytes_per_token)
    preserve = preserve_waste(context, api_s, costs)
    wastes = f"W_D alone {alone:.4g} < W_P {preserve:.4g} < W_D self-counted {self_counted:.4g}"
    assert 1.5 * alone < preserve < self_counted / 1.5, wastes

    prompt = filler_ids(ALONE_PROMPT, harness.vocab_size, random.Random(0))
    meta = RequestMeta(
        request_id=f"alone-{uuid.uuid4().hex}",
        arrival_time=time.time(),
        ends_in_api_call=True,
        remaining_segments=[
            TraceSegment(
                prompt_tokens=ALONE_PROMPT,
                completion_tokens=PREDICTED_DECODE,
                api_time=api_s,
                api_token_length=8,
            ),
            TraceSegment(prompt_tokens=ALONE_PROMPT + PREDICTED_DECODE + 8, completion_tokens=8),
        ],
        policy_variant=PRESERVE_OR_DISCARD,
    )
    params = SamplingParams(
        max_tokens=ALONE_DECODE,
        min_tokens=ALONE_DECODE,
        ignore_eos=True,
        temperature=0.0,
        extra_args=meta.to_extra_args(),
    )

    async def generate() -> int:
        tokens = 0
        async for output in harness.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"{meta.request_id}-s0"
        ):
            tokens = len(output.outputs[0].token_ids)
        return tokens

    keys = ("calls_discard", "calls_preserve", "policy_calls_as_planned")
    before = {key: _counter(harness, key) for key in keys}
    replanned = _replanned(harness)
    assert harness.run(generate()) == ALONE_DECODE
    settle(harness)
    after = {key: _counter(harness, key) - before[key] for key in keys}
    # The wastes were compared at the pause (not taken from the plan made at ranking, when the
    # request was not running yet and the question did not arise)...
    assert (after["policy_calls_as_planned"], _replanned(harness) - replanned) == (0, 1), after
    # ...with no other load: Discard, which costs only its own recompute.
    assert (after["calls_discard"], after["calls_preserve"]) == (1, 0), (after, wastes)
    # (The costs the policy decided with lie between those read before and after: the bracket
    # held at both ends, so the outcome is the code's, not a measurement's drift.)
    costs = EngineCosts.coerce(harness.stats.scheduler["costs"])
    alone, self_counted = discard_waste(context, 0, costs), discard_waste(context, context, costs)
    assert alone < preserve_waste(context, api_s, costs) < self_counted, costs
    assert harness.stats.scheduler["preserved_requests"] == 0
    assert harness.stats.kv_blocks_used == 0


def _replanned(h: EngineHarness) -> int:
    """LAMPS's pauses that compared the wastes again, whatever the reason."""
    return sum(
        int(v) for k, v in h.stats.scheduler.items() if k.startswith("policy_calls_replanned")
    )


# ---- prefix hits in the blocks the head of the queue needs ----

# Two preserved calls fill most of the cache: an older one of 1600 + 8 tokens (101 blocks) and
# one of 1500 + 8 tokens (95 blocks, of which its 94 full ones are in the prefix cache). Nothing
# runs, so 255 - 196 = 59 blocks are free.
OLDER_PROMPT, HOLDER_PROMPT, DECODE, RETURNED = 1600, 1500, 8, 8
OLDER_BLOCKS = _blocks(OLDER_PROMPT + DECODE - 1)  # KV of every token but the last sampled
HOLDER_BLOCKS = _blocks(HOLDER_PROMPT + DECODE - 1)
FREE = TOTAL_BLOCKS - OLDER_BLOCKS - HOLDER_BLOCKS
# The holder's continuation (1516 tokens) needs 95 blocks and finds 94 of them held; a new request
# starting with the holder's 1500-token prompt (1516 tokens) finds the 93 full prompt blocks.
CONTINUATION = HOLDER_PROMPT + DECODE + RETURNED
SHARED_PREFIX_HITS = HOLDER_PROMPT // BLOCK
# Counted as new, either head would want 95 blocks, 36 more than are free: the policy (fixed
# Preserve, longest paused first) would demote the older call to make room.
assert _blocks(CONTINUATION) - FREE >= 30
assert _blocks(CONTINUATION) - SHARED_PREFIX_HITS <= 2 < FREE


def _script(prompt: int) -> TraceScript:
    return TraceScript.model_validate(
        {
            "segments": [
                {
                    "prompt_tokens": prompt,
                    "completion_tokens": DECODE,
                    "api_time": 0.05,
                    "api_token_length": RETURNED,
                },
                {"prompt_tokens": prompt + DECODE + RETURNED, "completion_tokens": 4},
            ]
        }
    )


Tool = Callable[[str, dict[str, Any], str | None], Awaitable[ToolResult]]


def run_two_holds(
    h: EngineHarness, holder_id: str, during_holder_call: Callable[[], Awaitable[Any]]
) -> tuple[TraceOutcome, TraceOutcome, dict[str, Any], Any]:
    """The older request pauses (preserved) and stays in its call until the holder is done; the
    holder pauses (preserved) and runs `during_holder_call` in its call, then resumes. Returns
    both outcomes, the engine's figures read at the start of the holder's call, and what
    `during_holder_call` returned."""
    worker = ToolWorker(redis_url=None)
    seen: dict[str, Any] = {}
    result: list[Any] = []

    async def go() -> tuple[TraceOutcome, TraceOutcome]:
        older_paused, holder_done = asyncio.Event(), asyncio.Event()

        async def older_call(name: str, args: dict[str, Any], record_as: str | None) -> ToolResult:
            older_paused.set()
            await asyncio.wait_for(holder_done.wait(), 60)
            return await worker.call(name, args, record_as)

        async def holder_call(name: str, args: dict[str, Any], record_as: str | None) -> ToolResult:
            await asyncio.sleep(0.3)  # the pause's step publishes its figures
            seen.update(used=h.stats.kv_blocks_used, **h.stats.scheduler)
            result.append(await during_holder_call())
            return await worker.call(name, args, record_as)

        def trace(request_id: str, prompt: int, tool: Tool) -> Awaitable[TraceOutcome]:
            return run_trace(
                h.engine,
                h.vocab_size,
                2048,
                request_id,
                _script(prompt),
                tool,
                policy_variant="preserve",
            )

        older = asyncio.create_task(trace(f"older-{uuid.uuid4().hex}", OLDER_PROMPT, older_call))
        try:
            await asyncio.wait_for(older_paused.wait(), 60)
            holder = await trace(holder_id, HOLDER_PROMPT, holder_call)
        except BaseException:
            # A failing test must not leave the older request behind for the next one: cancelled,
            # it releases its hold (run_trace's `released_if_abandoned`).
            older.cancel()
            raise
        finally:
            holder_done.set()
        return await older, holder

    older, holder = h.run(go(), timeout=120)
    return older, holder, seen, result[0] if result else None


def _assert_two_holds(h: EngineHarness, during: dict[str, Any]) -> None:
    """The memory the scenario is built on: both calls preserved, 59 blocks free."""
    assert h.stats.kv_blocks_total - 1 == TOTAL_BLOCKS  # less vLLM's null block
    assert during["preserved_requests"] == 2, during
    assert during["preserved_blocks"] == OLDER_BLOCKS + HOLDER_BLOCKS, during
    # Nothing else holds blocks (the figure is rounded from a fraction of 256 blocks).
    assert abs(during["used"] - (OLDER_BLOCKS + HOLDER_BLOCKS)) <= 1, during


def test_a_continuation_needs_only_what_its_held_blocks_do_not_cover(
    harness: EngineHarness,
) -> None:
    settle(harness)
    assert harness.stats.kv_blocks_used == 0, "a test before this one left blocks in use"
    demoted = _counter(harness, "demoted_to_discard")
    resumed = _counter(harness, "preserve_released_resumed")

    async def nothing() -> None:
        return None

    older, holder, during, _ = run_two_holds(harness, f"holder-{uuid.uuid4().hex}", nothing)
    _assert_two_holds(harness, during)
    # The holder's continuation was the head with 59 blocks free and wanted one new block: no
    # preserved call was demoted, both came back to their blocks.
    assert _counter(harness, "demoted_to_discard") == demoted
    assert _counter(harness, "preserve_released_resumed") == resumed + 2
    assert holder.segments[1].cached_tokens == (HOLDER_PROMPT + DECODE - 1) // BLOCK * BLOCK
    assert older.segments[1].cached_tokens == (OLDER_PROMPT + DECODE - 1) // BLOCK * BLOCK
    settle(harness)
    assert harness.stats.kv_blocks_used == 0


def test_a_prefix_another_call_holds_is_not_counted_as_needed(harness: EngineHarness) -> None:
    settle(harness)
    assert harness.stats.kv_blocks_used == 0, "a test before this one left blocks in use"
    demoted = _counter(harness, "demoted_to_discard")
    resumed = _counter(harness, "preserve_released_resumed")
    holder_id = f"holder-{uuid.uuid4().hex}"
    # A new request (no augmented request of its own) whose prompt starts with the holder's
    # prompt (run_trace draws it from the request id), then goes its own way.
    rng = random.Random(holder_id)
    shared = filler_ids(HOLDER_PROMPT, harness.vocab_size, rng)
    prompt = shared + filler_ids(CONTINUATION - HOLDER_PROMPT, harness.vocab_size, random.Random(1))

    async def sharer() -> int:
        params = SamplingParams(max_tokens=4, min_tokens=4, ignore_eos=True)
        cached = -1
        async for output in harness.engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"sharer-{uuid.uuid4().hex}"
        ):
            cached = output.num_cached_tokens or 0
        return cached

    older, holder, during, sharer_cached = run_two_holds(harness, holder_id, sharer)
    _assert_two_holds(harness, during)
    # The sharer started on the holder's blocks, with 59 free and 2 new ones wanted: nothing was
    # demoted, and both paused requests came back to their own blocks.
    assert sharer_cached == SHARED_PREFIX_HITS * BLOCK
    assert _counter(harness, "demoted_to_discard") == demoted
    assert _counter(harness, "preserve_released_resumed") == resumed + 2
    assert holder.segments[1].cached_tokens == (HOLDER_PROMPT + DECODE - 1) // BLOCK * BLOCK
    assert older.segments[1].cached_tokens == (OLDER_PROMPT + DECODE - 1) // BLOCK * BLOCK
    settle(harness)
    assert harness.stats.kv_blocks_used == 0


# A request whose call is discarded leaves its 496-token prefix (31 full blocks) in the prefix
# cache, among the free blocks; its call returns 600 tokens, so its continuation (1108 tokens)
# needs 70 blocks: 31 cached, 39 new. Taking the cached ones takes them off the free pool, so it
# is 11 blocks short of the 59 free, and a preserved call must go. Counted as shared, its 31 hits
# would leave it wanting 39 (<= 59): nothing demoted, and vLLM, which finds 70 > 59, would not
# start it either, until a preserved call ended of itself.
DISCARDED_PROMPT, DISCARDED_RETURNED = 500, 600
DISCARDED = TraceScript.model_validate(
    {
        "segments": [
            {
                "prompt_tokens": DISCARDED_PROMPT,
                "completion_tokens": DECODE,
                "api_time": 0.05,
                "api_token_length": DISCARDED_RETURNED,
            },
            {
                "prompt_tokens": DISCARDED_PROMPT + DECODE + DISCARDED_RETURNED,
                "completion_tokens": 4,
            },
        ]
    }
)
DISCARDED_HITS = (DISCARDED_PROMPT + DECODE - 1) // BLOCK
assert DISCARDED_HITS <= FREE < _blocks(DISCARDED.segments[1].prompt_tokens) <= FREE + OLDER_BLOCKS
assert _blocks(DISCARDED.segments[1].prompt_tokens) - DISCARDED_HITS <= FREE


def test_a_prefix_only_cached_is_counted_as_needed(harness: EngineHarness) -> None:
    settle(harness)
    assert harness.stats.kv_blocks_used == 0, "a test before this one left blocks in use"
    demoted = _counter(harness, "demoted_to_discard")
    resumed = _counter(harness, "preserve_released_resumed")
    worker = ToolWorker(redis_url=None)

    async def discarded() -> TraceOutcome:
        trace = run_trace(
            harness.engine,
            harness.vocab_size,
            2048,
            f"discarded-{uuid.uuid4().hex}",
            DISCARDED,
            worker.call,
            policy_variant="discard",
        )
        # Without the demotion it would wait for the holder's call, which waits for it.
        return await asyncio.wait_for(trace, 15)

    older, holder, during, outcome = run_two_holds(harness, f"holder-{uuid.uuid4().hex}", discarded)
    _assert_two_holds(harness, during)
    # The older preserved call (paused first) gave its blocks up for the continuation, which
    # found its cached prefix; the holder came back to its blocks.
    assert _counter(harness, "demoted_to_discard") == demoted + 1
    assert _counter(harness, "preserve_released_resumed") == resumed + 1
    assert outcome.segments[1].cached_tokens == DISCARDED_HITS * BLOCK
    assert holder.segments[1].cached_tokens == (HOLDER_PROMPT + DECODE - 1) // BLOCK * BLOCK
    assert [s.completion_tokens for s in older.segments] == [DECODE, 4]
    settle(harness)
    assert harness.stats.kv_blocks_used == 0
