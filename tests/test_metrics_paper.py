"""Every metric function against a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from vitlens.metrics import (
    RESIDUAL_MATCH_CATEGORIES,
    class_similarity_change_rate,
    class_value_agreement,
    cls_token_mask,
    compositionality_rate,
    identifiability_rate,
    identifiability_rate_per_image_mean,
    identifiability_score,
    image_token_mask,
    images_with_identifiable_token,
    key_value_agreement_rate,
    labelled_token_mask,
    residual_top1_match,
)

# Two images, CLS + 3 image tokens; image 1 lost its last token (rank fill -1).
RANK = torch.tensor([
    [0, 0, 2, 0],
    [0, 1, 3, -1],
])
PRESENT = torch.tensor([[True, True, True, True], [True, True, True, False]])


def test_token_masks() -> None:
    assert image_token_mask(PRESENT, 1).tolist() == [[False, True, True, True], [False, True, True, False]]
    assert image_token_mask(PRESENT, 0).tolist() == PRESENT.tolist()  # GAP: every token is an image token
    assert cls_token_mask(PRESENT).tolist() == [[True, False, False, False], [True, False, False, False]]
    labels = torch.tensor([[3, 1, 0, 1], [3, 0, 1, 1]])
    assert labelled_token_mask(labels, 1, PRESENT).tolist() == [[False, True, False, True], [False, False, True, False]]


def test_identifiability_score() -> None:
    score = identifiability_score(torch.tensor([0, 1, 9, -1]), num_classes=10)
    assert score[:3].tolist() == pytest.approx([1.0, 0.9, 0.1])
    assert math.isnan(score[3].item())


def test_identifiability_rates_pooled_and_per_image() -> None:
    mask = image_token_mask(PRESENT, 1)
    # image tokens: image 0 ranks (0, 2, 0) -> 2 of 3; image 1 ranks (1, 3) -> 0 of 2
    assert identifiability_rate(RANK, mask).item() == pytest.approx(2 / 5)
    assert identifiability_rate_per_image_mean(RANK, mask).item() == pytest.approx((2 / 3 + 0) / 2)
    assert images_with_identifiable_token(RANK, mask).item() == pytest.approx(0.5)


def test_identifiability_rate_over_extra_axes() -> None:
    rank = torch.stack([RANK, torch.zeros_like(RANK)], dim=1)  # [B=2, blocks=2, T=4]
    mask = image_token_mask(PRESENT, 1)
    assert identifiability_rate(rank, mask).tolist() == pytest.approx([2 / 5, 1.0])
    assert images_with_identifiable_token(rank, mask).tolist() == pytest.approx([0.5, 1.0])


def test_class_similarity_change_rate_split_cls_and_image() -> None:
    output_logit = torch.tensor([[5.0, 1.0, 2.0, 0.0], [1.0, 3.0, 3.0, 9.0]])
    input_logit = torch.tensor([[4.0, 2.0, 1.0, 0.0], [2.0, 2.0, 3.0, 0.0]])
    # increases: image0 tokens 0 (5>4), 2 (2>1); image1 token 1 (3>2); equal does not count
    assert class_similarity_change_rate(output_logit, input_logit, cls_token_mask(PRESENT)).item() == 0.5
    image_mask = image_token_mask(PRESENT, 1)  # image0 tokens 1..3, image1 tokens 1..2
    assert class_similarity_change_rate(output_logit, input_logit, image_mask).item() == pytest.approx(2 / 5)


def test_residual_top1_match_with_composite() -> None:
    resid = torch.tensor([[1, 2, 3, 4]])
    attn = torch.tensor([[1, 0, 0, 0]])
    mlp = torch.tensor([[1, 2, 0, 0]])
    previous = torch.tensor([[0, 2, 0, 7]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    rates = residual_top1_match(resid, attn, mlp, previous, mask)
    assert RESIDUAL_MATCH_CATEGORIES == ("attn", "mlp", "previous_resid", "composite")
    # token 0: attn+mlp; token 1: mlp+previous; tokens 2, 3: none -> composite
    assert rates.tolist() == pytest.approx([0.25, 0.5, 0.25, 0.5])


def test_key_value_agreement_and_compositionality_rates() -> None:
    agreement = torch.tensor([[True, False, True, True]])
    non_compositional = torch.tensor([[True, False, False, True]])
    mask = torch.tensor([[False, True, True, True]])
    assert key_value_agreement_rate(agreement, mask).item() == pytest.approx(2 / 3)
    assert compositionality_rate(non_compositional, mask).item() == pytest.approx(2 / 3)


def test_class_value_agreement_by_hand() -> None:
    class_embedding = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # unit rows: (1, 0), (0, -1)
    values = torch.tensor([[3.0, 1.0], [4.0, 1.0]])  # unit columns: (0.6, 0.8), (0.7071, 0.7071)
    score = class_value_agreement(class_embedding, values)
    assert score.tolist() == pytest.approx([1 / math.sqrt(2), -0.7071067], abs=1e-6)


def test_rates_are_nan_without_selected_tokens() -> None:
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert math.isnan(identifiability_rate(RANK, none).item())
