"""The host side of one actor, per stage, against the device step it has to feed.

Builds a shard of ImageNet-sized JPEGs (500 x 375, with masks) and, for the B/32 and B/16
token layouts (224 px, 1000 classes), times each host stage of the actor's pipeline in ms
per image on ONE core (torch and Arrow at 1 thread):

    decode    read the tar, decode the JPEG + mask PNG, resize/crop/normalise, token labels
              (`vitlens.data.loader.shard_batches` with 0 workers, i.e. in the actor)
    rows      `LensBatch` -> Arrow rows of the tier (`tokens`: every token; `summary`: the
              group sums of `token_summary` / `residual_match`)
    write     Arrow rows -> Parquet (`StagedParquetWriter`)

The device step is a stub of known cost: the lens's real output for a batch of the shape
(random weights) is computed once before timing and reused, so the table isolates the host.
With decode workers (1 and 2 `DataLoader` processes) the decode wall time per image is
measured on the same shard. On a checkout without the loader or the summary tier (e.g. the
commit before them) the script measures what exists, so before/after tables come from the
same script.

It prints, for each shape and tier, the host ms/img per core, the images/s a node with
N cores per GPU could feed (N / host ms, decode spread over N-1 workers), and the ratio of
that to the device step it has to feed: timm's published `vit_base_patch16_224` /
`vit_base_patch32_224` inference (RTX 4090, AMP: 2,787 / 10,113 img/s) divided by 1.5 (the
lens's cost over a plain forward, `bench_lens.py`). Ratios come from this one run; repeats
are interleaved and the best of them is kept (other processes only ever add time).

    .venv/bin/python benchmarks/bench_pipeline.py [--images 64] [--repeats 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from vitlens.data.geometry import EvalGeometry
from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask
from vitlens.data.shard_writer import ShardWriter
from vitlens.lens.output import LensBatch
from vitlens.store.layout import StagedParquetWriter
from vitlens.store.records import tokens_table
from vitlens.store.schema import schema_of
from vitlens.store.storage import open_storage

DEVICE_IMG_PER_S = {"B/32": 10113 / 1.5, "B/16": 2787 / 1.5}
SHAPES = {"B/32": 7, "B/16": 14}  # token grid side at 224 px
BLOCKS, CLASSES, TOP_K = 12, 1000, 5


def make_shard(folder: Path, images: int) -> Path:
    """A vitlens shard of `images` 500x375 JPEGs (smooth content + noise, quality 90) with masks."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, "bench", "validation", shard_size=images)
    yy, xx = np.mgrid[0:375, 0:500]
    for index in range(images):
        base = (np.sin(xx / (20 + index)) + np.cos(yy / 31)) * 60 + 128
        pixels = np.clip(base[..., None] + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        mask = np.zeros((375, 500), dtype=np.int64)
        mask[100:300, 150:400] = 7
        writer.write(EncodedSample(f"img-{index:05d}", "image.jpg", buffer.getvalue(), encode_mask(mask),
                                   SampleMeta(6, 7, "class_6", None, None, "bench", "validation", "bench")))
    [entry] = writer.close()
    return folder / entry.name


def device_output(shape: str, batch: int) -> LensBatch:
    """What the device step returns for `batch` images: the lens's real output on a
    random-weights ViT-B of that shape (computed once; the timed loop only reuses it)."""
    import timm

    from vitlens.lens import Lens

    torch.manual_seed(0)
    name = {"B/32": "vit_base_patch32_224", "B/16": "vit_base_patch16_224"}[shape]
    model = timm.create_model(name, pretrained=False).eval()
    return Lens(model).run(torch.randn(batch, 3, 224, 224), torch.randint(0, CLASSES, (batch,)))


def best_of(repeats: int, run: Callable[[], None]) -> float:
    """Best wall seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cores", type=int, nargs="*", default=[4, 8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import pyarrow as pa

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:  # this script also measures older checkouts (before the loader and the summary tier)
        from vitlens.data.loader import shard_batches
        from vitlens.store.records import summary_tables
    except ImportError:
        shard_batches = summary_tables = None
    from vitlens.data.reader import iter_shard_batches

    tiers = ("tokens", "summary") if summary_tables is not None else ("tokens",)
    workers = (1, 2) if shard_batches is not None else ()
    with tempfile.TemporaryDirectory() as tmp:
        shard = make_shard(Path(tmp) / "shards", args.images)
        ms: dict[tuple[str, str], float] = {}
        kib: dict[tuple[str, str], float] = {}
        for shape, grid in SHAPES.items():
            geometry = EvalGeometry((224, 224), 0.9, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
            keys = [f"img-{i:05d}" for i in range(args.batch)]
            labels = torch.randint(0, 3, (args.batch, 1 + grid * grid), dtype=torch.int8)
            labels[:, 0] = 3
            fg = torch.rand(args.batch, 1 + grid * grid)
            lens_batch = device_output(shape, args.batch)

            def rows(tier: str) -> dict[str, pa.Table]:
                if tier == "tokens":
                    return {"tokens": tokens_table(lens_batch, keys, fg, labels, has_class_token=True)}
                summary, match = summary_tables(lens_batch, keys, labels, True)
                return {"token_summary": summary, "residual_match": match}

            appends = max(1, args.images // args.batch)  # one shard's worth of batches into one file

            def write(tier: str, tables: dict[str, pa.Table]) -> None:
                for name, table in tables.items():
                    writer = StagedParquetWriter(open_storage(Path(tmp) / "out"), f"{tier}/{name}.parquet",
                                                 schema_of(name))
                    for _ in range(appends):
                        writer.write(table)
                    writer.commit()

            def decode(count: int) -> None:
                if count == 0 and shard_batches is None:
                    batches = iter_shard_batches(str(shard), geometry, args.batch, 224 // grid, 1)
                else:
                    batches = shard_batches(str(shard), geometry, args.batch, 224 // grid, 1, workers=count)
                for _ in batches:
                    pass

            tables = {tier: rows(tier) for tier in tiers}
            timings: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # interleaved: every stage once per round
                timings.setdefault("decode", []).append(best_of(1, lambda: decode(0)) / args.images)
                for count in workers:
                    timings.setdefault(f"decode_w{count}", []).append(best_of(1, lambda: decode(count)) / args.images)
                for tier in tiers:
                    timings.setdefault(f"rows_{tier}", []).append(best_of(1, lambda: rows(tier)) / args.batch)
                    timings.setdefault(f"write_{tier}", []).append(
                        best_of(1, lambda: write(tier, tables[tier])) / (args.batch * appends))
            for stage, values in timings.items():
                ms[shape, stage] = 1000 * min(values)
            for tier in tiers:
                size = sum(p.stat().st_size for p in (Path(tmp) / "out" / tier).glob("*.parquet"))
                kib[shape, tier] = size / (args.batch * appends) / 1024

    print("ms per image on one core (best of interleaved repeats); decode_wN: wall ms per image with N workers")
    stages = ["decode"] + [f"decode_w{c}" for c in workers] + [f"{k}_{t}" for t in tiers for k in ("rows", "write")]
    print("shape  " + "  ".join(f"{s:>13}" for s in stages))
    for shape in SHAPES:
        print(f"{shape:5}  " + "  ".join(f"{ms[shape, s]:13.2f}" for s in stages))
    print("\nKiB per image written: " + ", ".join(
        f"{shape} {tier} {kib[shape, tier]:.2f}" for shape in SHAPES for tier in tiers))
    if "summary" in tiers:
        for shape in SHAPES:
            print(f"{shape}: summary / tokens bytes = {kib[shape, 'summary'] / kib[shape, 'tokens']:.4f}")
    if workers:
        for shape in SHAPES:
            print(f"{shape}: decode speed-up with 1 / 2 workers = "
                  f"{ms[shape, 'decode'] / ms[shape, 'decode_w1']:.2f} / {ms[shape, 'decode'] / ms[shape, 'decode_w2']:.2f}")
    print("\nimplied images/s of a node with N cores per GPU (decode on N-1 cores, rows + write on one)"
          " and its ratio to the device step it feeds")
    for shape in SHAPES:
        for tier in tiers:
            host = ms[shape, f"rows_{tier}"] + ms[shape, f"write_{tier}"]
            cells = []
            for cores in args.cores:
                feed = min(1000 * (cores - 1) / ms[shape, "decode"], 1000 / host)
                cells.append(f"N={cores}: {feed:7.0f} img/s = {feed / DEVICE_IMG_PER_S[shape]:.2f}x")
            needed = 1 + DEVICE_IMG_PER_S[shape] * ms[shape, "decode"] / 1000
            writer = "" if 1000 / host >= DEVICE_IMG_PER_S[shape] else \
                f"; one writer thread caps it at {1000 / host:.0f} img/s"
            print(f"{shape} {tier:8} " + "  ".join(cells) + f"   (cores to feed the device: {needed:.0f}{writer})")


if __name__ == "__main__":
    main()
