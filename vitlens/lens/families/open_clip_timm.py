"""open_clip `TimmModel` image towers (SigLIP, SigLIP 2, EVA-CLIP, Perception Encoder,
MobileCLIP-B, ViTamin, ...) inside a `ZeroShotClassifier` (METHOD §1c): family "open_clip_timm".

The trunk's own timm family adapter (vit, eva, relpos, beit) gives the embedding, the blocks,
the trunk's pooling and norms; then the trunk's `head` (EVA configs: the projection) and the
tower's `head` (`proj` Linear, dropout), L2 normalisation and the class space. Value vectors:
the trunk family's, mapped through the linear part of those heads (no norms, no biases).
Refused with a one-line reason: trunks without a lens family (ConvNeXt, FastViT, Swin, ...),
a distilled trunk, tower heads with a 2-D attention pool or an MLP projection.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import UserError
from vitlens.lens.families.attention_heads import AttentionHeads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy
from vitlens.lens.linearise import unit_length
from vitlens.lens.trace import BlockTrace

try:
    from open_clip.timm_model import TimmModel
except ImportError:  # the optional 'clip' extra is not installed: nothing registers
    TimmModel = None  # type: ignore[assignment, misc]

#: timm families whose head path is `head(fc_norm(pool(norm h)))` (base `norm_final`), tested as trunks
TRUNK_FAMILIES = ("vit", "eva", "relpos", "beit")


class _HeadlessInit(ModelAdapter):
    """Placed after a timm family adapter in a subclass's MRO: its `super().__init__` checks and
    describes a headless trunk (`num_classes=0`), which the base `__init__` refuses."""

    def __init__(self, model: nn.Module) -> None:  # noqa: D107 - the base's, minus the head check
        self.model = model
        self.check()
        self.anatomy = self.describe()


@lru_cache(maxsize=None)
def _headless(adapter_class: type[ModelAdapter]) -> type[ModelAdapter]:
    """`adapter_class` accepting a trunk without a linear head (never registered)."""
    return type(f"Headless{adapter_class.__name__}", (adapter_class, _HeadlessInit), {"model_classes": ()})


class OpenClipTimmAdapter(ModelAdapter):
    """open_clip `TimmModel` towers: a timm ViT trunk (its own lens family), then its heads."""

    family = "open_clip_timm"
    model_classes = (TimmModel,) if TimmModel is not None else ()

    trunk_adapter: ModelAdapter

    def attention_heads(self, index: int) -> AttentionHeads:
        """The timm trunk's own (its family's `attention_heads`). # -> AttentionHeads"""
        return self.trunk_adapter.attention_heads(index)

    def final_norms(self) -> list[tuple[str, nn.Module]]:
        """The timm trunk's own head-path norms (the L2 normalisation stays live)."""
        return [(f"visual.trunk.{name}", module) for name, module in self.trunk_adapter.final_norms()]

    @property
    def tower(self) -> "TimmModel":
        """The open_clip `TimmModel` (never modified)."""
        return self.model.tower

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        from vitlens.lens.families import adapter_classes

        trunk = self.tower.trunk
        trunk_class = adapter_classes().get(type(trunk))
        if trunk_class is None or trunk_class.family not in TRUNK_FAMILIES:
            raise UserError(f"open_clip timm tower with a {type(trunk).__name__} trunk: the lens has no "
                            f"ViT family for it (supported trunk families: {', '.join(TRUNK_FAMILIES)})")
        if getattr(trunk, "head_dist", None) is not None:
            raise UserError("a distilled timm trunk (head_dist) is not a contrastive image tower")
        for name, module in self.tower.head.named_children():
            if not isinstance(module, (nn.Dropout, nn.Linear)):
                raise UserError(f"open_clip timm tower head '{name}' ({type(module).__name__}) is not supported "
                                "(supported: dropout and a linear projection)")
        if not isinstance(trunk.head, (nn.Identity, nn.Linear)):
            raise UserError(f"timm trunk head {type(trunk.head).__name__} is not linear")
        try:
            self.trunk_adapter = _headless(trunk_class)(trunk)
        except UserError as err:
            raise UserError(f"open_clip timm trunk {type(trunk).__name__}: {err}") from None

    def describe(self) -> ViTAnatomy:
        return dataclasses.replace(self.trunk_adapter.anatomy, family=self.family,
                                   num_classes=int(self.model.num_classes))

    # ---- forward (the trunk's family) ------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk family's embedding. # images: [B, 3, H, W] -> hidden: [B, P+N, d]"""
        return self.trunk_adapter.embed(images)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """The trunk family's block. # resid_pre: [B, T, d] -> BlockTrace"""
        return self.trunk_adapter.block_forward(index, resid_pre, *args)

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk family's block loop. # hidden: [B, T0, d] -> [B, T, d]"""
        return self.trunk_adapter.run_blocks(hidden, key_keep)

    def _classify(self, trunk_output: torch.Tensor) -> torch.Tensor:
        """The tower's head, L2 normalisation, the wrapper's head. # [..., d_trunk] -> [..., C]"""
        return self.model.head(F.normalize(self.tower.head(trunk_output), dim=-1))

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The trunk family's token removal (its output is the trunk's features), then the heads.

        # hidden: [B, T, d], kept: [B, n] -> logits: [B, C]
        """
        return self._classify(self.trunk_adapter.logits_keeping(hidden, kept))

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's own head path (its family's `model_logits`: pooling, norms, trunk head),
        then the tower's head, normalisation and the class space.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        return self._classify(self.trunk_adapter.model_logits(resid_final, key_keep))

    # ---- projection ----------------------------------------------------------------------
    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The trunk family's one-token head path, the trunk's head, the tower's head, L2
        normalisation. # hidden: [..., d] -> [..., d'] (unit norm)"""
        trunk_features = self.tower.trunk.head(self.trunk_adapter.norm_final(hidden))
        return unit_length(self.tower.head(trunk_features))

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """CLS pooling: the CLS token's projection; other pooling: the trunk's pooled vector
        through the heads. # resid_final: [B, T, d] -> logits: [B, C]"""
        anatomy = self.anatomy
        if anatomy.global_pool == "token" and anatomy.has_class_token:
            return self.project(resid_final[:, 0])
        return self.model_logits(resid_final)

    # ---- explainability / memories -----------------------------------------------------------
    def cls_branch(self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str) -> torch.Tensor:
        """The trunk family's CLS branch. # cls_row: [B, H, T] (leaf) -> x_cls: [B, d]"""
        return self.trunk_adapter.cls_branch(index, trace, cls_row, source)

    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """The trunk family's value vectors mapped through the trunk's and the tower's linear
        heads (weights only). # -> values: [d', M]"""
        values = self.trunk_adapter.value_vectors(index, sublayer)
        for layer in (self.tower.trunk.head, *self.tower.head.children()):
            if isinstance(layer, nn.Linear):
                values = layer.weight @ values
        return values
