"""Stream decoded, model-transformed batches with metadata and token labels from shards.

One shard is read as a tar stream (`vitlens.data.urls.open_binary`: local paths, `file:`,
object stores such as `s3://` through fsspec, and any other URL webdataset accepts:
`http(s)://`, `pipe:`), one sample at a time; a batch never spans
two shards. There is no hidden splitting by node or worker and no shuffling: the caller
passes the exact list of shards it wants (`iter_batches`) or one shard
(`iter_shard_batches`). A sample that cannot be decoded is reported through
`on_reject(shard, key, reason, stage)` and skipped: stage `decode` (missing members,
broken JSON, an image or mask that does not decode, a mask of another size) or `label`
(its meta.json `class_index` is no integer, is negative, or — given the model's
`num_classes` — is not below it: one bad label costs its own sample, never the batch).

`transform` says what a batch holds of its images (the mask, labels and collation are the same
in every mode; a mask's code plane `mask.codes.png` is read when the shard has one, else
`mask.png`):

- `"timm"` (default): `Batch.pixels` [B, 3, H, W] uint8, resized and cropped on the host
  exactly as timm's eval transform; `Batch.model_input(device)` normalises on `device`
  (bit-identical to timm's float32 output);
- `"device"`: no resize on the host: `Batch.originals` holds each image as decoded, uint8
  [3, h, w] RGB (JPEGs by libjpeg-turbo through torchvision, the same pixels as PIL's decode
  and `convert("RGB")`; other formats by PIL, as timm's); with `jpeg_bytes=True` a
  JPEG in RGB or grey is passed as its bytes instead, undecoded (its size read from the
  header; for nvJPEG on CUDA), other images decoded as before. `Batch.model_input(device)`
  resizes, crops and normalises them on the device
  (`vitlens.data.device_transform.device_model_input`; close to timm, not bit-identical).

A damaged shard is not a reject: after yielding every sample (batch) it could read, the
reader raises `ShardReadError` when the tar breaks off (no end-of-archive marker, a
truncated member or header, bytes that are no tar), when the shard holds another number
of samples than `expected_samples`, or when the sha256 of its bytes differs from
`expected_sha256`. The sha256 is computed while streaming the one read of the file (the
bytes after the end-of-archive marker are drained into it), never by a second read
(`vitlens.data.shard_stream`, which reads the tar; this module decodes and batches).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from vitlens.data.geometry import EvalGeometry
from vitlens.data.manifest import read_manifest, shard_urls
from vitlens.data.sample_format import (
    IMAGE_MEMBERS,
    MASK_CODES_MEMBER,
    MASK_MEMBER,
    META_MEMBER,
    decode_image,
    decode_mask,
    decode_mask_codes,
    decode_meta,
    mask_codes,
)
from vitlens.data.shard_stream import ShardReadError, iter_shard_samples
from vitlens.data.token_labels import code_token_labels
from vitlens.errors import one_line_reason
from vitlens.settings import TRANSFORMS

__all__ = ["Batch", "ImageInput", "LabelError", "REJECT_DECODE", "REJECT_LABEL", "REJECT_STAGES", "RejectCallback",
           "ShardReadError", "check_class_index", "check_transform", "iter_batches", "iter_shard_batches",
           "iter_shard_samples", "read_manifest", "reject_stage", "shard_urls"]

RejectCallback = Callable[[str, str, str, str], None]  # (shard, key, reason, stage)

#: The stages of a sample reject (`rejects.stage` of a row with an image key).
REJECT_DECODE: str = "decode"
REJECT_LABEL: str = "label"
REJECT_STAGES: tuple[str, ...] = (REJECT_DECODE, REJECT_LABEL)

#: One image before the device transform: decoded uint8 [3, h, w] RGB, or a JPEG's bytes.
ImageInput = torch.Tensor | bytes


@dataclass
class Batch:
    """A batch of images with their labels (all from one shard), as its reader's `transform`
    made them: `pixels` ("timm") or `originals` ("device"); the other is None."""

    pixels: torch.Tensor | None  # [B, 3, H, W] uint8, resized and cropped (a channels-last view)
    originals: list[ImageInput] | None  # per image: uint8 [3, h, w] as decoded, or JPEG bytes
    class_index: torch.Tensor  # [B] int64, the model's label space
    fg_fraction: torch.Tensor  # [B, P + N] float32, NaN for prefix tokens
    token_label: torch.Tensor  # [B, P + N] int8, codes of vitlens.data.token_labels
    keys: list[str]
    meta: list[dict[str, Any]]
    shard: str
    geometry: EvalGeometry

    def model_input(self, device: torch.device | str) -> torch.Tensor:
        """The model's input on `device` -> [B, 3, H, W] float32, normalised.

        "timm": the uint8 pixels are copied to `device` (asynchronously from pinned memory)
        and normalised there, bit-identical to timm's eval transform. "device": the
        originals are resized, cropped and normalised on `device`
        (`vitlens.data.device_transform.device_model_input`).
        """
        if self.pixels is not None:
            pixels = self.pixels.to(device, non_blocking=True).contiguous()  # [B, 3, H, W] uint8
            return self.geometry.normalise(pixels)
        from vitlens.data.device_transform import device_model_input  # the device transform only

        assert self.originals is not None
        return device_model_input(self.originals, self.geometry, device)

    @property
    def images(self) -> torch.Tensor:
        """The model's input on the CPU -> [B, 3, H, W] float32 (`model_input("cpu")`)."""
        return self.model_input("cpu")


