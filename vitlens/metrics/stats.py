"""Statistical tests of the paper (METHOD §3): pure array-in/number-out functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

DEFAULT_PERMUTATIONS = 300


@dataclass(frozen=True)
class TestResult:
    """A test statistic and its p-value."""

    statistic: float
    p_value: float


def wilcoxon_greater(trained: np.ndarray, random: np.ndarray) -> TestResult:
    """One-sided Wilcoxon signed-rank test that `trained` exceeds `random`, paired by position
    (the paper pairs class-value agreement per class). Zero differences are dropped ("wilcox");
    the exact null distribution is used for small samples without ties (scipy's "auto").

    # trained, random: [n] float -> statistic W+ (sum of ranks of positive differences), p-value
    """
    trained, random = np.asarray(trained, dtype=float), np.asarray(random, dtype=float)
    if trained.shape != random.shape or trained.ndim != 1:
        raise ValueError(f"wilcoxon_greater needs two 1-D arrays of one length, got {trained.shape} and {random.shape}")
    if not np.any(trained != random):
        return TestResult(statistic=0.0, p_value=1.0)
    result = scipy_stats.wilcoxon(trained, random, alternative="greater", zero_method="wilcox")
    return TestResult(statistic=float(result.statistic), p_value=float(result.pvalue))


def pooled_rate_difference(successes: np.ndarray, totals: np.ndarray, in_group: np.ndarray) -> float:
    """Pooled rate of the units in the group minus that of the others:
    sum(successes[g]) / sum(totals[g]) - sum(successes[~g]) / sum(totals[~g]).

    # successes, totals: [n] >= 0, in_group: [n] bool -> float
    """
    group = np.asarray(in_group, dtype=bool)
    return float(successes[group].sum() / totals[group].sum() - successes[~group].sum() / totals[~group].sum())


def permutation_test_rate_difference(
    successes: np.ndarray,
    totals: np.ndarray,
    in_group: np.ndarray,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> TestResult:
    """Two-sided permutation test of `pooled_rate_difference`: the units (images, or tokens with
    totals 1) keep their counts and the group labels are shuffled `n_permutations` times.
    p = (1 + #{|permuted| >= |observed|}) / (1 + n_permutations). Needs both groups non-empty.

    # successes, totals: [n], in_group: [n] bool -> statistic (observed difference), p-value
    """
    successes = np.asarray(successes, dtype=float)
    totals = np.asarray(totals, dtype=float)
    group = np.asarray(in_group, dtype=bool)
    if not (successes.shape == totals.shape == group.shape) or successes.ndim != 1:
        raise ValueError("successes, totals and in_group must be 1-D arrays of one length")
    n_in = int(group.sum())
    if n_in == 0 or n_in == group.size:
        raise ValueError("permutation test needs units in both groups")
    observed = pooled_rate_difference(successes, totals, group)
    rng = np.random.default_rng(seed)
    # labels: [n_permutations, n] bool, each row a shuffle of the observed group labels
    labels = np.stack([rng.permutation(group) for _ in range(n_permutations)])
    in_rate = (labels * successes).sum(1) / (labels * totals).sum(1)
    out_rate = (~labels * successes).sum(1) / (~labels * totals).sum(1)
    extreme = np.abs(in_rate - out_rate) >= abs(observed) - 1e-12
    return TestResult(statistic=observed, p_value=float((1 + extreme.sum()) / (1 + n_permutations)))
