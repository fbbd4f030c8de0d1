"""Model variants: the registry (paper's ViTs, the embedded zoo, any timm ViT) and weight loading."""

from vitlens.models.registry import (
    LoadedVariant,
    VariantSpec,
    get_variant,
    list_variants,
    load_variant,
)

__all__ = ["LoadedVariant", "VariantSpec", "get_variant", "list_variants", "load_variant"]
