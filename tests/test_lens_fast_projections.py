"""`projections = "fast"`: bf16 logits with a rigorous bound, near ties in fp32 — the fp32
path's ranks, correct logits and top-k classes and logits, bit for bit (issue 22, item 5)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.lens import Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.projection import CPU_BF16, ExactProjection, FastProjection, exact_logits, reproduces_full_gemm
from vitlens.models import load_variant
from vitlens.runner.spec import ResourceSpec

from tests.family_checks import tiny

FIELDS = ("rank", "correct_logit", "topk_class", "topk_logit")


def assert_same(out: object, reference: object) -> None:
    """Bitwise equality of the four reductions (NaN fill values equal to NaN)."""
    for name in FIELDS:
        got, expected = getattr(out, name), getattr(reference, name)
        assert got.dtype == expected.dtype, name
        if got.is_floating_point():
            got, expected = got.view(torch.int32), expected.view(torch.int32)  # the bits, NaN included
        assert torch.equal(got, expected), name


def fast_and_fp32(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> FastProjection:
    """Run both lenses, assert equal outputs, return the fast projection (its statistics)."""
    reference = Lens(model, memory_flags=False, input_logits=False).run(images, labels)
    lens = Lens(model, projections="fast", memory_flags=False, input_logits=False)
    assert isinstance(lens.projection, FastProjection) and lens.projection.enabled
    assert_same(lens.run(images, labels), reference)
    return lens.projection


def test_recomputed_rows_and_classes_are_the_full_gemms_here() -> None:
    """The premise of the recompute, on this machine's BLAS (else "fast" falls back to fp32)."""
    assert reproduces_full_gemm(64, 20, torch.device("cpu"))
    assert reproduces_full_gemm(768, 1000, torch.device("cpu"))


@pytest.mark.parametrize("name", ["shapes_vit_p16", "shapes_vit_gap_p8"])
def test_fast_equals_fp32_on_the_zoo(name: str) -> None:
    variant = load_variant(name)
    size = variant.data_config["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, size, size, generator=generator)
    stats = fast_and_fp32(variant.model, images, torch.tensor([0, 7, 19])).stats
    assert stats.rows < stats.tokens  # the decided (not recomputed) path ran


def test_fast_equals_fp32_on_a_random_timm_model_with_many_classes() -> None:
    model = tiny(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                           num_classes=300, reg_tokens=1), seed=3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stats = fast_and_fp32(model, images, torch.tensor([0, 17, 299, 150])).stats
    assert stats.rows < stats.tokens  # decided from the union's fp32 values, not whole rows


def test_fast_equals_fp32_with_a_bf16_forward_and_removed_tokens() -> None:
    """The projection's arithmetic is independent of the forward's, and of removed tokens."""
    model = tiny(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                           num_classes=120), seed=4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    labels, keep = torch.tensor([0, 60, 119]), torch.rand(3, 16, generator=torch.Generator().manual_seed(7)) > 0.3
    reference = Lens(model, precision="bf16").run(images, labels, token_keep=keep)
    assert_same(Lens(model, precision="bf16", projections="fast").run(images, labels, token_keep=keep), reference)


def adversarial_model() -> VisionTransformer:
    """A head with exact duplicate rows, rows one ulp apart and a few dominant classes."""
    model = tiny(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                           num_classes=64), seed=5)
    with torch.no_grad():
        weight, bias = model.head.weight, model.head.bias
        weight[1], bias[1] = weight[0], bias[0]  # exact ties with class 0 (and the label below)
        weight[2], bias[2] = weight[0], bias[0]
        weight[3] = weight[0]
        bias[3] = torch.nextafter(bias[0], torch.tensor(float("inf")))  # one ulp above, before rounding
        weight[4] = torch.nextafter(weight[0], weight[0] * 2)  # every weight one ulp larger
        bias[4] = bias[0]
        weight[10:14] = weight[10:14] * 8  # dominant classes: most tokens decided from bf16
    return model


def test_fast_equals_fp32_on_exact_and_one_ulp_ties() -> None:
    model = adversarial_model()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fast_and_fp32(model, images, torch.tensor([0, 1, 2, 3, 4, 11]))


def test_fast_equals_fp32_on_huge_and_tiny_tokens() -> None:
    """Hidden states far from the model's scale, through the two projections directly."""
    model = adversarial_model()
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 8, 32, generator=generator)
    hidden[0] *= 1e30  # the norm takes the scale out: ties remain
    hidden[1, :4] = 1e-30 * hidden[1, :4]
    with torch.no_grad():
        model.norm.weight[:3] = 1e18  # huge normed tokens: the bound is huge, rows recomputed
        model.norm.weight[3:6] = 1e-38  # subnormal products
    labels = torch.tensor([0, 3, 4, 12])
    fast = FastProjection(adapter, 5)
    with torch.inference_mode():
        assert_same(fast.reduce(hidden, labels), ExactProjection(adapter, 5).reduce(hidden, labels))
    assert fast.stats.rows > 0


def test_bound_holds_against_float64() -> None:
    """|bf16 logits - fp32 logits| <= e_t, with e_t checked against exact float64 dot products
    on inputs at bf16 rounding midpoints (the worst rounding)."""
    generator = torch.Generator().manual_seed(4)
    width, classes = 256, 40
    bf16 = torch.randn(64, width, generator=generator).to(torch.bfloat16).float()
    ulp = torch.finfo(torch.bfloat16).eps * bf16.abs()
    x = (bf16 + ulp / 2 * torch.sign(torch.randn(64, width, generator=generator))).abs()  # all positive
    weight = torch.randn(classes, width, generator=generator).abs()  # no cancellation: the bound is tight
    bias = torch.randn(classes, generator=generator)
    model = tiny(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=width, depth=1, num_heads=2,
                                           num_classes=classes), seed=0)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    fast = FastProjection(adapter_for(model), 5)
    assert fast.low == CPU_BF16
    with torch.inference_mode():
        low = fast.low_logits(x)
        half = fast.token_bound(x, low)[:, None] / 2  # e_t
        exact = x.double() @ weight.double().T + bias.double()
        fp32 = exact_logits(x, weight, bias)
    assert bool(((low.double() - exact).abs() <= half.double()).all())
    assert bool(((low - fp32).abs() <= 2 * half).all())
    assert float(((low.double() - exact).abs() / half.double()).max()) > 0.05  # the bound is not vacuous


def test_projections_setting_is_checked() -> None:
    with pytest.raises(UserError, match="unknown projections 'bf16'"):
        Lens(adversarial_model(), projections="bf16")
    with pytest.raises(UserError, match="projections"):
        ResourceSpec(projections="fp16")
    assert ResourceSpec(projections="fast").projections == "fast"
