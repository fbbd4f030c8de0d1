"""The hooked forward reproduces timm exactly; attention probabilities are real probabilities."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from vitlens.lens import Lens, STREAM_RESID, describe_model, embed, iter_block_traces, model_logits, project
from vitlens.lens.attention import attention_sublayer

from tests.family_checks import tiny

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
ARCHITECTURES = {
    "cls": {},
    "cls_layerscale_registers_qknorm": dict(init_values=0.3, reg_tokens=2, qk_norm=True),
    "gap_post_norm": dict(class_token=False, global_pool="avg", block_fn=ResPostBlock, init_values=0.5),
}


def tiny_vit(seed: int = 0, **overrides: object) -> VisionTransformer:
    """A tiny timm ViT with every parameter re-drawn at a scale where attention is far from uniform."""
    return tiny(lambda: VisionTransformer(**{**TINY, **overrides}), seed)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_last_block_projection_equals_model_logits(arch: str) -> None:
    model = tiny_vit(**ARCHITECTURES[arch])
    images = torch.randn(4, 3, 32, 32)
    expected = model(images)  # timm's own forward, fused attention
    anatomy = describe_model(model)
    with torch.inference_mode():
        traces = list(iter_block_traces(model, embed(model, images, anatomy), anatomy))
        final = traces[-1].resid_post
        tokens_logits = project(model, final)  # [B, T, C]
        assert torch.allclose(model_logits(model, final), expected, atol=1e-5)
    if anatomy.is_gap:
        pooled = model.head(model.fc_norm(final.mean(dim=1)))
        assert torch.allclose(pooled, expected, atol=1e-5)
    else:
        assert torch.allclose(tokens_logits[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["cls", "cls_layerscale_registers_qknorm"])
def test_lens_last_block_cls_topk_and_prediction_match_model(arch: str) -> None:
    model = tiny_vit(**ARCHITECTURES[arch])
    images = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 3, 5, 7, 9])
    expected = model(images)
    out = Lens(model).run(images, labels)
    last = out.num_blocks
    top = expected.topk(5, dim=-1)
    assert torch.allclose(out.topk_logit[:, last, STREAM_RESID, 0], top.values, atol=1e-5)
    assert torch.equal(out.topk_class[:, last, STREAM_RESID, 0].long(), top.indices)
    assert torch.allclose(out.correct_logit[:, last, STREAM_RESID, 0], expected[torch.arange(5), labels], atol=1e-5)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    assert torch.equal(out.correct, expected.argmax(dim=-1) == labels)


def manual_attention_probs(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities straight from the qkv weights (no q/k norm in this model)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    q_w, k_w, _ = attn.qkv.weight.chunk(3, dim=0)
    q_b, k_b, _ = attn.qkv.bias.chunk(3, dim=0)
    q = (x @ q_w.T + q_b).unflatten(-1, (heads, head_dim)).transpose(1, 2)
    k = (x @ k_w.T + k_b).unflatten(-1, (heads, head_dim)).transpose(1, 2)
    scores = torch.einsum("bhqe,bhke->bhqk", q, k) / head_dim ** 0.5
    return scores.softmax(dim=-1)


def test_attention_probs_sum_to_one_and_reproduce_fused_output() -> None:
    model = tiny_vit()
    attn = model.blocks[0].attn
    assert attn.fused_attn, "timm should use the fused SDPA path here"
    x = torch.randn(3, 17, 32)
    with torch.inference_mode():
        fused = attn(x)  # timm, scaled_dot_product_attention
        explicit = attention_sublayer(attn, x, need_probs=True)
        implicit = attention_sublayer(attn, x)
        manual = manual_attention_probs(attn, x)
        reprojected = attn.proj(explicit.coefficients)
    assert explicit.probs is not None and implicit.probs is None
    assert torch.allclose(explicit.probs.sum(dim=-1), torch.ones(3, 2, 17), atol=1e-6)
    assert torch.allclose(explicit.probs, manual, atol=1e-6)
    assert torch.allclose(explicit.output, fused, atol=1e-5)
    assert torch.allclose(implicit.output, fused, atol=1e-6)
    # coefficients are the input of attn.proj: proj(coefficients) is the output
    assert torch.allclose(reprojected, fused, atol=1e-5)


def test_mlp_coefficients_are_fc1_pre_activation_and_streams_add_up() -> None:
    model = tiny_vit(init_values=0.3)
    images = torch.randn(2, 3, 32, 32)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: captured.__setitem__("fc1", o)),
        model.blocks[0].ls1.register_forward_hook(lambda m, i, o: captured.__setitem__("attn", o)),
        model.blocks[0].ls2.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o)),
    ]
    model(images)
    for hook in hooks:
        hook.remove()
    anatomy = describe_model(model)
    with torch.inference_mode():
        first = next(iter_block_traces(model, embed(model, images, anatomy), anatomy))
    assert torch.allclose(first.mlp_coefficients, captured["fc1"], atol=1e-5)
    assert torch.allclose(first.attn_out, captured["attn"], atol=1e-5)
    assert torch.allclose(first.mlp_out, captured["mlp"], atol=1e-5)
    assert torch.allclose(first.resid_pre + first.attn_out, first.resid_mid, atol=1e-6)
    assert torch.allclose(first.resid_mid + first.mlp_out, first.resid_post, atol=1e-6)


def test_post_norm_sublayer_streams_pass_through_block_post_norm() -> None:
    model = tiny_vit(**ARCHITECTURES["gap_post_norm"])
    block = model.blocks[0]
    images = torch.randn(2, 3, 32, 32)
    anatomy = describe_model(model)
    with torch.inference_mode():
        hidden = embed(model, images, anatomy)
        trace = next(iter_block_traces(model, hidden, anatomy))
        assert torch.allclose(trace.attn_out, block.norm1(block.attn(hidden)), atol=1e-5)
        assert torch.allclose(trace.mlp_out, block.norm2(block.mlp(trace.resid_mid)), atol=1e-5)
        assert torch.allclose(trace.resid_post, block(hidden), atol=1e-5)


def test_materialised_attention_keeps_the_logits() -> None:
    """With the probabilities recomputed in every block (unfused path) the output is unchanged."""
    model = tiny_vit(init_values=0.3, qk_norm=True)
    images = torch.randn(3, 3, 32, 32)
    expected = model(images)
    anatomy = describe_model(model)
    with torch.inference_mode():
        traces = list(iter_block_traces(model, embed(model, images, anatomy), anatomy, need_probs=True))
        logits = model_logits(model, traces[-1].resid_post)
    assert all(trace.attn_probs is not None for trace in traces)
    assert torch.allclose(logits, expected, atol=1e-5)
