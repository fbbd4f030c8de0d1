"""Damaged shards: the reader yields what it could read, then raises `ShardReadError`.

Every shard here is a tar written by hand with `tarfile` (USTAR, so the byte layout is
known: a 512-byte header per member, data padded to 512, two zero blocks at the end), and
every expectation is counted by hand or computed with `hashlib` on the file's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from vitlens.data.geometry import EvalGeometry
from vitlens.data.manifest import ShardEntry, shard_entries, shard_urls
from vitlens.data.reader import ShardReadError, iter_shard_batches, iter_shard_samples
from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask, encode_png
from vitlens.errors import UserError

GEOMETRY = EvalGeometry(
    input_size=(16, 16), crop_pct=1.0, crop_mode="center", interpolation="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)
BLOCK = 512


def _members(i: int) -> list[tuple[str, bytes]]:
    """The three members of a decodable 16x16 sample `sample{i:03d}` (noise image, half mask)."""
    rng = np.random.default_rng(i)
    ids = np.zeros((16, 16), dtype=np.int64)
    ids[:, :8] = 1
    meta = SampleMeta(i % 3, 1, f"class{i % 3}", None, None, "test", "validation", "test")
    image = encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return EncodedSample(f"sample{i:03d}", "image.png", image, encode_mask(ids), meta).members()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A USTAR tar of the members, with its end-of-archive marker and record padding."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member_span(data: bytes) -> int:
    """Bytes one member takes in a USTAR tar: header block + data rounded up to blocks."""
    return BLOCK + -(-len(data) // BLOCK) * BLOCK


def _shard(tmp_path: Path, n: int, name: str = "shard.tar") -> tuple[Path, list[tuple[str, bytes]]]:
    members = [m for i in range(n) for m in _members(i)]
    path = tmp_path / name
    path.write_bytes(_tar_bytes(members))
    return path, members


def _read(url: str, **checks) -> tuple[list[str], list[tuple[str, str, str, str]], ShardReadError | None]:
    """Keys of every batch yielded, rejects reported, and the ShardReadError raised (or None)."""
    keys: list[str] = []
    rejects: list[tuple[str, str, str, str]] = []
    try:
        for batch in iter_shard_batches(url, GEOMETRY, 2, 8, 1, on_reject=lambda *r: rejects.append(r), **checks):
            keys.extend(batch.keys)
    except ShardReadError as err:
        return keys, rejects, err
    return keys, rejects, None


def _assert_one_line(reason: str) -> None:
    assert reason and "\n" not in reason and "0x" not in reason and "\x1b" not in reason
    assert "Traceback" not in reason


def test_an_intact_shard_with_matching_checks_reads_without_error(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path, 5)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    keys, rejects, error = _read(str(path), expected_samples=5, expected_sha256=digest)
    assert keys == [f"sample{i:03d}" for i in range(5)] and rejects == [] and error is None


def test_truncated_inside_a_member_raises_after_the_samples_before_it(tmp_path: Path) -> None:
    path, members = _shard(tmp_path, 6)
    # Cut half-way into the data of sample 4's image (its first member).
    first = 4 * len(_members(0))
    cut = sum(_member_span(d) for _, d in members[:first]) + BLOCK + len(members[first][1]) // 2
    path.write_bytes(path.read_bytes()[:cut])
    keys, rejects, error = _read(str(path))
    assert keys == [f"sample{i:03d}" for i in range(4)]  # all four complete samples, in batches
    assert rejects == []  # the damage is not a sample reject
    assert error is not None and error.reason.startswith("shard truncated after 4 samples: ")
    _assert_one_line(error.reason)


def test_truncated_exactly_between_samples_raises(tmp_path: Path) -> None:
    """Cut at a member boundary: no end-of-archive marker. Today's reader ended silently."""
    path, members = _shard(tmp_path, 5)
    cut = sum(_member_span(d) for _, d in members[:3 * len(_members(0))])  # after sample 2's last member
    path.write_bytes(path.read_bytes()[:cut])
    keys, rejects, error = _read(str(path))
    assert keys == ["sample000", "sample001", "sample002"] and rejects == []
    assert error is not None and error.reason.startswith("shard truncated after 3 samples: ")
    _assert_one_line(error.reason)


