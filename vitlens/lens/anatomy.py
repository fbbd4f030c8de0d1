"""The model-level entry points used across the package: each dispatches to the model's
family adapter (`vitlens/lens/families/`), the one place a family's anatomy is defined.

`ViTAnatomy` (the static facts an adapter checks once: prefix tokens, pooling, token grid,
which experiments apply) and the experiment names are defined with the adapter interface in
`families/base.py` and re-exported here. The dependency points one way: this module imports
the families, never the reverse.
"""

from __future__ import annotations

import torch

from vitlens.lens.families import adapter_for
from vitlens.lens.families.base import EXPLAIN_EXPERIMENT, PERTURBATION_EXPERIMENTS, ModelAdapter, ViTAnatomy

__all__ = [
    "EXPLAIN_EXPERIMENT",
    "PERTURBATION_EXPERIMENTS",
    "ViTAnatomy",
    "describe_model",
    "model_adapter",
    "project",
]


def model_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The family adapter of `model` (raises `UserError` with a one-line reason if unsupported)."""
    return adapter_for(model)


def describe_model(model: torch.nn.Module) -> ViTAnatomy:
    """Check that the lens handles `model` exactly, and describe it (raises `UserError` otherwise)."""
    return model_adapter(model).anatomy


def project(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Class-space projection of any token, pooling-aware (METHOD §1b), bias included.

    # hidden: [..., d] -> logits: [..., C]
    """
    return model_adapter(model).project(hidden)
