"""The ONE token-label rule (METHOD §5): which tokens show the object, the context, or neither.

The mask must already have been through the image's resize/crop (`EvalGeometry.mask`, or
`EvalGeometry.mask_codes` for the code plane of `mask.codes.png`),
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

from vitlens.data.sample_format import MASK_CODE_CLASS, MASK_CODE_CONTEXT, MASK_CODE_IGNORE, mask_codes

LABEL_CONTEXT: int = MASK_CODE_CONTEXT  # the label codes are the mask's codes (mask.codes.png), plus prefix
LABEL_CLASS: int = MASK_CODE_CLASS
LABEL_IGNORE: int = MASK_CODE_IGNORE
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
    """Per-token foreground fraction and label of one transformed mask of class ids.

    mask: [H, W] integer class ids, H and W multiples of the patch size.
    Returns fg_fraction [P + N] float32 (NaN for prefix tokens) and label [P + N] int8,
    with N = (H / ph) * (W / pw) image tokens in row-major order.
    """
    ids = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if ids.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {tuple(ids.shape)}")
    fg_fraction, label = code_token_labels(mask_codes(ids, mask_class_id), patch_size, num_prefix_tokens)
    return torch.from_numpy(fg_fraction), torch.from_numpy(label)


def code_token_labels(
    codes: np.ndarray, patch_size: int | tuple[int, int], num_prefix_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """`token_labels` of a transformed mask given as codes [H, W] uint8 (0 context, 1 class,
    2 ignore: `vitlens.data.sample_format.mask_codes`) -> (fg_fraction [P + N] float32,
    label [P + N] int8), numpy (tiny per-image torch ops contend for torch's thread pool).

    Vectorised: per patch, the sum of the codes and the count of ignore pixels (code >> 1),
    two reshape sums over the patch's rows then columns; class pixels = sum - 2 * ignore.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {tuple(codes.shape)}")
    patch_h, patch_w = _patch_hw(patch_size)
    height, width = codes.shape
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"mask of {height}x{width} pixels is not a whole grid of {patch_h}x{patch_w} patches"
        )
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    grid_h, grid_w = height // patch_h, width // patch_w
    pixels_per_patch = patch_h * patch_w
    counter = np.uint16 if 2 * pixels_per_patch <= np.iinfo(np.uint16).max else np.int64

    def patch_sums(values: np.ndarray) -> np.ndarray:  # [H, W] -> [N]
        rows = values.reshape(grid_h, patch_h, width).sum(axis=1, dtype=counter)  # [gh, W]
        return rows.reshape(grid_h, grid_w, patch_w).sum(axis=2, dtype=counter).reshape(-1)

    ignore_count = patch_sums(codes >> 1).astype(np.int64)  # [N]
    class_count = patch_sums(codes).astype(np.int64) - 2 * ignore_count  # [N]
    fg_fraction = (class_count / pixels_per_patch).astype(np.float32)  # [N]
    label = np.full(fg_fraction.shape, LABEL_CONTEXT, dtype=np.int8)  # [N]
    label[class_count >= CLASS_THRESHOLD * pixels_per_patch] = LABEL_CLASS
    label[ignore_count > IGNORE_THRESHOLD * pixels_per_patch] = LABEL_IGNORE
    fg_all = np.concatenate([np.full(num_prefix_tokens, np.nan, dtype=np.float32), fg_fraction])
    label_all = np.concatenate([np.full(num_prefix_tokens, LABEL_PREFIX, dtype=np.int8), label])
    return fg_all, label_all
