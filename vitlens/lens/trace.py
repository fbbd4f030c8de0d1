"""`BlockTrace`: every stream of one transformer block, as each family adapter exposes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockTrace:
    """Every stream of one block (1-based `index`); hook names as in `vitlens/lens/README.md`.

    Coverage of the token axis: the residual tensors (`resid_pre`, `resid_mid`, `resid_post`)
    hold the sequence positions `first_token .. T-1` of the full (CLS-inserted) layout, and
    the sub-layer tensors (`attn_out`, `mlp_out`, coefficients, `attn_probs` rows) hold the
    first `sublayer_tokens` of those (None = all of them). Plain ViTs: `first_token = 0`,
    `sublayer_tokens = None`. CaiT / XCiT: before the class-attention blocks the CLS token does
    not exist yet (`first_token = 1`); in a class-attention block only the CLS token is
    updated (`sublayer_tokens = 1`).
    """

    index: int
    resid_pre: torch.Tensor  # [B, T', d] block input
    attn_out: torch.Tensor  # [B, S, d] what attention adds to the residual (after ls1 / post-norm1)
    resid_mid: torch.Tensor  # [B, T', d] the MLP's input stream (resid_pre + attn_out; parallel: resid_pre)
    mlp_out: torch.Tensor  # [B, S, d] what the MLP adds (after ls2 / post-norm2)
    resid_post: torch.Tensor  # [B, T', d] block output
    attn_coefficients: torch.Tensor  # [B, S, Ma] input of the attention's output projection
    mlp_coefficients: torch.Tensor  # [B, S, M] the MLP's memory coefficients (lens/mlp.py)
    attn_probs: torch.Tensor | None  # [B, H, S, T'] when computed (perturbation or need_probs)
    # [B, H, T', hd] the values the probabilities weight (hook_v; heads' source attribution), where
    # the family exposes them: each head's coefficients are `attn_probs @ attn_values`
    attn_values: torch.Tensor | None = None
    first_token: int = 0  # position of resid_pre[:, 0] in the full sequence
    sublayer_tokens: int | None = None  # S: sub-layer streams cover positions first_token .. first_token+S-1
