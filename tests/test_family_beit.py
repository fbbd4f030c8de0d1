"""The BEiT adapter (`vitlens/lens/families/beit.py`) against timm's own `Beit` modules.

Every expectation comes from timm itself: `model(x)`, its blocks / attention / MLP captured
with forward hooks, its unfused attention path (`fused_attn = False`) whose `attn_drop`
input is the post-softmax attention, and — for the perturbations — that same `attn_drop`
made to return the perturbed probabilities, so timm's own modules compute the perturbed
forward. Tiny configs of the real class, every parameter re-drawn (BEiT's zero bias tables,
1e-3 head and LayerScale inits would hide whole branches).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.vision_transformer import Block as VitBlock

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import STREAM_RESID, Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.families.beit import BeitAdapter
from vitlens.lens.parity import check_parity
from vitlens.lens.perturb import attention_keep_mask

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


def tiny_beit(option: str, seed: int = 0) -> Beit:
    """A tiny `Beit` with every parameter re-drawn at a scale where attention is far from uniform."""
    torch.manual_seed(seed)
    model = Beit(**{**TINY, **OPTIONS[option]}).eval()
    if option == "qkv_bias_separate":
        for block in model.blocks:
            block.attn.qkv_bias_separate = True
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name:
                parameter.normal_(0.0, 1.5)
            elif "gamma" in name:
                parameter.uniform_(0.3, 1.0)
            else:
                parameter.normal_(0.0, 0.3)
    return model


def images(batch: int = 2) -> torch.Tensor:
    """# -> [B, 3, 32, 32]"""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def shared_bias(model: Beit) -> torch.Tensor | None:
    """What `Beit.forward_features` passes every block. # -> [H, T, T] | None"""
    return model.rel_pos_bias() if model.rel_pos_bias is not None else None


def capture(model: Beit, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """timm's own forward with every block's input, attention output (before `gamma_1`), input
    of `attn.proj`, MLP output (before `gamma_2`), `fc1` output and block output recorded.

    # x: [B, 3, H, W] -> lists over blocks of [B, T, ...]
    """
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in ("input", "attn", "proj_in", "mlp", "fc1", "output")}
    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(lambda m, a: seen["input"].append(a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o: seen["output"].append(o)))
        handles.append(block.attn.register_forward_hook(lambda m, a, o: seen["attn"].append(o)))
        handles.append(block.attn.proj.register_forward_pre_hook(lambda m, a: seen["proj_in"].append(a[0])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o: seen["mlp"].append(o)))
        fc1 = block.mlp.fc1 if hasattr(block.mlp, "fc1") else None
        if fc1 is not None:
            handles.append(fc1.register_forward_hook(lambda m, a, o: seen["fc1"].append(o)))
    try:
        seen["logits"] = [model(x)]
    finally:
        for handle in handles:
            handle.remove()
    return seen


def timm_with_probs(model: Beit, edit) -> None:
    """Switch timm's attention to its unfused path and let `edit(probs)` replace the output of
    every block's `attn_drop` (the post-softmax attention) — timm's own modules then compute
    the edited forward."""
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o: edit(o))


# ---- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_every_option(option: str) -> None:
    model = tiny_beit(option)
    result = check_parity(model, images())
    assert result.logit_scale > 1.0  # the logits are not trivially small
    assert result.ok, result
    assert result.forward_error < 1e-5 and result.projection_error < 1e-5


@pytest.mark.parametrize("option", ["avg_fc_norm_abs_pos", "avg_norm_before_pool", "cls_token_pool"])
def test_projection_is_the_pooled_head_of_one_token(option: str) -> None:
    model = tiny_beit(option)
    adapter = adapter_for(model)
    hidden = torch.randn(3, 5, 32)
    with torch.no_grad():
        # the head of a sequence whose image tokens are all h: the mean is h (avg), or h is the CLS token
        for t in range(5):
            h = hidden[:, t]  # [3, d]
            sequence = h[:, None].expand(-1, 1 + 16, -1)
            expected = model.forward_head(model.norm(sequence))
            assert torch.allclose(adapter.project(h), expected, atol=1e-5)


