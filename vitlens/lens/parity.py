"""The parity test of every family (METHOD §1b), as a function users and the sweep can call.

Two checks on the same images, both against `model(x)` itself:
- `forward`: the adapter's hooked forward (its `BlockTrace`s, then `model_logits`) reproduces
  the model — the streams the lens projects are the model's own;
- `projection`: the projection of what the head really reads at the last block
  (`parity_logits`: the CLS token, the mean of the image tokens, the mean of two distilled
  heads, ...) equals the model's output — the class space the lens uses is the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.lens.families import adapter_for

#: Both checks pass when |difference| <= PARITY_TOLERANCE * max(1, max |model(x)|).
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """Largest absolute differences from `model(x)` and the verdict."""

    forward_error: float  # max |model_logits(hooked forward) - model(x)|
    projection_error: float  # max |parity_logits(last block) - model(x)|
    logit_scale: float  # max |model(x)|

    @property
    def tolerance(self) -> float:
        """The allowed absolute difference for this model's logits."""
        return PARITY_TOLERANCE * max(1.0, self.logit_scale)

    @property
    def ok(self) -> bool:
        """Both differences within tolerance (NaN fails)."""
        return self.forward_error <= self.tolerance and self.projection_error <= self.tolerance


def check_parity(model: torch.nn.Module, images: torch.Tensor) -> ParityResult:
    """Run both parity checks of `model` (eval mode) on `images`.

    Raises `UserError` when the model's family is unsupported.

    # images: [B, 3, H, W] -> ParityResult
    """
    adapter = adapter_for(model)
    with torch.inference_mode():
        expected = model(images).float()
        resid_final = adapter.embed(images)
        for trace in adapter.iter_block_traces(resid_final):  # the hooked path, not model.blocks
            resid_final = trace.resid_post
        hooked = adapter.model_logits(resid_final).float()
        projected = adapter.parity_logits(resid_final).float()
    return ParityResult(
        forward_error=float((hooked - expected).abs().max()),
        projection_error=float((projected - expected).abs().max()),
        logit_scale=float(expected.abs().max()),
    )
