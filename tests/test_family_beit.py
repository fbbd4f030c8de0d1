"""The BEiT adapter (`vitlens/lens/families/beit.py`) against timm's own `Beit` modules.

Every expectation comes from timm itself: `model(x)`, its blocks / attention / MLP captured
with forward hooks, its unfused attention path (`fused_attn = False`) whose `attn_drop`
input is the post-softmax attention, and — for the perturbations — that same `attn_drop`
made to return the perturbed probabilities, so timm's own modules compute the perturbed
forward. Tiny configs of the real class, every parameter re-drawn (BEiT's zero bias tables,
1e-3 head and LayerScale inits would hide whole branches).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit

from vitlens.errors import UserError
from vitlens.lens import STREAM_RESID, Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.families.beit import BeitAdapter
from vitlens.lens.perturb import attention_keep_mask

from tests import family_checks as checks

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)  # 4 x 4 grid, T = 17
OPTIONS = {
    "avg_fc_norm_abs_pos": dict(),  # BEiT defaults: average pooling, fc_norm, absolute position embedding
    "block_rel_pos_layer_scale": dict(use_rel_pos_bias=True, init_values=0.1),  # beit_* checkpoints
    "shared_rel_pos_no_abs_pos": dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1),
    "block_and_shared_rel_pos": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True),
    "cls_token_pool": dict(global_pool="token", use_rel_pos_bias=True, init_values=0.1),
    "cls_token_pool_fc_norm": dict(global_pool="token", use_fc_norm=True, use_rel_pos_bias=True),
    "avg_norm_before_pool": dict(use_fc_norm=False, use_rel_pos_bias=True),
    "swiglu_scale_mlp": dict(swiglu_mlp=True, scale_mlp=True, use_rel_pos_bias=True, init_values=0.1),
    "no_qkv_bias": dict(qkv_bias=False, use_rel_pos_bias=True),
    "qkv_bias_separate": dict(use_rel_pos_bias=True, init_values=0.1),  # the flag set after construction
}
images = partial(checks.images, seed=7)  # [B, 3, 32, 32]


def tiny_beit(option: str, seed: int = 0) -> Beit:
    """A tiny `Beit` with every parameter re-drawn at a scale where attention is far from uniform."""
    model = checks.tiny(lambda: Beit(**{**TINY, **OPTIONS[option]}), seed,
                 (lambda name: "relative_position_bias_table" in name, lambda p: p.normal_(0.0, 1.5)),
                 (lambda name: "gamma" in name, lambda p: p.uniform_(0.3, 1.0)))
    if option == "qkv_bias_separate":
        for block in model.blocks:
            block.attn.qkv_bias_separate = True
    return model


def shared_bias(model: Beit) -> torch.Tensor | None:
    """What `Beit.forward_features` passes every block. # -> [H, T, T] | None"""
    return model.rel_pos_bias() if model.rel_pos_bias is not None else None


