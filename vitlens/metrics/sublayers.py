"""Sub-layer analyses of METHOD §3 computed per token by the lens: change rate, top-1 match, memories."""

from __future__ import annotations

import torch

from vitlens.metrics.tokens import masked_rate

RESIDUAL_MATCH_CATEGORIES: tuple[str, ...] = ("attn", "mlp", "previous_resid", "composite")


def class_similarity_change_rate(
    output_logit: torch.Tensor, input_logit: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of selected tokens whose correct-class logit of proj(sub-layer output) exceeds
    that of proj(sub-layer input). Split CLS vs image tokens with `token_mask`.

    # output_logit, input_logit: [B, *S, T], token_mask: [B, T] bool -> [*S] float
    """
    return masked_rate(output_logit > input_logit, token_mask)


def residual_top1_match(
    resid_top1: torch.Tensor,
    attn_top1: torch.Tensor,
    mlp_top1: torch.Tensor,
    previous_resid_top1: torch.Tensor,
    token_mask: torch.Tensor,
) -> torch.Tensor:
    """Rates of each `RESIDUAL_MATCH_CATEGORIES` entry: top-1 of proj(resid_b) equals that of
    proj(attn_b), proj(mlp_b), proj(resid_{b-1}) (may overlap), or none of them ("composite").

    # *_top1: [B, *S, T] int, token_mask: [B, T] bool -> [4, *S] float
    """
    matches = [resid_top1 == attn_top1, resid_top1 == mlp_top1, resid_top1 == previous_resid_top1]
    composite = ~(matches[0] | matches[1] | matches[2])
    return torch.stack([masked_rate(flags, token_mask) for flags in matches + [composite]])


def key_value_agreement_rate(agreement: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of selected tokens whose top-5 memories include one of the correct class's top-5.

    # agreement: [B, *S, T] bool, token_mask: [B, T] bool -> [*S] float
    """
    return masked_rate(agreement, token_mask)


def compositionality_rate(non_compositional: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of selected tokens whose sub-layer top-1 class matches NONE of its top-5 memories'
    top-1 classes (a composite prediction; the paper's "compositionality").

    # non_compositional: [B, *S, T] bool, token_mask: [B, T] bool -> [*S] float
    """
    return masked_rate(~non_compositional.bool(), token_mask)


def class_value_agreement(class_embedding: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per class, the highest cosine similarity between its class embedding and any value vector.

    Rows of E and columns (value vectors) of W are unit-normalised; `A = E_n · W_n`; max over memories.

    # class_embedding: [C, d], values: [d, M] -> [C] float
    """
    class_unit = torch.nn.functional.normalize(class_embedding.float(), dim=1)
    value_unit = torch.nn.functional.normalize(values.float(), dim=0)
    return (class_unit @ value_unit).max(dim=1).values
