"""Classifiers around another library's vision module, with timm's classifier API.

The lens analyses timm models directly. A model from open_clip or Hugging Face transformers
is wrapped once, at load time, in a `TowerClassifier`: `model(images)` returns logits,
`num_classes`, `head` (the class embedding as an `nn.Linear`) and `reset_classifier(C)` behave
as timm's do, so the registry, the parity check, the runner and the report see one API. The
wrapped library module (`tower`) is never modified: its exact class picks the family adapter
(`vitlens.lens.families.adapter_for`), as a timm model's class does.

Two kinds:
- `ZeroShotClassifier`: a contrastive image tower (open_clip `VisionTransformer`, the vision
  half of a transformers `CLIPModel` / `SiglipModel`) whose class space comes from text
  (METHOD §1c): `logits = head(n(features(x)))` with `head.weight = s · E` (the normalised
  mean prompt embedding of each class, times `exp(logit_scale)`) and `head.bias = b` (SigLIP's
  `logit_bias`, the same for every class) or None.
- `HFImageClassifier`: a transformers `*ForImageClassification` model; `model(images)` is
  its own `.logits`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class TowerClassifier(nn.Module):
    """timm's classifier API over a library's module (`tower`); subclasses give `forward`."""

    #: the library the tower comes from ("open_clip", "transformers"): errors and docs name it
    library: str = ""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    @property
    def num_classes(self) -> int:
        """C, the rows of the class embedding (0 without a class space)."""
        head = self.head
        return int(head.out_features) if isinstance(head, nn.Linear) else 0

    @property
    def head(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class ZeroShotClassifier(TowerClassifier):
    """A contrastive image tower and a class space from text (METHOD §1c).

    `features(images)` is the library's own image embedding (open_clip `visual(x)`,
    transformers `get_image_features`); the logits are `head(F.normalize(features))`.
    """

    def __init__(
        self,
        tower: nn.Module,
        features: Callable[[torch.Tensor], torch.Tensor],
        feature_dim: int,
        library: str,
        head: nn.Linear | None = None,
    ) -> None:
        """`tower`: the image tower (its class picks the adapter); `features`: images -> the
        library's image embedding [B, d']; `head`: the class space (None: no classes yet,
        `num_classes == 0`, until a head file is attached)."""
        super().__init__(tower)
        self._features = features  # a module (registered below) or a bound method of the tower
        if isinstance(features, nn.Module) and features is not tower:
            self.features_module = features
        self.feature_dim = int(feature_dim)
        self.library = library
        self.classifier = head if head is not None else nn.Identity()

    @property
    def head(self) -> nn.Module:
        """The class space as a linear layer: weight `s · E` [C, d'], bias `b` [C] or None."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new (zero) class space of `num_classes` rows with a bias (timm's API; `attach_head`
        loads the file's tensors into it and drops the bias when the file has none)."""
        reference = next(self.tower.parameters())
        self.classifier = nn.Linear(self.feature_dim, num_classes, device=reference.device, dtype=reference.dtype)
        if reference.device.type != "meta":
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The library's own image embedding, before normalisation.

        # images: [B, 3, H, W] -> [B, d']
        """
        return self._features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`s · n(features(x)) · Eᵀ (+ b)`: the library's zero-shot logits.

        # images: [B, 3, H, W] -> logits: [B, C]
        """
        return self.classifier(F.normalize(self.image_features(images), dim=-1))


class HFImageClassifier(TowerClassifier):
    """A transformers `*ForImageClassification` model: `model(images)` is its `.logits`."""

    library = "transformers"

    def __init__(self, tower: nn.Module, image_size: tuple[int, int] | None = None) -> None:
        """`image_size`: the (H, W) the model is run at, from its image processor (None: the
        config's); DINOv2 checkpoints keep `image_size=518` in their config but run at 224."""
        super().__init__(tower)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))

    @property
    def head(self) -> nn.Module:
        """The model's classifier (DeiT with teacher: `cls_classifier`; its adapter averages both)."""
        tower = self.tower
        return getattr(tower, "classifier", None) or getattr(tower, "cls_classifier")

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier of `num_classes` rows over the classifier's input."""
        tower = self.tower
        if not hasattr(tower, "classifier"):
            raise ValueError(f"{type(tower).__name__} has more than one classifier")
        old = tower.classifier
        in_features = old.in_features if isinstance(old, nn.Linear) else int(tower.config.hidden_size)
        reference = next(tower.parameters())
        tower.classifier = nn.Linear(in_features, num_classes, device=reference.device, dtype=reference.dtype)
        tower.num_labels = tower.config.num_labels = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own logits.

        # images: [B, 3, H, W] -> logits: [B, C]
        """
        return self.tower(pixel_values=images).logits


def adapter_key(model: nn.Module) -> type:
    """The class that picks `model`'s family adapter: the tower's for wrapped models."""
    return type(model.tower) if isinstance(model, TowerClassifier) else type(model)