def capture(model: Beit, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """timm's own forward with every block's input, attention output (before `gamma_1`: `attn`;
    after: `attn_add`), input of `attn.proj`, MLP output (`mlp`, `mlp_add`), `fc1` output and
    block output recorded.

    # x: [B, 3, H, W] -> lists over blocks of [B, T, ...]
    """
    blocks = list(model.blocks)
    points = {"input": blocks, "output": blocks, "attn": [b.attn for b in blocks],
              "proj_in": [b.attn.proj for b in blocks], "mlp": [b.mlp for b in blocks],
              "fc1": [b.mlp.fc1 for b in blocks if hasattr(b.mlp, "fc1")]}
    with checks.recording(points, inputs={"input", "proj_in"}) as seen:
        seen["logits"] = [model(x)]
    scales = [(1.0 if b.gamma_1 is None else b.gamma_1, 1.0 if b.gamma_2 is None else b.gamma_2) for b in blocks]
    seen["attn_add"] = [gamma_1 * attn for (gamma_1, _), attn in zip(scales, seen["attn"])]
    seen["mlp_add"] = [gamma_2 * mlp for (_, gamma_2), mlp in zip(scales, seen["mlp"])]
    return seen


# ---- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_every_option(option: str) -> None:
    checks.assert_parity(tiny_beit(option), images())


@pytest.mark.parametrize("option", ["avg_fc_norm_abs_pos", "avg_norm_before_pool", "cls_token_pool"])
def test_projection_is_the_pooled_head_of_one_token(option: str) -> None:
    # the head of a sequence whose image tokens are all h: the mean is h (avg), or h is the CLS token
    checks.assert_projects_as_pooled_head(tiny_beit(option), width=32, count=5)


# ---- streams -----------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["block_and_shared_rel_pos", "swiglu_scale_mlp", "qkv_bias_separate"])
def test_streams_are_timm_modules_outputs(option: str) -> None:
    model = tiny_beit(option)
    x = images()
    with torch.no_grad():
        seen = capture(model, x)
    checks.assert_streams_are(adapter_for(model), x, seen)


@pytest.mark.parametrize("option", ["block_rel_pos_layer_scale", "shared_rel_pos_no_abs_pos", "block_and_shared_rel_pos"])
def test_attention_probabilities_are_timms_unfused(option: str) -> None:
    model = tiny_beit(option)
    x = images()
    recorded = checks.assert_probs_are_timms_unfused(model, x)
    with torch.no_grad():
        # the relative position bias matters: without it the probabilities differ
        block = model.blocks[0]
        q, k, _ = F.linear(block.norm1(adapter_for(model).embed(x)), block.attn.qkv.weight,
                           torch.cat((block.attn.q_bias, block.attn.k_bias, block.attn.v_bias))
                           ).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        plain = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        assert (plain - recorded[0]).abs().max() > 1e-2


# ---- perturbations -----------------------------------------------------------------------
@pytest.mark.parametrize("perturbation", ["self_only", "no_cls"])
def test_attention_perturbation_is_timms_masked_forward(perturbation: str) -> None:
    model = tiny_beit("block_and_shared_rel_pos")
    x = images()
    # by hand: image queries are tokens 1..16; self_only keeps i->i and i->CLS, no_cls drops i->CLS
    mask = torch.ones(17, 17)
    if perturbation == "self_only":
        mask[1:, 1:] = torch.eye(16)
    else:
        mask[1:, 0] = 0.0
    assert torch.equal(attention_keep_mask(perturbation, 17, 1, True), mask)
    expected, _ = checks.assert_keep_mask_is_timms(model, x, mask)
    labels = torch.tensor([2, 5])
    out = Lens(model).run(x, labels, attention_perturbation=perturbation)
    assert torch.equal(out.prediction, expected.argmax(-1))


def test_token_removal_is_timms_renormalised_attention_over_kept_keys() -> None:
    model = tiny_beit("block_and_shared_rel_pos")
    x = images()
    adapter = adapter_for(model)
    token_keep = torch.ones(2, 16, dtype=torch.bool)
    token_keep[0, [0, 5, 6, 15]] = False
    token_keep[1, 3:12] = False
    key_keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), token_keep], dim=1)  # [B, T]
    # timm's own modules: removed keys get weight 0, the kept weights renormalised (= softmax
    # of the shortened sequence with every kept pair's relative position bias unchanged)
    final: list[torch.Tensor] = []
    model.norm.register_forward_hook(lambda m, a, o: final.append(a[0]))

    def remove(probs: torch.Tensor) -> torch.Tensor:
        kept = probs * key_keep[:, None, None, :]
        return kept / kept.sum(-1, keepdim=True)

    handles = checks.timm_with_probs(model.blocks, remove)
    with torch.no_grad():
        model(x)
        hidden = final[0]  # [B, T, d] the last block's output
        mean = torch.stack([hidden[i, 1:][token_keep[i]].mean(0) for i in range(2)])  # kept image tokens only
        expected = model.head(model.fc_norm(mean))
        kept = torch.stack([torch.nonzero(key_keep[i, 1:]).squeeze(1)[:7] + 1 for i in range(2)])  # 7 kept each
        keys_7 = torch.zeros_like(key_keep)
        keys_7[:, 0] = True
        keys_7.scatter_(1, kept, True)
        logits_keeping = adapter.logits_keeping(adapter.embed(x), kept)
    assert torch.allclose(adapter.model_logits(adapter.run_blocks(adapter.embed(x), key_keep), key_keep), expected, atol=1e-5)
    labels = torch.tensor([1, 8])
    out = Lens(model).run(x, labels, token_keep=token_keep)
    assert torch.equal(out.prediction, expected.argmax(-1))
    assert torch.equal(out.token_present, key_keep)
    last = out.num_blocks
    token_logits = model.head(model.fc_norm(hidden))  # [B, T, C] each token alone through the head
    for i in range(2):
        present = key_keep[i]
        assert torch.allclose(out.correct_logit[i, last, STREAM_RESID][present], token_logits[i, present, labels[i]], atol=1e-5)
        assert bool(out.rank[i, last, STREAM_RESID][~present].eq(-1).all())
    # deletion's logits_keeping: the same with 7 tokens kept, from timm's modules
    final.clear()

    def keep_seven(probs: torch.Tensor) -> torch.Tensor:
        kept_probs = probs * keys_7[:, None, None, :]
        return kept_probs / kept_probs.sum(-1, keepdim=True)

    for handle in handles:
        handle.remove()
    checks.timm_with_probs(model.blocks, keep_seven)
    with torch.no_grad():
        model(x)
        seven = torch.stack([final[0][i][keys_7[i]][1:].mean(0) for i in range(2)])
        assert torch.allclose(logits_keeping, model.head(model.fc_norm(seven)), atol=1e-5)


