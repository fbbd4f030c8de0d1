"""Decoding in DataLoader workers changes nothing: the same batches, rejects and shard
failures, in the same order, as the in-process reader, for 0, 1 and 2 workers."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlens.data import loader
from vitlens.data.geometry import EvalGeometry
from vitlens.data.loader import shard_batches
from vitlens.data.reader import ShardReadError, iter_shard_batches
from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask, encode_png

GEOMETRY = EvalGeometry((16, 16), 0.875, "center", "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def write_shard(path: Path, count: int, broken: tuple[int, ...] = (), cut: int | None = None) -> bytes:
    """A USTAR shard of `count` 20x24 samples; samples in `broken` have an undecodable image;
    `cut` truncates the file to that many bytes. Returns the full file's bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(count):
            rng = np.random.default_rng(i)
            ids = np.zeros((20, 24), dtype=np.int64)
            ids[:, : 4 + i % 16] = 1
            image = b"not an image" if i in broken else encode_png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
            meta = SampleMeta(i % 3, 1, f"class{i % 3}", None, None, "test", "validation", "test")
            for name, data in EncodedSample(f"s{i:03d}", "image.png", image, encode_mask(ids), meta).members():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data if cut is None else data[:cut])
    return data


def collect(iterator) -> tuple[list[tuple], str | None]:
    """(per batch: keys, images, labels, fg, classes) and the ShardReadError reason, if any."""
    batches, failure = [], None
    try:
        for batch in iterator:
            batches.append((batch.keys, batch.images, batch.token_label, batch.fg_fraction, batch.class_index))
    except ShardReadError as err:
        failure = err.reason
    return batches, failure


def assert_same(got: tuple[list[tuple], str | None], want: tuple[list[tuple], str | None]) -> None:
    assert got[1] == want[1]
    assert [b[0] for b in got[0]] == [b[0] for b in want[0]]
    for mine, theirs in zip(got[0], want[0]):
        for a, b in zip(mine[1:], theirs[1:]):
            assert torch.equal(torch.nan_to_num(a, 9.0), torch.nan_to_num(b, 9.0))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_same_batches_and_rejects_as_the_reader(tmp_path: Path, workers: int) -> None:
    shard = tmp_path / "s.tar"
    data = write_shard(shard, 11, broken=(3, 8))
    sha = hashlib.sha256(data).hexdigest()
    rejects: dict[str, list] = {"reader": [], "loader": []}
    want = collect(iter_shard_batches(str(shard), GEOMETRY, 4, 4, 1, lambda *r: rejects["reader"].append(r),
                                      expected_samples=11, expected_sha256=sha))
    got = collect(shard_batches(str(shard), GEOMETRY, 4, 4, 1, lambda *r: rejects["loader"].append(r),
                                expected_samples=11, expected_sha256=sha, workers=workers))
    assert_same(got, want)
    assert [b[0] for b in want[0]] == [["s000", "s001", "s002", "s004"], ["s005", "s006", "s007", "s009"], ["s010"]]
    assert rejects["loader"] == rejects["reader"] and [r[1] for r in rejects["reader"]] == ["s003", "s008"]


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_miscounted_and_replaced_shards_fail_after_the_last_batch(tmp_path: Path, workers: int) -> None:
    shard = tmp_path / "s.tar"
    data = write_shard(shard, 7)
    for kwargs in ({"expected_samples": 8}, {"expected_sha256": "0" * 64}):
        want = collect(iter_shard_batches(str(shard), GEOMETRY, 3, 4, 1, **kwargs))
        got = collect(shard_batches(str(shard), GEOMETRY, 3, 4, 1, workers=workers, **kwargs))
        assert got[1] is not None
        assert_same(got, want)
    write_shard(shard, 7, cut=len(data) // 2 + 100)  # cut inside a member
    want = collect(iter_shard_batches(str(shard), GEOMETRY, 3, 4, 1))
    got = collect(shard_batches(str(shard), GEOMETRY, 3, 4, 1, workers=workers))
    assert got[1] is not None and "truncated" in got[1]
    assert_same(got, want)


def test_a_worker_that_dies_fails_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = tmp_path / "s.tar"
    write_shard(shard, 9)
    real = loader._decode_sample

    def dying(key, *args):
        if key == "s005":
            os._exit(3)  # the worker process dies mid-shard (the parent forked this patch)
        return real(key, *args)

    monkeypatch.setattr(loader, "_decode_sample", dying)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        list(shard_batches(str(shard), GEOMETRY, 2, 4, 1, workers=2))


def test_reader_options_send_jpegs_undecoded_only_to_cuda() -> None:
    from vitlens.data.loader import reader_options

    assert reader_options("device", torch.device("cuda")) == {"transform": "device", "jpeg_bytes": True}
    assert reader_options("device", torch.device("cpu")) == {"transform": "device", "jpeg_bytes": False}
    assert reader_options("timm", torch.device("cuda")) == {"transform": "timm", "jpeg_bytes": False}
    with pytest.raises(ValueError, match="transform"):
        reader_options("gpu", torch.device("cpu"))
