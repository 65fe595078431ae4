"""The plugin's step profile on the real engine: the prefill and decode tokens it counts are the
ones the requests asked for, and the decode batch (decode tokens per decoding step) says how
many requests shared each step (docs/benchmarks.md, "Where the time goes")."""

from __future__ import annotations

import time
import uuid

from lamps_core.trace import TraceScript
from tests.engine_harness import EngineHarness
from tests.test_engine_policies import run_all

REQUESTS, PROMPT, DECODE = 6, 40, 20
ONE_SEGMENT = TraceScript.model_validate(
    {"segments": [{"prompt_tokens": PROMPT, "completion_tokens": DECODE}]}
)


def _figures(h: EngineHarness) -> dict[str, int]:
    keys = ("prefill_tokens", "decode_tokens", "decode_steps")
    return {key: int(h.stats.scheduler.get(key, 0)) for key in keys}


def test_step_profile_counts_tokens_and_the_decode_batch(harness: EngineHarness) -> None:
    time.sleep(0.3)  # figures ride on each step's statistics
    before = _figures(harness)
    fresh = f"profile-{uuid.uuid4().hex[:8]}"  # prompts no other test cached: no prefix hits
    outcomes = run_all(harness, "vllm", [ONE_SEGMENT] * REQUESTS, id_prefix=fresh)
    assert [o.segments[0].completion_tokens for o in outcomes] == [DECODE] * REQUESTS
    deadline = time.monotonic() + 10
    while True:
        after = _figures(harness)
        delta = {key: after[key] - before[key] for key in after}
        if delta["decode_tokens"] >= REQUESTS * (DECODE - 1) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # Each prompt is prefilled once (its first token sampled there), each later token decoded
    # once; async scheduling may schedule one step past a request's last token.
    assert delta["prefill_tokens"] == REQUESTS * PROMPT
    assert REQUESTS * (DECODE - 1) <= delta["decode_tokens"] <= REQUESTS * DECODE
    # Started together, the requests decode side by side: far fewer steps than tokens.
    assert DECODE - 1 <= delta["decode_steps"] <= delta["decode_tokens"] / 2
    assert delta["decode_tokens"] / delta["decode_steps"] <= REQUESTS
