"""The sample format of every vitlens shard — the ONE place that defines it.

A WebDataset sample is a group of tar members sharing a `__key__` (the member name up
to its first dot; keys therefore contain no `.`):

| member | content |
|---|---|
| `{key}.image.png` / `{key}.image.jpg` | the image: PNG (lossless) for the embedded set, the original JPEG bytes (never re-encoded) for ImageNet-S |
| `{key}.mask.png` | RGB PNG in ImageNet-S encoding: class id = R + 256*G; 0 = other/context, 1000 = ignore |
| `{key}.mask.codes.png` | what the token labels need, one code per pixel: 0 context, 1 class (`mask_class_id`), 2 ignore (id 1000); a 2-bit palette PNG (index = code), ~6x cheaper to decode than `mask.png` |
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

`mask.codes.png` is derived from `mask.png` and `mask_class_id` (`mask_codes`); readers take
it when present and fall back to `mask.png` (shards written before it existed). `mask.png`
stays in every shard: it keeps every object's id (the report and other analyses read it).

Shards are `{dataset}-{split}-{NNNNNN}.tar` (uncompressed, members in the order image,
mask, mask codes, meta; mtimes, owners and modes fixed, so the same inputs give byte-identical
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

#: The codes of `mask.codes.png` (the token-label codes of vitlens.data.token_labels).
MASK_CODE_CONTEXT: int = 0
MASK_CODE_CLASS: int = 1
MASK_CODE_IGNORE: int = 2
# Palette of `mask.codes.png` (index = code): context grey, class green, ignore black (for viewing only).
_CODES_PALETTE: tuple[int, ...] = (128, 128, 128, 0, 200, 0, 0, 0, 0)

IMAGE_MEMBERS: tuple[str, ...] = ("image.png", "image.jpg")
MASK_MEMBER: str = "mask.png"
MASK_CODES_MEMBER: str = "mask.codes.png"
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
    mask_codes_png: bytes | None = None  # None: derived from mask_png and meta.mask_class_id

    def members(self) -> list[tuple[str, bytes]]:
        """Tar members `(name, data)` of this sample in their fixed order."""
        check_key(self.key)
        if self.image_member not in IMAGE_MEMBERS:
            raise ValueError(f"sample {self.key}: image member must be one of {IMAGE_MEMBERS}")
        codes = self.mask_codes_png
        if codes is None:
            codes = encode_mask_codes(mask_codes(decode_mask(self.mask_png), self.meta.mask_class_id))
        return [
            (f"{self.key}.{self.image_member}", self.image_bytes),
            (f"{self.key}.{MASK_MEMBER}", self.mask_png),
            (f"{self.key}.{MASK_CODES_MEMBER}", codes),
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


def mask_codes(ids: np.ndarray, mask_class_id: int) -> np.ndarray:
    """The token-label code of every pixel of a class-id mask -> [H, W] uint8.

    ids: [H, W] integer class ids. `MASK_CODE_CLASS` where the id is `mask_class_id`,
    `MASK_CODE_IGNORE` where it is `MASK_IGNORE_ID`, `MASK_CODE_CONTEXT` elsewhere.
    """
    ids = np.asarray(ids)
    codes = np.zeros(ids.shape, dtype=np.uint8)  # [H, W]
    codes[ids == mask_class_id] = MASK_CODE_CLASS
    codes[ids == MASK_IGNORE_ID] = MASK_CODE_IGNORE
    return codes


def encode_mask_codes(codes: np.ndarray) -> bytes:
    """`mask.codes.png` bytes of codes [H, W] in 0..2: a palette PNG (2 bits per pixel,
    index = code; deterministic output)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"mask codes must be 2-D [H, W], got shape {codes.shape}")
    if codes.size and codes.max() > MASK_CODE_IGNORE:
        raise ValueError(f"mask codes must be in 0..{MASK_CODE_IGNORE}, got up to {codes.max()}")
    image = Image.frombytes("P", (codes.shape[1], codes.shape[0]), codes.tobytes())
    image.putpalette(_CODES_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def decode_mask_codes(png: bytes) -> np.ndarray:
    """Decode `mask.codes.png` bytes -> codes [H, W] uint8 in 0..2 (ValueError otherwise)."""
    with Image.open(io.BytesIO(png)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"mask codes must be a palette or grey PNG, got mode {image.mode!r}")
        codes = np.asarray(image)  # [H, W] uint8: palette indices or grey values
    if codes.size and codes.max() > MASK_CODE_IGNORE:
        raise ValueError(f"mask codes must be in 0..{MASK_CODE_IGNORE}, got up to {codes.max()}")
    return codes


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
        return image if image.mode == "RGB" else image.convert("RGB")


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
