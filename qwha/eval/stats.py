"""Interval estimates for the result tables: binomial intervals, bootstrap over items, paired differences.

What each table cell uses (``experiments/render.py``):

- An accuracy ``k / n`` (GSM8K exact match, one CSQA task): :func:`wilson_interval` (the score interval;
  :func:`clopper_pearson` is the exact binomial interval, wider, also available).
- A mean over items of several strata (the CSQA average: the mean of the tasks' accuracies) or a ratio of
  sums (the GSM8K answer perplexity ``exp(sum of nll / sum of tokens)``), with per-item records:
  :func:`bootstrap_interval`, a percentile bootstrap that resamples items within each stratum (each task
  keeps its n, so the estimator's weights are fixed).
- Without per-item records (older archives): the CSQA average from each task's accuracy and n,
  :func:`mean_of_proportions_interval` (normal approximation); nothing for a perplexity.
- A method's difference to QWHA on the same items: :func:`paired_bootstrap_difference` (one draw of items
  shared by both arms, so item difficulty cancels). Between aggregates only:
  :func:`newcombe_difference` (two proportions) and :func:`mean_of_proportions_difference` (two CSQA
  averages, independent samples): both unpaired, so wider.

Seeds are a replicate axis: an arm is an array ``[seeds, items]``; its estimate is the mean over seeds of
the per-seed statistic, and each bootstrap replicate also resamples the seeds (with replacement,
independently per arm), so the interval covers training noise as well as item sampling. With one seed it
covers item sampling only.

All bootstraps take a seed and are deterministic; percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL: float = 0.95
N_BOOT: int = 2000
STATISTICS: tuple[str, ...] = ("mean", "ppl")


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: allowed values are in (0, 1)")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _check_counts(k: int, n: int) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"binomial counts k={k}, n={n}: need n >= 1 and 0 <= k <= n")


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (clipped to [0, 1])."""
    _check_counts(k, n)
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, n + 1)
    logs = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    m = logs.max()
    return float(min(1.0, math.exp(m) * np.exp(logs - m).sum()))


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial interval of ``k / n``: the p where P(X >= k) and P(X <= k) reach
    (1 - level) / 2, found by bisection on the binomial tail (no beta quantile needed)."""
    _check_counts(k, n)
    alpha = (1 - level) / 2

    def solve(f, target: float) -> float:  # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: _binom_sf(k, n, p), alpha)
    # P(X <= k) = 1 - P(X >= k + 1) decreases in p; solve 1 - P(X <= k) = P(X >= k+1) = 1 - alpha.
    upper = 1.0 if k == n else solve(lambda p: _binom_sf(k + 1, n, p), 1 - alpha)
    return lower, upper


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> tuple[float, float]:
    """Interval of ``k1/n1 - k2/n2`` for independent samples: Newcombe's hybrid score method (1998,
    method 10), built from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, level)
    l2, u2 = wilson_interval(k2, n2, level)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def mean_of_proportions_interval(
    props: Sequence[float], ns: Sequence[int], level: float = LEVEL
) -> tuple[float, float]:
    """Normal interval of the mean of T independent proportions (the CSQA average from each task's
    accuracy ``props[t]`` on ``ns[t]`` documents): variance ``sum p(1-p)/n / T^2``."""
    p, n = np.asarray(props, float), np.asarray(ns, float)
    est = float(p.mean())
    se = math.sqrt(float((p * (1 - p) / n).sum())) / len(p)
    z = _z(level)
    return est - z * se, est + z * se


def mean_of_proportions_difference(
    props1: Sequence[float],
    ns1: Sequence[int],
    props2: Sequence[float],
    ns2: Sequence[int],
    level: float = LEVEL,
) -> tuple[float, float]:
    """Normal interval of the difference of two such means from independent samples (unpaired)."""
    p1, n1 = np.asarray(props1, float), np.asarray(ns1, float)
    p2, n2 = np.asarray(props2, float), np.asarray(ns2, float)
    d = float(p1.mean() - p2.mean())
    se = math.sqrt(
        float((p1 * (1 - p1) / n1).sum()) / len(p1) ** 2 + float((p2 * (1 - p2) / n2).sum()) / len(p2) ** 2
    )
    z = _z(level)
    return d - z * se, d + z * se


