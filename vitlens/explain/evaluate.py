"""Every explanation method on one batch, and the deletion-test AUC table comparing them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.explain.baselines import baseline_importances
from vitlens.explain.deletion import DELETION_TESTS, curve_auc, deletion_curve, reference_normalised_auc
from vitlens.explain.gradients import GradientSource, block_head_importance, global_importance

METHODS: tuple[str, ...] = ("ours", "chefer", "attention", "rollout", "random")


def method_importances(
    model: VisionTransformer,
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
    """Top-1 correctness of one method's deletion test on a batch."""

    method: str
    test: str  # "negative" (most important kept first) or "positive" (least important first)
    correct: torch.Tensor  # [N+1, B] bool, row n = prefix + n kept image tokens

    @property
    def accuracy(self) -> torch.Tensor:
        """Top-1 accuracy per kept count. # -> [N+1]"""
        return self.correct.float().mean(dim=1)

    @property
    def auc(self) -> float:
        """Trapezoid AUC over the kept fraction in [0, 1]."""
        return curve_auc(self.accuracy)

    @property
    def reference_auc(self) -> float:
        """The reference code's normalisation Σacc / ((N+1) · max acc)."""
        return reference_normalised_auc(self.accuracy)


def perturbation_curves(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    importances: dict[str, torch.Tensor],
) -> list[PerturbationCurve]:
    """Negative and positive deletion tests for every method's importance.

    # images: [B, 3, H, W], labels: [B], importances: {method: [B, N]} -> curves
    """
    return [
        PerturbationCurve(method, test, deletion_curve(model, images, labels, importance, test))
        for method, importance in importances.items()
        for test in DELETION_TESTS
    ]
