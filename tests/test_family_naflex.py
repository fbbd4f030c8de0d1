"""The NaFlexViT adapter against timm's own NaFlexVit: parity per option, streams and attention
from hooks on timm's forward, perturbations and token removal against timm run with the same
edit (its unfused attention with masked probabilities; its own `patch_valid` masking), the
lens end to end, explainability's last block against autograd through timm, refusals."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from timm.layers import GluMlp, SwiGLU
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg, batch_patchify
from timm.models.vision_transformer import ResPostBlock

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import STREAM_RESID, Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.families.naflex import NaFlexAdapter
from vitlens.lens.parity import check_parity
from vitlens.lens.perturb import attention_keep_mask

from tests.family_checks import images as seeded_images
from tests.family_checks import recording, timm_with_probs, tiny

INPUT = (32, 48)  # not square: a transposed grid would show
GRID = (4, 6)
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=None)
OPTIONS: dict[str, dict[str, object]] = {
    # naflexvit_base_patch16_gap: registers, layer scale, fc_norm after average pooling
    "gap_registers": dict(global_pool="avg", fc_norm=True, reg_tokens=2, init_values=0.3),
    # naflexvit_base_patch16_parfac_gap: factorised, aspect-preserving position embedding (resized)
    "gap_factorized_ar": dict(global_pool="avg", fc_norm=True, reg_tokens=1, pos_embed="factorized",
                              pos_embed_ar_preserving=True, pos_embed_grid_size=(5, 5)),
    # naflexvit_base_patch16_map / so150m2_map: attention pooling after the final norm
    "map_register": dict(global_pool="map", reg_tokens=1, init_values=0.3, qkv_bias=False),
    # naflexvit_*_siglip: no prefix token, tanh GELU, bilinear resize of the position table
    "map_siglip": dict(global_pool="map", act_layer="gelu_tanh", pos_embed_interp_mode="bilinear",
                       pos_embed_grid_size=(3, 5)),
    # C-RADIO: CLS pooling, no final norm, registers, 16x16 table resized square then cropped
    "token_radio": dict(class_token=True, global_pool="token", final_norm=False, reg_tokens=3,
                        pos_embed_grid_size=(16, 16), pos_embed_interp_mode="bilinear",
                        pos_embed_ar_preserving=True, pos_embed_antialias=False,
                        pos_embed_align_corners=True, init_values=0.3),
    "max_conv_cls": dict(class_token=True, global_pool="max", embed_proj_type="conv"),
    "avgmax_prefix": dict(class_token=True, reg_tokens=1, global_pool="avgmax", pool_include_prefix=True,
                          fc_norm=True),
    "map_prefix": dict(class_token=True, global_pool="map", pool_include_prefix=True),
    "post_norm_qknorm": dict(class_token=True, global_pool="token", block_fn=ResPostBlock, qk_norm=True,
                             init_values=0.5),
    "prenorm_scale_norms": dict(class_token=True, global_pool="token", pre_norm=True, embed_norm_layer="layernorm",
                                scale_mlp_norm=True, scale_attn_inner_norm=True),
    "swiglu": dict(global_pool="avg", fc_norm=True, reg_tokens=1, mlp_layer=SwiGLU),
    "glu": dict(class_token=True, global_pool="token", mlp_layer=GluMlp, init_values=0.3),
}


def tiny_naflex(option: str, seed: int = 0, input_size: tuple[int, int] = INPUT, **overrides: object) -> NaFlexVit:
    """A tiny NaFlexVit of the real class, every parameter re-drawn at a scale where attention
    is far from uniform. A position table of its own size sets the grid from `img_size`;
    otherwise the input size is timm's nominal one (the `pretrained_cfg`)."""
    cfg = NaFlexVitCfg(**{**TINY, **OPTIONS[option], **overrides})
    model = tiny(lambda: NaFlexVit(cfg, num_classes=10, img_size=input_size), seed)
    if model.embeds.default_img_size is None:
        model.pretrained_cfg = {"input_size": (3, *input_size)}
    return model


images = partial(seeded_images, size=INPUT)  # [B, 3, 32, 48]


def one_token_sequences(model: NaFlexVit, hidden: torch.Tensor) -> torch.Tensor:
    """Each token as the whole sequence timm's head reads: alone when the pool reads the first
    token or includes the prefix, else after zero placeholders in the prefix slots it drops.

    # hidden: [n, d] -> [n, P' + 1, d]
    """
    if model.global_pool == "token" or model.pool_include_prefix:
        return hidden[:, None]
    prefix = hidden.new_zeros(hidden.shape[0], model.num_prefix_tokens, hidden.shape[-1])
    return torch.cat([prefix, hidden[:, None]], dim=1)


