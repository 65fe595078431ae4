"""The learned output-length model: it learns what a constant cannot, survives a save and load,
starts from the prior, stays bounded, follows refits; a chat segment's engine request carries
its forecast, and the scheduler ranks by it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from ray import serve

from deployments.engine_replica import load_length_predictor
from lamps_core.costs import EngineCosts
from lamps_core.length_model import (
    DEFAULT_DECODE_TOKENS,
    MIN_PRIOR_COUNT,
    OPEN_BIN_START,
    LengthModel,
    OutputLengthPredictor,
    SegmentContext,
    TrainingSettings,
    length_bin,
    segment_features,
)
from lamps_core.policies import make_policy
from lamps_core.policy import EngineView, QueuedRequest
from lamps_core.request_meta import MAX_PREDICTED_DECODE_TOKENS, RequestMeta
from lamps_vllm.chat_session import ChatOutcome, ChatPlan, run_chat
from lamps_vllm.config import LengthModelConfig
from tests.conftest import MODEL
from tests.engine_harness import EngineHarness

# A task word decides the length; topics are noise the model must learn to ignore.
TASK_TOKENS = {"story": 420, "poem": 120, "list": 80, "yes": 3, "code": 250, "explain": 190}


def synthetic(n: int, seed: int) -> list[tuple[SegmentContext, int]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        task = rng.choice(list(TASK_TOKENS))
        context = SegmentContext(user_text=f"please {task} about topic {rng.randint(0, 99)}")
        mean = TASK_TOKENS[task]
        examples.append((context, max(1, round(rng.gauss(mean, 0.1 * mean)))))
    return examples


def trained(examples: list[tuple[SegmentContext, int]], **kwargs: Any) -> OutputLengthPredictor:
    predictor = OutputLengthPredictor(**kwargs)
    for context, tokens in examples:
        predictor.observe(context, tokens, None, truncated=False)
    assert predictor.refit()
    return predictor


@pytest.fixture(scope="module")
def predictor() -> OutputLengthPredictor:
    return trained(synthetic(600, seed=0))


def test_learns_what_a_constant_cannot(predictor: OutputLengthPredictor) -> None:
    held_out = synthetic(300, seed=1)
    mean = float(np.mean([t for _, t in synthetic(600, seed=0)]))
    learned = [predictor.predict(c).decode_tokens for c, _ in held_out]
    errors = np.abs(np.array(learned) - [t for _, t in held_out])
    constant = np.abs(mean - np.array([t for _, t in held_out]))
    assert errors.mean() < 0.25 * constant.mean()
    actual_bins = np.array([length_bin(t) for _, t in held_out])
    learned_near = np.abs(np.array([length_bin(p) for p in learned]) - actual_bins) <= 1
    constant_near = np.abs(length_bin(round(mean)) - actual_bins) <= 1
    assert learned_near.mean() > constant_near.mean() + 0.3
    assert predictor.predict(held_out[0][0]).source == "model"


def test_forecast_is_capped_at_the_budget(predictor: OutputLengthPredictor) -> None:
    story = SegmentContext(user_text="please story about topic 3")
    assert predictor.predict(story).decode_tokens > 300
    assert predictor.predict(story, budget=64).decode_tokens <= 64


def test_save_and_load_give_identical_forecasts(
    predictor: OutputLengthPredictor, tmp_path: Path
) -> None:
    path = tmp_path / "lengths.npz"
    predictor.save(path)
    loaded = OutputLengthPredictor.load(path)
    for context, _ in synthetic(50, seed=2):
        assert loaded.predict(context, 300) == predictor.predict(context, 300)
    assert loaded.buffered == predictor.buffered
    # What it learned goes on: a refit of the loaded buffer gives the same model.
    assert loaded.refit() and predictor.refit()
    context = synthetic(1, seed=3)[0][0]
    assert loaded.predict(context) == predictor.predict(context)


def test_a_file_of_another_format_is_refused(
    predictor: OutputLengthPredictor, tmp_path: Path
) -> None:
    path = tmp_path / "lengths.npz"
    predictor.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "format_version": 99}))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="format"):
        OutputLengthPredictor.load(path)
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["model_length_bias"] = arrays["model_length_bias"][:3]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="shapes"):
        OutputLengthPredictor.load(path)


def test_cold_start_falls_back_to_the_running_mean_then_the_default() -> None:
    cold = OutputLengthPredictor()
    free = SegmentContext(user_text="hello", tool_mode="none")
    forced = SegmentContext(user_text="2+2", tools=("calculator",), tool_mode="required")
    assert cold.predict(free).decode_tokens == DEFAULT_DECODE_TOKENS
    assert cold.predict(free).source == "default"
    assert cold.predict_decode_tokens(free) is None  # the scheduler keeps its own default
    assert cold.predict(free, budget=10).decode_tokens == 10
    cold.observe(free, 300, None, truncated=False)
    cold.observe(free, 100, None, truncated=False)
    # Too few of any group: the overall running mean, for forced calls too.
    assert cold.predict(forced).decode_tokens == 200
    assert cold.predict(forced).source == "prior"
    assert cold.predict_decode_tokens(forced, budget=150) == 150
    for _ in range(MIN_PRIOR_COUNT):
        cold.observe(forced, 30, "calculator", truncated=False)
    assert cold.predict(forced).decode_tokens == 30  # its own group now
    assert cold.predict(free).decode_tokens == round((400 + 30 * MIN_PRIOR_COUNT) / 7)
    # Below min_examples nothing is fitted: the prior stays.
    assert not cold.refit()
    assert cold.model is None


def test_a_segment_cut_by_its_budget_is_not_learned() -> None:
    lengths = OutputLengthPredictor()
    context = SegmentContext(user_text="write a long story")
    assert not lengths.observe(context, 64, None, truncated=True)
    assert lengths.observe(context, OPEN_BIN_START + 10, None, truncated=True)  # open bin
    assert lengths.observe(context, 64, None, truncated=False)
    assert lengths.buffered == 2


def test_the_buffer_is_bounded() -> None:
    lengths = OutputLengthPredictor(buffer_size=10)
    for context, tokens in synthetic(25, seed=4):
        lengths.observe(context, tokens, None, truncated=False)
    assert lengths.buffered == 10
    assert lengths.new_examples == 25


def test_refit_follows_new_observations() -> None:
    context = SegmentContext(user_text="please poem about topic 1")
    settings = TrainingSettings(min_examples=20)
    lengths = trained(synthetic(200, seed=5), buffer_size=200, training=settings)
    before = lengths.predict(context).decode_tokens
    assert abs(before - TASK_TOKENS["poem"]) < 40
    for _ in range(200):  # poems got much longer; the old examples leave the buffer
        lengths.observe(context, 400, None, truncated=False)
    assert lengths.predict(context).decode_tokens == before  # until the refit
    assert lengths.refit()
    assert lengths.predict(context).decode_tokens > 350
    assert lengths.new_examples == 0


def test_the_tool_head_learns_which_segments_call_which_tool() -> None:
    rng = random.Random(6)
    lengths = OutputLengthPredictor(training=TrainingSettings(min_examples=20))
    for _ in range(150):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        forced = SegmentContext(
            user_text=f"what is {a}*{b}", tools=("calculator",), tool_mode="required"
        )
        answer = SegmentContext(user_text=f"what is {a}*{b}", tool_mode="none")
        lengths.observe(forced, 30, "calculator", truncated=False)
        lengths.observe(answer, 20, None, truncated=False)
    assert lengths.refit()
    forced = lengths.predict(
        SegmentContext(user_text="what is 3*4", tools=("calculator",), tool_mode="required")
    )
    assert forced.tool == "calculator" and forced.call_probability is not None
    assert forced.call_probability > 0.9
    answer = lengths.predict(SegmentContext(user_text="what is 3*4", tool_mode="none"))
    assert answer.call_probability is not None and answer.call_probability < 0.1


def test_an_auto_turn_is_forecast_to_call_what_such_turns_called() -> None:
    rng = random.Random(8)
    lengths = OutputLengthPredictor(training=TrainingSettings(min_examples=20))
    offered = ("calculator", "http_get")
    for _ in range(150):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        sums = SegmentContext(user_text=f"what is {a}*{b}", tools=offered, tool_mode="auto")
        chat = SegmentContext(user_text=f"tell me about topic {a}", tools=offered, tool_mode="auto")
        lengths.observe(sums, 30, "calculator", truncated=False)
        lengths.observe(chat, 90, None, truncated=False)
    assert lengths.predict_call(SegmentContext(tools=offered, tool_mode="auto")) is None  # no fit
    assert lengths.refit()
    sums = SegmentContext(user_text="what is 3*4", tools=offered, tool_mode="auto")
    assert lengths.predict_call(sums) == "calculator"
    chat = SegmentContext(user_text="tell me about topic 5", tools=offered, tool_mode="auto")
    assert lengths.predict_call(chat) is None
    # Only for `auto`, and only a tool this turn offers.
    assert lengths.predict_call(SegmentContext(user_text="what is 3*4", tool_mode="none")) is None
    elsewhere = SegmentContext(user_text="what is 3*4", tools=("http_get",), tool_mode="auto")
    assert lengths.predict_call(elsewhere) is None


def test_context_from_chat_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "name": "calculator", "content": "error: bad expression"},
    ]
    context = SegmentContext.from_chat(messages, ["calculator"], "calculator", 1)
    assert context == SegmentContext(
        user_text="What is 2+2?",
        system_text="Be brief.",
        tools=("calculator",),
        tool_mode="named",
        forced_tool="calculator",
        earlier_turns=1,
        segment_index=1,
        after_tool="calculator",
        after_tool_failed=True,
    )
    assert SegmentContext.from_dict(context.to_dict()) == context
    # A giant prompt costs no more than a bounded one.
    huge = SegmentContext.from_chat([{"role": "user", "content": "word " * 100_000}], [], "none", 0)
    assert len(segment_features(huge).indices) < 1000


def test_model_weights_must_fit_the_feature_space(predictor: OutputLengthPredictor) -> None:
    model = predictor.model
    assert model is not None
    arrays = model.to_arrays()
    arrays["columns"] = arrays["columns"] + (1 << 20)
    with pytest.raises(ValueError, match="out of range"):
        LengthModel(tool_names=model.tool_names, examples=model.examples, **arrays)


def test_the_meta_field_is_bounded() -> None:
    meta = RequestMeta(request_id="c", arrival_time=0.0, predicted_decode_tokens=42)
    assert RequestMeta.from_extra_args(meta.to_extra_args()) == meta
    for bad in (0, -5, MAX_PREDICTED_DECODE_TOKENS + 1):
        with pytest.raises(ValidationError):
            RequestMeta(request_id="c", arrival_time=0.0, predicted_decode_tokens=bad)


COSTS = EngineCosts(
    kv_bytes_per_token=1000,
    fwd_intercept_s=0.01,
    fwd_slope_s=0.001,
    swap_slope_s=0.0001,
    decode_step_s=0.01,
)


def chat_request(rid: str, arrival: float, predicted: int | None) -> QueuedRequest:
    meta = RequestMeta(request_id=rid, arrival_time=arrival, predicted_decode_tokens=predicted)
    return QueuedRequest(
        engine_request_id=rid,
        arrival_time=arrival,
        context_tokens=100,
        generated_tokens=0,
        queued_at=arrival,
        waited_before_s=0.0,
        passed_over=0,
        meta=meta,
    )


@pytest.mark.parametrize("policy_name", ["sjf", "lamps"])
def test_the_scheduler_ranks_chat_requests_by_their_forecast(policy_name: str) -> None:
    policy = make_policy(policy_name, costs=COSTS)
    view = EngineView(now=1.0, running_tokens=0, free_blocks=1000, total_blocks=1000, block_size=16)
    early_long = chat_request("a", 0.0, predicted=400)
    late_short = chat_request("b", 0.5, predicted=10)
    default = chat_request("c", 0.2, predicted=None)  # 128 tokens, the default
    ranked = sorted([early_long, late_short, default], key=lambda r: policy.priority(r, view))
    assert [r.engine_request_id for r in ranked] == ["b", "c", "a"]


class RecordingEngine:
    """The engine, with every engine request's sampling parameters kept."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.params: list[Any] = []

    def generate(self, prompt: Any, params: Any, request_id: str) -> Any:
        self.params.append(params)
        return self._engine.generate(prompt, params, request_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class SpyLengths(OutputLengthPredictor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observed: list[tuple[SegmentContext, int, str | None, bool]] = []

    def observe(
        self, context: SegmentContext, decode_tokens: int, tool: str | None, truncated: bool
    ) -> bool:
        self.observed.append((context, decode_tokens, tool, truncated))
        return super().observe(context, decode_tokens, tool, truncated)


def chat_once(
    harness: EngineHarness, plan: ChatPlan, lengths: OutputLengthPredictor
) -> tuple[ChatOutcome, list[Any]]:
    """`run_chat` on the real engine; the outcome and every engine request's parameters."""
    engine = RecordingEngine(harness.engine)

    async def chat() -> ChatOutcome:
        async def no_tool_runs(*_: Any) -> Any:
            raise AssertionError("the tiny model writes no tool call")

        outcome = None
        async for event in run_chat(
            engine,  # type: ignore[arg-type]
            harness.engine.get_tokenizer(),
            harness.settings.max_model_len,
            plan,
            no_tool_runs,
            lengths,
        ):
            outcome = event
        assert isinstance(outcome, ChatOutcome)
        return outcome

    return harness.run(chat()), engine.params


def test_a_chat_segment_carries_the_learned_forecast(harness: EngineHarness) -> None:
    lengths = SpyLengths()
    for context, tokens in synthetic(200, seed=7):
        lengths.observe(context, tokens, None, truncated=False)
    assert lengths.refit()
    lengths.observed.clear()
    messages = [{"role": "user", "content": "please poem about topic 12"}]
    plan = ChatPlan(
        request_id="length-forecast-test",
        messages=messages,
        tools=[],
        tool_choice="none",
        max_tokens=12,
        max_tool_calls=0,
    )
    outcome, [params] = chat_once(harness, plan, lengths)
    meta = RequestMeta.from_extra_args(params.extra_args)
    assert meta is not None
    context = SegmentContext.from_chat(messages, [], "none", 0)
    expected = lengths.predict(context, budget=12)
    assert expected.source == "model"
    assert meta.predicted_decode_tokens == expected.decode_tokens
    assert meta.predicted_call_tool is None  # no tool offered
    # The completed segment went back to the model with what it decoded.
    [(seen, tokens, tool, truncated)] = lengths.observed
    assert seen == context and tool is None
    assert tokens == outcome.completion_tokens
    assert truncated == (outcome.finish_reason == "length")


def test_an_auto_turn_reaches_the_engine_with_its_call_forecast(harness: EngineHarness) -> None:
    offered = ("calculator",)
    lengths = OutputLengthPredictor(training=TrainingSettings(min_examples=20))
    for i in range(60):
        sums = SegmentContext(user_text=f"what is {i}*{i + 7}", tools=offered, tool_mode="auto")
        chat = SegmentContext(user_text=f"tell me about topic {i}", tools=offered, tool_mode="auto")
        lengths.observe(sums, 30, "calculator", truncated=False)
        lengths.observe(chat, 90, None, truncated=False)
    assert lengths.refit()
    tool = {"type": "function", "function": {"name": "calculator", "parameters": {}}}
    forecasts = {}
    for question in ("what is 6*7", "tell me about topic 3"):
        plan = ChatPlan(
            request_id=f"call-forecast-{len(forecasts)}",
            messages=[{"role": "user", "content": question}],
            tools=[tool],
            tool_choice="auto",
            max_tokens=8,
            max_tool_calls=1,
        )
        _, params = chat_once(harness, plan, lengths)
        meta = RequestMeta.from_extra_args(params[0].extra_args)
        assert meta is not None and meta.ends_in_api_call is False  # a forecast, not a known call
        forecasts[question] = meta.predicted_call_tool
    assert forecasts == {"what is 6*7": "calculator", "tell me about topic 3": None}


def test_the_replica_loads_what_its_config_names(
    predictor: OutputLengthPredictor, tmp_path: Path
) -> None:
    fresh, path = load_length_predictor(LengthModelConfig())
    assert fresh.model is None and path is None  # learns in memory only
    target = tmp_path / "lengths.npz"
    fresh, path = load_length_predictor(LengthModelConfig(path=str(target), buffer_size=64))
    assert fresh.model is None and path == target and fresh.buffer_size == 64
    predictor.save(target)
    loaded, path = load_length_predictor(LengthModelConfig(path=str(target), buffer_size=64))
    assert loaded.model is not None and path == target and loaded.buffered == 64
    target.write_bytes(b"not a model")
    broken, path = load_length_predictor(LengthModelConfig(path=str(target)))
    assert broken.model is None and path is None  # never saved over what it could not read
    assert target.read_bytes() == b"not a model"


@pytest.mark.engine
def test_the_serving_replica_learns_from_chat_segments(http: httpx.Client) -> None:
    engine = serve.get_deployment_handle("EngineReplica", "lamps")
    before = engine.length_model_stats.remote().result(timeout_s=30)
    assert before["enabled"]
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is 12*34?"}],
            "tools": [{"type": "function", "function": {"name": "calculator"}}],
            "tool_choice": "required",
            "max_tokens": 64,
        },
    )
    assert response.status_code == 200, response.text
    after = engine.length_model_stats.remote().result(timeout_s=30)
    # The forced call's segment ended on its own: it is learned (the answer after it may have
    # run into the request's 64 tokens, which is not).
    assert after["buffered"] > before["buffered"]
    assert after["new_examples"] > before["new_examples"]
