"""Block- and head-specific class-embedding gradients (METHOD §6, paper §7).

Importance of image token t for head h of block b (1-based) and class of interest c:
`-∂ℓ_b/∂a_b^h[cls, t]` with `ℓ_b = CE(proj(x_cls^b), c)` on logits, `x_cls^b` the CLS token
of the residual stream after block b (`source="resid"`) or of the attention sub-layer's
output of block b (`source="attn"`, the reference code's choice).

All blocks come from ONE forward and ONE backward per batch. Inside block b the CLS
token's stream depends on `a_b` only through the CLS row `a_b[:, :, cls, :]` (every other
row feeds other tokens; layer norms and MLPs act per token). So for every block a
*detached branch* (the family adapter's `cls_branch`) recomputes the rest of block b for
the CLS token from a leaf copy of that row; the main path (run without gradients)
continues to block b+1 untouched.
The branch losses are summed and back-propagated once: the gradient on leaf b contains
`ℓ_b` only — never the later losses `ℓ_{b'>b}` (tests compare against a separate
`torch.autograd.grad` per block on the full graph).

Beyond the paper (options, never the default; METHOD §6's verified finding):
- `ln="frozen"`: the per-token scale of the model's final norm(s) — `model.norm` and
  `model.fc_norm`, the norms `adapter.project` applies (LayerNorm's 1/σ, RmsNorm's 1/rms) — is
  detached in the backward, as in direct logit attribution. The forward values are unchanged;
  the blocks' own norms (and an attention pool's internal norm) stay live.
- `loss="logit"`: `ℓ_b = −logit_c(proj(x_cls^b))` instead of the CE; importance stays
  `−∂ℓ_b/∂a` (= `+∂logit_c/∂a`), so higher still means more supportive of c.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F

from vitlens.errors import UserError
from vitlens.lens.anatomy import EXPLAIN_EXPERIMENT, ViTAnatomy
from vitlens.lens.families import adapter_for
from vitlens.lens.linearise import final_norms, frozen_final_norm
from vitlens.settings import EXPLAIN_LN, EXPLAIN_LOSSES

GradientSource = Literal["resid", "attn"]
GRADIENT_SOURCES: tuple[str, ...] = ("resid", "attn")
NormScale = Literal["live", "frozen"]
GradientLoss = Literal["ce", "logit"]
#: The head-path norms `ln="frozen"` acts on (attribute names on the timm model).


def require_autograd() -> None:
    """Gradients cannot be taken under `torch.inference_mode()` (e.g. inside `Lens.run`)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("vitlens.explain needs autograd: call it outside torch.inference_mode()")


def require_class_token(anatomy: ViTAnatomy) -> None:
    """Reject models explainability does not apply to (no CLS token the head reads, XCiT, ...),
    with the family's one-line reason."""
    reason = anatomy.skip_reason(EXPLAIN_EXPERIMENT)
    if reason is not None:
        raise UserError(f"explainability does not apply to this model: {reason}")


def check_explain_options(source: str = "resid", ln: str = "live", loss: str = "ce") -> None:
    """Raise `UserError` naming an unknown gradient source, norm mode or loss."""
    if source not in GRADIENT_SOURCES:
        raise UserError(f"unknown gradient source {source!r}: use one of {GRADIENT_SOURCES}")
    if ln not in EXPLAIN_LN:
        raise UserError(f"unknown ln {ln!r}: use one of {EXPLAIN_LN}")
    if loss not in EXPLAIN_LOSSES:
        raise UserError(f"unknown loss {loss!r}: use one of {EXPLAIN_LOSSES}")


def block_loss(logits: torch.Tensor, class_index: torch.Tensor, loss: GradientLoss = "ce") -> torch.Tensor:
    """One block's loss summed over the batch: CE on logits ("ce", the paper) or the class of
    interest's negative logit ("logit"), so that −∂ℓ/∂a is higher for more supportive tokens.

    # logits: [B, C], class_index: [B] -> scalar
    """
    if loss == "ce":
        return F.cross_entropy(logits, class_index, reduction="sum")
    return -logits.gather(1, class_index[:, None]).sum()


def block_head_importance(
    model: torch.nn.Module,
    images: torch.Tensor,
    class_index: torch.Tensor,
    source: GradientSource = "resid",
    ln: NormScale = "live",
    loss: GradientLoss = "ce",
) -> torch.Tensor:
    """Importance of every image token for every block and head, one forward + one backward.

    `class_index` is the class of interest per image (the true class, or the model's
    prediction). Importance = `-∂ℓ_b/∂a_b^h[cls, t]` over image tokens t, with
    `ℓ_b = CE(proj(x_cls^b), c)` (the paper; defaults) or, beyond the paper, `ln="frozen"`
    (the final norm's scale detached) and / or `loss="logit"` (`ℓ_b = −logit_c`).

    # images: [B, 3, H, W], class_index: [B] int64 -> importance: [B, L, H, N]
    """
    check_explain_options(source, ln, loss)
    require_autograd()
    adapter = adapter_for(model)
    require_class_token(adapter.anatomy)
    prefix = adapter.anatomy.num_prefix_tokens
    if ln == "frozen":
        final_norms(adapter)  # an unknown norm class fails before any work

    def norm_mode() -> contextlib.AbstractContextManager:
        return frozen_final_norm(adapter) if ln == "frozen" else contextlib.nullcontext()

    leaves: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    with torch.no_grad():  # the main path needs no graph; each branch builds its own
        hidden = adapter.embed(images)
        for trace in adapter.iter_block_traces(hidden, need_probs=True):
            with torch.enable_grad():
                cls_row = trace.attn_probs[:, :, 0, :].clone().requires_grad_(True)  # [B, H, T]
                x_cls = adapter.cls_branch(trace.index, trace, cls_row, source)
                with norm_mode():
                    logits = adapter.project(x_cls)  # [B, C]
                losses.append(block_loss(logits, class_index, loss))
            leaves.append(cls_row)
    with torch.enable_grad():
        torch.stack(losses).sum().backward(inputs=leaves)
    gradients = torch.stack([leaf.grad[:, :, prefix:] for leaf in leaves], dim=1)  # [B, L, H, N]
    return -gradients


def global_importance(importance: torch.Tensor) -> torch.Tensor:
    """Global map: sum over blocks and heads.

    # importance: [B, L, H, N] -> global: [B, N]
    """
    return importance.sum(dim=(1, 2))
