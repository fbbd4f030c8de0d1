"""The relative-position ViT adapter (`vitlens/lens/families/relpos.py`) against timm's own modules.

Every expectation comes from timm itself: `model(x)`, its blocks / attention / LayerScale /
post-norms captured with forward hooks, its unfused attention path (`fused_attn = False`)
whose `attn_drop` input is the post-softmax attention, and — for the perturbations — that
same `attn_drop` made to return the perturbed probabilities, so timm's own modules compute
the perturbed forward. Tiny configs of the real class, every parameter re-drawn (the 1e-6
LayerScale init would hide the blocks).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from timm.layers import RelPosBiasTf
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import STREAM_ATTN, STREAM_MLP, STREAM_RESID, Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.families.relpos import RelPosAdapter
from vitlens.lens.perturb import attention_keep_mask

from tests import family_checks as checks

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, rel_pos_dim=16)  # 4 x 4 grid
CLS = dict(class_token=True, global_pool="token")
OPTIONS = {
    "gap_norm_before_pool": dict(),  # the class defaults: no CLS, avg pooling after `norm`, log-coordinate MLP bias
    "gap_fc_norm": dict(fc_norm=True, qkv_bias=False),  # vit_relpos_{small,medium,base}
    "gap_shared_rel_pos": dict(shared_rel_pos=True, qkv_bias=False),  # vit_srelpos_*
    "cls_token_pool": dict(**CLS, qkv_bias=False),  # vit_relpos_*_cls
    "cls_gap_fc_norm": dict(class_token=True, fc_norm=True),  # vit_relpos_base_patch16_clsgap
    "post_norm_gap": dict(block_fn=ResPostRelPosBlock, qkv_bias=False),  # vit_relpos_*_rpn
    "post_norm_cls": dict(**CLS, block_fn=ResPostRelPosBlock),
    "bias_table_cls": dict(**CLS, rel_pos_type="bias"),
    "bias_table_shared_gap": dict(rel_pos_type="bias", shared_rel_pos=True),
    "mlp_swin_cls_gap": dict(class_token=True, rel_pos_type="mlp_swin"),
    "qk_norm_no_layer_scale": dict(**CLS, qk_norm=True, init_values=None),
}
images = partial(checks.images, seed=7)  # [B, 3, 32, 32]


def tiny_relpos(option: str, seed: int = 0) -> VisionTransformerRelPos:
    """A tiny `VisionTransformerRelPos` with every parameter re-drawn (attention far from uniform)."""
    return checks.tiny(lambda: VisionTransformerRelPos(**{**TINY, **OPTIONS[option]}), seed,
                (lambda name: "relative_position_bias_table" in name, lambda p: p.normal_(0.0, 1.5)),
                (lambda name: name.endswith("gamma"), lambda p: p.uniform_(0.3, 1.0)),
                (lambda name: "rel_pos.mlp" in name, lambda p: p.normal_(0.0, 1.0)))


def shared_bias(model: VisionTransformerRelPos) -> torch.Tensor | None:
    """What `forward_features` passes every block. # -> [1, H, T, T] | None"""
    return model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None


