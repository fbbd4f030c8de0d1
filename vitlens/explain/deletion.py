"""Deletion (perturbation) tests of METHOD §6 and their areas under the curve.

Tokens are ranked by importance; for n = 0..N the image keeps its prefix tokens plus
the n most (negative test) or least (positive test) important image tokens, removed
tokens being excluded as attention keys (METHOD §4, `vitlens.lens.forward`). n = 0 is the
prefix only. AUC = trapezoid area of top-1 accuracy over the kept fraction n/N ∈ [0, 1];
the reference code's normalisation is Σ_n acc_n / ((N+1) · max_n acc_n).
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.lens.anatomy import describe_model
from vitlens.lens.forward import embed, iter_block_traces, model_logits

DeletionTest = Literal["negative", "positive"]
DELETION_TESTS: tuple[str, ...] = ("negative", "positive")


def keep_masks(importance: torch.Tensor, test: DeletionTest, num_prefix_tokens: int) -> torch.Tensor:
    """Key-keep masks for every n = 0..N: prefix plus the n first tokens in the test's order.

    Negative test: most important first; positive test: least important first (ties by index).

    # importance: [B, N] -> key_keep: [N+1, B, P+N] bool
    """
    batch, num_image_tokens = importance.shape
    order = importance.argsort(dim=1, descending=(test == "negative"), stable=True)  # [B, N]
    position = order.argsort(dim=1)  # [B, N] rank of each token in the order
    kept_count = torch.arange(num_image_tokens + 1, device=importance.device)  # [N+1]
    image_keep = position[None, :, :] < kept_count[:, None, None]  # [N+1, B, N]
    prefix_keep = torch.ones(num_image_tokens + 1, batch, num_prefix_tokens, dtype=torch.bool,
                             device=importance.device)
    return torch.cat([prefix_keep, image_keep], dim=2)


def deletion_curve(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    importance: torch.Tensor,
    test: DeletionTest,
) -> torch.Tensor:
    """Correctness of the model's top-1 prediction when keeping n = 0..N tokens.

    # images: [B, 3, H, W], labels: [B], importance: [B, N] -> correct: [N+1, B] bool
    """
    anatomy = describe_model(model)
    masks = keep_masks(importance, test, anatomy.num_prefix_tokens)  # [N+1, B, T]
    correct = []
    with torch.no_grad():
        hidden = embed(model, images, anatomy)
        for key_keep in masks:
            resid = hidden
            for trace in iter_block_traces(model, hidden, anatomy, key_keep=key_keep):
                resid = trace.resid_post
            correct.append(model_logits(model, resid, key_keep).argmax(dim=1) == labels)
    return torch.stack(correct)


def curve_auc(accuracy: torch.Tensor) -> float:
    """Trapezoid area under accuracy over the kept fraction n/N, n = 0..N.

    # accuracy: [N+1] -> scalar
    """
    fraction = torch.linspace(0.0, 1.0, accuracy.shape[0], dtype=torch.float64)
    return float(torch.trapezoid(accuracy.double(), fraction))


def reference_normalised_auc(accuracy: torch.Tensor) -> float:
    """The reference code's normalisation Σ acc / ((N+1) · max acc) (0 when accuracy is all 0).

    # accuracy: [N+1] -> scalar
    """
    peak = float(accuracy.max())
    return float(accuracy.double().sum()) / (accuracy.shape[0] * peak) if peak > 0 else 0.0
