"""Prepared model folders: layout, idempotency, and the Hermes tool-calling chat template."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from lamps.model import (
    MARKER_FILE,
    MODEL_TEMPLATE_FILE,
    PreparedModels,
    chat_template,
    prepare_models,
)

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CALCULATOR: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
TOOL_CALL_RE = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def tokenizer(prepared_models: PreparedModels) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared_models.smollm2)


def render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_folders_layout(prepared_models: PreparedModels) -> None:
    smol, tiny = prepared_models.smollm2, prepared_models.tiny_dummy
    assert (smol / "model.safetensors").stat().st_size > 500_000_000  # float32, 135M params
    assert not list(tiny.glob("*.safetensors"))  # served with load_format="dummy"
    for folder in (smol, tiny):
        assert (folder / MARKER_FILE).is_file()
        assert (folder / MODEL_TEMPLATE_FILE).read_text(encoding="utf-8") == chat_template()
        assert (folder / "tokenizer.json").is_file()
    assert not list(smol.parent.glob(".*.tmp"))


def test_tiny_config_matches_tokenizer(prepared_models: PreparedModels, tokenizer: Any) -> None:
    tiny = json.loads((prepared_models.tiny_dummy / "config.json").read_text())
    real = json.loads((prepared_models.smollm2 / "config.json").read_text())
    assert tiny["architectures"] == ["LlamaForCausalLM"]
    assert tiny["vocab_size"] == real["vocab_size"] == len(tokenizer) == 49152
    assert tiny["hidden_size"] == tiny["num_attention_heads"] * tiny["head_dim"]
    assert tiny["num_hidden_layers"] < real["num_hidden_layers"]
    assert tiny["max_position_embeddings"] == 8192
    assert tiny["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_plain_chat_is_smollm2_chatml(tokenizer: Any) -> None:
    prompt = render(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _tools_in(prompt: str) -> list[dict[str, Any]]:
    block = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    return [json.loads(line) for line in block.splitlines()]


def test_tools_block_with_default_system(tokenizer: Any) -> None:
    prompt = render(tokenizer, [{"role": "user", "content": "2+2?"}], tools=[CALCULATOR])
    assert prompt.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n")
    assert _tools_in(prompt) == [CALCULATOR]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n' in prompt
    assert prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_tools_block_merges_user_system(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = render(tokenizer, messages, tools=[CALCULATOR, CALCULATOR])
    assert prompt.startswith("<|im_start|>system\nAnswer tersely.\n\n# Tools\n")
    assert prompt.count("<|im_start|>system") == 1
    assert DEFAULT_SYSTEM not in prompt
    assert _tools_in(prompt) == [CALCULATOR, CALCULATOR]


def _conversation(args: dict[str, Any], as_string: bool) -> list[dict[str, Any]]:
    calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": "calculator",
                "arguments": json.dumps(a) if as_string else a,
            },
        }
        for i, a in enumerate([args, {"expression": "1/3"}])
    ]
    return [
        {"role": "user", "content": "Compute both."},
        {"role": "assistant", "content": "Let me calculate.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "391"},
        {"role": "tool", "tool_call_id": "call_1", "content": "0.333"},
    ]


@pytest.mark.parametrize("as_string", [False, True], ids=["dict-args", "json-string-args"])
def test_tool_calls_and_responses(tokenizer: Any, as_string: bool) -> None:
    args = {"expression": "17 * 23", "note": 'ünïcode "quoted"'}
    prompt = render(tokenizer, _conversation(args, as_string), tools=[CALCULATOR])
    turns = prompt.split("<|im_start|>")
    assistant = next(t for t in turns if t.startswith("assistant\nLet me"))
    assert assistant.startswith("assistant\nLet me calculate.\n<tool_call>\n")
    assert assistant.endswith("</tool_call><|im_end|>\n")
    parsed = [json.loads(body) for body in TOOL_CALL_RE.findall(assistant)]
    assert parsed == [
        {"name": "calculator", "arguments": args},
        {"name": "calculator", "arguments": {"expression": "1/3"}},
    ]
    # Both results in one user turn with the question restated, then the generation prompt;
    # once results are in, the tools block is left out (SmolLM2-135M echoes results otherwise).
    assert prompt.endswith(
        "<|im_start|>user\n"
        "<tool_response>391</tool_response>\n"
        "<tool_response>0.333</tool_response>\n"
        'Use this result to answer the question "Compute both." in one sentence.<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert "<tools>" not in prompt


def test_tool_call_without_content(tokenizer: Any) -> None:
    messages = _conversation({"expression": "2+2"}, as_string=False)[:2]
    messages[1] = {**messages[1], "content": None, "tool_calls": messages[1]["tool_calls"][:1]}
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, tools=[CALCULATOR])
    assert prompt.endswith(
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "2+2"}}\n'
        "</tool_call><|im_end|>\n"
    )


def test_rendered_tool_call_parses_with_vllm_hermes(tokenizer: Any) -> None:
    # The model imitates the in-context calls, so they must be what vLLM's parser reads.
    hermes = pytest.importorskip("vllm.tool_parsers.hermes_tool_parser")
    args = {"expression": "17 * 23"}
    prompt = render(tokenizer, _conversation(args, as_string=True), tools=[CALCULATOR])
    turn = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    info = hermes.Hermes2ProToolParser(tokenizer).extract_tool_calls(turn, None)
    assert info.tools_called
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == [
        ("calculator", args),
        ("calculator", {"expression": "1/3"}),
    ]
    assert info.content.strip() == "Let me calculate."


def test_second_call_is_a_no_op(prepared_models: PreparedModels) -> None:
    markers = [p / MARKER_FILE for p in (prepared_models.smollm2, prepared_models.tiny_dummy)]
    before = [m.stat().st_mtime_ns for m in markers]
    start = time.perf_counter()
    again = prepare_models(prepared_models.smollm2.parent.parent)
    assert time.perf_counter() - start < 2.0
    assert again == prepared_models
    assert [m.stat().st_mtime_ns for m in markers] == before


def test_stale_template_is_refreshed_without_rebuild(
    prepared_models: PreparedModels, tmp_path: Path
) -> None:
    # Mirror the prepared folders with symlinks (no 540 MB copy) and stale markers.
    for src in (prepared_models.smollm2, prepared_models.tiny_dummy):
        dst = tmp_path / "models" / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != MARKER_FILE:
                (dst / f.name).symlink_to(f)
        (dst / MARKER_FILE).write_text(json.dumps({"template_sha256": "stale"}))
    copy = prepare_models(tmp_path)
    for folder in (copy.smollm2, copy.tiny_dummy):
        template = folder / MODEL_TEMPLATE_FILE
        assert not template.is_symlink()  # replaced, the original was left alone
        assert template.read_text(encoding="utf-8") == chat_template()
        assert json.loads((folder / MARKER_FILE).read_text())["template_sha256"] != "stale"
        assert (folder / "config.json").is_symlink()  # nothing else was rebuilt


def test_call_end_sequences_close_a_call_and_only_that(tokenizer: Any) -> None:
    # The engine stops an `auto` turn at these token sequences (lamps_vllm.scheduler): the one
    # the rendered conversation uses must be among them, and the opening tag must match none.
    from lamps_vllm.tool_calls import call_end_token_ids

    endings = call_end_token_ids(tokenizer)
    assert all(tokenizer.decode(list(e)).endswith("</tool_call>") for e in endings)
    messages = _conversation({"expression": "2+2"}, as_string=True)
    prompt = render(tokenizer, messages, tools=[CALCULATOR])
    rendered = tokenizer.encode(prompt.split("</tool_call>")[0] + "</tool_call>")
    assert any(tuple(rendered[-len(e) :]) == e for e in endings)
    opening = tokenizer.encode('x <tool_call>\n{"name": "calculator"', add_special_tokens=False)
    assert not any(
        tuple(opening[i : i + len(e)]) == e for e in endings for i in range(len(opening))
    )
