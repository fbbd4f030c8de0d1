"""Every explanation method on one batch, and the deletion tests comparing them.

`explain_batch` is what the job's `explain` experiment runs per batch: the paper's
block × head gradients, every baseline, and both deletion tests of every method's global
map (METHOD §6), all on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.explain.baselines import baseline_importances
from vitlens.explain.deletion import (
    DELETION_TESTS,
    curve_auc,
    deletion_predictions,
    kept_token_counts,
    reference_normalised_auc,
)
from vitlens.explain.gradients import GradientSource, block_head_importance, global_importance

METHODS: tuple[str, ...] = ("ours", "chefer", "attention", "rollout", "random")


def method_importances(
    model: torch.nn.Module,
    images: torch.Tensor,
    class_index: torch.Tensor,
    source: GradientSource = "resid",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Global token importance of every method in `METHODS` on the same batch.

    # images: [B, 3, H, W], class_index: [B] -> {method: importance [B, N]}
    """
    ours = global_importance(block_head_importance(model, images, class_index, source))
    return {"ours": ours, **baseline_importances(model, images, class_index, seed)}


@dataclass(frozen=True)
class PerturbationCurve:
    """One method's deletion test on a batch: the prediction at every kept count."""

    method: str
    test: str  # "negative" (most important kept first) or "positive" (least important first)
    kept_counts: torch.Tensor  # [K] int64, n image tokens kept (plus the prefix), 0..N
    num_image_tokens: int  # N
    predictions: torch.Tensor  # [K, B] int64
    labels: torch.Tensor  # [B] int64, the true classes

    @property
    def correct(self) -> torch.Tensor:
        """Top-1 correctness per kept count and image. # -> [K, B] bool"""
        return self.predictions == self.labels[None, :].to(self.predictions.device)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """n / N per point. # -> [K] float64"""
        return self.kept_counts.double() / self.num_image_tokens

    @property
    def accuracy(self) -> torch.Tensor:
        """Top-1 accuracy per kept count. # -> [K]"""
        return self.correct.float().mean(dim=1)

    @property
    def auc(self) -> float:
        """Trapezoid AUC over the kept fraction in [0, 1]."""
        return curve_auc(self.accuracy.cpu(), self.kept_fraction.cpu())

    @property
    def reference_auc(self) -> float:
        """The reference code's normalisation Σacc / (K · max acc)."""
        return reference_normalised_auc(self.accuracy)


def perturbation_curves(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    importances: dict[str, torch.Tensor],
    kept_counts: torch.Tensor | None = None,
) -> list[PerturbationCurve]:
    """Negative and positive deletion tests for every method's importance.

    # images: [B, 3, H, W], labels: [B], importances: {method: [B, N]}, kept_counts: [K] -> curves
    """
    num_image_tokens = next(iter(importances.values())).shape[1]
    if kept_counts is None:
        kept_counts = kept_token_counts(num_image_tokens)
    return [
        PerturbationCurve(method, test, kept_counts.cpu(), num_image_tokens,
                          deletion_predictions(model, images, importance, test, kept_counts), labels)
        for method, importance in importances.items()
        for test in DELETION_TESTS
    ]


@dataclass(frozen=True)
class ExplainBatch:
    """Everything the `explain` experiment keeps of one batch."""

    class_of_interest: torch.Tensor  # [B] int64
    block_head: torch.Tensor  # [B, L, H, N] the paper's importance per block and head
    baselines: dict[str, torch.Tensor]  # {method: [B, N]} global maps of the baselines
    curves: list[PerturbationCurve]  # every method in METHODS x both tests


def explain_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: str = "true",
    source: GradientSource = "resid",
    curve_points: int = 0,
    seed: int = 0,
) -> ExplainBatch:
    """The paper's gradients, every baseline and every deletion curve on one batch.

    `target` picks the class of interest: "true" (the label) or "predicted" (the model's
    top-1). The deletion tests always score against the true label. `curve_points` = 0
    evaluates every kept count n = 0..N, else that many evenly spaced counts.

    # images: [B, 3, H, W], labels: [B] -> ExplainBatch
    """
    num_classes = model.num_classes
    if labels.shape != images.shape[:1] or bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must hold one class in [0, {num_classes}) per image, got {labels.tolist()}")
    if target == "true":
        class_of_interest = labels
    elif target == "predicted":
        with torch.no_grad():
            class_of_interest = model(images).argmax(dim=1)
    else:
        raise ValueError(f"target must be 'true' or 'predicted', got {target!r}")
    block_head = block_head_importance(model, images, class_of_interest, source)
    baselines = baseline_importances(model, images, class_of_interest, seed)
    importances = {"ours": global_importance(block_head), **baselines}
    kept_counts = kept_token_counts(block_head.shape[-1], curve_points)
    curves = perturbation_curves(model, images, labels, importances, kept_counts)
    return ExplainBatch(class_of_interest, block_head, baselines, curves)
