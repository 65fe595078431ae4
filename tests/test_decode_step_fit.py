"""The decode step the policies price with, fitted over every recent step (lamps_core.costs)."""

from __future__ import annotations

import random

import pytest

from lamps_core.costs import StepSample, fit_decode_step


def step_time(prefill: int, batch: int, context: int) -> float:
    return 0.004 + 2e-5 * prefill + 1e-4 * batch + 2e-7 * context


def test_the_fit_follows_the_batch_as_it_runs_now_not_the_light_decode_only_steps() -> None:
    """Under load nearly every step also prefills; the few decode-only steps are the light ones
    (a small batch at the end of a burst). Their median says 4.5 ms; the batch that actually runs
    (48 requests over 40k tokens of context) takes about 17 ms a decode step."""
    rng = random.Random(0)
    samples = [StepSample(0, 4, 2_000, step_time(0, 4, 2_000)) for _ in range(10)]
    for _ in range(200):
        batch = rng.randint(40, 56)
        context = batch * rng.randint(700, 950)
        prefill = rng.choice([0, 0, 128, 256, 512])
        samples.append(StepSample(prefill, batch, context, step_time(prefill, batch, context)))
    light_median = step_time(0, 4, 2_000)
    fitted = fit_decode_step(samples)
    assert fitted is not None
    heavy = [s for s in samples if s.decode_requests >= 40]
    batch = sum(s.decode_requests for s in samples) / len(samples)
    context = sum(s.decode_context_tokens for s in samples) / len(samples)
    assert fitted == pytest.approx(step_time(0, round(batch), round(context)), rel=0.05)
    assert fitted > 3 * light_median
    assert len(heavy) > 150


def test_outliers_and_too_few_steps() -> None:
    rng = random.Random(1)
    samples = []
    for _ in range(100):
        batch = rng.randint(1, 64)
        context = batch * 500
        samples.append(StepSample(0, batch, context, step_time(0, batch, context)))
    clean = fit_decode_step(samples)
    # A few steps that shared the machine with something else (10x slower) hardly move it.
    noisy = samples + [StepSample(0, 2, 1_000, 0.2) for _ in range(5)]
    assert fit_decode_step(noisy) == pytest.approx(clean, rel=0.1)
    assert fit_decode_step(samples[:10]) is None  # too few to fit
    assert fit_decode_step([StepSample(64, 0, 0, 0.01)] * 40) is None  # nothing decoded
