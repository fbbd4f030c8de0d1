"""Baseline token importances on the same images (METHOD §6): Chefer et al. 2021 relevancy,
raw last-block CLS attention, attention rollout (Abnar & Zuidema 2020), random order
(`random_orders`: R seeded orders; the `explain` experiment's random baseline is the mean
curve over them, `vitlens.explain.evaluate`).

All read the CLS row over image tokens; higher = more important.
"""

from __future__ import annotations

import torch

from vitlens.explain.gradients import require_autograd, require_class_token
from vitlens.lens.families import adapter_for

BASELINES: tuple[str, ...] = ("chefer", "attention", "rollout", "random")


def attention_with_gradients(
    model: torch.nn.Module, images: torch.Tensor, class_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's post-softmax attention and the gradient of the model's output logit of
    class c with respect to it (one forward, one backward).

    # images: [B, 3, H, W], class_index: [B] -> probs, gradients: [B, L, H, T, T]
    """
    require_autograd()
    adapter = adapter_for(model)
    require_class_token(adapter.anatomy)
    with torch.enable_grad():
        hidden = adapter.embed(images)
        probs: list[torch.Tensor] = []
        for trace in adapter.iter_block_traces(hidden, need_probs=True):
            probs.append(trace.attn_probs)
            hidden = trace.resid_post
        logits = adapter.model_logits(hidden)  # [B, C]
        chosen = logits.gather(1, class_index[:, None]).sum()
        gradients = torch.autograd.grad(chosen, probs)
    return torch.stack([p.detach() for p in probs], 1), torch.stack(gradients, 1)


def chefer_relevancy(probs: torch.Tensor, gradients: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Chefer et al. 2021: Ā_b = mean_h clamp(∇A_b ⊙ A_b, 0); R ← R + Ā_b R from R = I.

    # probs, gradients: [B, L, H, T, T] -> relevancy: [B, N] (CLS row, image tokens)
    """
    weighted = (gradients * probs).clamp(min=0).mean(dim=2)  # [B, L, T, T]
    tokens = probs.shape[-1]
    relevancy = torch.eye(tokens, dtype=probs.dtype, device=probs.device).expand(probs.shape[0], -1, -1)
    for block in range(probs.shape[1]):
        relevancy = relevancy + weighted[:, block] @ relevancy
    return relevancy[:, 0, num_prefix_tokens:]


def last_block_attention(probs: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Raw attention CLS gives each image token in the last block, mean over heads.

    # probs: [B, L, H, T, T] -> attention: [B, N]
    """
    return probs[:, -1, :, 0, num_prefix_tokens:].mean(dim=1)


def attention_rollout(probs: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Abnar & Zuidema 2020: average heads, add identity, row-normalise, multiply through blocks.

    # probs: [B, L, H, T, T] -> rollout: [B, N]
    """
    tokens = probs.shape[-1]
    identity = torch.eye(tokens, dtype=probs.dtype, device=probs.device)
    rollout = identity.expand(probs.shape[0], -1, -1)
    for block in range(probs.shape[1]):
        mixed = probs[:, block].mean(dim=1) + identity  # [B, T, T]
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout[:, 0, num_prefix_tokens:]


def random_orders(batch: int, num_image_tokens: int, seed: int, orders: int = 1) -> torch.Tensor:
    """`orders` seeded random orders per image (the ranks of random permutations), all drawn
    from ONE generator seeded with `seed`: order 0 is `random_importance(batch, N, seed)`.

    # -> importance: [R, B, N] (R = orders; each [b] row a permutation of 0..N-1 as floats)
    """
    if orders < 1:
        raise ValueError(f"random orders must be >= 1, got {orders}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(orders, batch, num_image_tokens, generator=generator)
    return draws.argsort(dim=2).argsort(dim=2).float()


def random_importance(batch: int, num_image_tokens: int, seed: int) -> torch.Tensor:
    """A seeded random order (a random permutation's ranks) per image.

    # -> importance: [B, N]
    """
    return random_orders(batch, num_image_tokens, seed, 1)[0]


def baseline_importances(
    model: torch.nn.Module, images: torch.Tensor, class_index: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    """All baselines of `BASELINES` on one batch, by name.

    # images: [B, 3, H, W], class_index: [B] -> {name: importance [B, N]}
    """
    prefix = adapter_for(model).anatomy.num_prefix_tokens
    probs, gradients = attention_with_gradients(model, images, class_index)
    num_image_tokens = probs.shape[-1] - prefix
    return {
        "chefer": chefer_relevancy(probs, gradients, prefix),
        "attention": last_block_attention(probs, prefix),
        "rollout": attention_rollout(probs, prefix),
        "random": random_importance(images.shape[0], num_image_tokens, seed).to(images.device),
    }
