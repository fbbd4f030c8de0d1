"""What a loader of another library's model returns: `LibraryModel`.

Each library has one loader module (`open_clip_models.py`, `hf_classifiers.py`,
`hf_zeroshot.py`); the registry (`registry.py`) turns a variant name into a call of one of
them, attaches a class space (`zeroshot.py`) and hands a `LoadedVariant` on, exactly as for
a timm model. The optional libraries are imported inside the loaders only:
`require(extra, module)` refuses in one line, naming the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import torch

from vitlens.errors import UserError
from vitlens.lens.classifiers import TowerClassifier

#: prompts -> the library's own text features [n, d'] (before normalisation)
TextEncoder = Callable[[Sequence[str]], torch.Tensor]

#: the pip extra that brings each optional library
EXTRAS: dict[str, str] = {"open_clip": "clip", "transformers": "hf"}


@dataclass
class LibraryModel:
    """A loaded library model with what the lens and the reader need next to it."""

    model: TowerClassifier  # eval mode; zero-shot towers have no class space yet (num_classes 0)
    #: timm-style eval preprocessing (`input_size` (3, H, W), `interpolation`, `mean`, `std`,
    #: `crop_pct`, `crop_mode`), equal to the library's own preprocessing of its model
    data_config: dict[str, Any]
    class_names: list[str] | None = None  # a classifier's own labels; None for zero-shot towers
    text: TextEncoder | None = None  # zero-shot towers: the library's own text tower
    logit_scale: float | None = None  # exp(logit_scale) of a contrastive model (METHOD §1c: s)
    logit_bias: float | None = None  # SigLIP's scalar logit_bias (METHOD §1c: b), else None
    description: str = ""  # one line: the library, the architecture, the weights


class TextUnavailable(UserError):
    """A text tower cannot encode here: its tokenizer cannot be built (a hub tokenizer, offline)."""


def require(module: str) -> ModuleType:
    """Import an optional library, or refuse in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS[module.split(".")[0]]
        raise UserError(
            f"{module.split('.')[0]} is not installed ({err}): install vitlens with the '{extra}' extra, "
            f"pip install 'vitlens[{extra}]'"
        ) from err
