"""Predictors: oracle arithmetic, reproducible noise with the right moments, tool estimates."""

from __future__ import annotations

import statistics

import pytest

from lamps_core.call_durations import CallDurationSummary
from lamps_core.predictors import (
    DEFAULT_DECODE_TOKENS,
    NoisyOraclePredictor,
    OraclePredictor,
    PredictionDefaults,
    Predictor,
    SegmentForecast,
    ToolEstimatePredictor,
    make_predictor,
)
from lamps_core.request_meta import RequestMeta
from lamps_core.trace import TraceScript, TraceSegment

SCRIPT = TraceScript(
    segments=[
        TraceSegment(
            prompt_tokens=100,
            completion_tokens=10,
            api_time=2.0,
            api_token_length=5,
            api_type="search",
        ),
        TraceSegment(prompt_tokens=115, completion_tokens=20, api_time=0.5, api_token_length=0),
        TraceSegment(prompt_tokens=135, completion_tokens=30),
    ]
)


def meta(request_id: str = "r", segment: int = 0, script: TraceScript = SCRIPT) -> RequestMeta:
    return RequestMeta(
        request_id=request_id,
        arrival_time=0.0,
        segment_index=segment,
        ends_in_api_call=script.segments[segment].has_api_call,
        remaining_segments=script.segments[segment:],
    )


def one_call(api_time: float, completion: int, returned: int) -> TraceScript:
    return TraceScript(
        segments=[
            TraceSegment(
                prompt_tokens=10,
                completion_tokens=completion,
                api_time=api_time,
                api_token_length=returned,
            ),
            TraceSegment(prompt_tokens=10 + completion + returned, completion_tokens=1),
        ]
    )


def test_oracle_reads_every_remaining_segment() -> None:
    prediction = OraclePredictor().predict(meta(), generated_tokens=4)
    assert prediction.segments == (
        SegmentForecast(6, 2.0, 5, "search"),
        SegmentForecast(20, 0.5, 0),
        SegmentForecast(30, None),
    )
    assert (prediction.decode_tokens, prediction.api_s, prediction.api_tokens) == (6, 2.0, 5)
    assert prediction.has_call and prediction.remaining_decode_tokens == 56
    last = OraclePredictor().predict(meta(segment=2))
    assert not last.has_call and last.api_s == 0.0 and last.remaining_decode_tokens == 30


def test_requests_without_a_trace_get_the_defaults() -> None:
    defaults = PredictionDefaults(decode_tokens=50, api_s=3.0, api_tokens=7)
    oracle = OraclePredictor(defaults)
    plain = oracle.predict(None)
    assert plain.segments == (SegmentForecast(50, None),)
    forced = RequestMeta(request_id="c", arrival_time=0.0, ends_in_api_call=True)
    assert oracle.predict(forced, generated_tokens=10).segments == (
        SegmentForecast(40, 3.0, 7),
        SegmentForecast(50, None),
    )
    # A call that nobody foresaw still gets a duration.
    assert oracle.call_duration(None) == 3.0
    with pytest.raises(ValueError, match="default_decode_tokens"):
        PredictionDefaults(decode_tokens=0)


@pytest.mark.parametrize(
    "predictor",
    [OraclePredictor(), NoisyOraclePredictor(0.3), ToolEstimatePredictor({"calculator": 2.0})],
)
def test_a_chat_segment_decodes_its_forecast_not_the_default(predictor: Predictor) -> None:
    chat = RequestMeta(request_id="c", arrival_time=0.0, predicted_decode_tokens=40)
    assert predictor.predict(chat, generated_tokens=15).segments == (SegmentForecast(25, None),)
    forced = RequestMeta(
        request_id="c",
        arrival_time=0.0,
        ends_in_api_call=True,
        api_type="calculator",
        predicted_decode_tokens=30,
    )
    # The forecast is the current segment's; the one after the call keeps the default.
    [current, after] = predictor.predict(forced).segments
    assert (current.decode_tokens, after.decode_tokens) == (30, DEFAULT_DECODE_TOKENS)
    # A trace keeps its own numbers.
    traced = meta().model_copy(update={"predicted_decode_tokens": 999})
    assert predictor.predict(traced) == predictor.predict(meta())


def test_noisy_draws_are_reproducible_and_independent_of_call_order() -> None:
    ids = [f"req{i}" for i in range(5)]
    forward = NoisyOraclePredictor(0.3, seed=7)
    backward = NoisyOraclePredictor(0.3, seed=7)
    a = {i: forward.predict(meta(i)) for i in ids}
    b = {i: backward.predict(meta(i)) for i in reversed(ids)}
    assert a == b
    assert a["req0"] != a["req1"]  # distinct requests draw differently
    assert NoisyOraclePredictor(0.3, seed=8).predict(meta("req0")) != a["req0"]
    # The draw belongs to the segment, not to whoever asks: segment 1 forecast from segment 0
    # is the one segment 1 gets when it runs.
    assert forward.predict(meta("req0", segment=1)).segments[0] == a["req0"].segments[1]


