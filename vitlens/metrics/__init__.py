"""Pure tensor-in/tensor-out functions, one per paper quantity (no I/O, no models)."""

from vitlens.metrics.identifiability import (
    identifiability_rate,
    identifiability_rate_per_image_mean,
    identifiability_score,
    images_with_identifiable_token,
)
from vitlens.metrics.sublayers import (
    RESIDUAL_MATCH_CATEGORIES,
    class_similarity_change_rate,
    class_value_agreement,
    compositionality_rate,
    key_value_agreement_rate,
    residual_top1_match,
)
from vitlens.metrics.tokens import (
    cls_token_mask,
    image_token_mask,
    labelled_token_mask,
    masked_rate,
    per_image_rate,
)

__all__ = [
    "RESIDUAL_MATCH_CATEGORIES",
    "class_similarity_change_rate",
    "class_value_agreement",
    "cls_token_mask",
    "compositionality_rate",
    "identifiability_rate",
    "identifiability_rate_per_image_mean",
    "identifiability_score",
    "image_token_mask",
    "images_with_identifiable_token",
    "key_value_agreement_rate",
    "labelled_token_mask",
    "masked_rate",
    "per_image_rate",
    "residual_top1_match",
]
