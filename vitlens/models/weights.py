"""Building a timm ViT with its weights from one source: the hub, a local checkpoint, or a fixed seed.

Every path either returns a model carrying the requested weights or raises `UserError`;
none falls back to random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models import load_checkpoint

from vitlens.errors import UserError


def create_random_model(
    timm_name: str, seed: int, num_classes: int | None, model_kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """A `pretrained=False` timm model initialised under `torch.manual_seed(seed)` (the baseline)."""
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    try:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"cannot build timm model {timm_name!r} with {kwargs}: {err}") from err


def create_hub_model(
    timm_name: str, num_classes: int | None, model_kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """A timm model with its pretrained hub weights (needs the weights cached or internet access)."""
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # network/cache errors come in many types; all mean "no weights"
        raise UserError(
            f"cannot load the hub weights of timm model {timm_name!r} ({type(err).__name__}: {err}); "
            "download them first, pass a local checkpoint file, or use the NAME@random baseline"
        ) from err


def load_checkpoint_file(model: torch.nn.Module, checkpoint_path: str | Path) -> torch.nn.Module:
    """Load a local checkpoint into `model` strictly; `.npz`/`.npy` go through timm's custom loader.

    PyTorch (`.pth`, `.pt`, `.bin`) and `.safetensors` files are loaded as state dicts (a
    `state_dict`/`model`/`state_dict_ema` entry is unwrapped). Original JAX `.npz` files go to
    the model's own `load_pretrained` (timm's `custom_load` path). Missing or unexpected keys
    raise `UserError` listing them: a partially loaded model is never returned.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        load_checkpoint(model, str(path), strict=True)
    except Exception as err:  # torch.load / numpy / safetensors errors share no base class
        lines = str(err).splitlines()
        if lines and "Error(s) in loading state_dict" in lines[0]:
            detail = " ".join(line.strip() for line in lines[1:3])
            raise UserError(f"checkpoint {path} does not match the model architecture: {detail}") from err
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err
    return model
