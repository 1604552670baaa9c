"""Interval code against published and analytic values, and the paired bootstrap's defining cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwha.eval import stats
from qwha.eval.stats import Arm


@pytest.mark.parametrize(
    ("k", "n", "wilson", "exact"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I.
        (81, 263, (0.2553, 0.3662), (0.2527, 0.3676)),
        (15, 148, (0.0624, 0.1605), (0.0578, 0.1617)),
        (0, 20, (0.0, 0.1611), (0.0, 0.1684)),
        (1, 29, (0.0061, 0.1718), (0.0009, 0.1776)),
    ],
)
def test_binomial_intervals_match_published_values(k, n, wilson, exact):
    assert stats.wilson_interval(k, n) == pytest.approx(wilson, abs=6e-5)
    assert stats.clopper_pearson(k, n) == pytest.approx(exact, abs=6e-5)


def test_exact_interval_at_the_edges_is_analytic():
    """k = 0: the upper limit solves (1 - p)^n = alpha / 2; k = n: the lower limit solves p^n = alpha / 2."""
    for n in (1, 10, 50, 500):
        assert stats.clopper_pearson(0, n) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)), abs=1e-9)
        assert stats.clopper_pearson(n, n) == pytest.approx((0.025 ** (1 / n), 1.0), abs=1e-9)


def test_wilson_hand_worked():
    """5/10: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5, half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)."""
    z = 1.959963984540054
    half = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert stats.wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # Newcombe's table
    lo, hi = stats.wilson_interval(50, 100, level=0.5)
    assert lo < 0.5 < hi and hi - lo < stats.wilson_interval(50, 100)[1] - stats.wilson_interval(50, 100)[0]
    with pytest.raises(ValueError, match="k=11, n=10"):
        stats.wilson_interval(11, 10)


def test_newcombe_difference_published_example():
    """Newcombe (1998), "Interval estimation for the difference between independent proportions",
    example (a): 56/70 - 48/80, method 10 gives 0.0524 to 0.3339."""
    assert stats.newcombe_difference(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=6e-5)


def test_mean_of_proportions_interval_hand_worked():
    """Two tasks, 0.5 of 100 and 0.8 of 400: se = sqrt(0.25/100 + 0.16/400) / 2 = sqrt(0.0029) / 2."""
    se = math.sqrt(0.0029) / 2
    z = 1.959963984540054
    assert stats.mean_of_proportions_interval([0.5, 0.8], [100, 400]) == pytest.approx(
        (0.65 - z * se, 0.65 + z * se)
    )
    d = stats.mean_of_proportions_difference([0.5, 0.8], [100, 400], [0.5, 0.8], [100, 400])
    assert d == pytest.approx((-z * se * math.sqrt(2), z * se * math.sqrt(2)))


def test_arm_estimates_hand_worked():
    """Stratified mean = mean of the strata's means; ppl = exp(sum nll / sum tokens); seeds averaged."""
    arm = Arm(a=[1, 0, 0, 1, 1, 1], strata=[0, 0, 0, 1, 1, 1])  # (1/3 + 1) / 2
    assert arm.estimate() == pytest.approx(2 / 3)
    ppl = Arm(a=[[2.0, 4.0], [1.0, 1.0]], b=[[2, 2], [1, 1]], stat="ppl")  # seeds: exp(1.5), exp(1)
    assert ppl.estimate() == pytest.approx((math.exp(1.5) + math.e) / 2)
    with pytest.raises(ValueError, match="stat="):
        Arm(a=[1.0], stat="median")


def test_stratified_resampling_keeps_each_position_in_its_stratum():
    strata = np.array([0, 0, 1, 1, 1, 2])
    idx = stats.resample_items(strata, 500, np.random.default_rng(0))
    assert idx.shape == (500, 6)
    assert np.array_equal(strata[idx], np.broadcast_to(strata, idx.shape))
    assert set(np.unique(idx[:, 2])) == {2, 3, 4}


