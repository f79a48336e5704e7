"""Tests for medseg_jax.stats on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg_jax import stats


def test_bootstrap_ci_known_inputs():
    # Constant values: every resampled mean equals the value.
    assert stats.bootstrap_ci([0.7] * 9) == (pytest.approx(0.7), pytest.approx(0.7))
    # Two values 0 and 1: resampled means are k/2 with k ~ Binomial(2, 1/2), so
    # the 2.5% and 97.5% quantiles are 0 and 1.
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # Normal data: the interval is close to mean +- 1.96 * sd / sqrt(n).
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=400)
    lo, hi = stats.bootstrap_ci(x, samples=4000)
    half = 1.96 * x.std() / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.04)
    assert hi == pytest.approx(x.mean() + half, abs=0.04)
    # Seeded: the same call gives the same interval; nan values are skipped.
    assert stats.bootstrap_ci(x[:20]) == stats.bootstrap_ci(np.append(x[:20], np.nan))
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0, np.nan]))


def test_bootstrap_ci_errors():
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="samples"):
        stats.bootstrap_ci([1.0, 2.0], samples=0)


def test_paired_wilcoxon_known_inputs():
    # Ten positive differences of distinct sizes: W- = 0, and the exact
    # two-sided p-value is 2 / 2**10.
    a = np.arange(1, 11) * 0.01 + 0.8
    b = np.full(10, 0.8)
    out = stats.paired_wilcoxon(a, b)
    assert out["n"] == 10 and out["statistic"] == 0.0
    assert out["p_value"] == pytest.approx(2 / 1024)
    assert out["median_diff"] == pytest.approx(0.055)
    # Differences +1, -2, +3, -4, +5: W+ = 9, W- = 6; exact p = 26/32 (counted by hand:
    # 13 of the 32 sign patterns have min(W+, W-) <= 6, twice over both tails).
    out = stats.paired_wilcoxon([1, -2, 3, -4, 5], [0] * 5)
    assert out["statistic"] == 6.0
    assert out["p_value"] == pytest.approx(0.8125)
    # Zero differences and nan pairs are dropped and counted out of n.
    out = stats.paired_wilcoxon([1, 2, np.nan, 4], [1, 1, 0, 1])
    assert out["n"] == 2
    assert stats.paired_wilcoxon([1, 2], [1, 2]) == {"n": 0, "median_diff": 0.0,
                                                     "statistic": 0.0, "p_value": 1.0}
    assert math.isnan(stats.paired_wilcoxon([np.nan], [1.0])["p_value"])
    with pytest.raises(ValueError, match="as many"):
        stats.paired_wilcoxon([1, 2], [1])


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    """The percentile interval of the resampled means, as scipy.stats.bootstrap gives it;
    with other resamples the bounds agree to the Monte Carlo error."""
    from scipy.stats import bootstrap as scipy_bootstrap

    values = np.random.default_rng(3).gamma(2.0, 1.0, size=60)
    lo, hi = stats.bootstrap_ci(values, samples=20000, seed=0)
    ref = scipy_bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                          confidence_level=0.95, random_state=1).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.05 * width and abs(hi - ref.high) < 0.05 * width
