"""The JSON nesting scan the ingress runs on a body before parsing it: exact on valid JSON
(brackets in strings and escapes included, in any encoding json.loads takes), and linear on
anything. The server's answers to deep bodies are in tests/test_serving_errors.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.api_models import MAX_JSON_DEPTH, json_nesting_depth


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


# Strings full of what could fool a scan: brackets, quotes, backslashes, escapes, non-ASCII.
tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\/ \n\tabcé\u2028\U0001f600'), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(
    value=json_values,
    ensure_ascii=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-32"]),
)
def test_depth_of_valid_json_is_exact(value: Any, ensure_ascii: bool, encoding: str) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    raw = text.encode(encoding)
    assert json.loads(raw) == value  # the ingress's parser reads it so
    assert json_nesting_depth(raw) == depth(value)
    assert json_nesting_depth(text) == depth(value)  # a tool call's arguments, as a string


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[" * 200_000, 200_000),  # the body that was a 500
        (b"[]" * 100_000, 1),
        (b'"' + b'\\"[' * 100_000 + b'"', 0),  # brackets inside one string
        (b'["\\\\", [[]]]', 3),  # an escaped backslash ends before the quote
        # Not JSON: the parser stops at the first `]`, before any nesting. A parser meets
        # only a prefix that is valid so far, where no closing bracket goes below zero.
        (b"]]]][[", 0),
        (b"[1]]]" + b"[" * 100, 1),
        (b"", 0),
    ],
)
def test_depth_of_any_body(raw: bytes, expected: int) -> None:
    assert json_nesting_depth(raw) == expected


def test_the_limit_leaves_room_for_real_requests() -> None:
    chat = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"type": "array", "items": {"type": "object"}}},
                    },
                },
            }
        ],
    }
    assert json_nesting_depth(json.dumps(chat).encode()) < MAX_JSON_DEPTH // 4
