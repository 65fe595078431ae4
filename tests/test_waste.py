"""Engine costs and INFERCEPT's waste formulas against hand-computed numbers.

Costs throughout: M = 1000 B/token, T_fwd(C) = 0.01 + 0.001·C s, T_swap(C) = 0.0001·C s,
saturation 384 tokens.
"""

from __future__ import annotations

import pytest

from lamps_core.costs import EngineCosts, fit_linear, kv_bytes_per_token
from lamps_core.policy import Strategy
from lamps_core.waste import (
    argmin_strategy,
    discard_waste,
    min_waste_strategy,
    preserve_waste,
    recompute_chunks,
    strategy_wastes,
    swap_waste,
)
from tests.test_policies import COSTS  # M = 1000 B/token, T_fwd = 0.01 + 0.001·C s

P, S, D = Strategy.PRESERVE, Strategy.SWAP, Strategy.DISCARD


def test_kv_bytes_per_token_counts_key_and_value_per_layer_and_head() -> None:
    assert kv_bytes_per_token(28, 16, 256, 2) == 458_752  # GPT-J 6B, fp16
    assert kv_bytes_per_token(2, 1, 4, 2) == 32
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_bytes_per_token(2, 0, 4, 2)


def test_fit_linear_recovers_a_line_and_rejects_degenerate_input() -> None:
    intercept, slope = fit_linear([(100, 0.11), (200, 0.21), (400, 0.41)])
    assert intercept == pytest.approx(0.01)
    assert slope == pytest.approx(0.001)
    # Symmetric noise around the line does not move the fit.
    intercept, slope = fit_linear([(100, 0.12), (100, 0.10), (300, 0.32), (300, 0.30)])
    assert (intercept, slope) == (pytest.approx(0.01), pytest.approx(0.001))
    # One slow first step (1.2 s at the smallest size) among the warm-up's prefills: ignored,
    # where least squares would tilt the line flat at ~0.3 s a prefill of any size.
    warm_up = [(32, 0.004), (32, 0.005), (128, 0.012), (128, 0.013), (512, 0.05), (512, 0.052)]
    intercept, slope = fit_linear([(32, 1.2), *warm_up])
    assert slope == pytest.approx(1e-4, rel=0.1)
    assert intercept == pytest.approx(0.001, abs=0.002)
    # Hundreds of serving-time sizes are binned before the pairwise slopes; the line survives.
    many = [(n, 0.002 + 1e-5 * n + (0.001 if n % 7 == 0 else -0.001)) for n in range(16, 2048, 8)]
    intercept, slope = fit_linear(many)
    assert (intercept, slope) == (pytest.approx(0.002, abs=0.0015), pytest.approx(1e-5, rel=0.05))
    # Time never falls with size: a falling set of points is a flat line at the median.
    assert fit_linear([(100, 0.3), (200, 0.2), (300, 0.1)]) == (pytest.approx(0.2), 0.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_linear([(100, 0.1)])
    with pytest.raises(ValueError, match="distinct"):
        fit_linear([(100, 0.1), (100, 0.2)])


def test_costs_linear_times_and_dict_round_trip() -> None:
    assert COSTS.t_fwd(200) == pytest.approx(0.21)
    assert COSTS.t_swap(400) == pytest.approx(0.04)
    assert COSTS.t_fwd(0) == 0.0 and COSTS.t_swap(0) == 0.0  # nothing to run, nothing to copy
    assert EngineCosts.from_dict(COSTS.to_dict()) == COSTS
    assert COSTS.to_dict()["saturation_tokens"] == 384
    with pytest.raises(ValueError, match="fwd_slop"):
        EngineCosts.from_dict({**COSTS.to_dict(), "fwd_slop": 1.0})
    with pytest.raises(ValueError, match="decode_step_s"):
        EngineCosts(1000, 0.01, 0.001, 0.0001, decode_step_s=-1.0)


def test_preserve_waste_is_call_time_by_context() -> None:
    assert preserve_waste(400, 2.0, COSTS) == pytest.approx(800_000)


def test_discard_waste_uses_chunked_recompute() -> None:
    # C = 400 needs n = 2 chunks of 200: 0.41·400·1000/2 + 2·0.21·1000·1000.
    assert recompute_chunks(400, COSTS) == 2
    assert discard_waste(400, 1000, COSTS) == pytest.approx(82_000 + 420_000)
    # C = 300 fits one chunk: 0.31·300·1000/2 + 1·0.31·1000·1000.
    assert discard_waste(300, 1000, COSTS) == pytest.approx(46_500 + 310_000)
    assert discard_waste(300, 0, COSTS) == pytest.approx(46_500)  # nothing else to stall
    assert discard_waste(0, 1000, COSTS) == 0.0


def test_swap_waste_stalls_the_batch_both_ways() -> None:
    assert swap_waste(400, 1400, COSTS) == pytest.approx(2 * 0.04 * 1400 * 1000)


def test_min_waste_strategy_follows_the_numbers() -> None:
    # C = 400, 1000 other tokens: W_S = 112 000, W_D = 502 000, W_P = T·400 000.
    args = (400, 1000, 1400, COSTS)
    assert min_waste_strategy(400, 0.2, *args[1:]) is P  # 80 000
    assert min_waste_strategy(400, 0.5, *args[1:]) is S  # 200 000 > 112 000
    assert min_waste_strategy(400, 0.5, *args[1:], allow_swap=False) is P  # < 502 000
    assert min_waste_strategy(400, 2.0, *args[1:], allow_swap=False) is D  # 800 000
    assert list(strategy_wastes(400, 1.0, 1000, 1400, COSTS, allow_swap=False)) == [P, D]


def test_ties_go_to_preserve_then_swap_then_discard() -> None:
    assert argmin_strategy({D: 1.0, S: 1.0, P: 1.0}) is P
    assert argmin_strategy({D: 1.0, S: 1.0, P: 2.0}) is S
    assert argmin_strategy({D: 0.5, S: 1.0, P: 2.0}) is D
    # An empty context wastes nothing whatever is done with it.
    assert min_waste_strategy(0, 10.0, 1000, 1000, COSTS) is P