def capture(model: VisionTransformerRelPos, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """timm's own forward with, per block: its input and output, what each sub-layer adds to the
    residual (the output of `ls1` / `ls2`, or of the post-norms `norm1` / `norm2`), the input of
    `attn.proj` and the `fc1` output; the input of the final norm.

    # x: [B, 3, H, W] -> lists over blocks of [B, T, ...]
    """
    blocks = list(model.blocks)
    post = [isinstance(block, ResPostRelPosBlock) for block in blocks]
    points = {"input": blocks, "output": blocks,
              "attn_add": [b.norm1 if p else b.ls1 for b, p in zip(blocks, post)],
              "mlp_add": [b.norm2 if p else b.ls2 for b, p in zip(blocks, post)],
              "proj_in": [b.attn.proj for b in blocks], "fc1": [b.mlp.fc1 for b in blocks], "final": [model.norm]}
    with checks.recording(points, inputs={"input", "proj_in", "final"}) as seen:
        seen["logits"] = [model(x)]
    return seen


def token_logits(model: VisionTransformerRelPos, hidden: torch.Tensor) -> torch.Tensor:
    """Each token alone through the head as timm pools it (one token's mean is the token).

    # hidden: [B, T, d] -> [B, T, C]
    """
    return model.head(model.fc_norm(model.norm(hidden)))


# ---- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_every_option(option: str) -> None:
    checks.assert_parity(tiny_relpos(option), images())


@pytest.mark.parametrize("option", ["gap_norm_before_pool", "gap_fc_norm", "cls_gap_fc_norm", "cls_token_pool"])
def test_projection_is_the_pooled_head_of_one_token(option: str) -> None:
    checks.assert_projects_as_pooled_head(tiny_relpos(option), width=32, count=4)


# ---- streams -----------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["gap_shared_rel_pos", "post_norm_cls", "bias_table_cls", "qk_norm_no_layer_scale"])
def test_streams_are_timm_modules_outputs(option: str) -> None:
    model = tiny_relpos(option)
    x = images()
    adapter = adapter_for(model)
    assert adapter.anatomy.post_norm == (option == "post_norm_cls")
    with torch.no_grad():
        seen = capture(model, x)
    checks.assert_streams_are(adapter, x, seen)


@pytest.mark.parametrize("option", ["gap_norm_before_pool", "gap_shared_rel_pos", "bias_table_cls", "mlp_swin_cls_gap"])
def test_attention_probabilities_are_timms_unfused(option: str) -> None:
    model = tiny_relpos(option)
    x = images()
    tokens = model.num_prefix_tokens + 16
    recorded = checks.assert_probs_are_timms_unfused(model, x)
    with torch.no_grad():
        # the position bias matters: without it the probabilities differ
        block = model.blocks[0]
        embedded = adapter_for(model).embed(x)
        attn_input = embedded if isinstance(block, ResPostRelPosBlock) else block.norm1(embedded)
        q, k, _ = block.attn.qkv(attn_input).reshape(2, tokens, 3, 2, 16).permute(2, 0, 3, 1, 4)
        plain = ((block.attn.q_norm(q) * block.attn.scale) @ block.attn.k_norm(k).transpose(-2, -1)).softmax(-1)
        assert (plain - recorded[0]).abs().max() > 1e-2


# ---- perturbations -----------------------------------------------------------------------
@pytest.mark.parametrize(("option", "perturbation"), [
    ("cls_token_pool", "self_only"), ("cls_token_pool", "no_cls"),
    ("post_norm_gap", "self_only"), ("gap_shared_rel_pos", "self_only"),
])
def test_attention_perturbation_is_timms_masked_forward(option: str, perturbation: str) -> None:
    model = tiny_relpos(option)
    x = images()
    prefix = model.num_prefix_tokens
    tokens = prefix + 16
    # by hand: self_only keeps i->i and i->CLS for image queries, no_cls drops i->CLS
    mask = torch.ones(tokens, tokens)
    if perturbation == "self_only":
        mask[prefix:, prefix:] = torch.eye(16)
    else:
        mask[1:, 0] = 0.0
    assert torch.equal(attention_keep_mask(perturbation, tokens, prefix, prefix == 1), mask)
    expected, outputs = checks.assert_keep_mask_is_timms(model, x, mask)
    labels = torch.tensor([2, 5])
    out = Lens(model).run(x, labels, attention_perturbation=perturbation)
    assert torch.equal(out.prediction, expected.argmax(-1))
    last = token_logits(model, outputs[-1])[torch.arange(2), :, labels]  # [B, T]
    assert torch.allclose(out.correct_logit[:, 2, STREAM_RESID], last, atol=1e-4)


@pytest.mark.parametrize("option", ["gap_norm_before_pool", "post_norm_cls", "cls_gap_fc_norm"])
def test_token_removal_is_timms_renormalised_attention_over_kept_keys(option: str) -> None:
    model = tiny_relpos(option)
    x = images()
    adapter = adapter_for(model)
    prefix = model.num_prefix_tokens
    token_keep = torch.ones(2, 16, dtype=torch.bool)
    token_keep[0, [0, 5, 6, 15]] = False
    token_keep[1, 3:12] = False
    key_keep = torch.cat([torch.ones(2, prefix, dtype=torch.bool), token_keep], dim=1)  # [B, T]
    kept = torch.stack([torch.nonzero(token_keep[i]).squeeze(1)[:6] + prefix for i in range(2)])  # 6 kept each
    keys_6 = torch.zeros_like(key_keep)
    keys_6[:, :prefix] = True
    keys_6.scatter_(1, kept, True)

    def timm_logits_keeping(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's own modules with removed keys at weight 0 and the kept weights renormalised
        (= the softmax over the kept keys, every kept pair's relative position bias unchanged);
        the head pools the kept image tokens. In float64: renormalising float32 probabilities
        would divide underflowed zeros. # -> (logits [B, C], last hidden [B, T, d]), float32"""
        probe = tiny_relpos(option).double()

        def remove(probs: torch.Tensor) -> torch.Tensor:
            weights = probs * keys[:, None, None, :]
            return weights / weights.sum(-1, keepdim=True)

        checks.timm_with_probs(probe.blocks, remove)
        with torch.no_grad():
            hidden = capture(probe, x.double())["final"][0]
            if probe.global_pool == "token":
                return probe.forward_head(probe.norm(hidden)).float(), hidden.float()
            normed = probe.norm(hidden)
            pooled = torch.stack([normed[i, prefix:][keys[i, prefix:]].mean(0) for i in range(2)])
            return probe.head(probe.fc_norm(pooled)).float(), hidden.float()

    expected, hidden = timm_logits_keeping(key_keep)
    with torch.no_grad():
        assert torch.allclose(adapter.model_logits(adapter.run_blocks(adapter.embed(x), key_keep), key_keep),
                              expected, atol=1e-4)
        expected_6, _ = timm_logits_keeping(keys_6)
        assert torch.allclose(adapter.logits_keeping(adapter.embed(x), kept), expected_6, atol=1e-4)
    labels = torch.tensor([1, 8])
    out = Lens(model).run(x, labels, token_keep=token_keep)
    assert torch.equal(out.prediction, expected.argmax(-1))
    assert torch.equal(out.token_present, key_keep)
    every = token_logits(model, hidden)  # [B, T, C]
    for i in range(2):
        present = key_keep[i]
        assert torch.allclose(out.correct_logit[i, 2, STREAM_RESID][present], every[i, present, labels[i]], atol=1e-4)
        assert bool(out.rank[i, 2, STREAM_RESID][~present].eq(-1).all())


# ---- end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["gap_norm_before_pool", "post_norm_gap"])
def test_lens_run_end_to_end(option: str) -> None:
    model = tiny_relpos(option)
    x = images(3)
    labels = torch.tensor([0, 4, 9])
    seen = capture(model, x)
    out = checks.assert_lens_resid_is_timms(model, x, labels, seen, lambda h: token_logits(model, h))
    with torch.no_grad():
        for stream, name in ((STREAM_ATTN, "attn_add"), (STREAM_MLP, "mlp_add")):
            logits = token_logits(model, seen[name][1])  # after ls / the post-norm (METHOD §1)
            assert torch.allclose(out.correct_logit[:, 2, stream], logits[torch.arange(3), :, labels], atol=1e-4)


@pytest.mark.parametrize("option", ["cls_token_pool", "post_norm_cls"])
def test_explain_gradients_are_timms(option: str) -> None:
    model = tiny_relpos(option)
    checks.assert_explain_gradients_are_timms(model, images(), torch.tensor([3, 6]), shared_rel_pos=shared_bias(model))


# ---- what is refused / skipped -----------------------------------------------------------
def test_skipped_experiments() -> None:
    anatomy = adapter_for(tiny_relpos("gap_norm_before_pool")).anatomy
    assert anatomy.family == "relpos" and anatomy.num_prefix_tokens == 0 and not anatomy.has_class_token
    assert anatomy.skip_reason("attn_no_cls") == "the model has no CLS token"
    assert anatomy.skip_reason("explain").endswith("global_pool='avg'")
    assert anatomy.skip_reason("attn_self_only") is None and anatomy.skip_reason("remove_class_tokens") is None
    anatomy = adapter_for(tiny_relpos("cls_token_pool")).anatomy
    assert anatomy.skipped == () and anatomy.grid_size == (4, 4) and anatomy.token_cell == (8, 8)
    assert adapter_for(tiny_relpos("cls_gap_fc_norm")).anatomy.skip_reason("attn_no_cls") is None
    with pytest.raises(UserError, match="explainability does not apply to this model: .*global_pool='avg'"):
        block_head_importance(tiny_relpos("gap_fc_norm"), images(), torch.tensor([0, 1]))


def test_refusals() -> None:
    checks.assert_usual_refusals(lambda **options: VisionTransformerRelPos(**{**TINY, **options}))
    assert type(adapter_for(tiny_relpos("gap_fc_norm"))) is RelPosAdapter
    model = tiny_relpos("gap_fc_norm")
    model.blocks[0].attn.rel_pos = RelPosBiasTf((4, 4), num_heads=2)
    with pytest.raises(UserError, match="block 1's rel_pos: unsupported relative position module RelPosBiasTf"):
        adapter_for(model)
    model = tiny_relpos("gap_shared_rel_pos")
    model.shared_rel_pos.window_size = (2, 2)
    with pytest.raises(UserError, match=r"the shared rel_pos has window \(2, 2\) .* \(4, 4\) token grid"):
        adapter_for(model)
