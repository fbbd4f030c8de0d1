"""The ViT adapter in every option timm's `VisionTransformer` offers: parity with `model(x)`,
streams equal to timm's own modules (forward hooks), pooling-aware projections by hand
(METHOD §1b), the generic explainability branch and deletion path equal to the fast ones,
and one-line refusals for what stays unsupported."""

from __future__ import annotations

import pytest
import torch
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
)

from vitlens.errors import UserError
from vitlens.lens import Lens, adapter_for
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.parity import check_parity

from tests.family_checks import timm_block_outputs
from tests.test_lens_forward import tiny_vit  # a tiny ViT with attention far from uniform

OPTIONS = {
    "cls": {},
    "registers_no_cls_avg": dict(class_token=False, reg_tokens=2, global_pool="avg"),
    "avg_norm_before_pool": dict(global_pool="avg", fc_norm=False),
    "avg_fc_norm": dict(global_pool="avg", fc_norm=True),
    "avg_including_prefix": dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1),
    "max": dict(class_token=False, global_pool="max"),
    "avgmax": dict(global_pool="avgmax"),
    "map": dict(class_token=False, global_pool="map"),
    "post_norm": dict(block_fn=ResPostBlock, class_token=False, global_pool="avg"),
    "parallel_scaling": dict(block_fn=ParallelScalingBlock, init_values=0.5),
    "parallel_things": dict(block_fn=ParallelThingsBlock),
    "swiglu": dict(mlp_layer=SwiGLU),
    "swiglu_packed": dict(mlp_layer=SwiGLUPacked, mlp_ratio=2.0),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_and_lens_for_every_option(option: str) -> None:
    model = tiny_vit(**OPTIONS[option])
    images = torch.randn(3, 3, 32, 32)
    parity = check_parity(model, images)
    assert parity.ok, parity
    out = Lens(model).run(images, torch.tensor([1, 2, 3]))
    tokens = model.num_prefix_tokens + 16
    assert out.rank.shape == (3, 3, 3, tokens)
    assert bool((out.rank[:, 1:] >= 0).all()) and bool((out.rank[:, 0, 0] >= 0).all())
    assert torch.equal(out.prediction, model(images).argmax(dim=1))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_block_outputs_equal_timms_own_blocks(option: str) -> None:
    model = tiny_vit(**OPTIONS[option])
    captured, traces = timm_block_outputs(model, torch.randn(2, 3, 32, 32), model.blocks)
    for trace, expected in zip(traces, captured):
        torch.testing.assert_close(trace.resid_post, expected, atol=1e-5, rtol=1e-5)
        # the sub-layers add exactly what the block adds
        torch.testing.assert_close(trace.resid_pre + trace.attn_out + trace.mlp_out, expected, atol=1e-5, rtol=1e-5)


def test_pre_norm_sublayer_streams_equal_timms_modules() -> None:
    model = tiny_vit(init_values=0.5, mlp_layer=SwiGLU)
    images = torch.randn(2, 3, 32, 32)
    block = model.blocks[0]
    seen: dict[str, torch.Tensor] = {}
    block.attn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("attn", out))
    block.mlp.register_forward_hook(lambda _m, _i, out: seen.__setitem__("mlp", out))
    block.mlp.fc2.register_forward_hook(lambda _m, inputs, _o: seen.__setitem__("fc2_in", inputs[0]))
    with torch.inference_mode():
        model(images)
        adapter = adapter_for(model)
        trace = next(adapter.iter_block_traces(adapter.embed(images)))
        torch.testing.assert_close(trace.attn_out, block.ls1(seen["attn"]))
        torch.testing.assert_close(trace.mlp_out, block.ls2(seen["mlp"]))
    # gated MLP: the memory coefficients are what multiplies fc2's columns (lens/mlp.py)
    torch.testing.assert_close(trace.mlp_coefficients, seen["fc2_in"])
    assert adapter.value_vectors(1, "mlp").shape == (32, trace.mlp_coefficients.shape[-1])


