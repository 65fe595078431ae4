"""Replaying one request of a trace: every segment's length and every API call's duration and
returned tokens come from the script, so benchmarks reproduce a workload exactly.

The engine is forced to decode exactly `completion_tokens` (`ignore_eos`, `min_tokens` and
`max_tokens`); the continuation's context is the previous context, the tokens decoded and the API's
returned tokens, so a segment resumed from the prefix cache finds the same token ids again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.call_durations import ApiEstimate
from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript
from lamps_vllm.augmented_request import Call, CallTool, NextSegment, SegmentRun, drive
from lamps_vllm.errors import PromptTooLongError
from lamps_vllm.holds import HoldControl
from tool_workers.simulated_api import SIMULATED_API_TYPES
from tool_workers.tools import ToolResult

# Filler ids stay clear of the low ids where tokenizers keep their special tokens.
_FIRST_FILLER_ID = 1000


@dataclass
class SegmentRecord:
    index: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of the prompt, found in the engine's KV cache: the rest was recomputed
    started_at: float  # wall clock, when the segment was submitted to the engine
    first_token_at: float
    finished_at: float
    api_call: ToolResult | None


@dataclass
class TraceOutcome:
    request_id: str
    arrival_time: float
    finished_at: float
    segments: list[SegmentRecord]

    @property
    def ttft_s(self) -> float:
        return self.segments[0].first_token_at - self.arrival_time

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.arrival_time


def check_fits(script: TraceScript, max_model_len: int) -> None:
    if script.total_tokens > max_model_len:
        raise PromptTooLongError(
            f"the script reaches a context of {script.total_tokens} tokens; this model's context "
            f"is {max_model_len} tokens"
        )


def record_name(api_type: str | None) -> str | None:
    """The name a simulated call of `api_type` is recorded under: the simulated type itself,
    else (none, or a real tool's name) the tool that ran, `simulated_api`, so that a script's
    made-up durations never become a real tool's learned estimate."""
    return api_type if api_type in SIMULATED_API_TYPES else None


def filler_ids(count: int, vocab_size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(_FIRST_FILLER_ID, vocab_size) for _ in range(count)]


async def run_trace(
    engine: AsyncLLM,
    vocab_size: int,
    max_model_len: int,
    request_id: str,
    script: TraceScript,
    call_tool: CallTool,
    arrival_time: float | None = None,
    policy_variant: str | None = None,
    api_estimates: dict[str, ApiEstimate] | None = None,
    call_timeout_s: float | None = None,
    holds: HoldControl | None = None,
    api_estimates_version: int | None = None,
) -> TraceOutcome:
    """Run `script` as one augmented request; `policy_variant` names one of the engine's policy
    variants to schedule it (the engine's default policy when None); `call_timeout_s`: the
    longest a call of the simulated API can last (the scheduler's bound on a paused call);
    `holds`: the engine's hold table, told when the request is over (None: no plugin)."""
    check_fits(script, max_model_len)
    replay = TraceConversation(
        vocab_size,
        request_id,
        script,
        arrival_time if arrival_time is not None else time.time(),
        policy_variant,
        api_estimates,
        api_estimates_version,
        call_timeout_s,
    )
    outcome = None
    async for event in drive(engine, request_id, replay, call_tool, holds):
        outcome = event
    assert outcome is not None
    return outcome


class TraceConversation:
    """A trace script as the driver runs it (`augmented_request.Conversation`): every segment
    decodes exactly its scripted length and ends in its scripted call."""

    def __init__(
        self,
        vocab_size: int,
        request_id: str,
        script: TraceScript,
        arrival_time: float,
        policy_variant: str | None,
        api_estimates: dict[str, ApiEstimate] | None,
        api_estimates_version: int | None,
        call_timeout_s: float | None,
    ) -> None:
        self._vocab_size = vocab_size
        self._request_id = request_id
        self._script = script
        self._arrival = arrival_time
        self._policy_variant = policy_variant
        self._api_estimates = api_estimates
        self._api_estimates_version = api_estimates_version
        self._call_timeout_s = call_timeout_s
        # Seeded by the request id: distinct requests get distinct prompts (no accidental prefix
        # sharing between them), and a rerun of the same trace gets the same ones.
        self._rng = random.Random(request_id)
        self._context = filler_ids(script.segments[0].prompt_tokens, vocab_size, self._rng)
        self._records: list[SegmentRecord] = []

    def next_segment(self, index: int, waited_s: float) -> NextSegment | None:
        segments = self._script.segments
        if index >= len(segments):
            return None
        seg = segments[index]
        assert len(self._context) == seg.prompt_tokens  # TraceScript validated the arithmetic
        meta = RequestMeta(
            request_id=self._request_id,
            arrival_time=self._arrival,
            segment_index=index,
            waited_s=waited_s,
            ends_in_api_call=seg.has_api_call,
            remaining_segments=segments[index:],
            api_type=seg.api_type,
            call_timeout_s=self._call_timeout_s if seg.has_api_call else None,
            api_estimates=self._api_estimates,
            api_estimates_version=self._api_estimates_version,
            policy_variant=self._policy_variant,
        )
        params = SamplingParams(
            max_tokens=seg.completion_tokens,
            min_tokens=seg.completion_tokens,
            ignore_eos=True,
            temperature=0.0,
            extra_args=meta.to_extra_args(),
        )
        return NextSegment(list(self._context), params)

    def on_output(self, output: RequestOutput) -> Iterable[TraceOutcome]:
        return ()

    def call_in(self, segment: SegmentRun) -> Call | None:
        seg = self._script.segments[segment.index]
        self._records.append(
            SegmentRecord(
                segment.index,
                seg.prompt_tokens,
                len(segment.token_ids),
                segment.cached_tokens,
                segment.submitted_at,
                segment.first_token_at or 0.0,
                segment.finished_at,
                None,
            )
        )
        if not seg.has_api_call:
            return None
        arguments = {"duration_s": seg.api_time, "return_tokens": seg.api_token_length}
        return Call("simulated_api", arguments, record_as=record_name(seg.api_type))

    def on_result(
        self, segment: SegmentRun, call: Call, result: ToolResult
    ) -> Iterable[TraceOutcome]:
        seg = self._script.segments[segment.index]
        self._records[-1].api_call = result
        returned = filler_ids(seg.api_token_length or 0, self._vocab_size, self._rng)
        self._context = self._context + segment.token_ids + returned
        return ()

    def outcome(self) -> TraceOutcome:
        return TraceOutcome(
            self._request_id, self._arrival, self._records[-1].finished_at, self._records
        )
