"""The waiting order on the real engine: requests leave the queue in the order their policy's
formulas give, and the starvation guard bounds how long a heavy request waits under a stream of
light ones. The engine here runs one request at a time (`max_num_seqs=1`), so the order requests
get their first token in is the order the queue released them in."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from lamps.model import PreparedModels
from lamps_core.costs import EngineCosts
from lamps_core.policies import make_policy
from lamps_core.policy import EngineView, QueuedRequest
from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript
from lamps_vllm.trace_replay import TraceOutcome, run_trace
from tests.engine_harness import EngineHarness, tiny_settings
from tool_workers.worker import ToolWorker


@pytest.fixture(scope="module")
def serial(prepared_models: PreparedModels) -> Iterator[EngineHarness]:
    # The policies the tests compare: variants the engine builds at start-up, named by label.
    variants = {
        "vllm": {"policy": "vllm"},
        "sjf": {"policy": "sjf"},
        "lamps": {"policy": "lamps"},
        "lamps-unguarded": {"policy": "lamps", "policy_options": {"max_passed_over": None}},
        "lamps-guarded": {
            "policy": "lamps",
            "policy_options": {"max_passed_over": None, "max_queued_s": BOUND_S},
        },
    }
    h = EngineHarness(
        tiny_settings(
            prepared_models.tiny_dummy, max_num_seqs=1, scheduler={"policy_variants": variants}
        )
    )
    yield h
    h.close()


def script(prompt: int, decode: int) -> TraceScript:
    return TraceScript.model_validate(
        {"segments": [{"prompt_tokens": prompt, "completion_tokens": decode}]}
    )


async def replay_at(
    h: EngineHarness,
    delay_s: float,
    request_id: str,
    trace: TraceScript,
    variant: str,
) -> TraceOutcome:
    await asyncio.sleep(delay_s)
    worker = ToolWorker(redis_url=None)
    return await run_trace(
        h.engine, h.vocab_size, 2048, request_id, trace, worker.call, policy_variant=variant
    )


# (name, prompt tokens, decode tokens), submitted in this order while a blocker runs. LAMPS ranks
# by memory-over-time, decode·(context + decode/2): "wide" decodes least but holds a 1,500-token
# context throughout, so it goes after "narrow-40"; SJF looks at the output alone and puts it first.
CRAFTED = [
    ("long-120", 32, 120),
    ("narrow-40", 32, 40),
    ("wide", 1500, 12),
    ("mid-80", 64, 80),
    ("short-4", 16, 4),
]


def expected_order(policy: str, costs: EngineCosts) -> list[str]:
    """The order `policy`'s own priority function gives the crafted queue."""
    ranking = make_policy(policy, costs=costs)
    engine = EngineView(
        now=time.time(), running_tokens=0, free_blocks=255, total_blocks=255, block_size=16
    )
    keys = {}
    for i, (name, prompt, decode) in enumerate(CRAFTED):
        meta = RequestMeta(
            request_id=name,
            arrival_time=float(i),
            remaining_segments=script(prompt, decode).segments,
        )
        view = QueuedRequest(name, float(i), prompt, 0, float(i), 0.0, 0, meta)
        keys[name] = ranking.priority(view, engine)
    return sorted(keys, key=lambda name: keys[name])


@pytest.mark.parametrize("policy", ["vllm", "sjf", "lamps"])
def test_queue_releases_requests_in_the_policy_order(serial: EngineHarness, policy: str) -> None:
    tag = uuid.uuid4().hex[:8]

    async def go() -> list[TraceOutcome]:
        blocker = asyncio.create_task(
            replay_at(serial, 0.0, f"blocker-{tag}", script(16, 300), "vllm")
        )
        await asyncio.sleep(0.3)  # the blocker holds the engine's one slot
        crafted = [
            replay_at(serial, 0.02 * i, f"{name}-{tag}", script(prompt, decode), policy)
            for i, (name, prompt, decode) in enumerate(CRAFTED)
        ]
        outcomes = await asyncio.gather(*crafted)
        blocker_outcome = await blocker
        # All were queued before the blocker let go, else the order would say nothing.
        assert max(o.segments[0].started_at for o in outcomes) < blocker_outcome.finished_at
        return list(outcomes)

    outcomes = serial.run(go(), timeout=300)
    started = sorted(outcomes, key=lambda o: o.segments[0].first_token_at)
    got = [o.request_id.rsplit("-", 1)[0] for o in started]
    costs = EngineCosts.from_dict(serial.stats.scheduler["costs"])
    assert got == expected_order(policy, costs)
    submitted = [name for name, _, _ in CRAFTED]
    if policy == "vllm":
        assert got == submitted
    else:
        assert got != submitted
    if policy == "lamps":  # memory over time, not output length: the wide request waits
        assert got.index("narrow-40") < got.index("wide")
    if policy == "sjf":
        assert got.index("wide") < got.index("narrow-40")