def timm_token_logits(model: NaFlexVit, normed: torch.Tensor) -> torch.Tensor:
    """timm's own `forward_head` on every token alone (METHOD §1b), from `norm(h)`.

    # normed: [B, T, d] -> logits: [B, T, C]
    """
    flat = normed.reshape(-1, normed.shape[-1])
    return model.forward_head(one_token_sequences(model, flat)).reshape(*normed.shape[:2], -1)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_per_option(option: str) -> None:
    model = tiny_naflex(option)
    result = check_parity(model, images())
    assert result.ok, result
    assert result.logit_scale > 0.1  # not a degenerate output
    anatomy = adapter_for(model).anatomy
    assert anatomy.family == "naflex" and anatomy.grid_size == GRID and anatomy.token_cell == (8, 8)
    assert anatomy.num_tokens == model.num_prefix_tokens + GRID[0] * GRID[1]
    assert anatomy.post_norm == (option == "post_norm_qknorm")


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_projection_is_timm_head_on_the_token_alone(option: str) -> None:
    model = tiny_naflex(option)
    adapter = adapter_for(model)
    hidden = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = timm_token_logits(model, model.norm(hidden))
        assert torch.allclose(adapter.project(hidden), expected, atol=1e-5)
        labels = torch.tensor([1, 4, 9])
        assert torch.allclose(adapter.correct_class_logit(hidden, labels),
                              expected[torch.arange(3), :, labels], atol=1e-5)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_embed_is_the_input_of_timms_first_block(option: str) -> None:
    model = tiny_naflex(option)
    captured: list[torch.Tensor] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    x = images()
    with torch.no_grad():
        model(x)
        hook.remove()
        assert torch.allclose(adapter_for(model).embed(x), captured[0], atol=1e-6)


def test_embed_layout_by_hand() -> None:
    """Prefix (registers) first, then image tokens row-major: token (r, c) = proj of the patch's
    pixels flattened (row, column, channel) + pos_embed[r, c] (the table is the grid's size)."""
    model = tiny_naflex("gap_registers")
    x = images(1)
    with torch.no_grad():
        hidden = adapter_for(model).embed(x)[0]  # [P+N, d]
        assert torch.equal(hidden[:2], model.embeds.reg_token[0])
        for r, c in [(0, 0), (0, 5), (3, 0), (2, 4)]:
            patch = x[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].permute(1, 2, 0).reshape(-1)
            expected = model.embeds.proj(patch) + model.embeds.pos_embed[0, r, c]
            assert torch.allclose(hidden[2 + r * GRID[1] + c], expected, atol=1e-5)


