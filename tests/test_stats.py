"""The statistical tests (vitlens.metrics.stats) and their report tables against hand computations."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pyarrow as pa
import pytest

from vitlens.metrics.stats import permutation_test_rate_difference, pooled_rate_difference, wilcoxon_greater
from vitlens.report.statistics import (
    class_value_agreement_wilcoxon,
    class_vs_context_tokens,
    kv_agreement_correct_vs_misclassified,
)


def test_wilcoxon_all_positive_is_one_over_two_to_the_n():
    result = wilcoxon_greater(np.array([1.1, 2.2, 3.3, 4.4]), np.zeros(4))
    assert result.statistic == 10 and result.p_value == pytest.approx(1 / 16)


def test_wilcoxon_exact_tail_by_hand():
    # differences 1, 2, 3, 4, -0.5 -> signed ranks +2 +3 +4 +5 -1, W+ = 14; P(W+ >= 14) = #{subsets of
    # {1..5} with sum >= 14} / 32 = #{complements with sum <= 1} / 32 = 2 / 32
    result = wilcoxon_greater(np.array([1.0, 2.0, 3.0, 4.0, 0.0]), np.array([0.0, 0.0, 0.0, 0.0, 0.5]))
    assert result.statistic == 14 and result.p_value == pytest.approx(2 / 32)


def test_wilcoxon_trained_below_random_is_not_significant_and_equal_is_one():
    assert wilcoxon_greater(np.zeros(5), np.arange(1.0, 6.0)).p_value == pytest.approx(1.0)
    assert wilcoxon_greater(np.ones(3), np.ones(3)).p_value == 1.0
    with pytest.raises(ValueError):
        wilcoxon_greater(np.ones(3), np.ones(4))


def test_pooled_rate_difference_by_hand():
    assert pooled_rate_difference(np.array([3.0, 1.0, 0.0]), np.array([4.0, 2.0, 2.0]),
                                  np.array([True, False, False])) == pytest.approx(0.75 - 0.25)


def exact_permutation_p(successes: np.ndarray, totals: np.ndarray, group: np.ndarray) -> float:
    """Fraction of ALL relabellings (same group size) with |difference| >= the observed one."""
    observed = abs(pooled_rate_difference(successes, totals, group))
    hits = count = 0
    for chosen in combinations(range(group.size), int(group.sum())):
        labels = np.zeros(group.size, dtype=bool)
        labels[list(chosen)] = True
        hits += abs(pooled_rate_difference(successes, totals, labels)) >= observed - 1e-12
        count += 1
    return hits / count


def test_permutation_test_matches_full_enumeration():
    successes = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    group = np.array([True, True, True, False, False, False])
    assert exact_permutation_p(successes, np.ones(6), group) == pytest.approx(2 / 20)
    result = permutation_test_rate_difference(successes, np.ones(6), group, n_permutations=4000, seed=1)
    assert result.statistic == pytest.approx(1.0)
    assert result.p_value == pytest.approx(0.1, abs=0.015)
    rng = np.random.default_rng(3)
    totals = rng.integers(3, 9, size=8).astype(float)
    successes = np.floor(totals * rng.uniform(size=8))
    group = np.array([True] * 4 + [False] * 4)
    exact = exact_permutation_p(successes, totals, group)
    result = permutation_test_rate_difference(successes, totals, group, n_permutations=4000, seed=2)
    assert result.p_value == pytest.approx(exact, abs=0.02)


def test_permutation_default_is_300_and_p_never_zero():
    result = permutation_test_rate_difference(np.r_[np.ones(30), np.zeros(30)], np.ones(60), np.arange(60) < 30)
    assert result.p_value == pytest.approx(1 / 301)
    with pytest.raises(ValueError):
        permutation_test_rate_difference(np.ones(3), np.ones(3), np.ones(3, dtype=bool))


def test_report_wilcoxon_table():
    pairs = pa.table({"variant": ["m"] * 4, "block": [1] * 4, "sublayer": ["mlp"] * 4, "class_index": [0, 1, 2, 3],
                      "agreement": [0.5, 0.6, 0.7, 0.8], "random_agreement": [0.4, 0.4, 0.4, 0.4]})
    (row,) = class_value_agreement_wilcoxon(pairs).to_pylist()
    assert row["classes"] == 4 and row["mean_agreement"] == pytest.approx(0.65)
    assert row["random_mean_agreement"] == pytest.approx(0.4) and row["p_value"] == pytest.approx(1 / 16)


def test_report_permutation_tables():
    per_image = pa.table({"variant": ["m"] * 4 + ["r"] * 2, "block": [1] * 6, "sublayer": ["attn"] * 6,
                          "image_key": list("abcdef"), "correct": [True, True, False, False, False, False],
                          "agreeing": [4, 3, 1, 0, 2, 2], "tokens": [4, 4, 4, 4, 4, 4]})
    rows = {r["variant"]: r for r in kv_agreement_correct_vs_misclassified(per_image).to_pylist()}
    assert rows["m"]["correct_pct"] == pytest.approx(100 * 7 / 8)
    assert rows["m"]["misclassified_pct"] == pytest.approx(100 * 1 / 8)
    assert 0 < rows["m"]["p_value"] <= 1
    assert rows["r"]["correct_pct"] is None and rows["r"]["p_value"] is None
    per_label = pa.table({"variant": ["m"] * 2, "label": ["class", "context"],  # tokens 1,1 and 0,0,1
                          "identifiable": [2, 1], "tokens": [2, 3]})
    (row,) = class_vs_context_tokens(per_label).to_pylist()
    assert (row["class_tokens"], row["context_tokens"]) == (2, 3)
    assert row["class_pct"] == pytest.approx(100.0) and row["context_pct"] == pytest.approx(100 / 3)
