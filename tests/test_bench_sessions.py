"""`lamps bench --sessions` on the shared deployment (real SmolLM2): a script played as a
conversation of chat turns, each its own request, the client waiting out each call. Each turn
decodes exactly its segment's tokens, carries the whole conversation so far, and (one replica
here) finds the previous turn's prompt in the prefix cache."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from pathlib import Path

import pytest
import yaml

from lamps.bench import add_arguments, main
from lamps.bench_targets import DeploymentTarget
from lamps.local_stack import RunningStack
from lamps_core.trace import TraceScript, TraceSegment
from tests.conftest import DATA_DIR, PROJECT_DIR, SERVE_CONFIG

pytestmark = pytest.mark.engine

BLOCK = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["engine"][
    "block_size"
]  # prefix reuse counts whole blocks


def test_a_script_plays_as_a_conversation_of_turns(stack: RunningStack) -> None:
    script = TraceScript(
        segments=[
            TraceSegment(prompt_tokens=60, completion_tokens=5, api_time=0.3, api_token_length=20),
            TraceSegment(prompt_tokens=85, completion_tokens=4, api_time=0.2, api_token_length=10),
            TraceSegment(prompt_tokens=99, completion_tokens=3),
        ]
    )
    target = DeploymentTarget(sessions=True)
    response = asyncio.run(target.replay(f"session-{uuid.uuid4().hex}", script, None))

    turns = response.segments
    assert [t.completion_tokens for t in turns] == [5, 4, 3]  # ignore_eos: exactly these
    for before, after, segment in zip(turns, turns[1:], script.segments, strict=False):
        # The whole conversation again, plus the reply and what the client's call brought.
        grown = before.prompt_tokens + before.completion_tokens + (segment.api_token_length or 0)
        assert after.prompt_tokens >= grown, (before, after)
        # ... and the previous turn's prompt found in the cache, in whole blocks.
        assert after.cached_tokens >= before.prompt_tokens - (BLOCK - 1), (before, after)
    assert turns[0].cached_tokens <= BLOCK  # a new conversation: at most the template's head
    assert [t.api_duration_s for t in turns] == [0.3, 0.2, None]
    assert response.latency_s >= 0.5  # the client waited out both calls
    assert 0 < response.ttft_s < response.latency_s


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine-only"], "through the Serve deployment"),
        (["--policies", "lamps,vllm"], "runs one policy"),
    ],
)
def test_sessions_refuse_what_a_chat_turn_cannot_do(
    extra: list[str], message: str, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--workload", "toolbench", "--sessions", *extra, "--out", str(tmp_path)]
    )
    with pytest.raises(SystemExit, match=message):
        main(args, PROJECT_DIR, DATA_DIR)
