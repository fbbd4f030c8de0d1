"""Turn generated shapes (`vitlens.data.shapes`) into shard samples.

The image is stored as a lossless PNG; the mask holds `class_index + 1` on the object
and 0 (context) elsewhere, so `mask_class_id = class_index + 1`. In harder settings the
mask marks only the *visible* object: pixels hidden by an occluder and distractor shapes
of other classes are context (0). The mask's code plane (`mask.codes.png`) is written from
the same ids.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vitlens.data.sample_format import (
    MASK_CONTEXT_ID,
    EncodedSample,
    SampleMeta,
    encode_mask,
    encode_mask_codes,
    encode_png,
    mask_codes,
)
from vitlens.data.shapes import (
    DEFAULT_DIFFICULTY,
    SHAPES_KNOBS,
    ShapesSample,
    is_standard,
    iter_shapes_samples,
    shapes_difficulty,
)

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
    return EncodedSample(sample.key, "image.png", encode_png(sample.image), encode_mask(ids), meta,
                         encode_mask_codes(mask_codes(ids, mask_class_id)))


def shapes_source(
    num_classes: int,
    size: int,
    seed: int,
    context_correlation: float,
    difficulty: str = DEFAULT_DIFFICULTY,
    knobs: dict[str, float] | None = None,
) -> str:
    """The `source` recorded in each sample's meta.json.

    The standard setting gives the same text as before the harder settings existed (so
    its shards keep their bytes); any other setting appends the preset and every knob.
    """
    source = (
        f"vitlens.data.shapes classes={num_classes} size={size} seed={seed} "
        f"context_correlation={context_correlation}"
    )
    knobs = shapes_difficulty(difficulty) if knobs is None else knobs
    if difficulty == DEFAULT_DIFFICULTY and is_standard(knobs):
        return source
    settings = " ".join(f"{key}={knobs[key]}" for key in SHAPES_KNOBS)
    return f"{source} difficulty={difficulty} {settings}"


def iter_shapes_encoded(
    num_classes: int,
    per_class: int,
    size: int,
    seed: int,
    split: str,
    context_correlation: float,
    difficulty: str = DEFAULT_DIFFICULTY,
    *,
    occlusion: float | None = None,
    noise: float | None = None,
    contrast: float | None = None,
    distractors: int | None = None,
) -> Iterator[EncodedSample]:
    """Generate the shapes set (same order as `iter_shapes_samples`) as shard samples.

    `difficulty` and the knobs are those of `iter_shapes_samples` (a given knob overrides
    the preset's value).
    """
    knobs = shapes_difficulty(difficulty, occlusion, noise, contrast, distractors)
    source = shapes_source(num_classes, size, seed, context_correlation, difficulty, knobs)
    samples = iter_shapes_samples(
        num_classes, per_class, size, seed, split, context_correlation, difficulty, **knobs
    )
    for sample in samples:
        yield encode_shapes_sample(sample, split, source)
