"""The trace-script model validates the INFERCEPT/MARS segment arithmetic."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lamps_core.trace import TraceScript, TraceSegment


def seg(**kw: object) -> TraceSegment:
    return TraceSegment.model_validate(kw)


def test_consistent_script() -> None:
    script = TraceScript(
        segments=[
            seg(prompt_tokens=10, completion_tokens=5, api_time=1.5, api_token_length=3),
            seg(prompt_tokens=18, completion_tokens=4, api_time=0.5, api_token_length=0),
            seg(prompt_tokens=22, completion_tokens=7),
        ]
    )
    assert script.num_api_calls == 2
    assert script.total_tokens == 29
    assert script.total_api_time == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        (
            [{"prompt_tokens": 10, "completion_tokens": 5, "api_time": 1.0, "api_token_length": 3}],
            "last segment must not call an API",
        ),
        (
            [
                {"prompt_tokens": 10, "completion_tokens": 5},
                {"prompt_tokens": 15, "completion_tokens": 5},
            ],
            "must call an API",
        ),
        (
            [
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "api_time": 1.0,
                    "api_token_length": 3,
                },
                {"prompt_tokens": 17, "completion_tokens": 5},
            ],
            "ends with a context of 18",
        ),
        ([{"prompt_tokens": 10, "completion_tokens": 5, "api_time": 1.0}], "together"),
        ([{"prompt_tokens": 10, "completion_tokens": 0}], "greater than or equal to 1"),
        (
            [
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 2,
                    "api_time": -0.1,
                    "api_token_length": 1,
                },
                {"prompt_tokens": 13, "completion_tokens": 1},
            ],
            "greater than or equal to 0",
        ),
        ([{"prompt_tokens": 10, "completion_tokens": 2, "prompt": "x"}], "Extra inputs"),
    ],
)
def test_inconsistent_scripts_are_refused(segments: list[dict], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TraceScript.model_validate({"segments": segments})
