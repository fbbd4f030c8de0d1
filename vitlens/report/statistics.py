"""The paper's statistical tests on query results (inputs from queries/stats/*.sql).

Each function takes the Arrow result of one stats query and returns one Arrow table of
test results, one row per group; the tests themselves are `vitlens.metrics.stats`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from vitlens.metrics.stats import (
    DEFAULT_PERMUTATIONS,
    permutation_test_rate_difference,
    wilcoxon_greater,
)


def class_value_agreement_wilcoxon(pairs: pa.Table) -> pa.Table:
    """One-sided Wilcoxon (trained > random twin, paired by class) per variant x block x sub-layer.

    `pairs`: stats/class_value_agreement_pairs.sql. Columns out: variant, block, sublayer,
    classes, mean_agreement, random_mean_agreement, wilcoxon_w, p_value.
    """
    rows = []
    frame = pl.from_arrow(pairs)
    for (variant, block, sublayer), group in frame.group_by(["variant", "block", "sublayer"], maintain_order=True):
        trained = group["agreement"].to_numpy()
        random = group["random_agreement"].to_numpy()
        test = wilcoxon_greater(trained, random)
        rows.append({
            "variant": variant, "block": block, "sublayer": sublayer, "classes": len(group),
            "mean_agreement": float(trained.mean()), "random_mean_agreement": float(random.mean()),
            "wilcoxon_w": test.statistic, "p_value": test.p_value,
        })
    return _table(rows, ["variant", "block", "sublayer", "classes", "mean_agreement",
                         "random_mean_agreement", "wilcoxon_w", "p_value"])


def kv_agreement_correct_vs_misclassified(per_image: pa.Table, n_permutations: int = DEFAULT_PERMUTATIONS) -> pa.Table:
    """Permutation test (images shuffled between correct and misclassified) of the pooled
    key-value agreement rate per variant x block x sub-layer.

    `per_image`: stats/kv_agreement_per_image.sql. Columns out: variant, block, sublayer,
    correct_images, misclassified_images, correct_pct, misclassified_pct, p_value
    (p_value null when one group is empty).
    """
    rows = []
    frame = pl.from_arrow(per_image)
    for (variant, block, sublayer), group in frame.group_by(["variant", "block", "sublayer"], maintain_order=True):
        correct = group["correct"].to_numpy().astype(bool)
        agreeing = group["agreeing"].to_numpy().astype(float)
        tokens = group["tokens"].to_numpy().astype(float)
        both = 0 < correct.sum() < correct.size
        rows.append({
            "variant": variant, "block": block, "sublayer": sublayer,
            "correct_images": int(correct.sum()), "misclassified_images": int((~correct).sum()),
            "correct_pct": _pooled_pct(agreeing[correct], tokens[correct]),
            "misclassified_pct": _pooled_pct(agreeing[~correct], tokens[~correct]),
            "p_value": permutation_test_rate_difference(agreeing, tokens, correct, n_permutations).p_value if both else None,
        })
    return _table(rows, ["variant", "block", "sublayer", "correct_images", "misclassified_images",
                         "correct_pct", "misclassified_pct", "p_value"])


def class_vs_context_tokens(per_label: pa.Table, n_permutations: int = DEFAULT_PERMUTATIONS) -> pa.Table:
    """Permutation test (token labels shuffled) of class- vs context-labelled identifiability
    in the last block, per variant.

    `per_label`: stats/class_context_last_block.sql (identifiable and total tokens per
    variant × label; the tokens are expanded to 0/1 values, identifiable ones first, since a
    permutation of labels over tokens depends only on these counts). Columns out: variant,
    class_tokens, context_tokens, class_pct, context_pct, p_value (null when one label has
    no tokens).
    """
    rows = []
    frame = pl.from_arrow(per_label)
    for (variant,), group in frame.group_by(["variant"], maintain_order=True):
        counts = group.select("label", "identifiable", "tokens").rows()
        is_class = np.concatenate([np.full(int(tokens), label == "class") for label, _, tokens in counts])
        identifiable = np.concatenate([
            (np.arange(int(tokens)) < int(hits)).astype(float) for _, hits, tokens in counts])
        ones = np.ones_like(identifiable)
        both = 0 < is_class.sum() < is_class.size
        rows.append({
            "variant": variant, "class_tokens": int(is_class.sum()), "context_tokens": int((~is_class).sum()),
            "class_pct": _pooled_pct(identifiable[is_class], ones[is_class]),
            "context_pct": _pooled_pct(identifiable[~is_class], ones[~is_class]),
            "p_value": permutation_test_rate_difference(identifiable, ones, is_class, n_permutations).p_value if both else None,
        })
    return _table(rows, ["variant", "class_tokens", "context_tokens", "class_pct", "context_pct", "p_value"])


def _pooled_pct(successes: np.ndarray, totals: np.ndarray) -> float | None:
    return float(100 * successes.sum() / totals.sum()) if totals.sum() > 0 else None


def _table(rows: list[dict], columns: list[str]) -> pa.Table:
    if not rows:
        return pa.table({name: pa.array([], type=pa.null()) for name in columns})
    return pa.Table.from_pylist(rows).select(columns)