def test_noisy_with_zero_noise_is_the_oracle() -> None:
    assert NoisyOraclePredictor(0.0, seed=1).predict(meta()) == OraclePredictor().predict(meta())


def test_noisy_draws_have_mean_t_and_std_p_t() -> None:
    predictor = NoisyOraclePredictor(0.1, seed=3)
    script = one_call(api_time=10.0, completion=1000, returned=500)
    draws = [predictor.predict(meta(f"r{i}", script=script)) for i in range(2000)]
    durations = [d.api_s for d in draws]
    lengths = [d.decode_tokens for d in draws]
    returned = [d.api_tokens for d in draws]
    # Standard errors: mean 1/√2000 ≈ 0.022 s, variance 1·√(2/2000) ≈ 0.032 s².
    assert statistics.fmean(durations) == pytest.approx(10.0, abs=0.1)
    assert statistics.variance(durations) == pytest.approx(1.0, abs=0.15)
    assert statistics.fmean(lengths) == pytest.approx(1000, abs=10)
    assert statistics.stdev(lengths) == pytest.approx(100, abs=8)
    assert statistics.fmean(returned) == pytest.approx(500, abs=5)


def test_noisy_draws_are_clipped_at_sensible_minimums() -> None:
    predictor = NoisyOraclePredictor(5.0, seed=0)
    script = one_call(api_time=1.0, completion=2, returned=3)
    draws = [predictor.predict(meta(f"r{i}", script=script)) for i in range(300)]
    assert min(d.api_s for d in draws) == 0.0  # some would have gone negative
    assert min(d.decode_tokens for d in draws) == 1
    assert min(d.api_tokens for d in draws) == 0


def test_tool_estimates_give_durations_by_api_type_over_every_segment() -> None:
    predictor = ToolEstimatePredictor(defaults=PredictionDefaults(api_s=9.0))
    assert predictor.predict(meta()).api_s == 9.0  # nothing reported yet
    predictor.update({"search": 1.5, "calculator": 0.001})
    prediction = predictor.predict(meta(), generated_tokens=2)
    # Lengths from the trace, the search duration from the estimates, the untyped call's the
    # default: the whole remaining request, as the oracle sees it, with durations estimated.
    assert prediction.segments == (
        SegmentForecast(8, 1.5, 5, "search"),
        SegmentForecast(20, 9.0, 0),
        SegmentForecast(30, None),
    )
    assert predictor.predict(meta(segment=1)).api_s == 9.0  # untyped call: the default
    chat = RequestMeta(request_id="c", arrival_time=0.0, ends_in_api_call=True)
    assert predictor.predict(chat).api_s == 9.0
    # A chat turn forced to call one known tool: that tool's estimate.
    forced = RequestMeta(request_id="c", arrival_time=0.0, ends_in_api_call=True, api_type="search")
    assert predictor.predict(forced).api_s == 1.5


def test_tool_estimates_with_length_noise_draw_the_noisy_oracles_length_errors() -> None:
    """`estimates` with a noise: learned durations, and lengths off by the same relative error
    `noisy` draws for them (same seed, same segment), while durations stay the estimates."""
    noisy = NoisyOraclePredictor(0.5, seed=3)
    estimated = make_predictor("estimates", noise=0.5, seed=3)
    estimated.update({"search": 1.5})
    for i in range(20):
        request = meta(request_id=f"r{i}")
        lengths = [s.decode_tokens for s in estimated.predict(request).segments]
        assert lengths == [s.decode_tokens for s in noisy.predict(request).segments]
        assert [s.api_s for s in estimated.predict(request).segments] == [1.5, 1.0, None]
    exact = [s.decode_tokens for s in make_predictor("estimates").predict(meta()).segments]
    assert exact == [10, 20, 30]
    off = {
        tuple(s.decode_tokens for s in estimated.predict(meta(f"r{i}")).segments) for i in range(20)
    }
    assert len(off) > 10 and (10, 20, 30) not in off  # noise, drawn per request
    with pytest.raises(ValueError, match="noise must be"):
        make_predictor("estimates", noise=-1.0)


def test_tool_estimates_version_changes_only_with_the_estimates() -> None:
    predictor = ToolEstimatePredictor({"search": 1.0})
    assert predictor.version == 0
    predictor.update({"search": 1.0})
    assert predictor.version == 0
    predictor.update({"search": 2.0})
    assert predictor.version == 1 and predictor.estimates == {"search": 2.0}
    with pytest.raises(ValueError, match="search"):
        predictor.update({"search": float("nan")})


