"""Replaying one request of a trace: every segment's length and every API call's duration and
returned tokens come from the script, so benchmarks reproduce a workload exactly.

The engine is forced to decode exactly `completion_tokens` (`ignore_eos`, `min_tokens` and
`max_tokens`); the continuation's context is the previous context, the tokens decoded and the API's
returned tokens, so a segment resumed from the prefix cache finds the same token ids again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

from lamps_core.call_durations import ApiEstimate
from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import CallTool
from lamps_vllm.errors import PromptTooLongError
from lamps_vllm.holds import released_if_abandoned
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
) -> TraceOutcome:
    """Run `script` as one augmented request; `policy_variant` names one of the engine's policy
    variants to schedule it (the engine's default policy when None); `call_timeout_s`: the
    longest a call of the simulated API can last (the scheduler's bound on a paused call)."""
    check_fits(script, max_model_len)
    arrival = arrival_time if arrival_time is not None else time.time()
    # Seeded by the request id: distinct requests get distinct prompts (no accidental prefix
    # sharing between them), and a rerun of the same trace gets the same ones.
    rng = random.Random(request_id)
    context = filler_ids(script.segments[0].prompt_tokens, vocab_size, rng)
    records: list[SegmentRecord] = []
    waited_s = 0.0  # by the earlier segments, for the starvation guard

    async with released_if_abandoned(engine, request_id):
        for index, seg in enumerate(script.segments):
            assert len(context) == seg.prompt_tokens  # TraceScript validated the arithmetic
            meta = RequestMeta(
                request_id=request_id,
                arrival_time=arrival,
                segment_index=index,
                waited_s=waited_s,
                ends_in_api_call=seg.has_api_call,
                remaining_segments=script.segments[index:],
                api_type=seg.api_type,
                call_timeout_s=call_timeout_s if seg.has_api_call else None,
                api_estimates=api_estimates,
                policy_variant=policy_variant,
            )
            params = SamplingParams(
                max_tokens=seg.completion_tokens,
                min_tokens=seg.completion_tokens,
                ignore_eos=True,
                temperature=0.0,
                extra_args=meta.to_extra_args(),
            )
            started = time.time()
            first_token_at = 0.0
            token_ids: list[int] = []
            cached = 0
            async for output in engine.generate(
                TokensPrompt(prompt_token_ids=context), params, f"{request_id}-s{index}"
            ):
                token_ids = list(output.outputs[0].token_ids)
                cached = output.num_cached_tokens or 0
                if not first_token_at and token_ids:
                    first_token_at = time.time()
            finished = time.time()
            waited_s += (first_token_at or finished) - started

            api_result = None
            if seg.has_api_call:
                api_result = await call_tool(
                    "simulated_api",
                    {"duration_s": seg.api_time, "return_tokens": seg.api_token_length},
                    record_name(seg.api_type),
                )
                context = (
                    context + token_ids + filler_ids(seg.api_token_length or 0, vocab_size, rng)
                )
            records.append(
                SegmentRecord(
                    index,
                    seg.prompt_tokens,
                    len(token_ids),
                    cached,
                    started,
                    first_token_at,
                    finished,
                    api_result,
                )
            )
    return TraceOutcome(request_id, arrival, records[-1].finished_at, records)