def test_cut_inside_a_header_raises(tmp_path: Path) -> None:
    path, members = _shard(tmp_path, 3)
    cut = sum(_member_span(d) for _, d in members[:2 * len(_members(0))]) + 100  # 100 bytes into sample 2's header
    path.write_bytes(path.read_bytes()[:cut])
    keys, _, error = _read(str(path))
    assert keys == ["sample000", "sample001"]
    assert error is not None and error.reason.startswith("shard truncated after 2 samples: ")


def test_garbage_after_complete_samples_raises(tmp_path: Path) -> None:
    path, members = _shard(tmp_path, 3)
    cut = sum(_member_span(d) for _, d in members[:2 * len(_members(0))])
    garbage = np.random.default_rng(1).integers(0, 256, 4 * BLOCK, dtype=np.uint8).tobytes()
    path.write_bytes(path.read_bytes()[:cut] + garbage)
    keys, rejects, error = _read(str(path))
    assert keys == ["sample000", "sample001"] and rejects == []
    assert error is not None and error.reason.startswith("shard truncated after 2 samples: ")


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()],
                         ids=["zero-bytes", "random-bytes"])
def test_zero_or_random_bytes_raise_without_a_reject(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.tar"
    path.write_bytes(content)
    keys, rejects, error = _read(str(path))
    assert keys == [] and rejects == []
    assert error is not None and error.reason.startswith("shard truncated after 0 samples: ")
    _assert_one_line(error.reason)


def test_reasons_are_deterministic(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path, 3)
    path.write_bytes(path.read_bytes()[:3000])
    first, second = _read(str(path))[2], _read(str(path))[2]
    assert first is not None and second is not None and first.reason == second.reason
    assert str(first) == first.reason


def test_sample_count_differs_from_the_manifest(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path, 3)
    keys, _, error = _read(str(path), expected_samples=4)
    assert keys == ["sample000", "sample001", "sample002"]  # every batch still arrives first
    assert error is not None and error.reason == "shard has 3 samples, manifest says 4"
    assert _read(str(path), expected_samples=2)[2].reason == "shard has 3 samples, manifest says 2"
    assert _read(str(path), expected_samples=3)[2] is None


def test_decode_rejected_samples_count_as_present(tmp_path: Path) -> None:
    broken = _members(1)
    broken[0] = (broken[0][0], b"not a png")  # sample001's image cannot be decoded
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar_bytes(_members(0) + broken + _members(2)))
    keys, rejects, error = _read(str(path), expected_samples=3)
    assert keys == ["sample000", "sample002"]
    assert [key for _, key, _, _ in rejects] == ["sample001"]
    assert error is None


def test_sha256_mismatch(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path, 3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"another file").hexdigest()
    keys, _, error = _read(str(path), expected_sha256=wrong)
    assert keys == ["sample000", "sample001", "sample002"]
    assert error is not None
    assert error.reason == f"sha256 mismatch: file {digest[:12]}…, manifest {wrong[:12]}…"
    assert _read(str(path), expected_sha256=digest)[2] is None


def test_sha256_covers_bytes_after_the_end_of_archive(tmp_path: Path) -> None:
    """Bytes after the end-of-archive marker are part of the file, so part of its hash."""
    path, _ = _shard(tmp_path, 2)
    data = path.read_bytes() + b"trailing bytes the tar reader never looks at" * 1000
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert _read(str(path), expected_sha256=digest)[2] is None
    shorter = hashlib.sha256(data[:-1]).hexdigest()
    assert _read(str(path), expected_sha256=shorter)[2] is not None


