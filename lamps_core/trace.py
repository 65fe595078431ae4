"""The INFERCEPT/MARS trace format: one augmented request as a list of segments.

Each segment is `{"prompt_tokens", "completion_tokens", "api_time", "api_token_length"}`; the last
one has no API fields. `prompt_tokens` of a later segment is the context length when it starts,
so it must equal the previous context plus its completion and the API's returned tokens.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A single simulated call longer than this is almost surely a unit mistake (ms given as s).
MAX_API_TIME_S = 3600.0


class TraceSegment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = Field(
        ge=1, description="Context length (tokens) when this segment starts."
    )
    completion_tokens: int = Field(ge=1, description="Tokens decoded in this segment.")
    api_time: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_API_TIME_S,
        allow_inf_nan=False,
        description="Seconds the API call after this segment lasts; absent on the last segment.",
    )
    api_token_length: int | None = Field(
        default=None, ge=0, description="Tokens the API call returns into the context."
    )
    api_type: str | None = Field(
        default=None, description="Name of the API (tool) called; the simulated API when absent."
    )

    @property
    def has_api_call(self) -> bool:
        return self.api_time is not None

    @model_validator(mode="after")
    def _api_fields_together(self) -> TraceSegment:
        if (self.api_time is None) != (self.api_token_length is None):
            raise ValueError("api_time and api_token_length must be given together")
        if self.api_type is not None and self.api_time is None:
            raise ValueError("api_type given without api_time")
        return self


class TraceScript(BaseModel):
    """One augmented request: decode, call, decode, ... with every length fixed in advance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    segments: list[TraceSegment] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> TraceScript:
        *calls, last = self.segments
        if last.has_api_call:
            raise ValueError("the last segment must not call an API (it ends the request)")
        for i, seg in enumerate(calls):
            if not seg.has_api_call:
                raise ValueError(f"segment {i} is not the last one, so it must call an API")
            expected = seg.prompt_tokens + seg.completion_tokens + (seg.api_token_length or 0)
            actual = self.segments[i + 1].prompt_tokens
            if actual != expected:
                raise ValueError(
                    f"segment {i + 1} prompt_tokens={actual}, but segment {i} ends with a "
                    f"context of {expected} tokens (prompt {seg.prompt_tokens} + completion "
                    f"{seg.completion_tokens} + api_token_length {seg.api_token_length})"
                )
        return self

    @property
    def num_api_calls(self) -> int:
        return len(self.segments) - 1

    @property
    def total_tokens(self) -> int:
        last = self.segments[-1]
        return last.prompt_tokens + last.completion_tokens

    @property
    def total_api_time(self) -> float:
        return sum(seg.api_time or 0.0 for seg in self.segments)