@dataclass
class _Decoded:
    key: str
    image: np.ndarray | ImageInput  # "timm": [H, W, 3] uint8; "device": see Batch.originals
    fg_fraction: np.ndarray  # [P + N] float32
    token_label: np.ndarray  # [P + N] int8
    meta: dict[str, Any]


class LabelError(ValueError):
    """A sample whose meta.json `class_index` is no label of the model (reject stage `label`)."""


def check_class_index(key: str, value: Any, num_classes: int | None) -> int:
    """`value` (a sample's meta.json `class_index`) as a label in [0, num_classes); raises
    `LabelError` naming the sample, the value and the class count. Without `num_classes`
    only the type and the sign are checked."""
    classes = "" if num_classes is None else f" (the model has {num_classes} classes: 0..{num_classes - 1})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelError(f"sample {key!r}: class_index {value!r} is not an integer{classes}")
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise LabelError(f"sample {key!r}: class_index {value} is outside the model's label space{classes}")
    return value


def reject_stage(error: BaseException) -> str:
    """The reject stage of an error that skipped a sample: `label` or `decode`."""
    return REJECT_LABEL if isinstance(error, LabelError) else REJECT_DECODE


def _warn_reject(shard: str, key: str, reason: str, stage: str) -> None:
    warnings.warn(f"skipped sample {key!r} of shard {shard} ({stage}): {reason}", stacklevel=3)


def check_transform(transform: str, jpeg_bytes: bool = False) -> None:
    """Raise ValueError for a `transform` the reader does not know, or `jpeg_bytes` without "device"."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if jpeg_bytes and transform != "device":
        raise ValueError(f"jpeg_bytes needs transform 'device', got {transform!r}")


def _image_input(data: bytes, geometry: EvalGeometry, transform: str, jpeg_bytes: bool
                 ) -> tuple[np.ndarray | ImageInput, tuple[int, int]]:
    """One image member as the batch holds it, and the image's (height, width)."""
    if jpeg_bytes:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            if header.format == "JPEG" and header.mode in ("RGB", "L"):
                return data, (header.height, header.width)
    if transform == "timm":
        image = decode_image(data)
        return geometry.image_pixels(image), (image.height, image.width)  # [H, W, 3] uint8
    from vitlens.data.device_transform import decode_images  # the device transform only

    # libjpeg-turbo straight into a [3, h, w] tensor (PIL's pixels exactly, without PIL's copy;
    # PIL for other formats and for JPEGs it refuses)
    [pixels] = decode_images([data], "cpu")
    return pixels, (pixels.shape[1], pixels.shape[2])