LIGHT = script(16, 6)
HEAVY = script(16, 96)
BOUND_S = 1.0


def heavy_under_a_stream(h: EngineHarness, variant: str) -> tuple[float, int]:
    """A heavy request queued behind a stream of light ones arriving faster than the engine
    serves them. Returns the heavy one's wait, and how many light requests queued before its
    wait reached BOUND_S were served after it (the queue it jumped)."""
    tag = uuid.uuid4().hex[:8]

    async def go() -> tuple[TraceOutcome, list[TraceOutcome]]:
        light = [replay_at(h, 0.02 * i, f"light{i}-{tag}", LIGHT, variant) for i in range(150)]
        heavy = replay_at(h, 0.2, f"heavy-{tag}", HEAVY, variant)
        heavy_outcome, *light_outcomes = await asyncio.gather(heavy, *light)
        return heavy_outcome, light_outcomes

    heavy, light = h.run(go(), timeout=300)
    segment = heavy.segments[0]
    # The stream kept the queue busy for the whole wait, else there was nothing to starve it.
    assert max(o.segments[0].started_at for o in light) > segment.started_at + BOUND_S
    jumped = sum(
        1
        for o in light
        if o.segments[0].started_at < segment.started_at + BOUND_S
        and o.segments[0].first_token_at > segment.first_token_at
    )
    return segment.first_token_at - segment.started_at, jumped


def test_heavy_request_waits_no_longer_than_the_starvation_bound(serial: EngineHarness) -> None:
    """Asserted on order, not on seconds (a busy machine slows every step): unguarded, the
    memory ranking serves every light request queued before the heavy one was due first;
    guarded, the heavy one is promoted once it has waited BOUND_S and served ahead of light
    requests that were queued before then."""
    # The engine also serves a policy that never re-ranks (vLLM's): that must not stop the
    # re-ranks the guard needs.
    serial.run(replay_at(serial, 0.0, f"fcfs-{uuid.uuid4().hex[:8]}", LIGHT, "vllm"))
    unguarded_wait, unguarded_jumped = heavy_under_a_stream(serial, "lamps-unguarded")
    assert unguarded_jumped == 0 and unguarded_wait > 3 * BOUND_S
    guarded_wait, guarded_jumped = heavy_under_a_stream(serial, "lamps-guarded")
    assert guarded_jumped > 0, guarded_wait
    assert guarded_wait < unguarded_wait


def test_a_forced_call_segment_waits_its_turn_in_the_policy_order(serial: EngineHarness) -> None:
    """A segment constrained to a tool call waits for its grammar in vLLM's `skipped_waiting`
    queue, which vLLM serves before `waiting` under FCFS. Ranked last by LAMPS (it will decode
    far more than the others), it must still be served after the requests ranked ahead of it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    tag = uuid.uuid4().hex[:8]
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}

    async def forced(delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        meta = RequestMeta(
            request_id=f"forced-{tag}",
            arrival_time=time.time(),
            ends_in_api_call=True,
            policy_variant="lamps",
            # Oracle knowledge: 400 tokens to decode, far more than the light requests.
            remaining_segments=script(16, 400).segments,
        )
        params = SamplingParams(
            max_tokens=8,
            structured_outputs=StructuredOutputsParams(json=schema),
            extra_args=meta.to_extra_args(),
        )
        first = 0.0
        async for output in serial.engine.generate(
            TokensPrompt(prompt_token_ids=[1000 + i for i in range(16)]), params, f"forced-{tag}"
        ):
            first = first or (time.time() if output.outputs[0].token_ids else 0.0)
        return first

    async def go() -> tuple[float, list[TraceOutcome], TraceOutcome]:
        blocker = asyncio.create_task(
            replay_at(serial, 0.0, f"blocker-{tag}", script(16, 300), "vllm")
        )
        await asyncio.sleep(0.3)  # the blocker holds the engine's one slot
        forced_first = asyncio.create_task(forced(0.0))
        lights = [
            replay_at(serial, 0.5 + 0.02 * i, f"light{i}-{tag}", script(16, 4 + 4 * i), "lamps")
            for i in range(3)
        ]
        outcomes = await asyncio.gather(*lights)
        return await forced_first, list(outcomes), await blocker

    forced_at, lights, blocker = serial.run(go(), timeout=300)
    # All were queued while the blocker ran, else the order would say nothing.
    assert max(o.segments[0].started_at for o in lights) < blocker.finished_at
    assert all(o.segments[0].first_token_at < forced_at for o in lights)
