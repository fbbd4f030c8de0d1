"""The XCiT adapter: parity with `model(x)` (with and without `tokens_norm`, average pooling,
no position encoding), streams equal to timm's own modules (forward hooks; LPI inside the
MLP's input stream), the class-attention block's image-token updates by hand, the CLS stream
only from the class-attention blocks through `Lens.run` and the tokens table, and the
skipped experiments refused with their reasons."""

from __future__ import annotations

import pytest
import torch
from timm.models.xcit import Xcit

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import Lens, adapter_for
from vitlens.lens.anatomy import EXPLAIN_EXPERIMENT, PERTURBATION_EXPERIMENTS
from vitlens.lens.parity import check_parity

from tests import family_checks as checks

DEPTH, CA_DEPTH, GRID, WIDTH, CLASSES = 2, 2, 4, 32, 10
TINY = dict(img_size=32, patch_size=8, embed_dim=WIDTH, depth=DEPTH, cls_attn_layers=CA_DEPTH, num_heads=2,
            num_classes=CLASSES, eta=0.5)
N = GRID * GRID
T = 1 + N
OPTIONS = {
    "cls_norm_only": dict(tokens_norm=False),
    "tokens_norm": dict(tokens_norm=True),
    "avg": dict(global_pool="avg", tokens_norm=True),
    "no_pos_embed": dict(use_pos_embed=False),
}


def tiny_xcit(seed: int = 0, **overrides: object) -> Xcit:
    """A tiny timm XCiT with parameters far from their initialisation (temperatures, layer
    scales and norms included)."""
    return checks.tiny(lambda: Xcit(**{**TINY, **overrides}), seed)


def all_blocks(model: Xcit) -> list[torch.nn.Module]:
    return list(model.blocks) + list(model.cls_attn_blocks)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_and_anatomy(option: str) -> None:
    model = tiny_xcit(**OPTIONS[option])
    parity = check_parity(model, checks.images(3))
    assert parity.ok, parity
    checks.assert_class_attention_anatomy(model, "xcit", DEPTH, CA_DEPTH)


@pytest.mark.parametrize("option", ["cls_norm_only", "tokens_norm"])
def test_block_outputs_equal_timms_own_blocks(option: str) -> None:
    model = tiny_xcit(**OPTIONS[option])
    captured, traces = checks.timm_block_outputs(model, checks.images(), all_blocks(model))
    for index, (trace, expected) in enumerate(zip(traces, captured), start=1):
        torch.testing.assert_close(trace.resid_post, expected, atol=1e-5, rtol=1e-5)
        if index <= DEPTH:
            assert (trace.first_token, trace.sublayer_tokens, trace.resid_post.shape[1]) == (1, None, N)
        else:
            assert (trace.first_token, trace.sublayer_tokens, trace.resid_post.shape[1]) == (0, 1, T)
            assert trace.attn_out.shape == trace.mlp_out.shape == (2, 1, WIDTH)
    torch.testing.assert_close(traces[DEPTH].resid_pre[:, 0], model.cls_token[0].expand(2, -1))


def test_xca_block_streams_equal_timms_modules_with_lpi_in_the_mlp_input() -> None:
    model = tiny_xcit()
    x = checks.images()
    block = model.blocks[1]
    points = {"block_in": block, "attn": block.attn, "proj_in": block.attn.proj, "lpi": block.local_mp,
              "mlp": block.mlp, "fc1": block.mlp.fc1}
    seen = checks.seen_in_forward(model, x, points, inputs={"block_in", "proj_in"})
    with torch.no_grad():
        adapter = adapter_for(model)
        trace = list(adapter.iter_block_traces(adapter.embed(x)))[1]
        torch.testing.assert_close(trace.resid_pre, seen["block_in"])
        torch.testing.assert_close(trace.attn_out, block.gamma1 * seen["attn"])
        torch.testing.assert_close(trace.mlp_out, block.gamma2 * seen["mlp"])
        lpi_out = block.gamma3 * seen["lpi"]
        torch.testing.assert_close(trace.resid_mid, seen["block_in"] + trace.attn_out + lpi_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.attn_coefficients, seen["proj_in"])
        torch.testing.assert_close(trace.mlp_coefficients, seen["fc1"])
        torch.testing.assert_close(trace.attn_coefficients @ adapter.value_vectors(2, "attn").T + block.attn.proj.bias,
                                   seen["attn"])
        assert trace.attn_probs is None