@dataclass(frozen=True)
class Arm:
    """One table row's per-item data on a common item axis.

    ``a``: ``[seeds, items]`` values (0/1 correctness, or an item's summed answer nll); ``b``: ``[seeds,
    items]`` denominators for ``stat="ppl"`` (an item's token count), unused for ``"mean"``;
    ``strata``: ``[items]`` integer stratum of each item (the CSQA task), or None for one stratum.

    ``stat="mean"``: the mean over strata of each stratum's mean of ``a`` (one stratum: the plain mean).
    ``stat="ppl"``: ``exp(sum a / sum b)`` (token-weighted perplexity)."""

    a: np.ndarray
    b: np.ndarray | None = None
    strata: np.ndarray | None = None
    stat: str = "mean"

    def __post_init__(self):
        if self.stat not in STATISTICS:
            raise ValueError(f"stat={self.stat!r}: allowed values are {', '.join(STATISTICS)}")
        a = np.atleast_2d(np.asarray(self.a, float))
        object.__setattr__(self, "a", a)
        if self.stat == "ppl":
            if self.b is None:
                raise ValueError("stat='ppl' needs b (tokens per item)")
            b = np.atleast_2d(np.asarray(self.b, float))
            if b.shape != a.shape:
                raise ValueError(f"a {a.shape} and b {b.shape} differ in shape")
            object.__setattr__(self, "b", b)
        strata = np.zeros(a.shape[1], int) if self.strata is None else np.asarray(self.strata, int)
        if strata.shape != (a.shape[1],):
            raise ValueError(f"strata {strata.shape} does not match {a.shape[1]} items")
        object.__setattr__(self, "strata", strata)

    @property
    def n_items(self) -> int:
        return self.a.shape[1]

    @property
    def n_seeds(self) -> int:
        return self.a.shape[0]

    def weights(self) -> np.ndarray:
        """``[items]`` weights w with ``mean = sum_i w_i a_i``: 1 / (number of strata x stratum size)."""
        _, inverse, counts = np.unique(self.strata, return_inverse=True, return_counts=True)
        return 1.0 / (len(counts) * counts[inverse])

    def estimate(self) -> float:
        """The statistic, averaged over seeds."""
        return float(self._stat(np.arange(self.n_items)[None, :], np.arange(self.n_seeds)[None, :])[0])

    def _stat(self, idx: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``[B]`` statistic for item indices ``idx [B, items]`` and seed indices ``seeds [B, S]``: per seed,
        on the resampled items, then averaged over the drawn seeds. ``idx`` must keep each position in its
        stratum (as :func:`resample_items` does), so the weights stay those of the original positions."""
        a = self.a[seeds[:, :, None], idx[:, None, :]]  # [B, S, items]
        if self.stat == "mean":
            per_seed = a @ self.weights()
        else:
            b = self.b[seeds[:, :, None], idx[:, None, :]]
            per_seed = np.exp(a.sum(-1) / b.sum(-1))
        return per_seed.mean(-1)


def resample_items(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, items]`` bootstrap indices; position i draws from the items of its own stratum."""
    strata = np.asarray(strata)
    idx = np.empty((n_boot, len(strata)), dtype=np.int64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return idx


def _resample_seeds(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    if n_seeds == 1:
        return np.zeros((n_boot, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def _stat_chunked(arm: Arm, idx: np.ndarray, seeds: np.ndarray, chunk: int = 128) -> np.ndarray:
    """:meth:`Arm._stat` over ``chunk`` replicates at a time (bounds the ``[B, S, items]`` gather)."""
    return np.concatenate(
        [arm._stat(idx[i : i + chunk], seeds[i : i + chunk]) for i in range(0, len(idx), chunk)]
    )


def _percentile(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_interval(
    arm: Arm, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, tuple[float, float]]:
    """(estimate, percentile interval) of ``arm``'s statistic, resampling items within strata (and seeds)."""
    _z(level)
    rng = np.random.default_rng(seed)
    idx = resample_items(arm.strata, n_boot, rng)
    samples = _stat_chunked(arm, idx, _resample_seeds(arm.n_seeds, n_boot, rng))
    return arm.estimate(), _percentile(samples, level)


def paired_bootstrap_difference(
    arm: Arm, reference: Arm, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, tuple[float, float]]:
    """(estimate, percentile interval) of ``stat(arm) - stat(reference)`` on the same items: every
    replicate draws one set of items for both arms (item ``i`` of one is item ``i`` of the other), and
    each arm's seeds independently."""
    if arm.n_items != reference.n_items or not np.array_equal(arm.strata, reference.strata):
        raise ValueError("paired arms must share their items and strata")
    if arm.stat != reference.stat:
        raise ValueError(f"paired arms compute different statistics ({arm.stat}, {reference.stat})")
    _z(level)
    rng = np.random.default_rng(seed)
    idx = resample_items(arm.strata, n_boot, rng)
    diff = _stat_chunked(arm, idx, _resample_seeds(arm.n_seeds, n_boot, rng)) - _stat_chunked(
        reference, idx, _resample_seeds(reference.n_seeds, n_boot, rng)
    )
    return arm.estimate() - reference.estimate(), _percentile(diff, level)