# ---- streams -----------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["block_and_shared_rel_pos", "swiglu_scale_mlp", "qkv_bias_separate"])
def test_streams_are_timm_modules_outputs(option: str) -> None:
    model = tiny_beit(option)
    x = images()
    adapter = adapter_for(model)
    with torch.no_grad():
        seen = capture(model, x)
        hidden = adapter.embed(x)
        assert torch.allclose(hidden, seen["input"][0], atol=1e-6)
        for b, trace in enumerate(adapter.iter_block_traces(hidden)):
            block = model.blocks[b]
            gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
            gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
            assert torch.allclose(trace.resid_pre, seen["input"][b], atol=1e-5)
            assert torch.allclose(trace.attn_out, gamma_1 * seen["attn"][b], atol=1e-5)
            assert torch.allclose(trace.attn_coefficients, seen["proj_in"][b], atol=1e-5)
            assert torch.allclose(trace.resid_mid, seen["input"][b] + gamma_1 * seen["attn"][b], atol=1e-5)
            assert torch.allclose(trace.mlp_out, gamma_2 * seen["mlp"][b], atol=1e-5)
            if seen["fc1"]:
                assert torch.allclose(trace.mlp_coefficients, seen["fc1"][b], atol=1e-5)
            assert torch.allclose(trace.resid_post, seen["output"][b], atol=1e-5)
            assert adapter.value_vectors(b + 1, "attn") is block.attn.proj.weight
            assert adapter.value_vectors(b + 1, "mlp") is block.mlp.fc2.weight
        assert torch.allclose(adapter.model_logits(trace.resid_post), seen["logits"][0], atol=1e-5)


@pytest.mark.parametrize("option", ["block_rel_pos_layer_scale", "shared_rel_pos_no_abs_pos", "block_and_shared_rel_pos"])
def test_attention_probabilities_are_timms_unfused(option: str) -> None:
    model = tiny_beit(option)
    x = images()
    adapter = adapter_for(model)
    recorded: list[torch.Tensor] = []
    timm_with_probs(model, lambda probs: recorded.append(probs))
    with torch.no_grad():
        expected = model(x)
        resid = adapter.embed(x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, need_probs=True)):
            assert trace.attn_probs.shape == (2, 2, 17, 17)
            assert torch.allclose(trace.attn_probs, recorded[b], atol=1e-6)
            resid = trace.resid_post
        assert torch.allclose(adapter.model_logits(resid), expected, atol=1e-5)
        # the relative position bias matters: without it the probabilities differ
        block = model.blocks[0]
        q, k, _ = F.linear(block.norm1(adapter.embed(x)), block.attn.qkv.weight,
                           torch.cat((block.attn.q_bias, block.attn.k_bias, block.attn.v_bias))
                           ).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        plain = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        assert (plain - recorded[0]).abs().max() > 1e-2