# ---- end to end --------------------------------------------------------------------------
def test_lens_run_end_to_end() -> None:
    model = tiny_beit("block_rel_pos_layer_scale")
    x = images(3)
    labels = torch.tensor([0, 4, 9])
    seen = capture(model, x)
    out = checks.assert_lens_resid_is_timms(model, x, labels, seen, lambda h: model.head(model.fc_norm(h)))
    with torch.no_grad():
        attn_logits = model.head(model.fc_norm(model.blocks[1].gamma_1 * seen["attn"][1]))
        assert torch.allclose(out.correct_logit[:, 2, 1], attn_logits[torch.arange(3), :, labels], atol=1e-4)


def test_explain_gradients_are_timms() -> None:
    model = tiny_beit("cls_token_pool")
    labels = torch.tensor([3, 6])
    checks.assert_explain_gradients_are_timms(model, images(), labels, shared_rel_pos_bias=shared_bias(model))


# ---- what is refused / skipped -----------------------------------------------------------
def test_skipped_experiments() -> None:
    assert adapter_for(tiny_beit("avg_fc_norm_abs_pos")).anatomy.skip_reason("explain").endswith("global_pool='avg'")
    anatomy = adapter_for(tiny_beit("cls_token_pool")).anatomy
    assert anatomy.skipped == () and anatomy.family == "beit" and anatomy.grid_size == (4, 4)
    assert anatomy.token_cell == (8, 8) and anatomy.num_prefix_tokens == 1 and anatomy.has_class_token


def test_refusals() -> None:
    checks.assert_usual_refusals(lambda **options: Beit(**{**TINY, **options}))
    assert type(adapter_for(tiny_beit("avg_fc_norm_abs_pos"))) is BeitAdapter
    model = tiny_beit("avg_fc_norm_abs_pos")
    model.blocks[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(UserError, match="block 1: unsupported MLP Sequential"):
        adapter_for(model)
    model = tiny_beit("block_rel_pos_layer_scale")
    model.blocks[0].attn.window_size = (2, 2)
    with pytest.raises(UserError, match=r"block 1's relative position table has window \(2, 2\) but the token grid is \(4, 4\)"):
        adapter_for(model)
