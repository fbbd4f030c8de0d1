"""Deletion (perturbation) tests of METHOD §6 and their areas under the curve.

Tokens are ranked by importance; for n = 0..N the image keeps its prefix tokens plus
the n most (negative test) or least (positive test) important image tokens (METHOD §4
token removal: the others are dropped from the sequence after the position embedding).
n = 0 is the prefix only. AUC = trapezoid area of top-1 accuracy over the kept fraction
n/N ∈ [0, 1]; the reference code's normalisation (METHOD §6, its `plots/explainability.py`)
is Σ_{n=1}^{N−1} acc_n / (N · max acc): n = 0 and n = N are left out of the sum.

Every n costs one forward of the batch on a sequence of P + n tokens, so a curve costs
about (N+1)/2 full forwards per method and test (B/16: ~99). `kept_token_counts(N, points)` picks an evenly spaced subset (always with 0 and
N); the AUC is then the trapezoid over those kept fractions.
"""

from __future__ import annotations

from typing import Literal

import torch

from vitlens.lens.families import adapter_for

DeletionTest = Literal["negative", "positive"]
DELETION_TESTS: tuple[str, ...] = ("negative", "positive")


def kept_token_counts(num_image_tokens: int, points: int = 0) -> torch.Tensor:
    """The kept counts n of a curve: every n = 0..N (`points` = 0 or >= N+1), else `points`
    evenly spaced counts from 0 to N (rounded; 0 and N always included).

    # -> [K] int64, increasing
    """
    if points < 0 or points == 1:
        raise ValueError(f"points must be 0 (every n) or >= 2, got {points}")
    if points == 0 or points >= num_image_tokens + 1:
        return torch.arange(num_image_tokens + 1)
    return torch.linspace(0, num_image_tokens, points, dtype=torch.float64).round().long().unique()


def deletion_order(importance: torch.Tensor, test: DeletionTest) -> torch.Tensor:
    """Image-token indices in the order a deletion test keeps them: most important first
    (negative test) or least important first (positive test); ties by lower index.

    # importance: [B, N] -> order: [B, N] int64
    """
    return importance.argsort(dim=1, descending=(test == "negative"), stable=True)


def deletion_predictions(
    model: torch.nn.Module,
    images: torch.Tensor,
    importance: torch.Tensor,
    test: DeletionTest,
    kept_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's top-1 prediction when keeping n tokens, for every kept count n (default 0..N).

    At a given n every image keeps exactly n image tokens; the family adapter's
    `logits_keeping` runs them (ViT: gathered into a shorter sequence, the same outputs as
    excluding the others as attention keys, METHOD §4, at about half the cost).

    # images: [B, 3, H, W], importance: [B, N], kept_counts: [K] -> predictions: [K, B] int64
    """
    adapter = adapter_for(model)
    prefix = adapter.anatomy.num_prefix_tokens
    if kept_counts is None:
        kept_counts = kept_token_counts(importance.shape[1])
    order = deletion_order(importance, test)  # [B, N]
    predictions = []
    with torch.no_grad():
        hidden = adapter.embed(images)  # [B, T0, d] (CaiT / XCiT: the image tokens only)
        for count in kept_counts.tolist():
            kept = order[:, :count].sort(dim=1).values + prefix  # [B, n] positions in the sequence
            predictions.append(adapter.logits_keeping(hidden, kept).argmax(dim=1))
    return torch.stack(predictions)


def curve_auc(accuracy: torch.Tensor, kept_fraction: torch.Tensor | None = None) -> float:
    """Trapezoid area under accuracy over the kept fraction (default n/N for n = 0..N).

    # accuracy: [K], kept_fraction: [K] -> scalar
    """
    if kept_fraction is None:
        kept_fraction = torch.linspace(0.0, 1.0, accuracy.shape[0], dtype=torch.float64)
    return float(torch.trapezoid(accuracy.double(), kept_fraction.double()))


def reference_normalised_auc(
    accuracy: torch.Tensor,
    kept_counts: torch.Tensor | None = None,
    num_image_tokens: int | None = None,
) -> float:
    """The reference code's normalisation Σ_{n=1}^{N−1} acc_n / (N · max acc) (METHOD §6).

    Defined on the points with 1 <= n <= N−1 as `mean(acc_n over those points) · (N−1)/N /
    max(acc over all points)`: exact when every n = 0..N was run, the same estimate from the
    interior points of a subset (`curve_points`). 0 when the accuracy is 0 everywhere or no
    point lies inside. Defaults: `kept_counts` = 0..K−1 and N = K−1 (every n was run).

    # accuracy: [K], kept_counts: [K] int -> scalar
    """
    if kept_counts is None:
        kept_counts = torch.arange(accuracy.shape[0])
    if num_image_tokens is None:
        num_image_tokens = accuracy.shape[0] - 1
    accuracy = accuracy.double().cpu()
    kept_counts = kept_counts.cpu()
    peak = float(accuracy.max())
    inside = (kept_counts >= 1) & (kept_counts <= num_image_tokens - 1)  # [K] bool
    if peak <= 0 or not bool(inside.any()):
        return 0.0
    mean_inside = float(accuracy[inside].mean())
    return mean_inside * (num_image_tokens - 1) / num_image_tokens / peak
