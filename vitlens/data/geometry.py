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
Pixels that padding adds to the mask get the ignore id (1000), or the ignore code in a
code plane (`mask.codes.png`): they are not image content. The mask's nearest-neighbour
resize and crop is one gather by index arrays, equal to PIL's NEAREST resize + crop.
The centre crop starts at `round((size - crop) / 2)` per axis, as torchvision and timm do
(`crop_offset = "round"`); Hugging Face image processors start it at `(size - crop) // 2`
(`crop_offset = "floor"`, which the transformers loaders put in their data config).
The image is converted to RGB and resized / cropped as uint8 (`image_pixels`); `normalise`
scales it to [0, 1] and normalises with `mean`/`std` on any device, with the fp32 operations
of timm's ToTensor + Normalize (bit-identical to timm's output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import str_to_interp_mode

from vitlens.data.sample_format import MASK_CODE_IGNORE, MASK_IGNORE_ID
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
        """Centre crop-or-pad the first two axes of pixels [h, w, ...] to input_size (a view
        of `pixels` when nothing is padded)."""
        rows, out_rows = _crop_span(pixels.shape[0], self.input_size[0], self.crop_offset)
        cols, out_cols = _crop_span(pixels.shape[1], self.input_size[1], self.crop_offset)
        if (out_rows.stop - out_rows.start, out_cols.stop - out_cols.start) == self.input_size:
            return pixels[rows, cols]
        out = np.empty((*self.input_size, *pixels.shape[2:]), dtype=pixels.dtype)
        out[...] = fill
        out[out_rows, out_cols] = pixels[rows, cols]
        return out

    def _image_fill(self) -> np.ndarray:
        """Padding colour [3] uint8: timm pads with the mean colour in border mode, else black."""
        if self.crop_mode == "border":
            return np.array([round(255 * v) for v in self.mean], dtype=np.uint8)
        return np.zeros(3, dtype=np.uint8)

    def image_pixels(self, image: Image.Image) -> np.ndarray:
        """Resized and cropped RGB pixels, before normalisation -> [H, W, 3] uint8."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.resized_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            mode = str_to_interp_mode(self.interpolation)
            image = TF.resize(image, [height, width], interpolation=mode)
        return self._crop_or_pad(np.asarray(image), self._image_fill())

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] -> float32 [..., 3, H, W] normalised, on pixels' device.

        timm's ToTensor + Normalize in the same fp32 operations: x / 255, then (x - mean) / std.
        The divisors are tensors on the device (CUDA multiplies by the reciprocal of a CPU
        scalar divisor, which can differ in the last bit), so the result is bit-identical
        to timm's on every device.
        """
        options = {"dtype": torch.float32, "device": pixels.device}
        mean = torch.tensor(self.mean, **options).view(3, 1, 1)
        std = torch.tensor(self.std, **options).view(3, 1, 1)
        scaled = pixels.to(torch.float32) / torch.tensor(255.0, **options)
        return (scaled - mean) / std

    def image(self, image: Image.Image) -> torch.Tensor:
        """The model input of one image -> [3, H, W] float32, normalised (timm's eval transform)."""
        return self.normalise(torch.from_numpy(np.array(self.image_pixels(image))).permute(2, 0, 1))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """The same resize (nearest) and crop applied to class ids [h, w] -> [H, W] int32
        (padding: the ignore id)."""
        return self._nearest(np.asarray(mask, dtype=np.int32), MASK_IGNORE_ID)

    def mask_codes(self, codes: np.ndarray) -> np.ndarray:
        """The same resize (nearest) and crop applied to mask codes [h, w] uint8 -> [H, W]
        uint8 (padding: the ignore code; `vitlens.data.sample_format.mask_codes`)."""
        return self._nearest(np.asarray(codes, dtype=np.uint8), MASK_CODE_IGNORE)

    def _nearest(self, mask: np.ndarray, fill: int) -> np.ndarray:
        """PIL's NEAREST resize to `resized_size`, then crop-or-pad with `fill`, as one gather
        of the cropped pixels: mask [h, w] -> [H, W] (same dtype)."""
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D [h, w], got shape {mask.shape}")
        rows, out_rows, cols, out_cols = _mask_gather(self, *mask.shape)
        out = np.empty(self.input_size, dtype=mask.dtype)  # [H, W]
        if out_rows.stop - out_rows.start < self.input_size[0] or out_cols.stop - out_cols.start < self.input_size[1]:
            out[...] = fill
        out[out_rows, out_cols] = mask[rows][:, cols]  # rows, then columns: 5x faster than one 2-D gather
        return out


def _crop_span(size: int, crop: int, offset: str) -> tuple[slice, slice]:
    """(source slice, output slice) of one axis of a centre crop-or-pad of `size` to `crop`."""
    pad_before, start = _pad_and_crop_offsets(size, crop, offset)
    source_start = start - pad_before  # source position of output position 0 (negative: padding)
    source = slice(max(0, source_start), min(size, source_start + crop))
    return source, slice(source.start - source_start, source.stop - source_start)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of every output pixel of PIL's NEAREST resize of one axis -> [size_out] int64.

    PIL (`ImagingScaleAffine`) starts at `scale / 2` and ADDS `scale = size_in / size_out`
    per pixel in double precision, truncating; the accumulated sum differs from
    `(i + 0.5) * scale` in the last bit often enough to move a pixel, so it is accumulated
    here in the same order (numpy's add.accumulate is sequential).
    """
    scale = size_in / size_out
    steps = np.full(size_out, scale)
    steps[0] = scale * 0.5
    return np.minimum(np.add.accumulate(steps).astype(np.int64), size_in - 1)


@lru_cache(maxsize=256)
def _mask_gather(geometry: EvalGeometry, height: int, width: int) -> tuple[np.ndarray, slice, np.ndarray, slice]:
    """Source rows and columns a mask of (height, width) gathers for `geometry` and the
    output slices they fill: (rows [n] int64, output rows, cols [m] int64, output columns)."""
    resized_h, resized_w = geometry.resized_size(height, width)
    rows, out_rows = _crop_span(resized_h, geometry.input_size[0], geometry.crop_offset)
    cols, out_cols = _crop_span(resized_w, geometry.input_size[1], geometry.crop_offset)
    return (nearest_indices(height, resized_h)[rows], out_rows, nearest_indices(width, resized_w)[cols], out_cols)
