"""The ONE token-label rule (METHOD §5): which tokens show the object, the context, or neither.

The mask must already have been through the image's resize/crop (`EvalGeometry.mask`),
so mask pixel (y, x) is model-input pixel (y, x). For each patch of the grid:

- `fg_fraction` = share of the patch's pixels whose id equals `mask_class_id`
  (the denominator is all pixels of the patch, ignore pixels included);
- label `ignore` when more than half of the patch is the ignore id (1000), else
  `class` when `fg_fraction >= 0.5`, else `context`.

Tokens are ordered like the model's sequence: `num_prefix_tokens` prefix tokens (CLS,
distillation, registers) with label `prefix` and `fg_fraction = NaN`, then the image
tokens row-major over the patch grid.
"""

from __future__ import annotations

import numpy as np
import torch

from vitlens.data.sample_format import MASK_IGNORE_ID

LABEL_CONTEXT: int = 0
LABEL_CLASS: int = 1
LABEL_IGNORE: int = 2
LABEL_PREFIX: int = 3
LABEL_NAMES: tuple[str, ...] = ("context", "class", "ignore", "prefix")  # index = code

CLASS_THRESHOLD: float = 0.5  # class when fg_fraction >= this
IGNORE_THRESHOLD: float = 0.5  # ignore when the ignore share is > this


def _patch_hw(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(patch_size, int):
        return patch_size, patch_size
    patch_h, patch_w = patch_size
    return int(patch_h), int(patch_w)


def token_labels(
    mask: np.ndarray | torch.Tensor,
    mask_class_id: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token foreground fraction and label of one transformed mask.

    mask: [H, W] integer class ids, H and W multiples of the patch size.
    Returns fg_fraction [P + N] float32 (NaN for prefix tokens) and label [P + N] int8,
    with N = (H / ph) * (W / pw) image tokens in row-major order.
    """
    # numpy, not torch: tiny per-image torch ops contend for torch's intra-op thread pool.
    ids = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if ids.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {tuple(ids.shape)}")
    patch_h, patch_w = _patch_hw(patch_size)
    height, width = ids.shape
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"mask of {height}x{width} pixels is not a whole grid of {patch_h}x{patch_w} patches"
        )
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    grid = ids.reshape(height // patch_h, patch_h, width // patch_w, patch_w)  # [gh, ph, gw, pw]
    pixels_per_patch = patch_h * patch_w
    class_count = (grid == mask_class_id).sum(axis=(1, 3)).reshape(-1)  # [N]
    ignore_count = (grid == MASK_IGNORE_ID).sum(axis=(1, 3)).reshape(-1)  # [N]
    fg_fraction = (class_count / pixels_per_patch).astype(np.float32)  # [N]
    label = np.full(fg_fraction.shape, LABEL_CONTEXT, dtype=np.int8)  # [N]
    label[class_count >= CLASS_THRESHOLD * pixels_per_patch] = LABEL_CLASS
    label[ignore_count > IGNORE_THRESHOLD * pixels_per_patch] = LABEL_IGNORE
    fg_all = np.concatenate([np.full(num_prefix_tokens, np.nan, dtype=np.float32), fg_fraction])
    label_all = np.concatenate([np.full(num_prefix_tokens, LABEL_PREFIX, dtype=np.int8), label])
    return torch.from_numpy(fg_all), torch.from_numpy(label_all)
