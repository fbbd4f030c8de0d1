"""Precision settings: fp32 and tf32 on the CPU change nothing; bf16 keeps the tables'
shapes and fill values and agrees with fp32 on most top-1 classes (ranks from fp32 logits)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.lens import Lens


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=20).eval()


def test_fp32_and_tf32_on_the_cpu_equal_the_default() -> None:
    model, images, labels = tiny_vit(), torch.randn(3, 3, 32, 32), torch.tensor([1, 5, 9])
    reference = Lens(model).run(images, labels)
    for precision in ("fp32", "tf32"):
        out = Lens(model, precision=precision).run(images, labels)
        assert torch.equal(out.rank, reference.rank) and torch.equal(out.topk_class, reference.topk_class)
        torch.testing.assert_close(out.correct_logit, reference.correct_logit, rtol=0, atol=0, equal_nan=True)


def test_bf16_forward_keeps_fp32_outputs_and_mostly_agrees() -> None:
    model, images, labels = tiny_vit(), torch.randn(4, 3, 32, 32), torch.tensor([1, 5, 9, 2])
    reference = Lens(model).run(images, labels)
    out = Lens(model, precision="bf16").run(images, labels)
    assert out.correct_logit.dtype == torch.float32 and out.topk_logit.dtype == torch.float32
    assert torch.equal(out.rank == -1, reference.rank == -1)  # the same slots exist
    exists = reference.rank >= 0
    agreement = (out.topk_class[..., 0] == reference.topk_class[..., 0])[exists].float().mean()
    assert agreement > 0.8
    # bf16 really ran: something differs from fp32
    assert not torch.equal(out.correct_logit[exists], reference.correct_logit[exists])


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        Lens(tiny_vit(), precision="fp16")  # type: ignore[arg-type]
