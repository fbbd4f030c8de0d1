"""The optional device transform (`[data] transform = "device"`): timm's eval geometry on tensors.

`device_model_input` takes the batch's images as decoded uint8 tensors or raw encoded bytes
and returns the model input, computed on the actor's device:

1. decode: JPEG bytes with `torchvision.io.decode_jpeg` — batched with nvJPEG when the device
   is CUDA, on the CPU (libjpeg-turbo, equal to PIL's decode on the files we tested) otherwise.
   JPEGs nvJPEG does not take (4-component CMYK / YCCK, 12-bit, or any file it refuses) are
   decoded on the CPU. Other bytes (PNG, ...) are decoded with PIL, as timm's pipeline does.
2. resize each image to `EvalGeometry.resized_size(h, w)` with torchvision v2's antialiased
   resize on tensors (images of equal size in one call), the geometry's interpolation, one
   axis at a time rounded to uint8 in between as PIL does (`_resize`); `nearest` gathers
   PIL's source pixels (`nearest_indices`), exactly;
3. the same centre crop-or-pad as `EvalGeometry` (its offsets; padding with the mean colour
   in `border` mode, else black, as timm), in uint8;
4. normalise with `EvalGeometry.normalise` (timm's ToTensor + Normalize in the same fp32
   operations, on the device), so equal uint8 pixels give bit-identical inputs.

It is NOT bit-identical to timm's PIL transform: PIL resamples in fixed-point arithmetic,
torchvision's CPU uint8 kernel nearly the same way, and on CUDA the resize runs in fp32; on
the zoo's inputs a few values in a thousand differ, by one or two levels (one level is
1 / (255 std) of normalised input). Images already at the resized size are bit-identical.
The measured agreement of the lens on the zoo is in docs/scale.md ("The device transform",
`benchmarks/bench_device_transform.py`).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F2
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from vitlens.data.geometry import EvalGeometry, _crop_span, nearest_indices
from vitlens.errors import UserError

__all__ = ["device_model_input", "decode_images", "jpeg_components"]

#: Interpolations resized on tensors: torchvision's antialiased kernels, and PIL's nearest
#: as a gather (`EvalGeometry`'s `nearest_indices`).
_TENSOR_MODES: tuple[InterpolationMode, ...] = (
    InterpolationMode.BICUBIC, InterpolationMode.BILINEAR, InterpolationMode.LANCZOS, InterpolationMode.NEAREST,
)
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT/JPG/DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field (TEM, RSTn, SOI, EOI).
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})

#: One image of a batch: decoded RGB uint8 [3, h, w], or its encoded bytes.
ImageInput = torch.Tensor | bytes


def jpeg_components(data: bytes) -> tuple[int, int] | None:
    """(bits per sample, colour components) from a JPEG's start-of-frame header, or None when
    `data` is no JPEG or its header cannot be read (a scan of the marker segments only)."""
    if not data.startswith(_JPEG_SOI):
        return None
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            return (data[pos + 4], data[pos + 9]) if pos + 10 <= size else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _nvjpeg_takes(data: bytes) -> bool:
    """Whether to send a JPEG to nvJPEG: 8-bit, 1 or 3 components (no CMYK / YCCK)."""
    return jpeg_components(data) in ((8, 1), (8, 3))


def _as_uint8_buffer(data: bytes) -> torch.Tensor:
    """Encoded bytes as a 1-D uint8 CPU tensor (one copy: torch wants a writable buffer) -> [n] uint8."""
    return torch.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=torch.uint8)


def _decode_on_cpu(data: bytes) -> torch.Tensor:
    """One encoded image decoded on the CPU to RGB -> [3, h, w] uint8.

    JPEGs with libjpeg-turbo (`decode_jpeg`), anything else — and any JPEG it refuses — with
    PIL, exactly as timm's pipeline (`Image.open(...).convert("RGB")`).
    """
    if data.startswith(_JPEG_SOI):
        try:
            return decode_jpeg(_as_uint8_buffer(data), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))  # [h, w, 3] uint8
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"image does not decode: {type(err).__name__}: {err}") from err
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_images(images: Sequence[ImageInput], device: torch.device | str) -> list[torch.Tensor]:
    """Decode the encoded images of a batch; tensors pass through -> list of [3, h, w] uint8.

    On a CUDA `device` the JPEGs nvJPEG takes are decoded in one batched `decode_jpeg` call
    on that device (when the batch call fails, one call per image, and the CPU for those it
    still refuses); everything else is decoded on the CPU. A decoded image stays where it was
    decoded (CPU or `device`); `device_model_input` moves it.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(images)
    on_gpu: list[int] = []
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i} must be uint8 [3, h, w], got {image.dtype} {tuple(image.shape)}")
            out[i] = image
        elif device.type == "cuda" and _nvjpeg_takes(image):
            on_gpu.append(i)
        else:
            out[i] = _decode_on_cpu(image)
    if on_gpu:
        buffers = [_as_uint8_buffer(images[i]) for i in on_gpu]
        try:
            decoded = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # no partial results: retry one by one, the CPU for what nvJPEG refuses
            decoded = []
            for i, buffer in zip(on_gpu, buffers):
                try:
                    decoded.append(decode_jpeg(buffer, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(_decode_on_cpu(images[i]))
        for i, image in zip(on_gpu, decoded):
            out[i] = image if image.shape[0] == 3 else _decode_on_cpu(images[i])
    return out  # type: ignore[return-value]


def _tensor_interpolation(geometry: EvalGeometry) -> InterpolationMode:
    """The geometry's interpolation, when it can resize tensors; refuses the others."""
    mode = str_to_interp_mode(geometry.interpolation)
    if mode not in _TENSOR_MODES:
        raise UserError(f"'data.transform' = \"device\" cannot resize with interpolation "
                        f"{geometry.interpolation!r} (tensors: bicubic, bilinear, lanczos, nearest); "
                        f"use transform = \"timm\"")
    return mode


def _height_first(size: tuple[int, int], out: tuple[int, int]) -> bool:
    """Whether PIL (13) resamples the height before the width: when the height shrinks by more
    than twice as many pixels as the width does. Found by measurement (no documented rule):
    it predicts the order on 299 of 299 bicubic resizes of random sizes, every direction.
    The order matters because PIL rounds the intermediate image to uint8."""
    (height, width), (new_height, new_width) = size, out
    return new_height < height and height - new_height > 2 * (width - new_width)


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: InterpolationMode,
            in_float: bool | None) -> torch.Tensor:
    """Antialiased resize of [n, 3, h, w] uint8 -> [n, 3, *size] uint8, as PIL does it: one
    axis, rounded to uint8, then the other (in PIL's order, `_height_first`).

    `in_float` false or None: torchvision's native uint8 kernel on the CPU (PIL's fixed-point
    arithmetic, nearly), fp32 on other devices (torchvision has no uint8 kernel there), each
    pass clamped to [0, 255] and rounded; True: fp32 on any device (to measure CUDA's
    arithmetic on the CPU). Without the intermediate rounding, or in the other order, bicubic
    overshoot at hard edges differs from PIL by up to ~20 levels.
    """
    height, width = pixels.shape[-2:]
    if (height, width) == size:
        return pixels
    if mode == InterpolationMode.NEAREST:  # PIL's source pixels, gathered
        rows, cols = (torch.from_numpy(nearest_indices(n_in, n_out)).to(pixels.device)
                      for n_in, n_out in ((height, size[0]), (width, size[1])))
        return pixels.index_select(-2, rows).index_select(-1, cols)
    height_first = _height_first((height, width), size)
    in_uint8 = not in_float and pixels.device.type == "cpu"
    if in_uint8 and not height_first:  # torchvision's uint8 kernel: the width, rounded, then the height
        return F2.resize(pixels, list(size), interpolation=mode, antialias=True)
    steps = [(size[0], width), size] if height_first else [(height, size[1]), size]
    out = pixels if in_uint8 else pixels.float()  # [n, 3, h, w]
    for step in steps:
        if tuple(out.shape[-2:]) != step:
            out = F2.resize(out, list(step), interpolation=mode, antialias=True)
            if not in_uint8:
                out = out.clamp_(0, 255).round_()
    return out.to(torch.uint8)


def _crop_or_pad(pixels: torch.Tensor, geometry: EvalGeometry, fill: torch.Tensor) -> torch.Tensor:
    """Centre crop-or-pad of [n, 3, h, w] to the geometry's input size -> [n, 3, H, W] (a view
    when nothing is padded), with EvalGeometry's spans; `fill` [3] is the padding colour."""
    crop_h, crop_w = geometry.input_size
    rows, out_rows = _crop_span(pixels.shape[-2], crop_h, geometry.crop_offset)
    cols, out_cols = _crop_span(pixels.shape[-1], crop_w, geometry.crop_offset)
    if (out_rows.stop - out_rows.start, out_cols.stop - out_cols.start) == (crop_h, crop_w):
        return pixels[:, :, rows, cols]
    out = fill.view(1, 3, 1, 1).expand(pixels.shape[0], 3, crop_h, crop_w).clone()
    out[:, :, out_rows, out_cols] = pixels[:, :, rows, cols]
    return out


def device_model_input(images: Sequence[ImageInput], geometry: EvalGeometry, device: torch.device | str,
                       *, resize_in_float: bool | None = None) -> torch.Tensor:
    """The model input of a batch, transformed on `device` -> [B, 3, H, W] float32.

    `images`: decoded RGB images as uint8 [3, h, w] tensors (on any device) or encoded bytes
    (JPEG: nvJPEG on CUDA, else the CPU; other formats: PIL). Each is resized to
    `geometry.resized_size(h, w)` (antialiased, one call per group of equal sizes), centre
    cropped or padded to `geometry.input_size` and normalised with the geometry's mean/std.
    `resize_in_float`: None resizes in uint8 on the CPU and in fp32 on other devices; True
    uses the fp32 resize on the CPU too (to measure CUDA's arithmetic without a GPU).
    """
    if not images:
        raise ValueError("device_model_input needs at least one image")
    device = torch.device(device)
    mode = _tensor_interpolation(geometry)
    fill = torch.as_tensor(geometry._image_fill(), device=device)  # [3] uint8
    decoded = decode_images(images, device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(decoded):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    crop_h, crop_w = geometry.input_size
    pixels = torch.empty((len(decoded), 3, crop_h, crop_w), dtype=torch.uint8, device=device)  # [B, 3, H, W]
    for (height, width), members in groups.items():
        parts = [decoded[i] for i in members]
        if len({part.device for part in parts}) > 1:
            parts = [part.to(device) for part in parts]
        group = torch.stack(parts).to(device)  # [n, 3, h, w] uint8: one host-to-device copy per group
        group = _resize(group, geometry.resized_size(height, width), mode, resize_in_float)
        index = torch.tensor(members, device=device)
        pixels.index_copy_(0, index, _crop_or_pad(group, geometry, fill))
    return geometry.normalise(pixels)  # [B, 3, H, W] float32, timm's fp32 operations
