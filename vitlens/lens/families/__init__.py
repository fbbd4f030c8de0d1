"""One adapter per timm model family (`base.ModelAdapter`), found by the model's exact class.

Every module of this package that defines a `ModelAdapter` subclass with `model_classes`
registers it: adding a family is one file plus its tests. Matching is by exact class, so a
subclass whose anatomy nobody checked is refused rather than mis-projected.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

import torch

from vitlens.errors import UserError
from vitlens.lens.classifiers import adapter_key
from vitlens.lens.families.base import SUBLAYERS, ModelAdapter


@lru_cache(maxsize=1)
def adapter_classes() -> dict[type, type[ModelAdapter]]:
    """Model (or wrapped tower) class -> its adapter, over every module of this package.

    A module whose library is not installed (open_clip, transformers: optional extras)
    registers nothing; its models are refused when loaded, naming the extra."""
    found: dict[type, type[ModelAdapter]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, ModelAdapter) and value.model_classes:
                if value.__module__ != module.__name__:
                    continue
                for model_class in value.model_classes:
                    if model_class in found and found[model_class] is not value:
                        raise RuntimeError(f"{model_class.__name__} has two adapters: {found[model_class]} and {value}")
                    found[model_class] = value
    return found


def family_names() -> list[str]:
    """Every supported family, sorted."""
    return sorted({adapter.family for adapter in adapter_classes().values()})


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The checked adapter of `model` (raises `UserError` with a one-line reason if unsupported)."""
    key = adapter_key(model)  # the model's class; a wrapped library model's tower class
    adapter = adapter_classes().get(key)
    if adapter is None:
        known = ", ".join(sorted(cls.__name__ for cls in adapter_classes()))
        raise UserError(f"the lens has no adapter for {key.__name__} (supported classes: {known})")
    return adapter(model)


__all__ = ["SUBLAYERS", "ModelAdapter", "adapter_classes", "adapter_for", "family_names"]