def test_count_and_checksum_through_iter_shard_samples(tmp_path: Path) -> None:
    path, _ = _shard(tmp_path, 2)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [key for key, _ in iter_shard_samples(str(path), expected_samples=2, expected_sha256=digest)] == [
        "sample000", "sample001"
    ]
    seen: list[str] = []
    with pytest.raises(ShardReadError, match="shard has 2 samples, manifest says 5"):
        for key, _ in iter_shard_samples(str(path), expected_samples=5):
            seen.append(key)
    assert seen == ["sample000", "sample001"]


def test_the_file_is_read_once(tmp_path: Path) -> None:
    """A `pipe:` URL that logs every time it runs: checking the sha256 adds no second read."""
    path, _ = _shard(tmp_path, 3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    log = tmp_path / "opened.log"
    url = f"pipe:echo opened >> {log}; cat {path}"
    keys, _, error = _read(url, expected_samples=3, expected_sha256=digest)
    assert keys == ["sample000", "sample001", "sample002"] and error is None
    assert log.read_text() == "opened\n"


def test_checksum_of_a_stream_that_arrives_in_pieces(tmp_path: Path) -> None:
    """A FIFO can be read only once; the hash is still that of every byte written to it."""
    path, _ = _shard(tmp_path, 6)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    fifo = tmp_path / "stream.tar"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as stream:
            for start in range(0, len(data), 777):
                stream.write(data[start : start + 777])
                stream.flush()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    keys, _, error = _read(str(fifo), expected_samples=6, expected_sha256=digest)
    feeder.join(timeout=10)
    assert len(keys) == 6 and error is None


def _write_manifest(directory: Path, shards: list[dict]) -> Path:
    manifest = {
        "format_version": 1, "dataset": "test", "split": "validation", "num_classes": 3,
        "class_names": ["a", "b", "c"], "shards": shards, "rejects": [], "created_by": {},
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_shard_entries_from_a_hand_written_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    path = _write_manifest(directory, [
        {"name": "test-validation-000000.tar", "samples": 10, "sha256": "ab" * 32},
        {"name": "test-validation-000001.tar"},  # an older manifest without counts or sums
    ])
    absolute = os.path.realpath(directory)
    expected = [
        ShardEntry(url=f"{absolute}/test-validation-000000.tar", name="test-validation-000000.tar",
                   samples=10, sha256="ab" * 32),
        ShardEntry(url=f"{absolute}/test-validation-000001.tar", name="test-validation-000001.tar",
                   samples=None, sha256=None),
    ]
    assert shard_entries(path) == expected
    assert shard_entries(directory) == expected
    assert shard_urls(directory) == [e.url for e in expected]
    with pytest.raises(dataclasses.FrozenInstanceError):
        expected[0].samples = 3  # type: ignore[misc]


def test_a_malformed_shard_record_is_a_user_error(tmp_path: Path) -> None:
    _write_manifest(tmp_path, [{"name": "x.tar", "samples": "ten"}])
    with pytest.raises(UserError, match=r"shards\[0\]"):
        shard_entries(tmp_path)


def test_manifest_entries_drive_the_checks(tmp_path: Path) -> None:
    """The checks the runner passes come straight from the manifest's entries."""
    path, _ = _shard(tmp_path, 3, name="test-validation-000000.tar")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_manifest(tmp_path, [{"name": path.name, "samples": 3, "sha256": digest}])
    (entry,) = shard_entries(tmp_path)
    assert _read(entry.url, expected_samples=entry.samples, expected_sha256=entry.sha256)[2] is None
    path.write_bytes(_tar_bytes([m for i in range(2) for m in _members(i)]))  # replaced behind its back
    error = _read(entry.url, expected_samples=entry.samples, expected_sha256=entry.sha256)[2]
    assert error is not None and error.reason.startswith("shard has 2 samples, manifest says 3")
