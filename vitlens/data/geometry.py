"""The eval-time geometry of a model, applied identically to an image and its mask.

It reproduces timm's eval transform (`timm.data.create_transform(**cfg,
is_training=False)`, i.e. `transforms_imagenet_eval`) step by step, so that the same
resize and crop can be applied to the segmentation mask (nearest neighbour, ids kept):

- `center` (timm's default): scale = floor(size / crop_pct) per side; a square scale
  resizes the shorter image side to it (torchvision `Resize(int)`), a non-square one
  resizes keeping the aspect ratio so both sides reach it (timm `ResizeKeepRatio`);
  then a centre crop of `input_size` (padding first if the image is smaller).
- `squash`: resize both sides to the scale size (aspect ratio not kept), centre crop.
- `border`: resize so the LONGER side fits the scale size, then centre crop or pad to
  `input_size` (timm pads the image with the mean colour).
Pixels that padding adds to the mask get the ignore id (1000): they are not image content.
The centre crop starts at `round((size - crop) / 2)` per axis, as torchvision and timm do
(`crop_offset = "round"`); Hugging Face image processors start it at `(size - crop) // 2`
(`crop_offset = "floor"`, which the transformers loaders put in their data config).
The image is converted to RGB, scaled to [0, 1] and normalised with `mean`/`std`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import str_to_interp_mode

from vitlens.data.sample_format import MASK_IGNORE_ID
from vitlens.errors import UserError

CROP_MODES: tuple[str, ...] = ("center", "squash", "border")
CROP_OFFSETS: tuple[str, ...] = ("round", "floor")
DEFAULT_CROP_PCT: float = 0.875  # timm's default when a config gives none


def _pad_and_crop_offsets(size: int, crop: int, offset: str = "round") -> tuple[int, int]:
    """(pad_before, crop_start) of one axis, exactly as torchvision/timm centre crop-or-pad
    (`offset="round"`), or with the crop start rounded down as transformers does (`"floor"`)."""
    pad_before = (crop - size) // 2 if crop > size else 0
    padded = size + ((crop - size) if crop > size else 0)
    if offset == "floor":
        return pad_before, (padded - crop) // 2
    return pad_before, int(round((padded - crop) / 2.0))


@dataclass(frozen=True)
class EvalGeometry:
    """Resize + crop + normalisation of a model's eval transform."""

    input_size: tuple[int, int]  # (H, W)
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_offset: str = "round"  # where the centre crop starts: "round" (torchvision, timm), "floor" (transformers)

    def __post_init__(self) -> None:
        """Reject settings this geometry does not reproduce."""
        if self.crop_offset not in CROP_OFFSETS:
            raise UserError(f"data config crop_offset {self.crop_offset!r} is not one of {CROP_OFFSETS}")
        if self.crop_mode not in CROP_MODES:
            raise UserError(f"data config crop_mode {self.crop_mode!r} is not one of {CROP_MODES}")
        if not self.crop_pct > 0:
            raise UserError(f"data config crop_pct must be > 0, got {self.crop_pct}")
        try:
            str_to_interp_mode(self.interpolation)
        except KeyError:
            raise UserError(f"data config interpolation {self.interpolation!r} is unknown") from None

    @classmethod
    def from_data_config(cls, cfg: Mapping[str, Any]) -> "EvalGeometry":
        """Build from timm's `resolve_data_config(...)` dict (`input_size` is (C, H, W))."""
        try:
            _, height, width = cfg["input_size"]
            return cls(
                input_size=(int(height), int(width)),
                crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                crop_mode=str(cfg.get("crop_mode") or "center"),
                interpolation=str(cfg.get("interpolation") or "bilinear"),
                mean=tuple(float(v) for v in cfg["mean"]),
                std=tuple(float(v) for v in cfg["std"]),
                crop_offset=str(cfg.get("crop_offset") or "round"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"data config {dict(cfg)} is incomplete or malformed: {err}") from err

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of (height, width) is resized to before cropping."""
        scale_h, scale_w = (math.floor(side / self.crop_pct) for side in self.input_size)
        if self.crop_mode == "squash":
            return scale_h, scale_w
        if self.crop_mode == "center" and scale_h == scale_w:
            short, long = sorted((height, width))
            new_long = int(scale_h * long / short)
            return (new_long, scale_h) if height > width else (scale_h, new_long)
        ratio_h, ratio_w = height / scale_h, width / scale_w
        ratio = max(ratio_h, ratio_w) if self.crop_mode == "border" else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def _crop_or_pad(self, pixels: np.ndarray, fill: np.ndarray | int) -> np.ndarray:
        """Centre crop-or-pad the first two axes of pixels [h, w, ...] to input_size."""
        crop_h, crop_w = self.input_size
        pad_top, top = _pad_and_crop_offsets(pixels.shape[0], crop_h, self.crop_offset)
        pad_left, left = _pad_and_crop_offsets(pixels.shape[1], crop_w, self.crop_offset)
        out = np.empty((crop_h, crop_w, *pixels.shape[2:]), dtype=pixels.dtype)
        out[...] = fill
        # Source rows/cols of the (virtually) padded image that land in the crop.
        src_top, src_left = top - pad_top, left - pad_left
        rows = slice(max(0, src_top), min(pixels.shape[0], src_top + crop_h))
        cols = slice(max(0, src_left), min(pixels.shape[1], src_left + crop_w))
        out_rows = slice(rows.start - src_top, rows.stop - src_top)
        out_cols = slice(cols.start - src_left, cols.stop - src_left)
        out[out_rows, out_cols] = pixels[rows, cols]
        return out

    def _image_fill(self) -> np.ndarray:
        """Padding colour [3] uint8: timm pads with the mean colour in border mode, else black."""
        if self.crop_mode == "border":
            return np.array([round(255 * v) for v in self.mean], dtype=np.uint8)
        return np.zeros(3, dtype=np.uint8)

    def image_pixels(self, image: Image.Image) -> np.ndarray:
        """Resized and cropped RGB pixels, before normalisation -> [H, W, 3] uint8."""
        image = image.convert("RGB")
        height, width = self.resized_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            mode = str_to_interp_mode(self.interpolation)
            image = TF.resize(image, [height, width], interpolation=mode)
        return self._crop_or_pad(np.asarray(image), self._image_fill())

    @cached_property
    def _normalise_table(self) -> np.ndarray:
        """[3, 256] float32: (v / 255 - mean) / std per channel, in timm's float32 arithmetic."""
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std

    def image_array(self, image: Image.Image) -> np.ndarray:
        """The model input of one image as numpy -> [3, H, W] float32, normalised.

        Equal to timm's ToTensor + Normalize (a per-channel lookup of the same float32
        values); numpy, because tiny per-image torch ops contend for torch's thread pool.
        """
        pixels = self.image_pixels(image)  # [H, W, 3] uint8
        table = self._normalise_table
        return np.stack([table[c][pixels[:, :, c]] for c in range(3)])

    def image(self, image: Image.Image) -> torch.Tensor:
        """The model input of one image -> [3, H, W] float32, normalised."""
        return torch.from_numpy(self.image_array(image))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """The same resize (nearest) and crop applied to class ids [h, w] -> [H, W] int32."""
        mask = np.asarray(mask, dtype=np.int32)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D [h, w], got shape {mask.shape}")
        height, width = self.resized_size(*mask.shape)
        if (height, width) != mask.shape:
            resized = Image.fromarray(mask).resize((width, height), Image.NEAREST)
            mask = np.asarray(resized, dtype=np.int32)
        return self._crop_or_pad(mask, MASK_IGNORE_ID)
