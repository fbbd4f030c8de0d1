"""The device transform against timm's own eval transform (on the CPU), its decode, and its key.

Tolerance (docs/scale.md, "The device transform"): the model input may differ from timm's
by at most 2 uint8 levels (2 / (255 std)) on photo-like images, and in a small share of values.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import InterpolationMode

from vitlens.data import device_transform
from vitlens.data.device_transform import decode_images, device_model_input, jpeg_components
from vitlens.data.geometry import EvalGeometry
from vitlens.errors import UserError
from vitlens.runner.spec import DataSpec, load_job_spec

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIGS = [  # (input (H, W), crop_pct, interpolation)
    ((224, 224), 0.875, "bicubic"),
    ((32, 48), 0.9, "bilinear"),  # non-square input
    ((40, 40), 1.2, "bicubic"),  # crop_pct > 1: padding
]
SOURCE_SIZES = [(40, 56), (300, 200), (17, 90), (64, 64), (40, 56)]  # (h, w); a repeated size shares a resize call
MAX_LEVELS = 2.0


def _cfg(input_size, crop_pct, crop_mode, interpolation):
    return {"input_size": (3, *input_size), "crop_pct": crop_pct, "crop_mode": crop_mode,
            "interpolation": interpolation, "mean": MEAN, "std": STD}


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour field + fine noise, [h, w, 3] uint8."""
    field = Image.fromarray(rng.integers(0, 256, (max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)


def _levels(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """|difference| of two normalised inputs [B, 3, H, W] in uint8 levels."""
    return (ours - theirs).abs() * 255 * torch.tensor(STD).view(1, 3, 1, 1)


def _jpeg(pixels: np.ndarray, mode: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size,crop_pct,interpolation", CONFIGS)
def test_close_to_timm_eval_transform(crop_mode, input_size, crop_pct, interpolation) -> None:
    """One batch of mixed sizes (uint8 tensors) against timm on each PIL image, in the CPU's
    uint8 arithmetic and in CUDA's fp32 one."""
    cfg = _cfg(input_size, crop_pct, crop_mode, interpolation)
    geometry, timm_transform = EvalGeometry.from_data_config(cfg), create_transform(**cfg, is_training=False)
    rng = np.random.default_rng(0)
    arrays = [_photo(rng, h, w) for h, w in SOURCE_SIZES]
    theirs = torch.stack([timm_transform(Image.fromarray(a)) for a in arrays])
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    for in_float in (None, True):
        ours = device_model_input(tensors, geometry, "cpu", resize_in_float=in_float)
        assert ours.shape == theirs.shape == (len(arrays), 3, *input_size) and ours.dtype == torch.float32
        levels = _levels(ours, theirs)
        assert levels.max().item() <= MAX_LEVELS + 1e-3
        assert (levels > 0.5).float().mean().item() < 0.1


@pytest.mark.parametrize("in_float", [None, True])
def test_resize_follows_pil_on_hard_edges(in_float) -> None:
    """Bicubic overshoot at hard edges depends on which axis PIL resamples first (it rounds to
    uint8 in between): every direction of resize against PIL's own Image.resize."""
    rng = np.random.default_rng(4)
    sizes = [((300, 200), (256, 256)), ((200, 300), (256, 256)), ((17, 90), (256, 256)), ((300, 200), (150, 400)),
             ((245, 127), (77, 43)), ((243, 85), (195, 75)), ((199, 226), (178, 223)), ((200, 300), (40, 40))]
    for (height, width), out in sizes:
        blocks = rng.integers(0, 2, (height // 3 + 1, width // 3 + 1, 3)) * 255
        pixels = blocks.astype(np.uint8).repeat(3, 0).repeat(3, 1)[:height, :width].copy()
        theirs = np.asarray(Image.fromarray(pixels).resize(out[::-1], Image.BICUBIC), dtype=np.int16)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        ours = device_transform._resize(tensor, out, InterpolationMode.BICUBIC, in_float)[0].permute(1, 2, 0)
        assert np.abs(ours.numpy().astype(np.int16) - theirs).max() <= MAX_LEVELS, ((height, width), out)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_nearest_is_bit_identical_to_timm(crop_mode) -> None:
    cfg = _cfg((40, 56), 0.875, crop_mode, "nearest")
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SOURCE_SIZES]
    theirs = torch.stack([create_transform(**cfg, is_training=False)(Image.fromarray(a)) for a in arrays])
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    assert torch.equal(device_model_input(tensors, EvalGeometry.from_data_config(cfg), "cpu"), theirs)


def test_no_resize_is_bit_identical_and_border_pads_with_the_mean_colour() -> None:
    """At the input size nothing is resampled: equal to timm bit for bit; in border mode the
    padding is timm's mean colour."""
    rng = np.random.default_rng(1)
    pixels = _photo(rng, 32, 32)
    for cfg in (_cfg((32, 32), 1.0, "center", "bicubic"), _cfg((40, 40), 1.25, "border", "bicubic")):
        theirs = create_transform(**cfg, is_training=False)(Image.fromarray(pixels))[None]
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        ours = device_model_input([tensor], EvalGeometry.from_data_config(cfg), "cpu")
        assert torch.equal(ours, theirs)
    assert torch.equal(ours[0, :, 0, 0], theirs[0, :, 0, 0])  # a padded corner
    assert not torch.equal(ours[0, :, 0, 0], torch.zeros(3))


def test_jpeg_bytes_decode_as_pil_and_transform_close_to_timm() -> None:
    """RGB, grayscale, CMYK, progressive JPEGs (and a PNG) as bytes: the CPU decode equals PIL's;
    the model input is within the tolerance of timm's PIL pipeline."""
    rng = np.random.default_rng(2)
    data = [
        _jpeg(_photo(rng, 75, 100), "RGB"),
        _jpeg(_photo(rng, 90, 60), "L"),
        _jpeg(_photo(rng, 64, 80), "CMYK"),
        _jpeg(_photo(rng, 81, 81), "RGB", progressive=True),
    ]
    png = io.BytesIO()
    Image.fromarray(_photo(rng, 50, 70)).save(png, "PNG")
    data.append(png.getvalue())
    pil = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    for image, expected in zip(decode_images(data, "cpu"), pil):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    cfg = _cfg((48, 48), 0.875, "center", "bicubic")
    theirs = torch.stack([create_transform(**cfg, is_training=False)(Image.fromarray(p)) for p in pil])
    ours = device_model_input(data, EvalGeometry.from_data_config(cfg), "cpu")
    assert _levels(ours, theirs).max().item() <= MAX_LEVELS + 1e-3
    assert [jpeg_components(d) for d in data] == [(8, Image.open(io.BytesIO(d)).layers) for d in data[:4]] + [None]


def test_cuda_decode_routing_and_fallbacks(monkeypatch) -> None:
    """With a CUDA device, nvJPEG gets one batched call without the CMYK file; when that call
    fails, each image is retried alone and the one it still refuses is decoded on the CPU.
    (decode_jpeg is replaced by a stand-in that refuses one file; no GPU needed.)"""
    rng = np.random.default_rng(3)
    good, refused, cmyk = (_jpeg(_photo(rng, 40, 50), mode) for mode in ("RGB", "L", "CMYK"))
    real = device_transform.decode_jpeg
    calls: list[int] = []

    def fake_decode(data, mode, device="cpu"):
        if torch.device(device).type == "cpu":
            return real(data, mode=mode)
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        assert not any(bytes(b.numpy()) == cmyk for b in batch)
        if any(bytes(b.numpy()) == refused for b in batch):
            raise RuntimeError("nvjpeg refused")
        out = [real(b, mode=mode) for b in batch]
        return out if isinstance(data, list) else out[0]

    monkeypatch.setattr(device_transform, "decode_jpeg", fake_decode)
    images = decode_images([good, cmyk, refused, good], "cuda")
    assert calls == [3, 1, 1, 1]  # the batch, then one call per image
    for image, data in zip(images, [good, cmyk, refused, good]):
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_unsupported_interpolation_names_the_key() -> None:
    geometry = EvalGeometry.from_data_config(_cfg((32, 32), 0.9, "center", "box"))
    with pytest.raises(UserError, match="'data.transform'") as caught:
        device_model_input([torch.zeros(3, 40, 40, dtype=torch.uint8)], geometry, "cpu")
    assert "\n" not in str(caught.value)


def test_spec_key_data_transform(tmp_path: Path) -> None:
    assert DataSpec(manifest="m.json").transform == "timm"
    assert DataSpec(manifest="m.json", transform="device").transform == "device"
    text = 'name = "t"\noutput = "o"\nvariants = ["a"]\n[data]\nmanifest = "m.json"\ntransform = {}\n'
    path = tmp_path / "job.toml"
    path.write_text(text.format('"device"'))
    assert load_job_spec(path).data.transform == "device"
    path.write_text(text.format('"gpu"'))
    with pytest.raises(UserError) as caught:
        load_job_spec(path)
    assert str(caught.value) == f"{path}: 'data.transform' must be one of ['timm', 'device'], not \"gpu\""
    with pytest.raises(UserError, match=re.escape("job spec: 'data.transform' must be one of ['timm', 'device']")):
        DataSpec(manifest="m.json", transform="gpu")