def test_constant_paired_difference_gives_a_degenerate_interval():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(1, 300))
    strata = np.repeat([0, 1, 2], 100)
    est, (lo, hi) = stats.paired_bootstrap_difference(
        Arm(a=ref + 0.25, strata=strata), Arm(a=ref, strata=strata), n_boot=500
    )
    assert est == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_identical_methods_give_an_interval_at_zero_and_unpaired_one_around_it():
    c = (np.random.default_rng(2).random((1, 400)) < 0.4).astype(float)
    est, (lo, hi) = stats.paired_bootstrap_difference(Arm(a=c), Arm(a=c), n_boot=500)
    assert (est, lo, hi) == (0.0, 0.0, 0.0)
    # Two independent draws of the same accuracy: the paired interval covers 0.
    d = (np.random.default_rng(3).random((1, 400)) < 0.4).astype(float)
    est, (lo, hi) = stats.paired_bootstrap_difference(Arm(a=d), Arm(a=c), n_boot=1000)
    assert lo < 0 < hi and lo < est < hi
    # Identical ppl arms too.
    nll, tok = np.random.default_rng(4).random((1, 50)) * 100, np.full((1, 50), 40.0)
    est, (lo, hi) = stats.paired_bootstrap_difference(
        Arm(a=nll, b=tok, stat="ppl"), Arm(a=nll, b=tok, stat="ppl"), n_boot=200
    )
    assert (est, lo, hi) == (0.0, 0.0, 0.0)


def test_pairing_narrows_the_interval_when_items_differ_in_difficulty():
    """Items of very different difficulty, two methods 3 points apart: the paired interval is far narrower
    than the unpaired one (Newcombe on the same counts)."""
    rng = np.random.default_rng(5)
    n = 2000
    difficulty = rng.random(n)
    ref = (difficulty < 0.5).astype(float)[None]
    better = ref.copy()
    better[0, np.flatnonzero(ref[0] == 0)[:60]] = 1.0  # 60 more correct: +3 points
    est, (lo, hi) = stats.paired_bootstrap_difference(Arm(a=better), Arm(a=ref), n_boot=2000)
    assert est == pytest.approx(0.03)
    u_lo, u_hi = stats.newcombe_difference(int(better.sum()), n, int(ref.sum()), n)
    assert 0 < lo < est < hi and (hi - lo) < 0.5 * (u_hi - u_lo)


def test_bootstrap_coverage_with_a_fixed_seed():
    """Percentile bootstrap of a mean of Bernoulli(0.3) and of a ppl over 200 simulated samples of 150
    items: coverage of the true value close to 95% (binomial sd over 200 trials ~1.5%)."""
    rng = np.random.default_rng(6)
    hits_mean = hits_ppl = 0
    trials = 200
    for t in range(trials):
        c = (rng.random(150) < 0.3).astype(float)
        _, (lo, hi) = stats.bootstrap_interval(Arm(a=c), n_boot=400, seed=t)
        hits_mean += lo <= 0.3 <= hi
        tokens = rng.integers(20, 60, 150).astype(float)
        nll = rng.gamma(shape=tokens, scale=1.0)  # E[nll] = tokens: true ppl = e
        _, (lo, hi) = stats.bootstrap_interval(Arm(a=nll, b=tokens, stat="ppl"), n_boot=400, seed=t)
        hits_ppl += lo <= math.e <= hi
    assert 0.89 <= hits_mean / trials <= 0.99
    assert 0.89 <= hits_ppl / trials <= 0.99


def test_seeds_widen_the_interval():
    """Three seeds whose means differ by 10 points: resampling seeds widens the interval beyond the one
    of the pooled items."""
    rng = np.random.default_rng(7)
    seeds = np.stack([(rng.random(500) < p).astype(float) for p in (0.3, 0.4, 0.5)])
    est, (lo, hi) = stats.bootstrap_interval(Arm(a=seeds), n_boot=1000)
    assert est == pytest.approx(seeds.mean())
    _, (lo1, hi1) = stats.bootstrap_interval(Arm(a=seeds[1:2]), n_boot=1000)
    assert hi - lo > 1.5 * (hi1 - lo1)


def test_paired_arms_must_share_items():
    with pytest.raises(ValueError, match="share"):
        stats.paired_bootstrap_difference(Arm(a=[1.0, 0.0]), Arm(a=[1.0, 0.0, 1.0]))