def _decode_sample(
    key: str,
    members: dict[str, bytes],
    geometry: EvalGeometry,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    num_classes: int | None = None,
    transform: str = "timm",
    jpeg_bytes: bool = False,
) -> _Decoded:
    """Decode and transform one raw sample; raises ValueError/OSError with the reason
    (`LabelError` for a `class_index` outside [0, num_classes), checked before the image
    is decoded). The mask's code plane is read when present, else `mask.png`."""
    image_member = next((name for name in IMAGE_MEMBERS if name in members), None)
    mask_member = MASK_CODES_MEMBER if MASK_CODES_MEMBER in members else MASK_MEMBER
    missing = [name for name in (mask_member, META_MEMBER) if name not in members]
    if image_member is None or missing:
        raise ValueError(f"missing member(s) {', '.join(missing or ['image'])}")
    meta = decode_meta(members[META_MEMBER])
    check_class_index(key, meta["class_index"], num_classes)
    image, (height, width) = _image_input(members[image_member], geometry, transform, jpeg_bytes)
    if mask_member == MASK_CODES_MEMBER:
        codes = decode_mask_codes(members[MASK_CODES_MEMBER])  # [h, w] uint8
    else:
        codes = mask_codes(decode_mask(members[MASK_MEMBER]), int(meta["mask_class_id"]))
    if codes.shape != (height, width):
        raise ValueError(f"mask is {codes.shape[1]}x{codes.shape[0]} but image is {width}x{height}")
    fg_fraction, label = code_token_labels(geometry.mask_codes(codes), patch_size, num_prefix_tokens)
    return _Decoded(key, image, fg_fraction, label, meta)


def _collate(samples: list[_Decoded], shard: str, geometry: EvalGeometry) -> Batch:
    """Stack in numpy (torch.stack of small tensors contends for torch's thread pool); the
    pixels are stacked channels-last, one copy, and viewed as [B, 3, H, W]."""
    class_index = np.array([s.meta["class_index"] for s in samples], dtype=np.int64)  # checked ints
    pixels = originals = None
    if isinstance(samples[0].image, np.ndarray):
        pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)  # [B, 3, H, W]
    else:
        originals = [s.image for s in samples]
    return Batch(
        pixels=pixels,
        originals=originals,
        class_index=torch.from_numpy(class_index),
        fg_fraction=torch.from_numpy(np.stack([s.fg_fraction for s in samples])),
        token_label=torch.from_numpy(np.stack([s.token_label for s in samples])),
        keys=[s.key for s in samples],
        meta=[s.meta for s in samples],
        shard=shard,
        geometry=geometry,
    )


def iter_shard_batches(
    url: str,
    geometry: EvalGeometry,
    batch_size: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    on_reject: RejectCallback | None = None,
    expected_samples: int | None = None,
    expected_sha256: str | None = None,
    num_classes: int | None = None,
    transform: str = "timm",
    jpeg_bytes: bool = False,
) -> Iterator[Batch]:
    """Stream one shard as batches of at most `batch_size` samples (the last may be smaller).

    `transform` ("timm" | "device") and `jpeg_bytes` say what a batch holds of its images
    (module docstring).

    Undecodable samples call `on_reject(url, key, reason, stage)` (default: a warning;
    `reason` is one deterministic line; `stage` is `decode`, or `label` for a `class_index`
    that is no integer in [0, num_classes)) and are skipped; they still count as samples
    of the shard. `num_classes` is the model's class count (None: labels are only checked
    to be integers >= 0).
    After yielding every batch it could read, raises `ShardReadError` when the tar breaks
    off (truncated, random or zero bytes), holds another number of samples than
    `expected_samples`, or its bytes' sha256 differs from `expected_sha256` (see
    `iter_shard_samples`; on_reject is not called for these).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_transform(transform, jpeg_bytes)
    reject = on_reject or _warn_reject
    pending: list[_Decoded] = []
    samples = iter_shard_samples(url, expected_samples, expected_sha256)
    failure: ShardReadError | None = None
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            break
        except ShardReadError as err:
            failure = err
            break
        try:
            pending.append(_decode_sample(key, members, geometry, patch_size, num_prefix_tokens, num_classes,
                                          transform, jpeg_bytes))
        except (ValueError, OSError, KeyError, TypeError, Image.DecompressionBombError) as err:
            reject(url, key, one_line_reason(err), reject_stage(err))
            continue
        if len(pending) == batch_size:
            yield _collate(pending, url, geometry)
            pending = []
    if pending:
        yield _collate(pending, url, geometry)
    if failure is not None:
        raise failure


def iter_batches(
    urls: Iterable[str],
    geometry: EvalGeometry,
    batch_size: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    on_reject: RejectCallback | None = None,
    num_classes: int | None = None,
    transform: str = "timm",
    jpeg_bytes: bool = False,
) -> Iterator[Batch]:
    """`iter_shard_batches` over an explicit list of shards, in the given order."""
    for url in urls:
        yield from iter_shard_batches(
            url, geometry, batch_size, patch_size, num_prefix_tokens, on_reject, num_classes=num_classes,
            transform=transform, jpeg_bytes=jpeg_bytes,
        )
