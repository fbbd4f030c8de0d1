"""Interaction latency of `vitlens explore` on a result set of >= 30 M token rows.

Builds the set from the demo's models: one shapes shard (100 images) analysed by
`shapes_vit_p8` and its random twin (experiments `baseline` and `heads`, tokens tier, 2 × 1,235
token rows per image), then copied R times as new shards — the tar with every sample key
renamed, and every per-shard Parquet file with its image keys (and `images.shard`) renamed —
and one `runs` row naming every shard, so the pictures are re-read from real shards. Then it
serves the set from a thread and times, over random images, what the page requests:

- image change: the image's tokens for the variant and its twin, its picture, its heads map,
  its curves (the page's requests for a new image, one after another);
- block change: the tokens of the variant and the twin at another block / stream;
- list page: a page of 50 images filtered and sorted (random sort key, correct filter, offset)
  and the curves of those 50;
- hover: answered in the page from the block's tokens already loaded (no request); its cost is
  the tooltip's rendering in the browser, not measured here.

Prints the set's size, the explorer's start-up time and the p50 / p95 / max of each
interaction in ms (the 95th percentile is the issue's goal: <= 150 ms).

    .venv/bin/python benchmarks/bench_explore.py [--rows 30000000] [--samples 200] [--out /tmp/explore-bench]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vitlens.cli import main as cli_main

VARIANTS = ("shapes_vit_p8", "shapes_vit_p8@random")
STEM = "shapes-validation-000000"


def build(out: Path, rows_wanted: int) -> tuple[int, int]:
    """The result set under `out/results` (shards under `out/shards`); returns (token rows, images)."""
    from vitlens.runner.bookkeeping import JobReport, write_run_record
    from vitlens.runner.shard_job import ShardProcessor
    from vitlens.runner.spec import DataSpec, JobSpec

    shards = out / "shards"
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", "5", "--size", "64", "--shard-size", "100",
                     "--seed", "0", "--split", "validation", "--out", str(shards)]) == 0
    results = out / "results"
    job = JobSpec(name="explore-bench", output=str(results), variants=VARIANTS,
                  data=DataSpec(manifest=str(shards / "manifest.json")), experiments=("baseline", "heads"),
                  batch_size=50)
    for variant in VARIANTS:
        ShardProcessor(variant, job).process(str(shards / f"{STEM}.tar"), STEM)
    per_copy = sum(pq.ParquetFile(f).metadata.num_rows for f in results.glob("table=tokens/*/*/*.parquet"))
    copies = max(0, -(-rows_wanted // per_copy) - 1)
    urls = [str(shards / f"{STEM}.tar")]
    data_files = [f for f in results.glob("table=*/variant=*/experiment=*/*.parquet")
                  if f.name.startswith(STEM) and "table=rejects" not in str(f)]
    for copy in range(1, copies + 1):
        stem, suffix = f"shapes-validation-c{copy:04d}", f"-c{copy:04d}"
        urls.append(str(_copy_tar(shards / f"{STEM}.tar", shards / f"{stem}.tar", suffix)))
        for source in data_files:
            table = pq.read_table(source)
            keys = pc.binary_join_element_wise(table.column("image_key"), pa.scalar(suffix), "")
            table = table.set_column(table.schema.get_field_index("image_key"), "image_key", keys)
            if "shard" in table.column_names:
                table = table.set_column(table.schema.get_field_index("shard"), "shard",
                                         pa.array([stem] * table.num_rows, pa.string()))
            pq.write_table(table, source.with_name(f"{stem}.parquet"))
    spec = JobSpec(name=job.name, output=job.output, variants=VARIANTS, data=DataSpec(shards=tuple(urls)),
                   experiments=job.experiments, batch_size=job.batch_size)
    write_run_record(spec, JobReport(shards_total=len(urls), shards_skipped=0, shards_done=len(urls),
                                     run_id="explore-bench"), "done")
    return per_copy * (copies + 1), 100 * (copies + 1)


def _copy_tar(source: Path, target: Path, suffix: str) -> Path:
    """`source` with every sample key renamed KEY -> KEY + suffix (members in the same order)."""
    with tarfile.open(source) as reading, tarfile.open(target, "w") as writing:
        for member in reading:
            key, rest = member.name.split(".", 1)
            data = reading.extractfile(member).read()
            info = tarfile.TarInfo(f"{key}{suffix}.{rest}")
            info.size, info.mtime, info.mode = len(data), member.mtime, member.mode
            writing.addfile(info, io.BytesIO(data))
    return target


def percentiles(values: list[float]) -> str:
    ms = np.array(values) * 1000
    return f"p50 {np.percentile(ms, 50):6.1f} ms, p95 {np.percentile(ms, 95):6.1f} ms, max {ms.max():6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/explore-bench"))
    parser.add_argument("--reuse", action="store_true", help="reuse a set built before under --out")
    args = parser.parse_args()
    from vitlens.explore.data import ExploreData
    from vitlens.explore.server import Explorer

    if not args.reuse:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        started = time.perf_counter()
        rows, images = build(args.out, args.rows)
        print(f"built {rows:,} token rows ({images:,} images x {len(VARIANTS)} variants) in "
              f"{time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    data = ExploreData(args.out / "results")
    app = Explorer(data)
    print(f"explorer start-up (opening the set, per-image sort keys, curves): {time.perf_counter() - started:.1f} s")
    server = app.serve("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    total = data.results.con.execute("SELECT count(*) FROM tokens").fetchone()[0]
    keys = [r[0] for r in data.results.con.execute(
        "SELECT image_key FROM images WHERE variant = ? AND experiment = 'baseline'", [VARIANTS[0]]).fetchall()]
    print(f"token rows served: {total:,}; images per variant: {len(keys):,}")

    def get(path: str, **params: object) -> bytes:
        request = urllib.request.Request(f"{base}{path}?{urllib.parse.urlencode(params)}",
                                         headers={"X-Vitlens-Token": app.token})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    rng = random.Random(0)
    image_change, block_change, list_change = [], [], []
    parts: dict[str, list[float]] = {}

    def timed(name: str, path: str, **params: object) -> bytes:
        start = time.perf_counter()
        body = get(path, **params)
        parts.setdefault(name, []).append(time.perf_counter() - start)
        return body

    for _ in range(args.samples):
        key = rng.choice(keys)
        start = time.perf_counter()
        for variant in VARIANTS:
            json.loads(timed("tokens", "/api/tokens", variant=variant, key=key, block=6, stream="resid"))
        timed("picture", "/api/picture", variant=VARIANTS[0], key=key)
        timed("heads", "/api/heads", variant=VARIANTS[0], key=key)
        timed("curves", "/api/curves", variant=VARIANTS[0], keys=key)
        image_change.append(time.perf_counter() - start)
        start = time.perf_counter()
        block, stream = rng.randrange(0, 7), rng.choice(("resid", "attn", "mlp"))
        block = max(block, 1) if stream != "resid" else block
        for variant in VARIANTS:
            get("/api/tokens", variant=variant, key=key, block=block, stream=stream)
        block_change.append(time.perf_counter() - start)
        start = time.perf_counter()
        sort = rng.choice(("image_key", "class_index", "last_block_id_pct", "cls_last_block_rank"))
        page = json.loads(timed("images", "/api/images", variant=VARIANTS[0], sort=sort, desc="true",
                                correct=rng.choice(("", "true", "false")), limit=50,
                                offset=rng.randrange(0, len(keys) // 2)))
        timed("curves (a page of 50)", "/api/curves", variant=VARIANTS[0],
              keys=",".join(row["image_key"] for row in page["images"]))
        list_change.append(time.perf_counter() - start)
    print(f"image change ({args.samples}): {percentiles(image_change)}")
    print(f"block change ({args.samples}): {percentiles(block_change)}")
    print(f"list page (filter / sort / page, and its curves) ({args.samples}): {percentiles(list_change)}")
    print("hover: answered in the page from the loaded block (no request)")
    for name, values in parts.items():
        print(f"  one /api/{name} request: {percentiles(values)}")
    server.shutdown()
    data.close()


if __name__ == "__main__":
    import urllib.parse  # noqa: F401 - used in get()

    main()
