"""Independent expectations for data-layer tests: timm-transformed masks, brute-force labels.

Nothing here calls the code under test: masks go through timm's own eval transform
(nearest interpolation) as colour images, and labels are counted pixel by pixel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image
from timm.data import create_transform

from vitlens.data.token_labels import LABEL_CLASS, LABEL_CONTEXT, LABEL_IGNORE, LABEL_PREFIX


def brute_force_labels(
    mask: np.ndarray, class_id: int, patch_h: int, patch_w: int, prefix: int
) -> tuple[list[float], list[int]]:
    """One patch at a time, pixel by pixel: (fg list, label list) incl. prefix tokens."""
    fg, labels = [math.nan] * prefix, [LABEL_PREFIX] * prefix
    for top in range(0, mask.shape[0], patch_h):
        for left in range(0, mask.shape[1], patch_w):
            pixels = [int(mask[y, x]) for y in range(top, top + patch_h) for x in range(left, left + patch_w)]
            n_class = sum(p == class_id for p in pixels)
            n_ignore = sum(p == 1000 for p in pixels)
            fg.append(n_class / len(pixels))
            if 2 * n_ignore > len(pixels):
                labels.append(LABEL_IGNORE)
            elif 2 * n_class >= len(pixels):
                labels.append(LABEL_CLASS)
            else:
                labels.append(LABEL_CONTEXT)
    return fg, labels


def timm_transformed_mask(ids: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """ids [h, w] (< 4096) moved by timm's eval transform with nearest interpolation.

    Pixels timm adds by padding come back as the ignore id 1000.
    """
    nearest_cfg = {**cfg, "interpolation": "nearest", "mean": (0, 0, 0), "std": (1, 1, 1)}
    colours = np.stack([16 + (ids % 64) * 3, 16 + (ids // 64) * 3, np.full_like(ids, 200)], -1)
    out = create_transform(**nearest_cfg, is_training=False)(Image.fromarray(colours.astype(np.uint8)))
    rgb = (out.numpy() * 255).round().astype(int).transpose(1, 2, 0)
    decoded = (rgb[..., 0] - 16) // 3 + 64 * ((rgb[..., 1] - 16) // 3)
    return np.where(rgb[..., 2] == 200, decoded, 1000)
