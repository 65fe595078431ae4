"""The chat strategy of the request driver (`ChatConversation`), with the real SmolLM2 tokenizer
and vLLM's Hermes parser: what it does with the call a segment ended in. No engine: the 135M
model never writes an `auto` call on its own, so the segment's text is given here."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer

from lamps.model import PreparedModels
from lamps_vllm.augmented_request import SegmentRun
from lamps_vllm.chat_session import ChatConversation, ChatPlan

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}


@dataclass
class _Completion:
    text: str
    token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    finish_reason: str = "stop"


@dataclass
class _Output:  # the fields of vLLM's RequestOutput the conversation reads
    outputs: list[_Completion]
    num_cached_tokens: int = 0


def segment(text: str) -> SegmentRun:
    return SegmentRun(0, 10, _Output([_Completion(text)]), 0.0, 0.1, 0.2)  # type: ignore[arg-type]


def auto_conversation(prepared_models: PreparedModels) -> ChatConversation:
    tokenizer = AutoTokenizer.from_pretrained(prepared_models.smollm2)
    plan = ChatPlan(
        request_id="r",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        tools=[CALCULATOR],
        tool_choice="auto",
        max_tokens=64,
        max_tool_calls=2,
    )
    chat = ChatConversation(tokenizer, 2048, plan, lengths=None)
    assert chat.next_segment(0, 0.0) is not None  # an `auto` turn: the model may call
    return chat


def test_an_auto_call_to_a_tool_the_request_did_not_offer_is_refused(
    prepared_models: PreparedModels,
) -> None:
    """The server runs `http_get`, but this request offered only the calculator: the model's
    call to it is not run; its result is the refusal, which the model reads."""
    chat = auto_conversation(prepared_models)
    text = '<tool_call>{"name": "http_get", "arguments": {"url": "http://10.0.0.1/"}}</tool_call>'
    call = chat.call_in(segment(text))
    assert call is not None and call.name == "http_get"
    assert call.refused is not None and "not offered" in call.refused


def test_an_auto_call_to_an_offered_tool_runs(prepared_models: PreparedModels) -> None:
    chat = auto_conversation(prepared_models)
    text = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>'
    call = chat.call_in(segment(text))
    assert call is not None and call.refused is None
    assert call.arguments == {"expression": "2+2"}
