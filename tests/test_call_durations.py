"""Call durations learned per tool: the recency-weighted summary, and the expected remaining time of
a call that has run a while, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from lamps_core.call_durations import (
    MAX_ATOMS,
    CallDurationSummary,
    summarize_durations,
)
from lamps_core.request_meta import MAX_API_ESTIMATES, RequestMeta

# Weights 0.5 ** (age / 1e300) are exactly 1.0 in floating point: every sample counts alike.
UNWEIGHTED = 1e300

# A tool that answers from a cache in 0.1 s or from its backend in 10 s, equally often.
BIMODAL = CallDurationSummary(atoms_s=(0.1,) * 8 + (10.0,) * 8, max_s=10.0, count=16)


def test_a_call_past_the_fast_mode_has_the_slow_mode_left() -> None:
    assert BIMODAL.mean_s == pytest.approx(5.05)  # (8 · 0.1 + 8 · 10) / 16
    assert BIMODAL.expected_remaining_s(0.0) == pytest.approx(5.05)  # nothing known yet: the mean
    # Inside the fast mode every atom is still possible: the mean less what has run.
    assert BIMODAL.expected_remaining_s(0.05) == pytest.approx(5.0)
    # After 1 s only the 10 s atoms are left: 9 s to go, not the mean's 4.05.
    assert BIMODAL.expected_remaining_s(1.0) == pytest.approx(9.0)
    assert BIMODAL.expected_remaining_s(9.5) == pytest.approx(0.5)


def test_past_the_atoms_the_tail_then_the_elapsed_time_then_the_timeout() -> None:
    summary = CallDurationSummary(atoms_s=(1.0, 2.0, 3.0), max_s=7.0, count=30)
    # Between the top atom and the longest sample: uniform up to it, (7 - 4) / 2.
    assert summary.expected_remaining_s(4.0) == pytest.approx(1.5)
    # Past every sample: as long again as it has run (INFERCEPT's estimate).
    assert summary.expected_remaining_s(8.0) == pytest.approx(8.0)
    bounded = summary.model_copy(update={"timeout_s": 10.0})
    assert bounded.expected_remaining_s(8.0) == pytest.approx(2.0)  # the worker stops it at 10 s
    assert bounded.expected_remaining_s(12.0) == 0.0
    assert bounded.expected_remaining_s(-1.0) == pytest.approx(2.0)  # a clock step back: 0 s run


def test_recency_weights_and_equal_mass_slices_by_hand() -> None:
    # Newest first, half-life 1 sample: weights 1, 1/2, 1/4 (total 7/4); three slices of 7/12.
    summary = summarize_durations([1.0, 2.0, 4.0], half_life_samples=1)
    assert summary is not None and summary.count == 3 and summary.max_s == 4.0
    # Slice 1: 7/12 of the 1 s sample. Slice 2: the 1 s sample's last 5/12 and 2/12 of 2 s:
    # (5/12 + 4/12) / (7/12) = 9/7. Slice 3: 4/12 of 2 s and all 3/12 of 4 s: (8 + 12) / 7.
    assert summary.atoms_s == pytest.approx((1.0, 9 / 7, 20 / 7))
    # Each atom is its slice's mean, so the summary's mean is the weighted mean: 3 / (7/4).
    assert summary.mean_s == pytest.approx(12 / 7)


def test_a_bimodal_tool_learned_from_its_samples() -> None:
    samples = [0.1, 10.0] * 8
    summary = summarize_durations(samples, half_life_samples=UNWEIGHTED)
    assert summary == BIMODAL
    assert summary.expected_remaining_s(1.0) == pytest.approx(9.0)


def test_the_newest_calls_count_most() -> None:
    # A tool that slowed down: 64 recent calls at 3 s after 100 older ones at 1 s.
    newest_first = [3.0] * 64 + [1.0] * 100
    summary = summarize_durations(newest_first, half_life_samples=64)
    assert summary is not None
    weights = [0.5 ** (age / 64) for age in range(len(newest_first))]
    weighted_mean = math.fsum(w * v for w, v in zip(weights, newest_first, strict=True)) / sum(
        weights
    )
    assert summary.mean_s == pytest.approx(weighted_mean)
    assert summary.mean_s > 2.0 > sum(newest_first) / len(newest_first)  # plain mean: 1.78 s


def test_the_summary_is_bounded_and_ignores_what_is_not_a_duration() -> None:
    summary = summarize_durations([0.001 * i for i in range(1000, 0, -1)], window=300)
    assert summary is not None
    assert summary.count == 300 and len(summary.atoms_s) == 16
    assert list(summary.atoms_s) == sorted(summary.atoms_s)
    assert summary.max_s == pytest.approx(1.0)  # the window holds the newest 300: 1.0 .. 0.701
    assert summarize_durations([float("nan"), -1.0, 1e9, float("inf")]) is None
    poisoned = summarize_durations([float("nan"), 2.0, -5.0, 1e12])
    assert poisoned is not None and poisoned.atoms_s == (2.0,) and poisoned.count == 1
    with pytest.raises(ValueError, match="atoms"):
        summarize_durations([1.0], atoms=MAX_ATOMS + 1)


@pytest.mark.parametrize(
    "fields",
    [
        {"atoms_s": (2.0, 1.0), "max_s": 2.0, "count": 2},  # not ascending
        {"atoms_s": (1.0,), "max_s": 0.5, "count": 1},  # max below an atom
        {"atoms_s": (float("nan"),), "max_s": 1.0, "count": 1},
        {"atoms_s": (-1.0,), "max_s": 1.0, "count": 1},
        {"atoms_s": (), "max_s": 1.0, "count": 0},
        {"atoms_s": (1.0,) * (MAX_ATOMS + 1), "max_s": 1.0, "count": 99},
        {"atoms_s": (1.0,), "max_s": 1.0, "count": 1, "extra": 1},
    ],
)
def test_a_summary_from_outside_is_validated(fields: dict) -> None:
    with pytest.raises(ValidationError):
        CallDurationSummary.model_validate(fields)


def test_request_meta_carries_means_and_distributions_bounded() -> None:
    meta = RequestMeta(
        request_id="r", arrival_time=0.0, api_estimates={"search": BIMODAL, "math": 0.5}
    )
    back = RequestMeta.from_extra_args(meta.to_extra_args())  # as the engine core reads it
    assert back is not None and back.api_estimates == {"search": BIMODAL, "math": 0.5}
    with pytest.raises(ValidationError):
        RequestMeta(
            request_id="r",
            arrival_time=0.0,
            api_estimates={f"t{i}": 1.0 for i in range(MAX_API_ESTIMATES + 1)},
        )
    with pytest.raises(ValidationError):  # a distribution that is not one
        RequestMeta.model_validate(
            {
                "request_id": "r",
                "arrival_time": 0.0,
                "api_estimates": {"search": {"atoms_s": [3.0, 1.0], "max_s": 3.0, "count": 2}},
            }
        )
