"""The sample format of every vitlens shard — the ONE place that defines it.

A WebDataset sample is a group of tar members sharing a `__key__` (the member name up
to its first dot; keys therefore contain no `.`):

| member | content |
|---|---|
| `{key}.image.png` / `{key}.image.jpg` | the image: PNG (lossless) for the embedded set, the original JPEG bytes (never re-encoded) for ImageNet-S |
| `{key}.mask.png` | RGB PNG in ImageNet-S encoding: class id = R + 256*G; 0 = other/context, 1000 = ignore |
| `{key}.meta.json` | `{"class_index", "mask_class_id", "class_name", "wnid", "folder_wnid", "source", "split", "dataset"}` |

- `class_index`: the class in the *model's* label space (ImageNet-1k index for
  ImageNet-S, 0..K-1 for shapes).
- `mask_class_id`: the id that marks the object in `mask.png` (ImageNet-S class id; for
  shapes `class_index + 1`).
- `wnid`: the synset of `mask_class_id` (null for shapes); `folder_wnid`: the synset of
  the folder the image came from (ImageNet-S only; may differ from `wnid` where
  ImageNet-S relabelled an image or merged a synset; null for shapes).
- `source`: where the image came from (path relative to the data set root, or the
  generator and its settings); `split`, `dataset`: as in the shard name.

Shards are `{dataset}-{split}-{NNNNNN}.tar` (uncompressed, members in the order image,
mask, meta; mtimes, owners and modes fixed, so the same inputs give byte-identical
shards) in one directory with `manifest.json` (see `vitlens.data.manifest`).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

MASK_CONTEXT_ID: int = 0
MASK_IGNORE_ID: int = 1000
MASK_MAX_ID: int = 255 + 256 * 255

IMAGE_MEMBERS: tuple[str, ...] = ("image.png", "image.jpg")
MASK_MEMBER: str = "mask.png"
META_MEMBER: str = "meta.json"

SHARD_NAME_PATTERN: str = "{dataset}-{split}-{index:06d}.tar"
_NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")
_KEY = re.compile(r"^[^./\\\s]+$")

META_REQUIRED_FIELDS: tuple[str, ...] = (
    "class_index",
    "mask_class_id",
    "class_name",
    "wnid",
    "folder_wnid",
    "source",
    "split",
    "dataset",
)


@dataclass(frozen=True)
class SampleMeta:
    """The `meta.json` of one sample (fields documented in the module docstring)."""

    class_index: int
    mask_class_id: int
    class_name: str
    wnid: str | None
    folder_wnid: str | None
    source: str
    split: str
    dataset: str


@dataclass(frozen=True)
class EncodedSample:
    """One sample as the bytes that go into a shard."""

    key: str
    image_member: str  # one of IMAGE_MEMBERS
    image_bytes: bytes
    mask_png: bytes
    meta: SampleMeta

    def members(self) -> list[tuple[str, bytes]]:
        """Tar members `(name, data)` of this sample in their fixed order."""
        check_key(self.key)
        if self.image_member not in IMAGE_MEMBERS:
            raise ValueError(f"sample {self.key}: image member must be one of {IMAGE_MEMBERS}")
        return [
            (f"{self.key}.{self.image_member}", self.image_bytes),
            (f"{self.key}.{MASK_MEMBER}", self.mask_png),
            (f"{self.key}.{META_MEMBER}", encode_meta(self.meta)),
        ]


def shard_name(dataset: str, split: str, index: int) -> str:
    """The file name of shard `index` of a data set split, e.g. `shapes-validation-000000.tar`."""
    for option, value in (("dataset", dataset), ("split", split)):
        if not _NAME_PART.match(value):
            raise ValueError(f"{option} {value!r} may only contain letters, digits and '_'")
    return SHARD_NAME_PATTERN.format(dataset=dataset, split=split, index=index)


def check_key(key: str) -> str:
    """Return `key` if it is a valid sample key (non-empty, no '.', '/', '\\' or spaces)."""
    if not _KEY.match(key):
        raise ValueError(f"invalid sample key {key!r}: keys may not contain '.', '/', '\\' or spaces")
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into `(key, member)` at the first dot of its base name."""
    directory, _, base = name.rpartition("/")
    key, dot, member = base.partition(".")
    if not dot or not key:
        raise ValueError(f"tar member {name!r} is not named '<key>.<member>'")
    return (f"{directory}/{key}" if directory else key), member


def encode_mask(ids: np.ndarray) -> bytes:
    """Encode a class-id mask as an RGB PNG (R = id % 256, G = id // 256, B = 0).

    ids: [H, W] integer ids in 0..65535.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > MASK_MAX_ID):
        raise ValueError(f"mask ids must be in 0..{MASK_MAX_ID}, got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.int64)
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)  # [H, W, 3]
    rgb[..., 0] = ids % 256
    rgb[..., 1] = ids // 256
    return encode_png(rgb)


def decode_mask_image(mask: Image.Image) -> np.ndarray:
    """Class ids of a mask image -> [H, W] int32.

    RGB/RGBA: id = R + 256*G (ImageNet-S encoding); palette images are converted to RGB
    first; single-channel images (L, I, I;16) hold the id directly.
    """
    if mask.mode == "P":
        mask = mask.convert("RGB")
    if mask.mode in ("RGB", "RGBA"):
        rgb = np.asarray(mask, dtype=np.int32)  # [H, W, 3|4]
        return rgb[..., 0] + 256 * rgb[..., 1]
    if mask.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(mask).astype(np.int32)
    raise ValueError(f"unsupported mask image mode {mask.mode!r}")


def decode_mask(png: bytes) -> np.ndarray:
    """Decode mask PNG bytes -> class ids [H, W] int32 (see `decode_mask_image`)."""
    with Image.open(io.BytesIO(png)) as mask:
        mask.load()
        return decode_mask_image(mask)


def is_imagenet_s_mask_png(png: bytes) -> bool:
    """True when the bytes are a PNG in RGB mode (already the ImageNet-S encoding)."""
    with Image.open(io.BytesIO(png)) as mask:
        return mask.format == "PNG" and mask.mode == "RGB"


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 image [H, W, 3] (or [H, W]); deterministic output."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=6
    )
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (PNG or JPEG) fully into an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def encode_meta(meta: SampleMeta) -> bytes:
    """`meta.json` bytes (sorted keys, UTF-8) of a sample."""
    return json.dumps(asdict(meta), sort_keys=True, ensure_ascii=False).encode("utf-8")


def decode_meta(data: bytes) -> dict[str, Any]:
    """Parse `meta.json` bytes; raises ValueError naming missing fields."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a JSON object")
    missing = [field for field in META_REQUIRED_FIELDS if field not in meta]
    if missing:
        raise ValueError(f"meta.json lacks field(s) {', '.join(missing)}")
    return meta
