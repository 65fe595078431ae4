"""The memory-time a replica has promised (`scoring.committed_memory_time`, what the fleet router
weighs), by hand, and from the real engine's plugin while a request's KV is held in a call."""

from __future__ import annotations

import pytest

from lamps_core.predictors import OraclePredictor, ToolEstimatePredictor
from lamps_core.request_meta import RequestMeta
from lamps_core.scoring import committed_memory_time, score_remaining
from lamps_core.trace import TraceScript, TraceSegment
from tests.engine_harness import EngineHarness
from tests.test_engine_strategies import replay
from tests.test_policies import COSTS  # M = 1000 B/token, T_fwd = 0.01 + 0.001·C s


def meta(decode: int, api_time: float | None = None) -> RequestMeta:
    returned = None if api_time is None else 8
    segment = TraceSegment(
        prompt_tokens=100, completion_tokens=decode, api_time=api_time, api_token_length=returned
    )
    return RequestMeta(request_id="r", arrival_time=0.0, remaining_segments=[segment])


def test_committed_sums_the_scores_and_the_rest_of_each_hold() -> None:
    oracle = OraclePredictor()
    short, long = meta(decode=10), meta(decode=400)
    expected = sum(
        score_remaining(100, oracle.predict(m), COSTS, other_tokens=200).memory_time
        for m in (short, long)
    )
    requests = [(100, 0, short), (100, 0, long)]
    assert committed_memory_time(requests, [], oracle, COSTS, other_tokens=200) == pytest.approx(
        expected
    )
    # A longer forecast commits more: a router must see it.
    assert committed_memory_time(
        [(100, 0, long)], [], oracle, COSTS, other_tokens=200
    ) > committed_memory_time([(100, 0, short)], [], oracle, COSTS, other_tokens=200)
    # 300 tokens held in a 5-s call that has run 2 s: 300 tokens x 3 s x 1000 bytes.
    hold = (300, 2.0, meta(decode=10, api_time=5.0))
    assert committed_memory_time([], [hold], oracle, COSTS, other_tokens=0) == pytest.approx(
        300 * 3.0 * 1000
    )
    # Past its predicted end a hold commits nothing more (never a negative figure).
    late = (300, 9.0, meta(decode=10, api_time=5.0))
    assert committed_memory_time([], [late], oracle, COSTS, other_tokens=0) == 0.0
    # Without the oracle's durations, the tool estimates' (a default for an unknown tool).
    estimates = ToolEstimatePredictor()
    chat = RequestMeta(request_id="c", arrival_time=0.0, ends_in_api_call=True)
    assert committed_memory_time(
        [], [(300, 0.25, chat)], estimates, COSTS, other_tokens=0
    ) == pytest.approx(300 * (estimates.defaults.api_s - 0.25) * 1000)


PROMPT, DECODE, CALL_S = 200, 24, 2.0
SCRIPT = TraceScript.model_validate(
    {
        "segments": [
            {
                "prompt_tokens": PROMPT,
                "completion_tokens": DECODE,
                "api_time": CALL_S,
                "api_token_length": 8,
            },
            {"prompt_tokens": PROMPT + DECODE + 8, "completion_tokens": 8},
        ]
    }
)


def test_engine_reports_a_preserved_hold_as_committed_memory_time(harness: EngineHarness) -> None:
    # The plugin's figures 0.2 s into SCRIPT's 2-s call (the step that paused it published).
    _, preserved = replay(harness, "preserve", script=SCRIPT)
    _, discarded = replay(harness, "discard", script=SCRIPT)
    per_token = preserved["costs"]["kv_bytes_per_token"]
    held = preserved["preserved_blocks"] * 16 * per_token  # bytes, 14 blocks of 16 tokens
    assert preserved["preserved_blocks"] == -(-(PROMPT + DECODE) // 16)
    # Held through at least the second of the 2-s call still to come (the oracle knows it).
    assert preserved["committed_memory_time"] >= held * 1.0
    assert preserved["committed_memory_time"] <= held * CALL_S
    # Discarded, the request holds nothing and nothing else runs: nothing is committed.
    assert discarded["preserved_blocks"] == 0
    assert discarded["committed_memory_time"] < held * 0.1
