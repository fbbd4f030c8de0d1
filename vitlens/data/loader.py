"""One shard as batches, decoded in `torch.utils.data.DataLoader` worker processes, in order.

`shard_batches` is `vitlens.data.reader.iter_shard_batches` with the decoding (JPEG/PNG
decode, resize, crop, token labels) spread over `workers` processes, so an actor
decodes the next batches while its device runs the current one. The result is the same
batches, samples and rejects in the same order as `iter_shard_batches`, for any number of
workers:

- every worker streams the whole tar (reading bytes is cheap; decoding is not) and decodes
  the samples `i` with `i % workers == worker_id`; a sample it cannot decode (or whose
  `class_index` is no label below `num_classes`) becomes a reject item in its place, so the DataLoader's round-robin over workers (one item per
  request, `batch_size=None`) returns the samples in tar order;
- each worker ends with one end-of-stream item saying how its read ended (worker 0 also
  checks the manifest's sha256: the shard's bytes are hashed once); a damaged, miscounted
  or replaced shard raises `ShardReadError` after the last batch, as `iter_shard_batches`
  does;
- batches are collated in the actor's process (and pinned when the device is CUDA).

A worker that dies (killed, out of memory) makes the DataLoader raise in the actor: the
shard fails like any analysis error, nothing of it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitlens.data.geometry import EvalGeometry
from vitlens.data.reader import (
    Batch,
    RejectCallback,
    ShardReadError,
    _collate,
    check_transform,
    _decode_sample,
    _Decoded,
    _warn_reject,
    iter_shard_samples,
    reject_stage,
)
from vitlens.errors import UserError, one_line_reason

__all__ = ["reader_options", "shard_batches"]

_DECODE_ERRORS = (ValueError, OSError, KeyError, TypeError, Image.DecompressionBombError)


@dataclass
class _Rejected:
    key: str
    reason: str
    stage: str  # vitlens.data.reader.REJECT_STAGES


@dataclass
class _StreamEnd:
    worker: int
    failure: str | None  # a ShardReadError reason, or None when the shard read as expected
    open_error: str | None = None  # the shard could not be opened (UserError message)


class _ShardSamples(IterableDataset):
    """The decoded samples of one shard that belong to this worker, then its end item."""

    def __init__(
        self,
        url: str,
        geometry: EvalGeometry,
        patch_size: int | tuple[int, int],
        num_prefix_tokens: int,
        expected_samples: int | None,
        expected_sha256: str | None,
        num_classes: int | None = None,
        transform: str = "timm",
        jpeg_bytes: bool = False,
    ) -> None:
        super().__init__()
        self.url = url
        self.geometry = geometry
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.expected_samples = expected_samples
        self.expected_sha256 = expected_sha256
        self.num_classes = num_classes
        self.transform = transform
        self.jpeg_bytes = jpeg_bytes

    def __iter__(self) -> Iterator[_Decoded | _Rejected | _StreamEnd]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sha256 = self.expected_sha256 if worker == 0 else None  # one worker checks the bytes
        try:
            for index, (key, members) in enumerate(iter_shard_samples(self.url, self.expected_samples, sha256)):
                if index % workers != worker:
                    continue
                try:
                    yield _decode_sample(key, members, self.geometry, self.patch_size, self.num_prefix_tokens,
                                         self.num_classes, self.transform, self.jpeg_bytes)
                except _DECODE_ERRORS as err:
                    yield _Rejected(key, one_line_reason(err), reject_stage(err))
        except ShardReadError as err:
            yield _StreamEnd(worker, err.reason)
            return
        except UserError as err:
            yield _StreamEnd(worker, None, str(err))
            return
        yield _StreamEnd(worker, None)


def _as_is(item: object) -> object:
    """The DataLoader's collate for single items: nothing to convert (collation is ours)."""
    return item


def _single_thread_worker(_: int) -> None:
    """Decode workers use one torch thread each (the actor's cores are the workers)."""
    torch.set_num_threads(1)


def shard_batches(
    url: str,
    geometry: EvalGeometry,
    batch_size: int,
    patch_size: int | tuple[int, int],
    num_prefix_tokens: int,
    on_reject: RejectCallback | None = None,
    expected_samples: int | None = None,
    expected_sha256: str | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch_batches: int = 2,
    num_classes: int | None = None,
    transform: str = "timm",
    jpeg_bytes: bool = False,
) -> Iterator[Batch]:
    """Stream one shard as batches of at most `batch_size` samples, decoded by `workers`
    DataLoader processes (0: in this process). Same batches, rejects and `ShardReadError`
    as `vitlens.data.reader.iter_shard_batches`.

    `prefetch_batches` batches per worker are decoded ahead of the consumer. `num_classes`
    is the model's class count: a sample whose `class_index` is not in [0, num_classes) is
    a reject of stage `label` (`on_reject(url, key, reason, stage)`), not a batch error.
    `transform` and `jpeg_bytes`: what a batch holds of its images (`vitlens.data.reader`);
    `pin_memory` pins `Batch.pixels` ("timm").
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    check_transform(transform, jpeg_bytes)
    reject = on_reject or _warn_reject
    dataset = _ShardSamples(url, geometry, patch_size, num_prefix_tokens, expected_samples, expected_sha256,
                            num_classes, transform, jpeg_bytes)
    if workers == 0:
        items: Iterator = iter(dataset)
    else:
        items = iter(DataLoader(
            dataset, batch_size=None, num_workers=workers, worker_init_fn=_single_thread_worker,
            prefetch_factor=max(1, prefetch_batches * batch_size // workers), collate_fn=_as_is,
        ))
    pending: list[_Decoded] = []
    failure: str | None = None
    for item in items:
        if isinstance(item, _StreamEnd):
            if item.open_error is not None:
                raise UserError(item.open_error)
            if item.failure is not None and (failure is None or item.worker == 0):
                failure = item.failure
            continue
        if isinstance(item, _Rejected):
            reject(url, item.key, item.reason, item.stage)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield _pinned(_collate(pending, url, geometry), pin_memory)
            pending = []
    if pending:
        yield _pinned(_collate(pending, url, geometry), pin_memory)
    if failure is not None:
        raise ShardReadError(failure)


def reader_options(transform: str, device: torch.device) -> dict[str, Any]:
    """The reader's `transform` and `jpeg_bytes` for a job's `[data] transform` on `device`:
    with "device" on CUDA the JPEGs go to the device undecoded (nvJPEG)."""
    check_transform(transform)
    return {"transform": transform, "jpeg_bytes": transform == "device" and torch.device(device).type == "cuda"}


def _pinned(batch: Batch, pin_memory: bool) -> Batch:
    """`batch` with its pixels in page-locked memory (fast, asynchronous copies to CUDA)."""
    if pin_memory and batch.pixels is not None:
        batch.pixels = batch.pixels.pin_memory()
    return batch
