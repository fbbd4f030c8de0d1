"""EvalGeometry reproduces timm's eval transform, and moves masks exactly like images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models.vision_transformer import VisionTransformer

from tests.data_expectations import timm_transformed_mask
from vitlens.data.geometry import EvalGeometry, nearest_indices
from vitlens.data.sample_format import mask_codes
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
        assert torch.equal(ours, theirs)  # bit-identical


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


def test_normalise_equals_the_float32_lookup_of_every_level() -> None:
    """uint8 -> float32 on the device: every level equals (v / 255 - mean) / std computed in
    numpy float32 (the lookup table the host used before, and timm's ToTensor + Normalize)."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    geometry = EvalGeometry((1, 256), 1.0, "center", "bicubic", mean, std)
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    table = (levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    pixels = torch.arange(256, dtype=torch.uint8).expand(2, 3, 1, 256)  # [B, 3, 1, 256]
    ours = geometry.normalise(pixels)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 1, 256)
    assert np.array_equal(ours[1, :, 0].numpy().view(np.uint32), table.view(np.uint32))


def test_nearest_indices_equal_pil_nearest() -> None:
    """The index arrays of the mask's resize pick the pixels PIL's NEAREST resize picks."""
    for size_in in (1, 7, 37, 40, 56, 333, 375, 500):
        row = Image.fromarray(np.arange(size_in, dtype=np.int32)[None, :])  # mode I: value = index
        for size_out in (1, 5, 32, 44, 224, 256, 341, 571):
            expected = np.asarray(row.resize((size_out, 1), Image.NEAREST))[0]
            np.testing.assert_array_equal(nearest_indices(size_in, size_out), expected,
                                          err_msg=f"{size_in}->{size_out}")


@pytest.mark.parametrize("crop_mode", ["center", "border"])
def test_mask_codes_follow_timm_geometry(crop_mode) -> None:
    """The code plane moves like the ids (timm's own NEAREST transform); padding is the ignore code."""
    rng = np.random.default_rng(3)
    cfg = _cfg((40, 40), 1.2, crop_mode, "bicubic")  # crop_pct > 1: padding
    geometry = EvalGeometry.from_data_config(cfg)
    for height, width in SOURCE_SIZES:
        ids = rng.choice([0, 5, 9, 1000], size=(height, width))
        ours = geometry.mask_codes(mask_codes(ids, 5))
        assert ours.dtype == np.uint8 and ours.shape == (40, 40)
        expected = timm_transformed_mask(ids, cfg)
        np.testing.assert_array_equal(ours, np.select([expected == 5, expected == 1000], [1, 2], 0))