def test_embed_layout_conv_stem_by_hand() -> None:
    model = tiny_naflex("max_conv_cls")
    x = images(1)
    with torch.no_grad():
        hidden = adapter_for(model).embed(x)[0]
        weight, bias = model.embeds.proj.weight, model.embeds.proj.bias  # [d, 3, 8, 8]
        for r, c in [(0, 5), (3, 1)]:
            patch = x[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
            expected = (weight * patch).sum(dim=(1, 2, 3)) + bias + model.embeds.pos_embed[0, r, c]
            assert torch.allclose(hidden[1 + r * GRID[1] + c], expected, atol=1e-5)
        assert torch.equal(hidden[0], model.embeds.cls_token[0, 0])


def capture_streams(model: NaFlexVit, x: torch.Tensor, post_norm: bool) -> dict[str, list[torch.Tensor]]:
    """Per block, what timm's own forward computes, recorded with hooks on its modules."""
    blocks = list(model.blocks)
    points = {"pre": blocks, "post": blocks, "attn_coef": [b.attn.proj for b in blocks],
              "attn": [b.norm1 if post_norm else b.ls1 for b in blocks],
              "mlp": [b.norm2 if post_norm else b.ls2 for b in blocks], "mlp_coef": [b.mlp.fc1 for b in blocks]}
    with recording(points, inputs={"pre", "attn_coef"}) as record, torch.no_grad():
        model(x)
    return record


@pytest.mark.parametrize("option", ["gap_registers", "post_norm_qknorm", "prenorm_scale_norms"])
def test_streams_match_timm_hooks(option: str) -> None:
    model = tiny_naflex(option)
    post_norm = option == "post_norm_qknorm"
    x = images()
    record = capture_streams(model, x, post_norm)
    adapter = adapter_for(model)
    with torch.no_grad():
        traces = list(adapter.iter_block_traces(adapter.embed(x)))
    for b, trace in enumerate(traces):
        assert torch.allclose(trace.resid_pre, record["pre"][b], atol=1e-5)
        assert torch.allclose(trace.attn_out, record["attn"][b], atol=1e-5)
        assert torch.allclose(trace.mlp_out, record["mlp"][b], atol=1e-5)
        assert torch.allclose(trace.resid_post, record["post"][b], atol=1e-5)
        assert torch.allclose(trace.attn_coefficients, record["attn_coef"][b], atol=1e-5)
        assert torch.allclose(trace.mlp_coefficients, record["mlp_coef"][b], atol=1e-5)
        assert torch.allclose(trace.resid_pre + trace.attn_out, trace.resid_mid, atol=1e-6)
        block = model.blocks[b]
        assert adapter.value_vectors(b + 1, "attn") is block.attn.proj.weight
        assert adapter.value_vectors(b + 1, "mlp") is block.mlp.fc2.weight


def test_attention_probabilities_match_timms_unfused_path() -> None:
    model = tiny_naflex("map_register")
    captured: list[torch.Tensor] = []
    hooks = timm_with_probs(model.blocks, captured.append)
    x = images()
    with torch.no_grad():
        expected = model(x)
        for hook in hooks:
            hook.remove()
        adapter = adapter_for(model)
        traces = list(adapter.iter_block_traces(adapter.embed(x), need_probs=True))
        assert torch.allclose(adapter.model_logits(traces[-1].resid_post), expected, atol=1e-5)
    for trace, probs in zip(traces, captured):
        assert trace.attn_probs is not None and trace.attn_probs.shape == (2, 2, 25, 25)
        assert torch.allclose(trace.attn_probs, probs, atol=1e-6)
        assert probs.std() > 0.02  # far from uniform: a wrong key order would show


class MaskedProbabilities(torch.nn.Module):
    """Stands in for timm's `attn_drop` (applied to the post-softmax attention on the unfused
    path): multiplies the probabilities by a keep mask, no renormalisation (METHOD §4)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs * self.mask


@pytest.mark.parametrize(("option", "perturbation"),
                         [("map_register", "self_only"), ("token_radio", "self_only"), ("token_radio", "no_cls"),
                          ("post_norm_qknorm", "self_only")])
def test_attention_perturbation_matches_timm_with_masked_probabilities(option: str, perturbation: str) -> None:
    model = tiny_naflex(option)
    x, labels = images(3), torch.tensor([0, 4, 7])
    out = Lens(model).run(x, labels, attention_perturbation=perturbation)
    plain = Lens(model).run(x, labels)
    prefix = model.num_prefix_tokens
    mask = attention_keep_mask(perturbation, prefix + 24, prefix, model.has_class_token)
    features: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop = MaskedProbabilities(mask)
    hook = model.norm.register_forward_hook(lambda m, i, o: features.append(o))
    with torch.no_grad():
        expected = model(x)  # timm's own forward, every block's probabilities masked
        hook.remove()
        token_logits = timm_token_logits(model, features[0])  # [B, T, C]
    correct = token_logits[torch.arange(3), :, labels]  # [B, T]
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    assert torch.allclose(out.correct_logit[:, -1, STREAM_RESID], correct, atol=1e-5)
    rank = (token_logits > correct[..., None]).sum(-1)
    assert torch.equal(out.rank[:, -1, STREAM_RESID].long(), rank)
    assert not torch.allclose(plain.correct_logit[:, -1, STREAM_RESID], correct, atol=1e-3)  # it did change


def patch_dict(model: NaFlexVit, x: torch.Tensor, token_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm's NaFlex input for `x` with the removed tokens marked invalid (`patch_valid`); every
    coordinate stays, so the position table is resized to the same full grid."""
    patches, (rows, cols) = batch_patchify(x, model.embeds.patch_size)
    coord = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    return {"patches": patches, "patch_coord": coord.reshape(1, -1, 2).expand(x.shape[0], -1, -1),
            "patch_valid": token_keep}


@pytest.mark.parametrize("option", ["gap_registers", "map_register", "map_siglip", "token_radio", "avgmax_prefix"])
def test_token_removal_matches_timms_patch_valid_masking(option: str) -> None:
    model = tiny_naflex(option)
    x, labels = images(3), torch.tensor([1, 5, 8])
    token_keep = torch.zeros(3, 24, dtype=torch.bool)
    token_keep[0, [0, 5, 6, 23]] = True
    token_keep[1, [1, 2, 3, 4, 9, 10, 17]] = True
    token_keep[2, :] = True
    token_keep[2, 11] = False
    inputs = patch_dict(model, x, token_keep)
    with torch.no_grad():
        expected = model(inputs)  # timm's own masked attention and masked pooling
        normed = model.forward_features(**inputs)["patches"]  # [B, T, d]
        token_logits = timm_token_logits(model, normed)
    out = Lens(model).run(x, labels, token_keep=token_keep)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    prefix = model.num_prefix_tokens
    for b in range(3):
        present = torch.cat([torch.ones(prefix, dtype=torch.bool), token_keep[b]])
        assert torch.equal(out.token_present[b], present)
        correct = token_logits[b, present, labels[b]]
        rank = (token_logits[b, present] > correct[:, None]).sum(-1)
        assert torch.allclose(out.correct_logit[b, -1, STREAM_RESID, present], correct, atol=1e-5)
        assert out.rank[b, -1, STREAM_RESID, present].tolist() == rank.tolist()
        assert bool((out.rank[b, :, :, ~present] == -1).all())
    adapter = adapter_for(model)
    with torch.no_grad():
        hidden = adapter.embed(x)
        for b in range(3):  # deletion curves: the shortened sequence through timm's blocks
            kept = prefix + torch.nonzero(token_keep[b]).reshape(1, -1)
            logits = adapter.logits_keeping(hidden[b : b + 1], kept)
            assert torch.allclose(logits, expected[b : b + 1], atol=1e-5)


def test_lens_end_to_end() -> None:
    model = tiny_naflex("token_radio")
    x, labels = images(4), torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        expected = model(x)
    out = Lens(model).run(x, labels)
    tokens = model.num_prefix_tokens + 24
    assert out.rank.shape == (4, 3, 3, tokens)
    top = expected.topk(5, dim=-1)
    assert torch.allclose(out.topk_logit[:, -1, STREAM_RESID, 0], top.values, atol=1e-5)
    assert torch.equal(out.topk_class[:, -1, STREAM_RESID, 0].long(), top.indices)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    assert bool((out.rank[:, 1:] >= 0).all())  # every token, block and stream filled


def test_explain_last_block_matches_autograd_through_timm() -> None:
    """At the last block ℓ_L = CE(model(x), c) for a CLS-pooled model: its gradient w.r.t. the
    CLS row of timm's own (unfused) last-block attention is the importance of that block."""
    model = tiny_naflex("token_radio")
    x, labels = images(2), torch.tensor([2, 7])
    importance = block_head_importance(model, x, labels)  # [B, L, H, N]
    last = model.blocks[-1].attn
    last.fused_attn = False
    captured: list[torch.Tensor] = []

    def keep_graph(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    hook = last.attn_drop.register_forward_hook(keep_graph)
    loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="sum")
    hook.remove()
    loss.backward()
    expected = -captured[0].grad[:, :, 0, model.num_prefix_tokens:]  # [B, H, N]
    assert importance.shape == (2, 2, 2, 24)
    assert torch.allclose(importance[:, -1], expected, atol=1e-5)
    assert expected.abs().max() > 1e-3


def test_skipped_experiments() -> None:
    gap = adapter_for(tiny_naflex("gap_registers")).anatomy
    assert gap.skip_reason("attn_no_cls") == "the model has no CLS token"
    assert "global_pool='avg'" in gap.skip_reason("explain")
    assert gap.skip_reason("attn_self_only") is None and gap.skip_reason("remove_class_tokens") is None
    radio = adapter_for(tiny_naflex("token_radio")).anatomy
    assert radio.skipped == ()
    with pytest.raises(UserError, match="global_pool='map'"):
        block_head_importance(tiny_naflex("map_prefix"), images(1), torch.tensor([0]))


def test_input_size_from_img_size_or_timms_nominal_size() -> None:
    assert adapter_for(tiny_naflex("gap_registers")).input_size == INPUT  # from img_size
    model = tiny_naflex("map_siglip", input_size=(40, 24))  # table (3, 5): timm's nominal size
    adapter = adapter_for(model)
    assert adapter.input_size == (40, 24) and adapter.anatomy.grid_size == (5, 3)
    del model.pretrained_cfg
    assert adapter_for(model).input_size == (224, 224)  # timm's default for a bare model
    with pytest.raises(UserError, match=r"images are \(32, 48\).*\(224, 224\)"):
        adapter_for(model).embed(images(1))


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(global_pool=""), "global_pool=''"),
    (dict(rope_type="axial"), "unsupported NaFlexVit block EvaBlock"),
    (dict(swiglu_mlp=True), "unsupported NaFlexVit block EvaBlock"),
    (dict(attn_layer="diff"), "unsupported attention DiffAttention"),
])
def test_refusals(overrides: dict[str, object], message: str) -> None:
    model = tiny_naflex("gap_registers", **overrides)
    with pytest.raises(UserError, match=message):
        adapter_for(model)


def test_refuses_headless_and_partial_patches() -> None:
    headless = NaFlexVit(NaFlexVitCfg(**TINY, global_pool="avg"), num_classes=0, img_size=INPUT)
    with pytest.raises(UserError, match="headless"):
        adapter_for(headless)
    with pytest.raises(UserError, match=r"not a whole number of \(8, 8\) patches"):
        adapter_for(tiny_naflex("map_siglip", input_size=(36, 48)))
    assert isinstance(adapter_for(tiny_naflex("glu")), NaFlexAdapter)
