"""Turn generated shapes (`vitlens.data.shapes`) into shard samples.

The image is stored as a lossless PNG; the mask holds `class_index + 1` on the object
and 0 (context) elsewhere, so `mask_class_id = class_index + 1`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vitlens.data.sample_format import (
    MASK_CONTEXT_ID,
    EncodedSample,
    SampleMeta,
    encode_mask,
    encode_png,
)
from vitlens.data.shapes import ShapesSample, iter_shapes_samples

SHAPES_DATASET: str = "shapes"


def encode_shapes_sample(sample: ShapesSample, split: str, source: str) -> EncodedSample:
    """One generated sample as shard bytes; `source` records the generator settings."""
    mask_class_id = sample.class_index + 1
    ids = np.where(sample.object_mask, mask_class_id, MASK_CONTEXT_ID)  # [S, S]
    meta = SampleMeta(
        class_index=sample.class_index,
        mask_class_id=mask_class_id,
        class_name=sample.class_name,
        wnid=None,
        folder_wnid=None,
        source=source,
        split=split,
        dataset=SHAPES_DATASET,
    )
    return EncodedSample(sample.key, "image.png", encode_png(sample.image), encode_mask(ids), meta)


def iter_shapes_encoded(
    num_classes: int,
    per_class: int,
    size: int,
    seed: int,
    split: str,
    context_correlation: float,
) -> Iterator[EncodedSample]:
    """Generate the shapes set (same order as `iter_shapes_samples`) as shard samples."""
    source = (
        f"vitlens.data.shapes classes={num_classes} size={size} seed={seed} "
        f"context_correlation={context_correlation}"
    )
    for sample in iter_shapes_samples(num_classes, per_class, size, seed, split, context_correlation):
        yield encode_shapes_sample(sample, split, source)