# ---- perturbations -----------------------------------------------------------------------
@pytest.mark.parametrize("perturbation", ["self_only", "no_cls"])
def test_attention_perturbation_is_timms_masked_forward(perturbation: str) -> None:
    model = tiny_beit("block_and_shared_rel_pos")
    x = images()
    adapter = adapter_for(model)
    # by hand: image queries are tokens 1..16; self_only keeps i->i and i->CLS, no_cls drops i->CLS
    mask = torch.ones(17, 17)
    if perturbation == "self_only":
        mask[1:, 1:] = torch.eye(16)
    else:
        mask[1:, 0] = 0.0
    assert torch.equal(attention_keep_mask(perturbation, 17, 1, True), mask)
    outputs: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, o: outputs.append(o))
    timm_with_probs(model, lambda probs: probs * mask)
    with torch.no_grad():
        expected = model(x)
        resid = adapter.embed(x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, keep_mask=mask)):
            assert torch.allclose(trace.resid_post, outputs[b], atol=1e-5)
            resid = trace.resid_post
        assert torch.allclose(adapter.model_logits(resid), expected, atol=1e-5)
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

    timm_with_probs(model, remove)
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

    for block in model.blocks:
        block.attn.attn_drop._forward_hooks.clear()
    timm_with_probs(model, keep_seven)
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
    out = Lens(model).run(x, labels)
    assert out.rank.shape == (3, 3, 3, 17)
    assert torch.equal(out.prediction, seen["logits"][0].argmax(-1))
    with torch.no_grad():
        for slot in range(3):
            hidden = seen["input"][0] if slot == 0 else seen["output"][slot - 1]
            logits = model.head(model.fc_norm(hidden))  # [B, T, C]
            correct = logits[torch.arange(3), :, labels]  # [B, T]
            assert torch.allclose(out.correct_logit[:, slot, STREAM_RESID], correct, atol=1e-4)
            rank = (logits > correct[..., None]).sum(-1)
            assert torch.equal(out.rank[:, slot, STREAM_RESID].long(), rank)
        attn_logits = model.head(model.fc_norm(model.blocks[1].gamma_1 * seen["attn"][1]))
        assert torch.allclose(out.correct_logit[:, 2, 1], attn_logits[torch.arange(3), :, labels], atol=1e-4)


def test_explain_gradients_are_timms() -> None:
    model = tiny_beit("cls_token_pool")
    x = images()
    labels = torch.tensor([3, 6])
    importance = block_head_importance(model, x, labels)  # [B, L, H, N]
    assert importance.shape == (2, 2, 2, 16)
    seen = capture(model, x)
    for b, block in enumerate(model.blocks):
        leaves: list[torch.Tensor] = []

        def leaf_row(m, a, probs):
            row = probs[:, :, 0].detach().clone().requires_grad_(True)
            leaves.append(row)
            return torch.cat([row[:, :, None], probs[:, :, 1:].detach()], dim=2)

        block.attn.fused_attn = False
        handle = block.attn.attn_drop.register_forward_hook(leaf_row)
        out = block(seen["input"][b].detach(), shared_rel_pos_bias=shared_bias(model))
        handle.remove()
        loss = F.cross_entropy(model.forward_head(model.norm(out)), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaves[0])
        assert torch.allclose(importance[:, b], -grad[:, :, 1:], atol=1e-5)
        assert grad.abs().max() > 1e-4


# ---- what is refused / skipped -----------------------------------------------------------
def test_skipped_experiments() -> None:
    assert adapter_for(tiny_beit("avg_fc_norm_abs_pos")).anatomy.skip_reason("explain").endswith("global_pool='avg'")
    anatomy = adapter_for(tiny_beit("cls_token_pool")).anatomy
    assert anatomy.skipped == () and anatomy.family == "beit" and anatomy.grid_size == (4, 4)
    assert anatomy.token_cell == (8, 8) and anatomy.num_prefix_tokens == 1 and anatomy.has_class_token


def test_refusals() -> None:
    with pytest.raises(UserError, match="global_pool=''"):
        BeitAdapter(Beit(**{**TINY, "global_pool": ""}))
    with pytest.raises(UserError, match="headless"):
        adapter_for(Beit(**{**TINY, "num_classes": 0}))
    model = tiny_beit("avg_fc_norm_abs_pos")
    model.blocks[1] = VitBlock(32, 2)
    with pytest.raises(UserError, match="block 2: unsupported transformer block Block"):
        adapter_for(model)
    model = tiny_beit("avg_fc_norm_abs_pos")
    model.blocks[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(UserError, match="block 1: unsupported MLP Sequential"):
        adapter_for(model)
    model = tiny_beit("block_rel_pos_layer_scale")
    model.blocks[0].attn.window_size = (2, 2)
    with pytest.raises(UserError, match=r"block 1's relative position table has window \(2, 2\) but the token grid is \(4, 4\)"):
        adapter_for(model)
