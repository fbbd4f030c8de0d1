"""Hugging Face transformers `BeitForImageClassification` (and `Data2VecVisionForImageClassification`,
the same architecture): pre-norm layers with layer scale (`lambda_1` / `lambda_2`) and relative
position biases, through the shared transformers anatomy of `hf_vit.py`.

The relative position bias of a layer is its own table (`use_relative_position_bias`), the
model-wide shared table (`use_shared_relative_position_bias`), both summed, or neither; each is
computed by the model's own `BeitRelativePositionBias` module for the token grid (it interpolates
its table where the grid differs from the config's window, as the model's forward does) and added
to the attention scores through `attend(..., bias=...)`, so METHOD §4's perturbations act on the
same post-softmax attention as the model's. Token removal is key masking at full length (every
kept pair keeps its bias), and deletion uses the generic `logits_keeping`.

Head: `use_mean_pooling` (every BEiT classifier checkpoint) averages the image tokens and applies
the pooler's layernorm (the encoder's final `layernorm` is then the identity); otherwise the CLS
token of the final layernorm. A token alone: `classifier(pooler.layernorm(layernorm(h)))` with
whichever of the two norms the model has (METHOD §1b). The CLS token is a prefix token; under mean
pooling the head does not read it, so explainability is skipped for those models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlens.lens.families.common import pool_tokens
from vitlens.lens.families.hf_vit import HFAdapter, hf_classes


class HFBeitAdapter(HFAdapter):
    """transformers BEiT / data2vec-vision image classifiers (both module layouts)."""

    family = "hf_beit"
    model_classes = hf_classes("BeitForImageClassification", "Data2VecVisionForImageClassification")

    @property
    def mean_pooling(self) -> bool:
        """True when the head averages the image tokens (the pooler has a layernorm)."""
        return getattr(self.base.pooler, "layernorm", None) is not None

    @property
    def pool_name(self) -> str:  # type: ignore[override]
        return "avg" if self.mean_pooling else "token"

    def skipped(self) -> tuple[tuple[str, str], ...]:
        if not self.mean_pooling:
            return ()
        return (("explain", "explainability differentiates the CLS token the head reads; this model "
                            "averages the image tokens (use_mean_pooling)"),)

    # ---- attention bias ------------------------------------------------------------------
    def attention_bias(self, index: int) -> torch.Tensor | None:
        """The layer's own relative position bias plus the shared one, from the model's modules
        at the token grid.

        # -> bias: [1, H, T, T] | None
        """
        layer, base = self.layer_modules()[index - 1], self.base
        inner = getattr(layer.attention, "attention", None)  # earlier layout: the self-attention module
        own = getattr(layer, "relative_position_bias", None)  # unified layout: on the layer
        if own is None and getattr(inner, "has_relative_position_bias", False):
            own = inner.relative_position_bias
        encoder = getattr(base, "encoder", None)
        shared = getattr(base, "shared_position_bias", None)
        if shared is None and getattr(encoder, "has_relative_position_bias", False):
            shared = encoder.relative_position_bias
        grid = self.anatomy.grid_size
        tokens = 1 + grid[0] * grid[1]
        biases = [module(grid, interpolate_pos_encoding=False, dim_size=tokens) for module in (own, shared)
                  if module is not None]  # each [1, H, T, T]
        if not biases:
            return None
        return biases[0] if len(biases) == 1 else biases[0] + biases[1]

    # ---- head ----------------------------------------------------------------------------
    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """# hidden: [..., d] -> [..., d] (the encoder's final layernorm, then the pooler's)"""
        normed = self.base.layernorm(hidden)
        return self.base.pooler.layernorm(normed) if self.mean_pooling else normed

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The model's pooler and classifier; with `key_keep`, the mean over the kept image tokens.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        base = self.base
        sequence = base.layernorm(resid_final)  # [B, T, d]
        if key_keep is None or not self.mean_pooling:
            pooled = base.pooler(sequence)
        else:
            pooled = base.pooler.layernorm(pool_tokens(sequence[:, 1:], "avg", key_keep[:, 1:]))
        return self.tower.classifier(pooled)

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """CLS: the CLS token's projection; mean pooling: the mean image token through the norms
        and the classifier (the pooled path itself).

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        if not self.mean_pooling:
            return self.project(resid_final[:, 0])
        weight, bias = self.class_embedding()
        pooled = self.base.layernorm(resid_final[:, 1:]).mean(dim=1)  # [B, d]
        return F.linear(self.base.pooler.layernorm(pooled), weight, bias)
