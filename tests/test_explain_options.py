"""Beyond-paper options of the §7 gradients (`ln="frozen"`, `loss="logit"`), the random
baseline as the mean over R orders, and METHOD §6's reference normalisation.

Gradients are checked against an independent per-block `torch.autograd.grad` on the full
graph with the final norm and the head written out here (the norm's scale `.detach()`ed for
`ln="frozen"`); the paper's default against the same reference with a live norm and the CE.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, RmsNorm
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.explain.baselines import random_importance
from vitlens.explain.deletion import curve_auc, deletion_predictions, reference_normalised_auc
from vitlens.explain.evaluate import (
    METHODS,
    PerturbationCurve,
    explain_batch,
    ours_method_name,
)
from vitlens.explain.gradients import block_head_importance, frozen_final_norm, global_importance
from vitlens.lens.anatomy import describe_model
from vitlens.lens.forward import embed, iter_block_traces
from vitlens.store.explain_records import explain_table, perturbation_curves_table


def tiny_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).eval()
    with torch.no_grad():  # non-trivial affine parameters in the final norms
        for name in ("norm", "fc_norm"):
            norm = getattr(model, name)
            if getattr(norm, "weight", None) is not None:
                norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.5, 0.5)
    return model


def norm_by_hand(norm: torch.nn.Module, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    """LayerNorm / RmsNorm written out; with `frozen` the per-token scale is detached.

    # x: [B, d] -> [B, d]
    """
    if isinstance(norm, torch.nn.Identity):
        return x
    if isinstance(norm, torch.nn.LayerNorm):
        centred = x - x.mean(dim=-1, keepdim=True)
        scale = 1.0 / torch.sqrt((centred ** 2).mean(dim=-1, keepdim=True) + norm.eps)
        return centred * (scale.detach() if frozen else scale) * norm.weight + norm.bias
    assert isinstance(norm, RmsNorm)
    scale = 1.0 / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + norm.eps)
    return x * (scale.detach() if frozen else scale) * norm.weight


def per_block_autograd(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, source: str,
                       frozen: bool, loss: str) -> torch.Tensor:
    """Independent reference: full graph, one autograd.grad per block on that block's loss only,
    the head path `head(fc_norm(norm(x)))` written out."""
    anatomy = describe_model(model)
    with torch.enable_grad():
        hidden = embed(model, images, anatomy)
        traces = list(iter_block_traces(model, hidden, anatomy, need_probs=True))
        per_block = []
        for trace in traces:
            stream = (trace.resid_post if source == "resid" else trace.attn_out)[:, 0]  # [B, d]
            normed = norm_by_hand(model.fc_norm, norm_by_hand(model.norm, stream, frozen), frozen)
            logits = normed @ model.head.weight.T + model.head.bias  # [B, C]
            if loss == "ce":
                block_loss = F.cross_entropy(logits, labels, reduction="sum")
            else:
                block_loss = -logits[torch.arange(len(labels)), labels].sum()
            (grad,) = torch.autograd.grad(block_loss, trace.attn_probs, retain_graph=True)
            per_block.append(-grad[:, :, 0, anatomy.num_prefix_tokens:])
    return torch.stack(per_block, 1)  # [B, L, H, N]


MODELS = {
    "layernorm": {},
    "rmsnorm": {"norm_layer": RmsNorm},
    "fc_norm": {"fc_norm": True},  # CLS pooling with the norm after pooling: model.norm is Identity
}


@pytest.mark.parametrize("source", ["resid", "attn"])
@pytest.mark.parametrize("ln, loss", [("frozen", "ce"), ("live", "logit"), ("frozen", "logit")])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_options_equal_per_block_autograd(model_name: str, ln: str, loss: str, source: str) -> None:
    model = tiny_vit(**MODELS[model_name])
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    ours = block_head_importance(model, images, labels, source, ln=ln, loss=loss)
    reference = per_block_autograd(model, images, labels, source, frozen=(ln == "frozen"), loss=loss)
    assert ours.shape == (3, 3, 2, 16)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    # the option changes the gradients: the paper's own reference differs
    paper = per_block_autograd(model, images, labels, source, frozen=False, loss="ce")
    assert not torch.allclose(ours, paper, atol=1e-4)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_defaults_are_the_papers_gradients(model_name: str) -> None:
    model = tiny_vit(**MODELS[model_name])
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 5, 9])
    default = block_head_importance(model, images, labels)
    explicit = block_head_importance(model, images, labels, "resid", ln="live", loss="ce")
    assert torch.equal(default, explicit)
    torch.testing.assert_close(default, per_block_autograd(model, images, labels, "resid", False, "ce"),
                               atol=1e-6, rtol=1e-5)


def test_frozen_norm_keeps_values_and_restores_the_modules() -> None:
    model = tiny_vit()
    x = torch.randn(4, 32)
    live = model.norm(x)
    with frozen_final_norm(model):
        frozen = model.norm(x)
        assert "forward" in model.norm.__dict__
    torch.testing.assert_close(frozen, live, atol=1e-6, rtol=1e-5)
    assert "forward" not in model.norm.__dict__
    assert model.blocks[0].norm1.__dict__.get("forward") is None  # the blocks' norms are never touched


def test_unknown_final_norm_is_named() -> None:
    class OddNorm(LayerNorm):
        pass

    model = tiny_vit()
    model.norm = OddNorm(32)
    with pytest.raises(UserError, match="OddNorm"):
        block_head_importance(model, torch.randn(1, 3, 32, 32), torch.tensor([0]), ln="frozen")
    block_head_importance(model, torch.randn(1, 3, 32, 32), torch.tensor([0]))  # the paper's needs no swap


def test_method_names_and_bad_options() -> None:
    assert ours_method_name() == ours_method_name("live", "ce") == "ours"
    assert ours_method_name("frozen", "ce") == "ours[ln=frozen]"
    assert ours_method_name("live", "logit") == "ours[loss=logit]"
    assert ours_method_name("frozen", "logit") == "ours[ln=frozen,loss=logit]"
    with pytest.raises(UserError, match="ln"):
        ours_method_name("fixed", "ce")
    with pytest.raises(UserError, match="loss"):
        block_head_importance(tiny_vit(), torch.randn(1, 3, 32, 32), torch.tensor([0]), loss="mse")


@pytest.fixture(scope="module")
def variant_batch() -> tuple:
    model = tiny_vit()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    return model, images, labels, explain_batch(model, images, labels, ln="frozen", loss="logit", seed=11,
                                                random_orders=5)


def test_variant_is_a_method_beside_the_papers(variant_batch: tuple) -> None:
    model, images, labels, result = variant_batch
    name = "ours[ln=frozen,loss=logit]"
    # ours stays the paper's method, bit for bit, and close to the independent reference
    assert torch.equal(result.block_head, block_head_importance(model, images, labels))
    torch.testing.assert_close(result.block_head, per_block_autograd(model, images, labels, "resid", False, "ce"),
                               atol=1e-6, rtol=1e-5)
    reference = per_block_autograd(model, images, labels, "resid", True, "logit")
    torch.testing.assert_close(result.variants[name], reference.sum(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    assert {(c.method, c.test) for c in result.curves} == {(m, t) for m in (*METHODS, name)
                                                           for t in ("negative", "positive")}
    keys = [f"k{i}" for i in range(4)]
    token_label = torch.zeros(4, 17, dtype=torch.int8)
    rows = explain_table(result, keys, token_label, torch.zeros(4, 17), 1).to_pylist()
    variant_rows = [r for r in rows if r["method"] == name]
    assert len(variant_rows) == 4 * 16 and all(r["block"] is None for r in variant_rows)
    by_key = {(r["image_key"], r["token"]): r["importance"] for r in variant_rows}
    assert by_key["k2", 5] == pytest.approx(float(reference[2, :, :, 4].sum()), abs=1e-5)
    curve_methods = {r["method"] for r in perturbation_curves_table(result.curves, keys).to_pylist()}
    assert curve_methods == {*METHODS, name}


def test_default_batch_has_no_variant() -> None:
    model = tiny_vit()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    result = explain_batch(model, images, labels, random_orders=1)
    assert result.variants == {}
    assert {c.method for c in result.curves} == set(METHODS)
    torch.testing.assert_close(global_importance(result.block_head),
                               per_block_autograd(model, images, labels, "resid", False, "ce").sum(dim=(1, 2)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="random_orders"):
        explain_batch(model, images, labels, random_orders=0)


def test_random_baseline_is_the_mean_over_distinct_orders(variant_batch: tuple) -> None:
    model, images, labels, result = variant_batch
    orders = result.random_orders  # [R, B, N]
    assert orders.shape == (5, 4, 16)
    assert torch.equal(orders.sort(dim=2).values, torch.arange(16.0).expand(5, 4, 16))  # permutations
    for image in range(4):
        assert len({tuple(order[image].tolist()) for order in orders}) == 5  # distinct per image
    # order 0 is the single seeded order of before, and the explain rows' map
    assert torch.equal(orders[0], random_importance(4, 16, seed=11))
    assert torch.equal(result.baselines["random"], orders[0])
    random = [c for c in result.curves if c.method == "random"]
    assert sorted((c.order, c.test) for c in random) == [(o, t) for o in range(5) for t in ("negative", "positive")]
    for order in range(5):
        negative, positive = (c for c in random if c.order == order)
        assert torch.equal(negative.predictions, positive.predictions)  # computed once, stored for both tests
        # keeping the highest ranks first == keeping the lowest of the reversed ranks first
        again = deletion_predictions(model, images, 15 - orders[order], "positive", negative.kept_counts)
        assert torch.equal(negative.predictions, again)
    per_test = [c for c in random if c.test == "negative"]
    mean = torch.stack([c.correct.double().mean(dim=1) for c in per_test]).mean(dim=0)  # the mean curve
    fraction = per_test[0].kept_fraction
    assert curve_auc(mean, fraction) == pytest.approx(sum(c.auc for c in per_test) / len(per_test), abs=1e-12)
    assert len({round(c.auc, 9) for c in per_test}) > 1  # the orders really differ
    rows = perturbation_curves_table(result.curves, [f"k{i}" for i in range(4)]).to_pylist()
    assert {r["order"] for r in rows if r["method"] == "random"} == set(range(5))
    assert {r["order"] for r in rows if r["method"] != "random"} == {0}


def test_reference_normalisation_by_hand() -> None:
    # N = 5, every n = 0..5; METHOD §6: sum over n = 1..4 only, over N * max acc (max over all n)
    accuracy = torch.tensor([0.1, 0.4, 0.8, 0.6, 1.0, 0.5])
    assert reference_normalised_auc(accuracy, torch.arange(6), 5) == pytest.approx((0.4 + 0.8 + 0.6 + 1.0) / (5 * 1.0))
    assert reference_normalised_auc(accuracy) == pytest.approx(0.56)
    # the peak at n = N counts in the max, not in the sum: (.2 + .3) / (2 * 1) for N = 2
    assert reference_normalised_auc(torch.tensor([0.0, 0.25, 1.0]), torch.arange(3), 2) == pytest.approx(0.125)
    # a subset n = 0, 2, 4, 5 of N = 5: the interior mean (.8 + 1) / 2, times 4 / 5, over max 1
    subset = torch.tensor([0.1, 0.8, 1.0, 0.5])
    assert reference_normalised_auc(subset, torch.tensor([0, 2, 4, 5]), 5) == pytest.approx(0.9 * 4 / 5)
    assert reference_normalised_auc(torch.zeros(4), torch.tensor([0, 2, 4, 5]), 5) == 0.0
    # the curve's own property uses its kept counts and N
    predictions = torch.tensor([[0, 0], [1, 0], [1, 2], [1, 0]])  # [K = 4, B = 2], labels 1, 2
    curve = PerturbationCurve("chefer", "negative", torch.tensor([0, 2, 4, 5]), 5, predictions, torch.tensor([1, 2]))
    # accuracy 0, .5, 1, .5 -> interior n = 2, 4: (.5 + 1) / 2 * 4 / 5 / 1 = .6
    assert curve.reference_auc == pytest.approx(0.6)