def test_attention_pooling_projects_a_token_as_a_one_token_sequence() -> None:
    """METHOD §1b `map`: head(attn_pool(norm h)) on one token — by hand, a softmax over one key
    is 1, so the pool's output is proj(v(x)) plus its MLP on that."""
    model = tiny_vit(class_token=False, global_pool="map")
    pool = model.attn_pool
    hidden = torch.randn(2, 5, 32)
    with torch.inference_mode():
        x = model.norm(hidden)
        values = pool.kv(x)[..., 32:]  # kv = [k | v]
        pooled = pool.proj(values)
        pooled = pooled + pool.mlp(pool.norm(pooled))
        expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(adapter_for(model).project(hidden), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", ["avg_norm_before_pool", "avg_fc_norm", "max"])
def test_average_and_max_pooling_project_a_token_through_both_norms(option: str) -> None:
    model = tiny_vit(**OPTIONS[option])
    hidden = torch.randn(2, 5, 32)
    with torch.inference_mode():
        expected = model.head(model.fc_norm(model.norm(hidden)))
        torch.testing.assert_close(adapter_for(model).project(hidden), expected)


def test_generic_cls_branch_equals_the_fast_vit_branch() -> None:
    model = tiny_vit(init_values=0.5)
    images = torch.randn(2, 3, 32, 32)
    adapter = adapter_for(model)
    with torch.no_grad():
        trace = next(adapter.iter_block_traces(adapter.embed(images), need_probs=True))
    for source in ("resid", "attn"):
        rows = [trace.attn_probs[:, :, 0].clone().requires_grad_(True) for _ in range(2)]
        with torch.enable_grad():
            fast = adapter.cls_branch(1, trace, rows[0], source)
            generic = ModelAdapter.cls_branch(adapter, 1, trace, rows[1], source)
            torch.testing.assert_close(fast, generic, atol=1e-5, rtol=1e-5)
            (fast.square().sum() + generic.square().sum()).backward()
        torch.testing.assert_close(rows[0].grad, rows[1].grad, atol=1e-4, rtol=1e-4)


def test_generic_token_removal_equals_the_shortened_sequence() -> None:
    """Key masking at full length (ModelAdapter.logits_keeping) == gathering the kept tokens."""
    model = tiny_vit(reg_tokens=1)
    images = torch.randn(3, 3, 32, 32)
    adapter = adapter_for(model)
    kept = torch.stack([torch.randperm(16)[:5].sort().values for _ in range(3)]) + 2
    with torch.inference_mode():
        hidden = adapter.embed(images)
        masked = ModelAdapter.logits_keeping(adapter, hidden, kept)
        short = torch.cat([hidden[:, :2], hidden.gather(1, kept[:, :, None].expand(-1, -1, 32))], dim=1)
        torch.testing.assert_close(masked, model.forward_head(model.norm(model.blocks(short))), atol=1e-5, rtol=1e-5)


def test_skipped_experiments_name_their_reason() -> None:
    assert dict(adapter_for(tiny_vit()).anatomy.skipped) == {}
    gap = dict(adapter_for(tiny_vit(**OPTIONS["registers_no_cls_avg"])).anatomy.skipped)
    assert gap["attn_no_cls"] == "the model has no CLS token"
    assert "global_pool='avg'" in gap["explain"]
    things = dict(adapter_for(tiny_vit(block_fn=ParallelThingsBlock)).anatomy.skipped)
    assert "ParallelThingsBlock" in things["explain"]


def test_refusals_are_one_line_and_name_the_reason() -> None:
    with pytest.raises(UserError, match="block 1: unsupported attention DiffAttention"):
        adapter_for(tiny_vit(attn_layer="diff"))
    model = tiny_vit(block_fn=ParallelScalingBlock)
    model.blocks[0].out_proj = torch.nn.Linear(32 + 128, 32)
    with pytest.raises(UserError, match="fused output projection"):
        adapter_for(model)
    with pytest.raises(UserError, match="headless"):
        adapter_for(tiny_vit(num_classes=0))
    with pytest.raises(UserError, match="no adapter for Sequential"):
        adapter_for(torch.nn.Sequential())
    with torch.device("meta"):
        assert adapter_for(tiny_vit(block_fn=Block)).anatomy.family == "vit"


@pytest.mark.parametrize("fused", [True, False])
def test_attention_pooling_over_kept_tokens_equals_the_shortened_sequence(fused: bool) -> None:
    model = tiny_vit(class_token=False, global_pool="map")
    model.attn_pool.fused_attn = fused
    adapter = adapter_for(model)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, 5:] = False
    with torch.inference_mode():
        final = adapter.run_blocks(adapter.embed(torch.randn(2, 3, 32, 32)), keep)
        expected = model.head(model.fc_norm(model.attn_pool(model.norm(final)[:, :5])))
        torch.testing.assert_close(adapter.model_logits(final, keep), expected, atol=1e-5, rtol=1e-5)


def test_vitamin_gated_mlp_streams_and_memories_are_timms() -> None:
    """ViTamin's `GeGluMlp` (norm, act(w0 x) * w1 x, w2): parity, the MLP stream equal to timm's
    own module output, the memory coefficients equal to what `w2` receives (a forward pre-hook),
    and the value vectors `w2`'s columns."""
    from timm.models.vitamin import GeGluMlp

    from vitlens.lens.memories import value_vectors

    model = tiny_vit(seed=3, mlp_layer=GeGluMlp)
    images = torch.randn(2, 3, 32, 32)
    assert check_parity(model, images).ok
    received, outputs = [], []
    block = model.blocks[0]
    handles = [block.mlp.w2.register_forward_pre_hook(lambda m, args: received.append(args[0])),
               block.mlp.register_forward_hook(lambda m, args, out: outputs.append(out))]
    try:
        with torch.no_grad():
            model(images)
            adapter = adapter_for(model)
            trace = next(adapter.iter_block_traces(adapter.embed(images)))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(trace.mlp_coefficients, received[0], atol=1e-6)
    assert torch.allclose(trace.mlp_out, block.ls2(outputs[0]), atol=1e-6)
    assert torch.equal(value_vectors(model, 1, "mlp"), block.mlp.w2.weight)
