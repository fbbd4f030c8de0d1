"""One-backward block/head gradients equal separate per-block `torch.autograd.grad` on the
full graph; baselines match hand computations; GAP models are rejected."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SwiGLU
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from vitlens.errors import UserError
from vitlens.explain.baselines import attention_rollout, chefer_relevancy, last_block_attention, random_importance
from vitlens.explain.gradients import block_head_importance, global_importance
from vitlens.lens.anatomy import describe_model, project
from vitlens.lens.forward import embed, iter_block_traces


def tiny_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


def per_block_autograd(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, source: str) -> torch.Tensor:
    """Independent reference: full graph, one autograd.grad per block on that block's loss only."""
    anatomy = describe_model(model)
    with torch.enable_grad():
        hidden = embed(model, images, anatomy)
        traces = list(iter_block_traces(model, hidden, anatomy, need_probs=True))
        per_block = []
        for trace in traces:
            stream = trace.resid_post if source == "resid" else trace.attn_out
            loss = F.cross_entropy(project(model, stream[:, 0]), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, trace.attn_probs, retain_graph=True)
            per_block.append(-grad[:, :, 0, anatomy.num_prefix_tokens:])
    return torch.stack(per_block, 1)


@pytest.mark.parametrize("source", ["resid", "attn"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"reg_tokens": 2}, {"block_fn": ResPostBlock}, {"block_fn": ParallelScalingBlock}, {"mlp_layer": SwiGLU}],
    ids=["cls", "registers", "postnorm", "parallel_generic_branch", "swiglu"],
)
def test_one_backward_equals_per_block_autograd(source: str, overrides: dict) -> None:
    model = tiny_vit(**overrides)
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([1, 4, 7])
    ours = block_head_importance(model, images, labels, source=source)
    reference = per_block_autograd(model, images, labels, source)
    assert ours.shape == (3, 3, 2, 16)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    assert global_importance(ours).shape == (3, 16)
    torch.testing.assert_close(global_importance(ours), reference.sum(dim=(1, 2)), atol=1e-5, rtol=1e-5)


def test_later_losses_do_not_leak_into_earlier_blocks() -> None:
    """Summing all losses on the full graph (the naive single backward) gives something else."""
    model = tiny_vit()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    anatomy = describe_model(model)
    with torch.enable_grad():
        traces = list(iter_block_traces(model, embed(model, images, anatomy), anatomy, need_probs=True))
        total = sum(F.cross_entropy(project(model, t.resid_post[:, 0]), labels, reduction="sum") for t in traces)
        (naive_first,) = torch.autograd.grad(total, traces[0].attn_probs)
    ours = block_head_importance(model, images, labels)
    assert not torch.allclose(ours[:, 0], -naive_first[:, :, 0, 1:], atol=1e-4)


def test_gap_model_is_rejected() -> None:
    with pytest.raises(UserError, match="CLS"):
        block_head_importance(tiny_vit(global_pool="avg", class_token=False), torch.randn(1, 3, 32, 32), torch.tensor([0]))


def test_chefer_rollout_attention_on_a_hand_made_example() -> None:
    # B=1, L=2, H=1, T=3 (prefix 1): hand-computed matrices
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    probs = torch.stack([a1, a2])[None, :, None]  # [1, 2, 1, 3, 3]
    grads = torch.stack([torch.ones(3, 3), -torch.ones(3, 3)])[None, :, None]
    # Chefer: block 1 weighted = a1, block 2 weighted = 0 -> R = I + a1
    torch.testing.assert_close(chefer_relevancy(probs, grads, 1), torch.tensor([[0.25, 0.25]]))
    torch.testing.assert_close(last_block_attention(probs, 1), torch.tensor([[0.8, 0.0]]))
    identity = torch.eye(3)
    r1 = (a1 + identity) / 2
    r2 = (a2 + identity) / 2
    expected = (r2 @ r1)[0, 1:]
    torch.testing.assert_close(attention_rollout(probs, 1), expected[None])


def test_random_order_is_a_seeded_permutation() -> None:
    first, again = random_importance(4, 16, seed=3), random_importance(4, 16, seed=3)
    assert torch.equal(first, again)
    assert torch.equal(first.sort(dim=1).values, torch.arange(16.0).expand(4, 16))
    assert not torch.equal(first, random_importance(4, 16, seed=4))


def test_inference_mode_is_refused_with_a_clear_error() -> None:
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        block_head_importance(tiny_vit(), torch.randn(1, 3, 32, 32), torch.tensor([0]))
