"""Which files a result set commits, and `verify`, on hand-made result sets: a local folder
with a marker of vitlens 0.1 (no `files`) beside a schema-6 marker, and an object store
(fsspec's in-memory file system) with objects no marker names. Records are computed here
with hashlib, independently of the store's writers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vitlens.store.committed import committed_files, damaged_shards, verify
from vitlens.store.layout import marker_key, table_key
from vitlens.store.storage import open_storage


def record(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def put(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_local_result_set_with_an_old_and_a_new_marker(tmp_path: Path) -> None:
    old_file, new_file = table_key("tokens", "v", "baseline", "s0"), table_key("tokens", "v", "baseline", "s1")
    whole = table_key("params", "v", "none", "params")
    put(tmp_path, old_file, b"old shard rows")
    put(tmp_path, new_file, b"new shard rows")
    put(tmp_path, whole, b"params")
    put(tmp_path, marker_key("v", "s0"), json.dumps({"experiments": ["baseline"]}).encode())  # vitlens 0.1
    put(tmp_path, marker_key("v", "s1"), json.dumps({"experiments": ["baseline"],
                                                     "files": {new_file: record(b"new shard rows")}}).encode())
    put(tmp_path, "table=tokens/variant=v/experiment=baseline/.s2.parquet.1234.tmp", b"half")  # a temporary

    found = committed_files(open_storage(tmp_path))
    assert sorted(found.files) == sorted([old_file, new_file, whole])
    assert found.files[old_file] is None and found.files[whole] is None  # nothing recorded to check
    assert found.files[new_file].size == len(b"new shard rows")
    assert found.unreferenced == [] and set(found.markers) == {("variant=v", "s0"), ("variant=v", "s1")}
    assert verify(found) == []

    (tmp_path / old_file).write_bytes(b"OLD shard rows")  # no record: cannot be found
    (tmp_path / new_file).write_bytes(b"new shard rowz")  # same size, other bytes
    damage = verify(committed_files(open_storage(tmp_path)))
    assert [(d.key, d.problem) for d in damage] == [(new_file, "sha256 differs from the committed one")]
    assert verify(committed_files(open_storage(tmp_path)), checksums=False) == []
    (tmp_path / new_file).unlink()
    found = committed_files(open_storage(tmp_path))
    damage = verify(found)
    assert [(d.key, d.problem) for d in damage] == [(new_file, "missing")]
    assert damaged_shards(damage, found) == {("variant=v", "s1")}
    assert damage[0].line(found.storage) == f"DAMAGED {tmp_path}/{new_file}: missing"


@pytest.mark.parametrize("cut", [1, 100])
def test_object_store_reads_only_what_markers_name(cut: int) -> None:
    root = f"memory://vitlens-committed-{cut}"
    storage = open_storage(root)
    named = "table=images/variant=v/experiment=baseline/s0.0123456789ab.parquet"
    orphan = "table=images/variant=v/experiment=baseline/s0.ba9876543210.parquet"  # a killed writer's
    runs = table_key("runs", "all", "none", "20261207T000000-abcdef01")
    data = b"x" * 1000
    storage.write_bytes(data, named)
    storage.write_bytes(b"y" * 1000, orphan)
    storage.write_bytes(b"run row", runs)
    storage.write_bytes(json.dumps({"experiments": ["baseline"], "files": {named: record(data)}}).encode(),
                        marker_key("v", "s0"))

    found = committed_files(storage)
    assert sorted(found.files) == sorted([named, runs]) and found.unreferenced == [orphan]
    assert verify(found) == []
    storage.write_bytes(data[:-cut], named)  # cut short after it was committed
    damage = verify(committed_files(storage))
    assert [(d.key, d.problem) for d in damage] == [(named, f"size {1000 - cut} bytes, committed 1000")]
    storage.fs.rm(storage.fs_path(""), recursive=True)
