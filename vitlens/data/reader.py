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

A damaged shard is not a reject: after yielding every sample (batch) it could read, the
reader raises `ShardReadError` when the tar breaks off (no end-of-archive marker, a
truncated member or header, bytes that are no tar), when the shard holds another number
of samples than `expected_samples`, or when the sha256 of its bytes differs from
`expected_sha256`. The sha256 is computed while streaming the one read of the file (the
bytes after the end-of-archive marker are drained into it), never by a second read.
"""

from __future__ import annotations

import hashlib
import tarfile
import warnings
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from vitlens.data import urls
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
from vitlens.errors import UserError, one_line_reason

__all__ = ["Batch", "LabelError", "REJECT_DECODE", "REJECT_LABEL", "REJECT_STAGES", "RejectCallback",
           "ShardReadError", "check_class_index", "iter_batches", "iter_shard_batches", "iter_shard_samples",
           "read_manifest", "reject_stage", "shard_urls"]

RejectCallback = Callable[[str, str, str, str], None]  # (shard, key, reason, stage)

#: The stages of a sample reject (`rejects.stage` of a row with an image key).
REJECT_DECODE: str = "decode"
REJECT_LABEL: str = "label"
REJECT_STAGES: tuple[str, ...] = (REJECT_DECODE, REJECT_LABEL)

_DRAIN_CHUNK: int = 1 << 20
# Errors that mean the tar stream itself is damaged (not one sample's content).
_STREAM_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, ValueError)


class ShardReadError(Exception):
    """A shard that does not read to its end as the manifest describes it.

    `reason` is one deterministic line (no object addresses, ANSI codes or tracebacks),
    e.g. "shard truncated after 7 samples: ReadError: unexpected end of data",
    "shard has 9 samples, manifest says 10" or
    "sha256 mismatch: file 0123456789ab…, manifest fedcba987654…".
    """

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = one_line_reason(reason)
        super().__init__(self.reason)


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


class _HashingReader:
    """A read-only file object over a stream that feeds every byte it returns into sha256."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream; the bytes also go into the hash."""
        data = self._stream.read(size)
        self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> None:
        """Read the rest of the stream to EOF (into the hash)."""
        while self.read(_DRAIN_CHUNK):
            pass


class _EndOfArchive:
    """Tells a tar that ended with its end-of-archive marker from one that broke off.

    `tarfile` in stream mode ends iteration silently when, after the first member, a
    header is missing, short or invalid; only a zero block is the real end. A TarInfo
    subclass sees which header error ended the archive.
    """

    def __init__(self) -> None:
        self.clean = False
        self.damage: str | None = None
        end = self

        class _TarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
                try:
                    return super().fromtarfile(tar)
                except tarfile.EOFHeaderError:
                    end.clean = True
                    raise
                except tarfile.HeaderError as err:
                    end.damage = _header_damage(err)
                    raise

        self.tarinfo = _TarInfo


def _header_damage(err: tarfile.HeaderError) -> str:
    """A one-line reason for a header that ended a tar stream early."""
    if isinstance(err, tarfile.EmptyHeaderError):
        return "stream ends without the tar end-of-archive marker"
    if isinstance(err, tarfile.TruncatedHeaderError):
        return "stream ends inside a tar header"
    return f"invalid tar header ({one_line_reason(err)})"


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's file members into `(key, {member: bytes})` samples."""
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


def _check_problems(
    count: int, digest: str, expected_samples: int | None, expected_sha256: str | None
) -> list[str]:
    """Differences of a completely read shard from what its manifest says."""
    problems = []
    if expected_samples is not None and count != expected_samples:
        problems.append(f"shard has {count} samples, manifest says {expected_samples}")
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        problems.append(f"sha256 mismatch: file {digest[:12]}…, manifest {expected_sha256.strip()[:12]}…")
    return problems


def iter_shard_samples(
    url: str,
    expected_samples: int | None = None,
    expected_sha256: str | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the raw samples of one shard: `(key, {member: bytes})`, in tar order.

    Members of a sample must be contiguous (as every vitlens shard writes them). Raises
    UserError when the shard cannot be opened. After the last sample it could read, raises
    `ShardReadError` when the tar broke off (a partly read sample is not yielded), when
    the number of samples differs from `expected_samples`, or when the sha256 of the
    file's bytes (hashed while streaming; the rest after the end-of-archive marker is
    drained into the hash) differs from `expected_sha256`. The file is read once.
    """
    try:
        raw = urls.open_binary(url)
    except UserError:
        raise
    except Exception as err:  # gopen / fsspec raise various types for missing files / bad URLs
        raise UserError(f"cannot open shard {url}: {err}") from err
    stream = _HashingReader(raw)
    end = _EndOfArchive()
    count = 0
    damage: str | None = None
    finished = False
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=end.tarinfo)  # type: ignore[call-overload]
        except _STREAM_ERRORS as err:
            damage = one_line_reason(err)
        else:
            with tar:
                samples = _tar_samples(tar)
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except _STREAM_ERRORS as err:
                        damage = one_line_reason(err)
                        break
                    count += 1
                    yield sample
            if damage is None and not end.clean:
                damage = end.damage or "stream ends without the tar end-of-archive marker"
        if damage is None:
            try:
                stream.drain()
            except _STREAM_ERRORS as err:
                damage = f"reading after the end-of-archive marker failed: {one_line_reason(err)}"
        finished = True
    finally:
        try:
            raw.close()  # a `pipe:` stream reports its command's failure here
        except _STREAM_ERRORS as err:
            if finished and damage is None:
                damage = f"stream failed: {one_line_reason(err)}"
    if damage is not None:
        raise ShardReadError(f"shard truncated after {count} samples: {damage}")
    problems = _check_problems(count, stream.digest.hexdigest(), expected_samples, expected_sha256)
    if problems:
        raise ShardReadError("; ".join(problems))


def _decode_sample(
    key: str,
    members: dict[str, bytes],
    geometry: EvalGeometry,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    num_classes: int | None = None,
) -> _Decoded:
    """Decode and transform one raw sample; raises ValueError/OSError with the reason
    (`LabelError` for a `class_index` outside [0, num_classes), checked before the image
    is decoded)."""
    image_member = next((name for name in IMAGE_MEMBERS if name in members), None)
    missing = [name for name in (MASK_MEMBER, META_MEMBER) if name not in members]
    if image_member is None or missing:
        raise ValueError(f"missing member(s) {', '.join(missing or ['image'])}")
    meta = decode_meta(members[META_MEMBER])
    check_class_index(key, meta["class_index"], num_classes)
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
    class_index = np.array([s.meta["class_index"] for s in samples], dtype=np.int64)  # checked ints
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
    expected_samples: int | None = None,
    expected_sha256: str | None = None,
    num_classes: int | None = None,
) -> Iterator[Batch]:
    """Stream one shard as batches of at most `batch_size` samples (the last may be smaller).

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
            pending.append(_decode_sample(key, members, geometry, patch_size, num_prefix_tokens, num_classes))
        except (ValueError, OSError, KeyError, TypeError, Image.DecompressionBombError) as err:
            reject(url, key, one_line_reason(err), reject_stage(err))
            continue
        if len(pending) == batch_size:
            yield _collate(pending, url)
            pending = []
    if pending:
        yield _collate(pending, url)
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
) -> Iterator[Batch]:
    """`iter_shard_batches` over an explicit list of shards, in the given order."""
    for url in urls:
        yield from iter_shard_batches(
            url, geometry, batch_size, patch_size, num_prefix_tokens, on_reject, num_classes=num_classes
        )
