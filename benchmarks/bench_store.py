"""The cost of the object-store commit protocol and of `vitlens verify`, as ratios from one run.

Writes one shard's worth of `tokens` rows (B/16 layout by default: 197 tokens x 37 slots per
image) through `StagedParquetWriter` to a local folder and to an S3-protocol server on the
loopback (moto's stand-alone server, as the tests use), commits a done-marker naming the
files, then times `vitlens.store.committed.verify` on each: sizes only (a listing, no byte
read) and sizes + sha256 (every byte read once). Repeats are interleaved; the best of each is
kept (other processes only ever add time). It prints ratios only:

    s3 write / local write          what the upload costs over a local rename
    verify sha256 / write           what a full check costs against writing the same bytes
    verify sha256 / read            hashing against a plain read of the same bytes (1 = I/O bound)
    verify sizes-only / sha256      what `--sizes-only` saves

moto keeps objects in memory on the loopback, so the s3 ratios bound the protocol's overhead,
not a real network's.

    .venv/bin/python benchmarks/bench_store.py [--images 64] [--files 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3_server import s3_server  # noqa: E402
from vitlens.store.committed import committed_files, verify  # noqa: E402
from vitlens.store.layout import StagedParquetWriter, marker_bytes, marker_key, table_key  # noqa: E402
from vitlens.store.schema import schema_of  # noqa: E402
from vitlens.store.storage import Storage, open_storage  # noqa: E402


def tokens_rows(images: int, tokens: int = 197, slots: int = 37, seed: int = 0) -> pa.Table:
    """Random rows of the `tokens` schema: images x slots x tokens."""
    rng = np.random.default_rng(seed)
    schema = schema_of("tokens")
    n = images * slots * tokens
    columns = {}
    for field in schema:
        kind = field.type
        if pa.types.is_string(kind) or pa.types.is_dictionary(kind):
            values = pa.array(np.array(["a", "b", "c"])[rng.integers(0, 3, n)])
        elif pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
            width = kind.list_size if pa.types.is_fixed_size_list(kind) else 5
            flat = pa.array(rng.integers(0, 1000, n * width).astype(kind.value_type.to_pandas_dtype()))
            values = (pa.FixedSizeListArray.from_arrays(flat, width) if pa.types.is_fixed_size_list(kind)
                      else pa.ListArray.from_arrays(pa.array(np.arange(0, n * width + 1, width, dtype=np.int32)), flat))
        elif pa.types.is_floating(kind):
            values = pa.array(rng.random(n).astype(kind.to_pandas_dtype()))
        elif pa.types.is_boolean(kind):
            values = pa.array(rng.random(n) < 0.5)
        else:
            values = pa.array(rng.integers(0, 100, n).astype(kind.to_pandas_dtype()))
        columns[field.name] = values.cast(kind)
    return pa.table(columns, schema=schema)


def write_shards(storage: Storage, table: pa.Table, files: int) -> None:
    """`files` shards of `table` each, committed with a marker naming their files."""
    for i in range(files):
        stem = f"bench-{i:06d}"
        writer = StagedParquetWriter(storage, table_key("tokens", "v", "baseline", stem), table.schema)
        writer.write(table)
        record = writer.commit()
        marker = {"experiments": ["baseline"], "files": {record.key: record.as_json()}}
        storage.write_bytes(marker_bytes(marker), marker_key("v", stem))


def read_all(storage: Storage) -> None:
    for key in committed_files(storage).files:
        storage.read_bytes(key)


def best(times: dict[str, list[float]], name: str) -> float:
    return min(times[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per shard file (default 64)")
    parser.add_argument("--files", type=int, default=4, help="shard files per repeat (default 4)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = tokens_rows(args.images)
    with tempfile.TemporaryDirectory() as tmp, s3_server("bench") as env:
        os.environ.update(env)
        times: dict[str, list[float]] = {}

        def timed(name: str, action: Callable[[], object]) -> None:
            start = time.perf_counter()
            action()
            times.setdefault(name, []).append(time.perf_counter() - start)

        size = 0
        for repeat in range(args.repeats):
            local = open_storage(Path(tmp) / f"local-{repeat}")
            remote = open_storage(f"s3://bench/r{repeat}")
            for name, storage in (("local", local), ("s3", remote)):
                timed(f"{name} write", lambda: write_shards(storage, table, args.files))
                found = committed_files(storage)
                size = sum(r.size for r in found.files.values() if r is not None)
                timed(f"{name} read", lambda: read_all(storage))
                timed(f"{name} sha256", lambda: verify(committed_files(storage), checksums=True))
                timed(f"{name} sizes", lambda: verify(committed_files(storage), checksums=False))
                assert verify(committed_files(storage)) == []
    print(f"{args.files} files of {size / args.files / 1e6:.1f} MB ({args.images} images of B/16 tokens rows), "
          f"best of {args.repeats} interleaved repeats")
    print(f"  s3 write / local write        {best(times, 's3 write') / best(times, 'local write'):6.2f}")
    for name in ("local", "s3"):
        print(f"  {name:5} verify sha256 / write   {best(times, f'{name} sha256') / best(times, f'{name} write'):6.2f}")
        print(f"  {name:5} verify sha256 / read    {best(times, f'{name} sha256') / best(times, f'{name} read'):6.2f}")
        print(f"  {name:5} sizes-only / sha256     {best(times, f'{name} sizes') / best(times, f'{name} sha256'):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
