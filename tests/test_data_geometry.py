"""EvalGeometry reproduces timm's eval transform, and moves masks exactly like images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models.vision_transformer import VisionTransformer

from tests.data_expectations import timm_transformed_mask
from vitlens.data.geometry import EvalGeometry
from vitlens.errors import UserError

CONFIGS = [
    # (input (H, W), crop_pct, interpolation)
    ((224, 224), 0.875, "bicubic"),
    ((32, 48), 0.9, "bilinear"),
    ((32, 32), 1.0, "bilinear"),
    ((40, 40), 1.2, "bicubic"),  # crop_pct > 1: the image is smaller than the crop -> padding
]
SOURCE_SIZES = [(40, 56), (300, 200), (17, 90), (64, 64)]  # (h, w)


def _cfg(input_size, crop_pct, crop_mode, interpolation, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    return {
        "input_size": (3, *input_size), "crop_pct": crop_pct, "crop_mode": crop_mode,
        "interpolation": interpolation, "mean": mean, "std": std,
    }


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size,crop_pct,interpolation", CONFIGS)
def test_image_equals_timm_eval_transform(crop_mode, input_size, crop_pct, interpolation) -> None:
    cfg = _cfg(input_size, crop_pct, crop_mode, interpolation)
    geometry = EvalGeometry.from_data_config(cfg)
    timm_transform = create_transform(**cfg, is_training=False)
    rng = np.random.default_rng(0)
    for height, width in SOURCE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, theirs = geometry.image(image), timm_transform(image)
        assert ours.shape == theirs.shape == (3, *input_size)
        assert (ours - theirs).abs().max().item() < 1e-5


def test_from_a_timm_model_config() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    cfg = resolve_data_config({}, model=model)
    geometry = EvalGeometry.from_data_config(cfg)
    assert geometry.input_size == tuple(cfg["input_size"][1:]) and geometry.crop_mode == "center"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    theirs = create_transform(**cfg, is_training=False)(image)
    assert (geometry.image(image) - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size,crop_pct,interpolation", CONFIGS)
def test_mask_follows_timm_geometry(crop_mode, input_size, crop_pct, interpolation) -> None:
    """timm's own transform with NEAREST interpolation, run on the mask painted as colours,
    must land every id where EvalGeometry.mask puts it; padded pixels become ignore (1000)."""
    rng = np.random.default_rng(2)
    cfg = _cfg(input_size, crop_pct, crop_mode, interpolation)
    geometry = EvalGeometry.from_data_config(cfg)
    for height, width in SOURCE_SIZES:
        ids = rng.integers(0, 1000, (height, width))  # 1000 (ignore) only from padding
        expected = timm_transformed_mask(ids, cfg)
        ours = geometry.mask(ids)
        assert ours.shape == input_size and ours.dtype == np.int32
        np.testing.assert_array_equal(ours, expected)
        if crop_pct > 1 and crop_mode != "squash":
            assert (ours == 1000).any()  # the padding case is exercised


def test_rejects_unknown_crop_mode_and_incomplete_config() -> None:
    with pytest.raises(UserError, match="crop_mode"):
        EvalGeometry.from_data_config(_cfg((32, 32), 0.9, "random", "bilinear"))
    with pytest.raises(UserError, match="incomplete"):
        EvalGeometry.from_data_config({"input_size": (3, 32, 32)})


def test_crop_offset_floor_starts_where_transformers_does() -> None:
    """transformers' centre crop starts at (L - c) // 2, torchvision's at round((L - c) / 2), half
    to even: a 32-wide crop of a 35-wide image starts at 1 vs 2. The same offset for the mask."""
    config = {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
              "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    pixels = np.arange(32 * 35, dtype=np.int32).reshape(32, 35)  # already at the scale: no resize
    floor = EvalGeometry.from_data_config({**config, "crop_offset": "floor"})
    rounded = EvalGeometry.from_data_config(config)
    assert np.array_equal(floor.mask(pixels), pixels[:, 1:33])
    assert np.array_equal(rounded.mask(pixels), pixels[:, 2:34])
    image = Image.fromarray((pixels % 251).astype(np.uint8)).convert("RGB")
    assert np.array_equal(floor.image_pixels(image)[:, :, 0], (pixels % 251)[:, 1:33])
    with pytest.raises(UserError, match="crop_offset"):
        EvalGeometry.from_data_config({**config, "crop_offset": "ceil"})