def test_make_predictor_names_bad_options() -> None:
    assert isinstance(make_predictor("oracle"), OraclePredictor)
    assert isinstance(make_predictor("noisy", noise=0.2, seed=1), NoisyOraclePredictor)
    assert isinstance(make_predictor("estimates"), ToolEstimatePredictor)
    given = ToolEstimatePredictor()
    assert make_predictor(given) is given
    with pytest.raises(ValueError, match="predictor must be one of"):
        make_predictor("psychic")
    with pytest.raises(ValueError, match="needs the option noise"):
        make_predictor("noisy")
    with pytest.raises(ValueError, match="not 'oracle'"):
        make_predictor("oracle", noise=0.1)
    with pytest.raises(ValueError, match="noise must be"):
        make_predictor("noisy", noise=-0.1)


# A tool that answers in 0.1 s or in 10 s, equally often (mean 5.05 s).
BIMODAL = CallDurationSummary(atoms_s=(0.1,) * 8 + (10.0,) * 8, max_s=10.0, count=16)


def test_tool_estimates_with_a_distribution_predict_its_mean_and_condition_on_elapsed() -> None:
    predictor = ToolEstimatePredictor(defaults=PredictionDefaults(api_s=9.0))
    predictor.update({"search": BIMODAL, "calculator": 0.001})
    assert predictor.version == 1
    assert predictor.estimates == {"search": pytest.approx(5.05), "calculator": 0.001}
    assert predictor.distributions == {"search": BIMODAL}
    # The plan at the pause: the mean (waste is linear in the duration), one call ahead.
    assert predictor.call_duration(meta()) == pytest.approx(5.05)
    assert predictor.predict(meta()).segments[0].api_s == pytest.approx(5.05)
    # A call under way: E[D - e | D > e] (a trace's call and a forced chat call alike).
    assert predictor.remaining_call_s(meta(), 0.0) == pytest.approx(5.05)
    assert predictor.remaining_call_s(meta(), 1.0) == pytest.approx(9.0)
    forced = RequestMeta(request_id="c", arrival_time=0.0, ends_in_api_call=True, api_type="search")
    assert predictor.remaining_call_s(forced, 1.0) == pytest.approx(9.0)
    # No distribution (a mean only, an untyped call, no meta): the caller's own rule.
    only_mean = RequestMeta(
        request_id="c", arrival_time=0.0, ends_in_api_call=True, api_type="calculator"
    )
    assert predictor.remaining_call_s(only_mean, 1.0) is None
    assert predictor.remaining_call_s(meta(segment=1), 1.0) is None
    assert predictor.remaining_call_s(None, 1.0) is None


def test_an_auto_turn_forecast_to_call_is_priced_with_that_tools_estimate() -> None:
    predictor = ToolEstimatePredictor(defaults=PredictionDefaults(api_s=9.0))
    predictor.update({"search": BIMODAL})
    auto = RequestMeta(request_id="c", arrival_time=0.0, predicted_decode_tokens=20)
    assert not predictor.predict(auto).has_call  # no forecast of a call: none is assumed
    calls = auto.model_copy(update={"predicted_call_tool": "search"})
    [current, after] = predictor.predict(calls).segments
    assert (current.decode_tokens, current.api_type) == (20, "search")
    assert current.api_s == pytest.approx(5.05)  # the tool's mean, not the 9-s default
    assert after == SegmentForecast(DEFAULT_DECODE_TOKENS, None)
    assert predictor.call_duration(calls) == pytest.approx(5.05)
    assert predictor.remaining_call_s(calls, 1.0) == pytest.approx(9.0)  # conditioned, as forced
    # A forced tool is known and wins over a forecast.
    forced = calls.model_copy(update={"ends_in_api_call": True, "api_type": "other"})
    assert predictor.predict(forced).segments[0].api_s == 9.0


def test_tool_estimates_version_follows_the_distribution_and_refuses_bad_values() -> None:
    predictor = ToolEstimatePredictor({"search": BIMODAL})
    predictor.update({"search": BIMODAL})
    assert predictor.version == 0
    # The same mean, another shape: predictions of running calls change, so the version does.
    flat = CallDurationSummary(atoms_s=(5.05,), max_s=5.05, count=3)
    predictor.update({"search": flat})
    assert predictor.version == 1
    assert predictor.remaining_call_s(meta(), 1.0) == pytest.approx(4.05)
    for bad in ({"search": True}, {"search": "5"}, {f"t{i}": 1.0 for i in range(300)}):
        with pytest.raises(ValueError):
            predictor.update(bad)  # type: ignore[arg-type]
    assert predictor.version == 1 and predictor.distributions == {"search": flat}


def test_oracle_and_noisy_predictors_have_no_distribution() -> None:
    for predictor in (OraclePredictor(), NoisyOraclePredictor(0.2, seed=1)):
        predictor.update({"search": BIMODAL})  # ignored, as means are
        assert predictor.remaining_call_s(meta(), 1.0) is None
        assert predictor.call_duration(meta()) == pytest.approx(
            2.0 if isinstance(predictor, OraclePredictor) else predictor.predict(meta()).api_s
        )
