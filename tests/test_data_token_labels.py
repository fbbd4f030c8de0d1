"""Token labels (METHOD §5) against hand-made masks and a brute-force per-patch loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.data_expectations import brute_force_labels
from vitlens.data.geometry import EvalGeometry
from vitlens.data.token_labels import (
    LABEL_CLASS,
    LABEL_CONTEXT,
    LABEL_IGNORE,
    LABEL_NAMES,
    LABEL_PREFIX,
    token_labels,
)

C, X, I = LABEL_CLASS, LABEL_CONTEXT, LABEL_IGNORE


def test_label_codes_and_names() -> None:
    assert LABEL_NAMES[LABEL_CONTEXT] == "context"
    assert LABEL_NAMES[LABEL_CLASS] == "class"
    assert LABEL_NAMES[LABEL_IGNORE] == "ignore"
    assert LABEL_NAMES[LABEL_PREFIX] == "prefix"


def test_hand_made_mask_thresholds() -> None:
    # 16 x 24 mask, 8-px patches -> 2 x 3 grid, class id 7.
    mask = np.zeros((16, 24), dtype=np.int32)
    mask[0:8, 0:8] = 7  # patch 0: all class -> class, fg 1
    mask[0:4, 8:16] = 7  # patch 1: exactly half class (32/64) -> class, fg .5
    mask[0:8, 16:23] = 1000  # patch 2: 56/64 ignore -> ignore
    mask[8:12, 0:8] = 1000  # patch 3: exactly half ignore (not more) ...
    mask[12:16, 0:8] = 7  # ... and half class -> class
    mask[8:16, 8:16] = 3  # patch 4: another class id only -> context, fg 0
    mask[8:11, 16:24] = 7  # patch 5: 24/64 class -> context
    mask[11, 16:17] = 7  # 25/64
    fg, label = token_labels(mask, 7, 8, num_prefix_tokens=1)
    assert label.dtype == torch.int8 and fg.dtype == torch.float32
    assert label.tolist() == [LABEL_PREFIX, C, C, I, C, X, X]
    assert math.isnan(fg[0])
    assert fg[1:].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.5, 0.0, 25 / 64])


def test_ignore_wins_over_class_when_more_than_half() -> None:
    mask = np.full((4, 4), 1000, dtype=np.int32)
    mask[0, :] = 5  # 4/16 class, 12/16 ignore
    fg, label = token_labels(mask, 5, 4, num_prefix_tokens=0)
    assert label.tolist() == [I] and fg.tolist() == [0.25]


@pytest.mark.parametrize("patch", [8, 16, 32, (8, 16)])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_matches_brute_force(patch: int | tuple[int, int], prefix: int) -> None:
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    rng = np.random.default_rng([patch_h, patch_w, prefix])
    height, width = 2 * patch_h, 3 * patch_w
    # Blocky random masks so that every label occurs; ids 0, 4 (class), 9, 1000.
    coarse = rng.choice([0, 4, 9, 1000], size=(height // 4, width // 4), p=[0.3, 0.4, 0.1, 0.2])
    mask = np.kron(coarse, np.ones((4, 4), dtype=np.int64))
    fg, label = token_labels(torch.from_numpy(mask), 4, patch, prefix)
    expected_fg, expected_label = brute_force_labels(mask, 4, patch_h, patch_w, prefix)
    assert label.tolist() == expected_label
    np.testing.assert_allclose(fg.numpy(), np.array(expected_fg, dtype=np.float32), rtol=0, atol=1e-7)


def test_crop_shifts_the_object() -> None:
    """Image 40 x 56 (h x w), input 32 x 32, crop_pct 1: the short side 40 -> 32, the long
    side 56 -> int(32 * 56 / 40) = 44, centre crop drops round(12 / 2) = 6 columns on the left.
    With factor 0.8, source columns [27.5, 37.5) map to resized [22, 30) -> crop [16, 24):
    exactly token column 2 of the 8-px grid; source rows [10, 20) -> [8, 16): token row 1.
    (Ignoring the crop, as the reference code did, would put it in columns 22-29.)"""
    geometry = EvalGeometry(
        input_size=(32, 32), crop_pct=1.0, crop_mode="center", interpolation="bilinear",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )
    mask = np.zeros((40, 56), dtype=np.int32)
    mask[10:20, 28:38] = 1  # nearest sampling keeps source columns 28..37 (centres 27.5+)
    fg, label = token_labels(geometry.mask(mask), 1, 8, num_prefix_tokens=1)
    expected = [LABEL_PREFIX] + [X] * 16
    expected[1 + 1 * 4 + 2] = C  # token (row 1, col 2)
    assert label.tolist() == expected
    assert fg[1 + 1 * 4 + 2].item() == 1.0
    assert fg[1:].sum().item() == 1.0  # nothing of the object leaks into other tokens


def test_rejects_masks_that_are_not_a_patch_grid() -> None:
    with pytest.raises(ValueError, match="whole grid"):
        token_labels(np.zeros((20, 16), dtype=np.int32), 1, 8, 1)
    with pytest.raises(ValueError, match="2-D"):
        token_labels(np.zeros((2, 16, 16), dtype=np.int32), 1, 8, 1)
