"""Stream decoded, model-transformed batches with metadata and token labels from shards.

One shard is read as a tar stream (`webdataset.gopen`, so any URL webdataset accepts:
local paths, `file:`, `http(s)://`, `pipe:`), one sample at a time; a batch never spans
two shards. There is no hidden splitting by node or worker and no shuffling: the caller
passes the exact list of shards it wants (`iter_batches`) or one shard
(`iter_shard_batches`). A sample that cannot be decoded is reported through
`on_reject(shard, key, reason)` and skipped.
"""

from __future__ import annotations

import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset
from PIL import Image

from vitlens.data.geometry import EvalGeometry
from vitlens.data.manifest import read_manifest, shard_urls
from vitlens.data.sample_format import (
    IMAGE_MEMBERS,
    MASK_MEMBER,
    META_MEMBER,
    decode_image,
    decode_mask,
    decode_meta,
    split_member_name,
)
from vitlens.data.token_labels import token_labels
from vitlens.errors import UserError

__all__ = ["Batch", "RejectCallback", "iter_batches", "iter_shard_batches", "iter_shard_samples",
           "read_manifest", "shard_urls"]

RejectCallback = Callable[[str, str, str], None]  # (shard, key, reason)


@dataclass
class Batch:
    """A batch of transformed images with their labels (all from one shard)."""

    images: torch.Tensor  # [B, 3, H, W] float32, normalised
    class_index: torch.Tensor  # [B] int64, the model's label space
    fg_fraction: torch.Tensor  # [B, P + N] float32, NaN for prefix tokens
    token_label: torch.Tensor  # [B, P + N] int8, codes of vitlens.data.token_labels
    keys: list[str]
    meta: list[dict[str, Any]]
    shard: str


@dataclass
class _Decoded:
    key: str
    image: np.ndarray  # [3, H, W] float32
    fg_fraction: np.ndarray  # [P + N] float32
    token_label: np.ndarray  # [P + N] int8
    meta: dict[str, Any]


def _warn_reject(shard: str, key: str, reason: str) -> None:
    warnings.warn(f"skipped sample {key!r} of shard {shard}: {reason}", stacklevel=3)


def iter_shard_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the raw samples of one shard: `(key, {member: bytes})`, in tar order.

    Members of a sample must be contiguous (as every vitlens shard writes them). Raises
    UserError when the shard cannot be opened; a damaged tar raises `tarfile.TarError`.
    """
    try:
        stream = webdataset.gopen(url, "rb")
    except Exception as err:  # gopen raises various types for missing files / bad URLs
        raise UserError(f"cannot open shard {url}: {err}") from err
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        key: str | None = None
        members: dict[str, bytes] = {}
        for info in tar:
            if not info.isfile():
                continue
            member_key, member = split_member_name(info.name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            extracted = tar.extractfile(info)
            assert extracted is not None
            members[member] = extracted.read()
        if key is not None:
            yield key, members


def _decode_sample(
    key: str,
    members: dict[str, bytes],
    geometry: EvalGeometry,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
) -> _Decoded:
    """Decode and transform one raw sample; raises ValueError/OSError with the reason."""
    image_member = next((name for name in IMAGE_MEMBERS if name in members), None)
    missing = [name for name in (MASK_MEMBER, META_MEMBER) if name not in members]
    if image_member is None or missing:
        raise ValueError(f"missing member(s) {', '.join(missing or ['image'])}")
    meta = decode_meta(members[META_MEMBER])
    image = decode_image(members[image_member])
    mask = decode_mask(members[MASK_MEMBER])
    if mask.shape != (image.height, image.width):
        raise ValueError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.width}x{image.height}"
        )
    fg_fraction, label = token_labels(
        geometry.mask(mask), int(meta["mask_class_id"]), patch_size, num_prefix_tokens
    )
    return _Decoded(key, geometry.image_array(image), fg_fraction.numpy(), label.numpy(), meta)


def _collate(samples: list[_Decoded], shard: str) -> Batch:
    """Stack in numpy (torch.stack of small tensors contends for torch's thread pool)."""
    class_index = np.array([int(s.meta["class_index"]) for s in samples], dtype=np.int64)
    return Batch(
        images=torch.from_numpy(np.stack([s.image for s in samples])),
        class_index=torch.from_numpy(class_index),
        fg_fraction=torch.from_numpy(np.stack([s.fg_fraction for s in samples])),
        token_label=torch.from_numpy(np.stack([s.token_label for s in samples])),
        keys=[s.key for s in samples],
        meta=[s.meta for s in samples],
        shard=shard,
    )


def iter_shard_batches(
    url: str,
    geometry: EvalGeometry,
    batch_size: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    on_reject: RejectCallback | None = None,
) -> Iterator[Batch]:
    """Stream one shard as batches of at most `batch_size` samples (the last may be smaller).

    Undecodable samples call `on_reject(url, key, reason)` (default: a warning) and are
    skipped; a tar that breaks off mid-stream reports key `"*"` and ends the shard.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reject = on_reject or _warn_reject
    pending: list[_Decoded] = []
    samples = iter_shard_samples(url)
    samples_read = 0
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            break
        except (tarfile.TarError, ValueError, OSError, EOFError) as err:
            reject(url, "*", f"shard unreadable after {samples_read} samples: {err}")
            break
        samples_read += 1
        try:
            pending.append(_decode_sample(key, members, geometry, patch_size, num_prefix_tokens))
        except (ValueError, OSError, KeyError, TypeError, Image.DecompressionBombError) as err:
            reject(url, key, f"{type(err).__name__}: {err}")
            continue
        if len(pending) == batch_size:
            yield _collate(pending, url)
            pending = []
    if pending:
        yield _collate(pending, url)


def iter_batches(
    urls: Iterable[str],
    geometry: EvalGeometry,
    batch_size: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    on_reject: RejectCallback | None = None,
) -> Iterator[Batch]:
    """`iter_shard_batches` over an explicit list of shards, in the given order."""
    for url in urls:
        yield from iter_shard_batches(
            url, geometry, batch_size, patch_size, num_prefix_tokens, on_reject
        )