@pytest.mark.parametrize("option", ["cls_norm_only", "tokens_norm"])
def test_class_attention_block_by_hand(option: str) -> None:
    """timm's ClassAttentionBlock: image tokens get gamma1·norm1(x) added, the CLS residual is
    replaced by norm2 (every token with tokens_norm), image tokens are doubled at the end."""
    model = tiny_xcit(**OPTIONS[option])
    x = checks.images()
    block = model.cls_attn_blocks[0]
    seen = checks.seen_in_forward(model, x, {"attn": block.attn, "mlp": block.mlp, "out": block})
    with torch.no_grad():
        adapter = adapter_for(model)
        trace = list(adapter.iter_block_traces(adapter.embed(x)))[DEPTH]
        sequence = trace.resid_pre  # [cls_token, image tokens]
        torch.testing.assert_close(trace.attn_out, block.gamma1 * seen["attn"])
        torch.testing.assert_close(trace.mlp_out, block.gamma2 * seen["mlp"])
        cls_mid = block.norm2(sequence[:, :1] + block.gamma1 * seen["attn"])
        image_mid = sequence[:, 1:] + block.gamma1 * block.norm1(sequence[:, 1:])
        if block.tokens_norm:
            image_mid = block.norm2(image_mid)
        torch.testing.assert_close(trace.resid_mid, torch.cat([cls_mid, image_mid], dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post[:, 1:], 2 * image_mid, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post[:, :1], cls_mid + block.gamma2 * seen["mlp"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post, seen["out"], atol=1e-5, rtol=1e-5)


def test_lens_run_has_no_cls_rows_before_the_class_attention_blocks() -> None:
    checks.assert_cls_only_from_class_attention(tiny_xcit(), checks.images(), DEPTH, CA_DEPTH)


def test_skipped_experiments_and_refusals_name_their_reason() -> None:
    model = tiny_xcit()
    adapter = adapter_for(model)
    skipped = dict(adapter.anatomy.skipped)
    assert set(skipped) == set(PERTURBATION_EXPERIMENTS) | {EXPLAIN_EXPERIMENT, "heads"}
    assert "cross-covariance" in skipped["heads"]
    assert "no token-to-token attention" in skipped["attn_self_only"] == skipped["attn_no_cls"]
    assert "LPI" in skipped["remove_class_tokens"] and "LPI" in skipped["remove_context_tokens"]
    assert all("\n" not in reason for reason in skipped.values())
    x, labels = checks.images(), torch.tensor([0, 1])
    for perturbation in ("self_only", "no_cls"):
        with pytest.raises(UserError, match="do not apply"):
            Lens(model).run(x, labels, attention_perturbation=perturbation)
    with pytest.raises(UserError, match="do not apply"):
        Lens(model).run(x, labels, token_keep=torch.ones(2, N, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(UserError, match="LPI"):
        adapter.logits_keeping(adapter.embed(x), torch.arange(1, 5).expand(2, -1))
    with pytest.raises(UserError, match="explainability does not apply to this model"):
        block_head_importance(model, x, labels)
    with pytest.raises(UserError, match="no token-to-token attention"):
        adapter.block_forward(1, adapter.embed(x), need_probs=True)
    with pytest.raises(UserError, match=r"token grid"):
        adapter.embed(torch.randn(1, 3, 48, 48))
    with pytest.raises(UserError, match="global_pool=''"):
        adapter_for(tiny_xcit(global_pool=""))
    with pytest.raises(UserError, match="without class-attention blocks"):
        adapter_for(tiny_xcit(cls_attn_layers=0))
    with pytest.raises(UserError, match="headless"):
        adapter_for(tiny_xcit(num_classes=0))
    with pytest.raises(UserError, match="not a whole number"):
        adapter_for(tiny_xcit(img_size=(32, 36)))
    with torch.device("meta"):  # the coverage sweep checks models without weights
        assert adapter_for(Xcit(**TINY)).anatomy.family == "xcit"
