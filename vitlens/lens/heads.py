"""Per-head and per-source direct logit attribution (METHOD §3b; beyond the paper).

The attention output of block `b` is a sum over heads plus the output projection's bias,
`attn_b(t) = Σ_h c_h(t) + b_O`, `c_h(t) = γ ⊙ (W_O[:, h] · z_h(t))` — `z_h` the head's slice
of the output projection's input (`BlockTrace.attn_coefficients`), `W_O[:, h]` its columns,
`γ` the layer scale (the family adapter's `attention_heads(b)` gives `γ ⊙ W_O` and `γ ⊙ b_O`).
The final norm (and a text class space's L2 normalisation) is linearised at the scale of the
token's residual stream after block `b`: `u_b(t) = readout_direction(resid_b(t))`
(`vitlens.lens.linearise`), so

    DLA_h(t) = c_h(t) · u_b(t) = z_h(t) · (W_Oᵀ (γ ⊙ u_b(t)))[h]
    Σ_h DLA_h(t) + b_O · u_b(t) = attn_b(t) · u_b(t)        (exact: the tests check it)

**Source attribution**: `z_h(t) = Σ_s a_h(t, s) v_h(s)` (`attn_probs`, `attn_values`), so head
`h`'s DLA at target `t` splits over the sources `s` it reads as
`a_h(t, s) · (v_h(s) · g_h(t))`, `g_h(t) = (W_Oᵀ (γ ⊙ u_b(t)))[h]`; the terms sum to `DLA_h(t)`.
They are kept summed per source token label (`[..., G]`, signed and absolute) and, for the
CLS target, per source token (the "where does the CLS read its class from" maps).

Shapes: `B` images, `L` blocks, `H` heads, `T` tokens of the full sequence, `G` token labels
(`vitlens.data.token_labels.LABEL_NAMES`); positions a block's sub-layer does not cover (CaiT,
XCiT) hold NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.data.token_labels import LABEL_NAMES
from vitlens.lens.families import adapter_for
from vitlens.lens.families.base import HEADS_EXPERIMENT, ModelAdapter
from vitlens.lens.linearise import readout_direction
from vitlens.lens.trace import BlockTrace


@dataclass
class HeadBatch:
    """Direct logit attribution of every head of every block, for one batch (METHOD §3b)."""

    class_index: torch.Tensor  # [B] int64 the class attributed (the true class)
    dla: torch.Tensor  # [B, L, H, T] float32 head h's DLA at target token t; NaN where absent
    bias_dla: torch.Tensor  # [B, L, T] the output projection bias's term (γ ⊙ b_O) · u
    attn_dla: torch.Tensor  # [B, L, T] the whole attention output's linearised logit attn_b(t) · u_b(t)
    source_dla: torch.Tensor  # [B, L, H, T, G] DLA_h(t) split over the sources, summed per source label
    source_abs: torch.Tensor  # [B, L, H, T, G] the same with |term| (how much is read, either sign)
    cls_source: torch.Tensor  # [B, L, H, T] the CLS target's source terms per source token; NaN without a CLS
    num_prefix_tokens: int
    has_class_token: bool

    @property
    def num_heads(self) -> int:
        """H."""
        return int(self.dla.shape[2])


def head_attribution(
    model: torch.nn.Module | ModelAdapter,
    images: torch.Tensor,
    class_index: torch.Tensor,
    token_label: torch.Tensor,
) -> HeadBatch:
    """Per-head and per-source DLA of the correct class for every block (one forward; the
    readout direction of each block by one small backward through the head path alone).
    Runs under `torch.no_grad()` itself; do not call it inside `torch.inference_mode()`.

    # images: [B, 3, H, W], class_index: [B] int64, token_label: [B, T] int -> HeadBatch (on the images' device)
    """
    adapter = model if isinstance(model, ModelAdapter) else adapter_for(model)
    anatomy = adapter.anatomy
    reason = anatomy.skip_reason(HEADS_EXPERIMENT)
    if reason is not None:
        raise ValueError(f"head attribution does not apply to this model: {reason}")
    device = images.device
    labels = class_index.to(device, torch.int64)
    token_label = token_label.to(device, torch.int64)  # [B, T]
    batch, blocks, tokens = images.shape[0], anatomy.num_blocks, anatomy.num_tokens
    groups = len(LABEL_NAMES)
    heads = adapter.attention_heads(1).num_heads
    nan = dict(dtype=torch.float32, device=device)
    out = HeadBatch(
        class_index=labels,
        dla=torch.full((batch, blocks, heads, tokens), float("nan"), **nan),
        bias_dla=torch.full((batch, blocks, tokens), float("nan"), **nan),
        attn_dla=torch.full((batch, blocks, tokens), float("nan"), **nan),
        source_dla=torch.full((batch, blocks, heads, tokens, groups), float("nan"), **nan),
        source_abs=torch.full((batch, blocks, heads, tokens, groups), float("nan"), **nan),
        cls_source=torch.full((batch, blocks, heads, tokens), float("nan"), **nan),
        num_prefix_tokens=anatomy.num_prefix_tokens, has_class_token=anatomy.has_class_token,
    )
    with torch.no_grad():
        hidden = adapter.embed(images)
        for trace in adapter.iter_block_traces(hidden, need_probs=True):
            _attribute_block(adapter, trace, labels, token_label, out)
    return out


def _attribute_block(
    adapter: ModelAdapter, trace: BlockTrace, labels: torch.Tensor, token_label: torch.Tensor, out: HeadBatch,
) -> None:
    """Fill block `trace.index`'s slices of `out` (see the module notes for the formulas).

    # trace: BlockTrace (attn_coefficients [B, S, Ma], attn_probs [B, H, S, Tk], attn_values [B, H, Tk, hd])
    """
    b = trace.index - 1
    first = trace.first_token
    coefficients = trace.attn_coefficients
    batch, targets, _ = coefficients.shape
    linear = adapter.attention_heads(trace.index)
    heads = linear.num_heads
    direction = readout_direction(adapter, trace.resid_post, labels)[:, :targets]
    direction = direction.to(linear.weight.dtype)  # [B, S, d]
    read = direction @ linear.weight  # [B, S, Ma]: W_Oᵀ (γ ⊙ u) per target
    span = slice(first, first + targets)
    out.dla[:, b, :, span] = (coefficients * read).reshape(batch, targets, heads, -1).sum(-1).transpose(1, 2).float()
    bias = torch.zeros((), device=direction.device) if linear.bias is None else direction @ linear.bias
    out.bias_dla[:, b, span] = bias.float()
    out.attn_dla[:, b, span] = (direction * trace.attn_out).sum(-1).float()
    probs, values = trace.attn_probs, trace.attn_values
    read_heads = read.reshape(batch, targets, heads, -1).transpose(1, 2)  # [B, H, S, hd]
    terms = probs * (read_heads @ values.transpose(-1, -2))  # [B, H, S, Tk]
    keys = terms.shape[-1]
    source_labels = token_label[:, first:first + keys]  # [B, Tk]: the keys cover positions first..
    onehot = torch.nn.functional.one_hot(source_labels, len(LABEL_NAMES)).to(terms.dtype)[:, None]  # [B, 1, Tk, G]
    out.source_dla[:, b, :, span] = (terms @ onehot).float()
    out.source_abs[:, b, :, span] = (terms.abs() @ onehot).float()
    if out.has_class_token and first == 0:  # the CLS is target 0 of this block
        out.cls_source[:, b, :, first:first + keys] = terms[:, :, 0].float()
