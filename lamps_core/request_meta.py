"""What the serving layer tells the scheduler about a request, carried in
`SamplingParams.extra_args[META_KEY]` as a plain dict.

An augmented request reaches the engine as one engine request per segment (the part between two
API calls); `request_id` and `arrival_time` are those of the whole augmented request, so a policy
ranks a resumed segment by the request it belongs to, not as a newcomer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lamps_core.call_durations import CallDurationSummary
from lamps_core.trace import TraceSegment

META_KEY = "lamps"
# The serving layer sends estimates for its registry's tools and the fixed simulated API types
# only (a few dozen); the caps keep every request's metadata small whatever Redis holds.
MAX_API_ESTIMATES = 256
MAX_API_TYPE_CHARS = 128
MAX_CALL_TIMEOUT_S = 86_400.0
# Above any context a served model has: a forecast past it is a bug, refused at the boundary.
MAX_PREDICTED_DECODE_TOKENS = 1 << 20

ApiTypeName = Annotated[str, Field(min_length=1, max_length=MAX_API_TYPE_CHARS)]


class RequestMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(description="Id of the whole augmented request.")
    arrival_time: float = Field(description="Wall-clock time (time.time()) the request arrived.")
    segment_index: int = Field(default=0, ge=0)
    waited_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Seconds the earlier segments of this request waited for their first token: "
        "what the starvation guard's `max_queued_s` bounds, over the whole request.",
    )
    ends_in_api_call: bool = Field(
        default=False,
        description="The segment is known to end in an API call (forced call, trace).",
    )
    call_end_token_ids: list[list[int]] | None = Field(
        default=None,
        description="Token sequences that close a tool call the model may write on its own "
        "(`auto` turns): the engine ends the segment there and hands the call to the policy.",
    )
    api_type: str | None = Field(
        default=None, description="The API (tool) the call ending this segment uses, when known."
    )
    call_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_CALL_TIMEOUT_S,
        allow_inf_nan=False,
        description="The longest the call ending this segment can run (the serving layer's timeout "
        "for its tool, or the longest of the tools an `auto` turn may call): a call paused "
        "this long ago is over, whatever its duration was predicted to be.",
    )
    # A mean stays a bare float (the predictor checks it, so a bad one is refused inside the
    # engine, counted, and the last estimates kept); a distribution is checked here.
    api_estimates: dict[ApiTypeName, float | CallDurationSummary] | None = Field(
        default=None,
        max_length=MAX_API_ESTIMATES,
        description="Call duration per API type from the tool workers' records, as the serving "
        "layer last read them: a mean (s), or the learned distribution (recency-weighted "
        "equal-mass atoms, `CallDurationSummary`). How the scheduler's predictions learn "
        "durations.",
    )
    api_estimates_version: int | None = Field(
        default=None,
        ge=0,
        description="The serving layer's version of `api_estimates`, raised each time they "
        "change: the engine installs estimates only newer than those it has, so a segment of an "
        "older request never puts older estimates back.",
    )
    predicted_decode_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PREDICTED_DECODE_TOKENS,
        description="Tokens this segment is forecast to decode, computed by the serving layer "
        "from the conversation (the learned output-length model, lamps_core.length_model), "
        "never taken from the client. Predictors use it instead of their default length for "
        "requests without a trace.",
    )
    predicted_call_tool: ApiTypeName | None = Field(
        default=None,
        description="The tool an `auto` segment is forecast to call (the learned model's tool "
        "head), computed by the serving layer, never taken from the client. For predictions "
        "only: the engine pauses for a call the model actually writes, never for a forecast.",
    )
    remaining_segments: list[TraceSegment] | None = Field(
        default=None, description="Oracle knowledge from a trace script: this segment and the rest."
    )
    policy_variant: str | None = Field(
        default=None,
        description="Label of one of the engine's policy variants (built at its start-up from "
        "its config) to schedule this request instead of its default: lets a benchmark run "
        "several policies one after another on one engine. An unknown label gets the default.",
    )
    reprofile: bool = Field(
        default=False,
        description="Start measuring the engine's costs afresh with this request (the engine "
        "replica's warm-up sends it when asked to profile again).",
    )

    def to_extra_args(self) -> dict[str, Any]:
        return {META_KEY: self.model_dump(mode="json", exclude_none=True)}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> RequestMeta | None:
        if not extra_args or META_KEY not in extra_args:
            return None
        return cls.model_validate(extra_args[META_KEY])
