"""Statistics over test cases: bootstrap intervals and paired tests.

``bootstrap_ci`` gives the percentile bootstrap interval of the mean of
per-case values; ``paired_wilcoxon`` tests whether two methods scored on the
same cases differ (Wilcoxon signed-rank, two-sided). Both drop non-finite
values first (a pair is dropped when either of its values is non-finite) and
report how many values they used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats as sp_stats

DEFAULT_BOOTSTRAP_SAMPLES = 2000


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def bootstrap_ci(values: Sequence[float], level: float = 0.95,
                 samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values``.

    Cases are resampled with replacement ``samples`` times (seeded, so the
    interval is reproducible); the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled means (``scipy.stats.bootstrap``,
    ``method="percentile"``). Fewer than two
    finite values give ``(nan, nan)``: one case says nothing about spread.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level must lie in (0, 1), got {level}")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    arr = _finite(values)
    if arr.size < 2:
        return float("nan"), float("nan")
    interval = sp_stats.bootstrap(
        (arr,), np.mean, n_resamples=samples, confidence_level=level, method="percentile",
        batch=500,  # bounded memory for large case counts
        random_state=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of ``a - b`` over paired cases.

    Returns ``{"n", "statistic", "p_value", "median_diff"}``. Pairs with a
    non-finite value are dropped; zero differences are dropped too
    (Wilcoxon's original rule, scipy's ``zero_method="wilcox"``), so ``n``
    counts the pairs that entered the test. With no non-zero difference the
    p-value is 1.0 (no evidence of a difference); with no usable pair it is nan.
    scipy uses the exact null distribution for small ``n`` without ties.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired test needs as many values in each group: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    nonzero = diff[diff != 0]
    out = {"n": int(nonzero.size),
           "median_diff": float(np.median(diff)) if diff.size else float("nan")}
    if diff.size == 0:
        return {**out, "statistic": float("nan"), "p_value": float("nan")}
    if nonzero.size == 0:
        return {**out, "statistic": 0.0, "p_value": 1.0}
    result = sp_stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
    return {**out, "statistic": float(result.statistic), "p_value": float(result.pvalue)}
