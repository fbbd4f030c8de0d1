"""`AttentionHeads`: a block's attention output as a linear map of its per-head coefficients
(METHOD §3b), and the helpers the family adapters build it with (`ModelAdapter.attention_heads`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.errors import UserError


@dataclass(frozen=True)
class AttentionHeads:
    """Block b's attention output as a linear function of its coefficients (the output
    projection's input, `BlockTrace.attn_coefficients`): `attn_out = coefficients @ weightᵀ + bias`,
    head h owning coefficients `h·hd .. (h+1)·hd − 1` (METHOD §3b)."""

    weight: torch.Tensor  # [d, Ma] γ ⊙ W_O: the output projection with the layer scale folded in
    bias: torch.Tensor | None  # [d] γ ⊙ b_O
    num_heads: int


def output_heads(projection: torch.nn.Module, gamma: torch.Tensor | None, num_heads: int) -> AttentionHeads:
    """`AttentionHeads` of an output projection (an `nn.Linear`) followed by a layer scale `gamma`
    (None: none); refuses (`UserError`) another projection or coefficients that do not split
    into `num_heads` equal slices.

    # gamma: [d] | None -> AttentionHeads (weight [d, Ma], bias [d] | None)
    """
    if not isinstance(projection, torch.nn.Linear):
        raise UserError(f"the attention's output projection is a {type(projection).__name__}, not a linear layer")
    if projection.in_features % num_heads:
        raise UserError(f"the output projection's {projection.in_features} inputs do not split into {num_heads} heads")
    weight, bias = projection.weight, projection.bias
    if gamma is not None:
        weight = gamma[:, None] * weight
        bias = None if bias is None else gamma * bias
    return AttentionHeads(weight=weight, bias=bias, num_heads=num_heads)


def layer_scale_vector(module: torch.nn.Module | torch.Tensor | None) -> torch.Tensor | None:
    """The vector of a layer scale given as a module (timm / open_clip `LayerScale`: `.gamma`;
    `nn.Identity`: None) or as the vector itself (BEiT / Eva / CaiT `gamma_1`)."""
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    if isinstance(module, torch.Tensor):
        return module
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, torch.Tensor):
        raise UserError(f"unsupported layer scale {type(module).__name__} (no gamma vector)")
    return gamma
