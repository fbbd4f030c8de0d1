"""The host side of one actor, per stage, against its floors and the device step it has to feed.

Builds a shard of ImageNet-like JPEGs (sizes around 500 x 375 in both orientations; of every
48, 2 grayscale, 1 CMYK, 4 progressive and 4 EXIF-rotated; quality 90) with ImageNet-S-like masks
(the object, another object's id, ignore pixels along the object's outline) and times, in
ms per image on ONE core (torch and Arrow at 1 thread):

    split     the exact ("timm") reader's stages one by one over the shard's samples:
              tar read, image decode, resize/crop, to-tensor/normalise (on the CPU here;
              the reader leaves it to the device), mask decode (the code plane
              `mask.codes.png` where the shard has it, else `mask.png`), mask transform,
              token labels; "rest" is the reader's total minus these (meta.json, checks,
              collation)
    floors    jpeg: PIL's decode of the shard's JPEG bytes alone;
              timm: PIL decode + convert("RGB") + `timm.data.create_transform(**cfg,
              is_training=False)` + the decode of the sample's `mask.png`
    readers   `vitlens.data.loader.shard_batches` (0 workers, i.e. in the actor; checking the
              shard's sha256 as a job with `[data] verify = true` does) with
              transform "timm" (host: uint8 pixels), "device" (decoded images) and
              "device" with `jpeg_bytes` (JPEGs undecoded, for nvJPEG), for the B/16 and
              B/32 patch grids
    rows      `LensBatch` -> Arrow rows of the tier (`tokens`: every token; `summary`: the
              group sums of `token_summary` / `residual_match`)
    write     Arrow rows -> Parquet (`StagedParquetWriter`)

The device step is a stub of known cost: the lens's real output for a batch of the shape
(random weights) is computed once before timing and reused, so the table isolates the host.

It prints the split, the readers' ratios to their floors (exact path / timm floor, device
path / JPEG floor) and the cores one GPU needs: timm's published inference rate on an RTX
4090 with AMP, eager (`vit_base_patch16_224` 2,993 img/s, `vit_base_patch32_224` 10,937
img/s) divided by the lens's cost factor over a plain forward (`--lens-factor`, default
1.45: `bench_lens.py`), times the host ms per image (reader + rows + write). Ratios come
from this one run; repeats are interleaved and the best of them is kept (other processes
only ever add time). On an older checkout (no transform option, no code plane, no summary
tier) it measures what exists, so before/after tables come from the same script:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/bench_pipeline.py
    .venv/bin/python benchmarks/bench_pipeline.py [--images 48] [--repeats 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from vitlens.data.geometry import EvalGeometry
from vitlens.data.reader import iter_shard_samples
from vitlens.data.sample_format import EncodedSample, SampleMeta, decode_image, decode_mask, encode_mask
from vitlens.data.shard_writer import ShardWriter
from vitlens.lens.output import LensBatch
from vitlens.store.layout import StagedParquetWriter
from vitlens.store.records import tokens_table
from vitlens.store.schema import schema_of
from vitlens.store.storage import open_storage

PUBLISHED_IMG_PER_S = {"B/16": 2993, "B/32": 10937}  # timm, RTX 4090, AMP, eager
SHAPES = {"B/32": 7, "B/16": 14}  # token grid side at 224 px
BLOCKS, CLASSES, TOP_K = 12, 1000, 5
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 375), (640, 480), (400, 500))
CFG = {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
MASK_CLASS_ID, OTHER_ID, IGNORE_ID = 7, 12, 1000


def _jpeg(index: int, width: int, height: int, rng: np.random.Generator) -> bytes:
    """An ImageNet-like JPEG: smooth content + noise; of every 48, 2 grayscale, 1 CMYK
    (its conversion to RGB costs ~3 decodes; ImageNet has a few in 50,000), 4 progressive,
    4 EXIF-rotated."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(xx / (20 + index)) + np.cos(yy / 31)) * 60 + 128
    pixels = np.clip(base[..., None] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image, options = Image.fromarray(pixels), {"quality": 90}
    kind = index % 12
    if kind == 1 and index % 24 == 1:
        image = image.convert("L")
    elif kind == 3 and index % 48 == 3:
        image = image.convert("CMYK")
    elif kind == 5:
        options["progressive"] = True
    elif kind == 7:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotated 90 degrees
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _mask(width: int, height: int) -> np.ndarray:
    """ImageNet-S-like ids [h, w]: an ellipse of the class, another object, ignore on the outline."""
    yy, xx = np.mgrid[0:height, 0:width]
    radius = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2
    ids = np.zeros((height, width), dtype=np.int64)
    ids[(xx < width // 5) & (yy > height // 2)] = OTHER_ID
    ids[radius < 1] = MASK_CLASS_ID
    ids[np.abs(radius - 1) < 0.04] = IGNORE_ID
    return ids


def make_shard(folder: Path, images: int) -> tuple[Path, str]:
    """A vitlens shard of `images` ImageNet-like JPEGs with their masks (this checkout's
    format): (path, sha256)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, "bench", "validation", shard_size=images)
    for index in range(images):
        width, height = SIZES[index % len(SIZES)]
        meta = SampleMeta(MASK_CLASS_ID - 1, MASK_CLASS_ID, "class_6", None, None, "bench", "validation", "bench")
        writer.write(EncodedSample(f"img-{index:05d}", "image.jpg", _jpeg(index, width, height, rng),
                                   encode_mask(_mask(width, height)), meta))
    [entry] = writer.close()
    return folder / entry.name, entry.sha256


def device_output(shape: str, batch: int) -> LensBatch:
    """What the device step returns for `batch` images: the lens's real output on a
    random-weights ViT-B of that shape (computed once; the timed loop only reuses it)."""
    import timm

    from vitlens.lens import Lens

    torch.manual_seed(0)
    name = {"B/32": "vit_base_patch32_224", "B/16": "vit_base_patch16_224"}[shape]
    model = timm.create_model(name, pretrained=False).eval()
    return Lens(model).run(torch.randn(batch, 3, 224, 224), torch.randint(0, CLASSES, (batch,)))


def timed(run: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class Split:
    """The exact reader's stages one by one, with whatever this checkout defines."""

    def __init__(self, shard: Path, sha256: str, geometry: EvalGeometry, patch: int) -> None:
        import vitlens.data.sample_format as sample_format
        from vitlens.data import token_labels

        self.shard, self.sha256, self.geometry, self.patch = str(shard), sha256, geometry, patch
        self.samples = list(iter_shard_samples(self.shard))
        self.format = sample_format
        self.codes_member = getattr(sample_format, "MASK_CODES_MEMBER", None)
        self.labels = token_labels
        self.images = [decode_image(m["image.jpg"]) for _, m in self.samples]
        self.pixels = [geometry.image_pixels(image) for image in self.images]  # [H, W, 3] uint8 each
        self.masks = [self._mask(m) for _, m in self.samples]
        self.moved = [self._move(mask) for mask in self.masks]

    def _mask(self, members: dict[str, bytes]) -> np.ndarray:
        if self.codes_member in members:
            return self.format.decode_mask_codes(members[self.codes_member])  # [h, w] uint8 codes
        return decode_mask(members["mask.png"])  # [h, w] int32 ids

    def _move(self, mask: np.ndarray) -> np.ndarray:
        return self.geometry.mask_codes(mask) if mask.dtype == np.uint8 else self.geometry.mask(mask)

    def _labels(self, moved: np.ndarray) -> Any:
        if moved.dtype == np.uint8:
            return self.labels.code_token_labels(moved, self.patch, 1)
        return self.labels.token_labels(moved, MASK_CLASS_ID, self.patch, 1)

    def _normalise(self) -> None:
        if hasattr(self.geometry, "normalise"):  # on the device in the pipeline; timed on the CPU here
            self.geometry.normalise(torch.from_numpy(np.stack(self.pixels)).permute(0, 3, 1, 2).contiguous())
            return
        table = self.geometry._normalise_table  # the commit before: a lookup per image
        for pixels in self.pixels:
            np.stack([table[c][pixels[:, :, c]] for c in range(3)])

    def stages(self) -> dict[str, Callable[[], Any]]:
        """Stage name -> a call that runs the stage over every sample of the shard."""
        return {
            "tar read": lambda: list(iter_shard_samples(self.shard, expected_sha256=self.sha256)),
            "image decode": lambda: [decode_image(m["image.jpg"]) for _, m in self.samples],
            "resize/crop": lambda: [self.geometry.image_pixels(image) for image in self.images],
            "to-tensor/normalise": self._normalise,
            "mask decode": lambda: [self._mask(m) for _, m in self.samples],
            "mask transform": lambda: [self._move(mask) for mask in self.masks],
            "token labels": lambda: [self._labels(moved) for moved in self.moved],
        }


def floors(shard: Path) -> dict[str, Callable[[], Any]]:
    """The floors' calls over every sample of the shard."""
    from timm.data import create_transform

    samples = list(iter_shard_samples(str(shard)))
    transform = create_transform(**CFG, is_training=False)

    def jpeg() -> None:
        for _, members in samples:
            with Image.open(io.BytesIO(members["image.jpg"])) as image:
                image.load()

    def timm_floor() -> None:
        for _, members in samples:
            with Image.open(io.BytesIO(members["image.jpg"])) as image:
                transform(image.convert("RGB"))
            decode_mask(members["mask.png"])

    return {"floor jpeg": jpeg, "floor timm": timm_floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lens-factor", type=float, default=1.45,
                        help="the lens's cost over a plain forward (bench_lens.py), divides the published rates")
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
    device_rate = {shape: rate / args.lens_factor for shape, rate in PUBLISHED_IMG_PER_S.items()}
    geometry = EvalGeometry.from_data_config(CFG)
    with tempfile.TemporaryDirectory() as tmp:
        shard, sha256 = make_shard(Path(tmp) / "shards", args.images)

        def reader(patch: int, **options: Any) -> Callable[[], None] | None:
            read = shard_batches if shard_batches is not None else iter_shard_batches
            try:
                next(iter(read(str(shard), geometry, args.batch, patch, 1, **options)))
            except TypeError:  # a checkout without this option
                return None
            return lambda: [None for _ in read(str(shard), geometry, args.batch, patch, 1,
                                                expected_sha256=sha256, **options)]

        readers = {"timm": {}, "device": {"transform": "device"},
                   "device+bytes": {"transform": "device", "jpeg_bytes": True}}
        per_image: dict[str, Callable[[], Any]] = {**Split(shard, sha256, geometry, 16).stages(), **floors(shard)}
        for shape, grid in SHAPES.items():
            for name, options in readers.items():
                run = reader(224 // grid, **options)
                if run is not None:
                    per_image[f"{shape} reader {name}"] = run
        per_batch: dict[str, Callable[[], Any]] = {}
        writes: dict[str, Callable[[], Any]] = {}
        appends = max(1, args.images // args.batch)  # one shard's worth of batches into one file
        for shape, grid in SHAPES.items():
            keys = [f"img-{i:05d}" for i in range(args.batch)]
            labels = torch.randint(0, 3, (args.batch, 1 + grid * grid), dtype=torch.int8)
            labels[:, 0] = 3
            fg = torch.rand(args.batch, 1 + grid * grid)
            lens_batch = device_output(shape, args.batch)

            def rows(tier: str, lens_batch=lens_batch, keys=keys, fg=fg, labels=labels) -> dict[str, pa.Table]:
                if tier == "tokens":
                    return {"tokens": tokens_table(lens_batch, keys, fg, labels, has_class_token=True)}
                summary, match = summary_tables(lens_batch, keys, labels, True)
                return {"token_summary": summary, "residual_match": match}

            def write(tier: str, tables: dict[str, pa.Table], shape: str = shape) -> None:
                for name, table in tables.items():
                    writer = StagedParquetWriter(open_storage(Path(tmp) / "out" / shape),
                                                 f"{tier}/{name}.parquet", schema_of(name))
                    for _ in range(appends):
                        writer.write(table)
                    writer.commit()

            for tier in tiers:
                tables = rows(tier)
                per_batch[f"{shape} rows {tier}"] = lambda tier=tier, rows=rows: rows(tier)
                writes[f"{shape} write {tier}"] = lambda tier=tier, tables=tables, write=write: write(tier, tables)

        timings: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # interleaved: every measurement once per round
            for name, run in per_image.items():
                timings.setdefault(name, []).append(timed(run) / args.images)
            for name, run in per_batch.items():
                timings.setdefault(name, []).append(timed(run) / args.batch)
            for name, run in writes.items():
                timings.setdefault(name, []).append(timed(run) / (args.batch * appends))
        ms = {name: 1000 * min(values) for name, values in timings.items()}
        kib = {(shape, tier): sum(p.stat().st_size for p in (Path(tmp) / "out" / shape / tier).glob("*.parquet"))
               / (args.batch * appends) / 1024 for shape in SHAPES for tier in tiers}
    report(ms, kib, tiers, device_rate, args)


def report(ms: dict[str, float], kib: dict[tuple[str, str], float], tiers: tuple[str, ...],
           device_rate: dict[str, float], args: argparse.Namespace) -> None:
    """Print the split, the floors' ratios and the cores per GPU."""
    print(f"ms per image on one core, best of {args.repeats} interleaved repeats, {args.images} JPEGs")
    stages = ["tar read", "image decode", "resize/crop", "to-tensor/normalise", "mask decode", "mask transform",
              "token labels"]
    exact = ms["B/16 reader timm"]
    on_device = hasattr(EvalGeometry, "normalise")  # this checkout normalises on the device, not in the reader
    host_stages = [s for s in stages if not (on_device and s == "to-tensor/normalise")]
    rest = exact - sum(ms[s] for s in host_stages)
    print("split of the exact reader (B/16):")
    for stage in stages:
        where = " (device, not in the reader)" if stage not in host_stages else ""
        print(f"  {stage:22} {ms[stage]:7.3f}{where}")
    print(f"  {'rest (meta, collation)':22} {rest:7.3f}")
    print(f"  {'reader total':22} {exact:7.3f}")
    print(f"floors: jpeg decode {ms['floor jpeg']:.3f}, timm decode + transform + mask.png decode "
          f"{ms['floor timm']:.3f}")
    for shape in SHAPES:
        cells = [f"{name} {ms[f'{shape} reader {name}']:.3f}" for name in ("timm", "device", "device+bytes")
                 if f"{shape} reader {name}" in ms]
        print(f"{shape} readers: " + ", ".join(cells))
        print(f"{shape} exact reader / timm floor = {ms[f'{shape} reader timm'] / ms['floor timm']:.2f}" + "".join(
            f"; {name} reader / jpeg floor = {ms[f'{shape} reader {name}'] / ms['floor jpeg']:.2f}"
            for name in ("device", "device+bytes") if f"{shape} reader {name}" in ms))
    print("\nhost ms per image for rows and write: " + ", ".join(
        f"{shape} {tier} {ms[f'{shape} rows {tier}']:.2f} + {ms[f'{shape} write {tier}']:.2f}"
        for shape in SHAPES for tier in tiers))
    print("KiB per image written: " + ", ".join(f"{shape} {tier} {kib[shape, tier]:.2f}"
                                                for shape in SHAPES for tier in tiers))
    print(f"\ncores one GPU needs (host ms per image x device img/s; device = timm's RTX 4090 AMP eager rate / "
          f"{args.lens_factor} lens factor)")
    for shape in SHAPES:
        for tier in tiers:
            host = ms[f"{shape} rows {tier}"] + ms[f"{shape} write {tier}"]
            cells = []
            for name in ("timm", "device", "device+bytes"):
                if f"{shape} reader {name}" in ms:
                    cpu = ms[f"{shape} reader {name}"] + host
                    cells.append(f"{name}: {cpu:5.2f} ms -> {device_rate[shape] * cpu / 1000:5.1f} cores")
            cap = "" if 1000 / host >= device_rate[shape] else \
                f"   (one writer thread caps it at {1000 / host:.0f} img/s)"
            print(f"{shape} {tier:8} @ {device_rate[shape]:6.0f} img/s   " + "   ".join(cells) + cap)


if __name__ == "__main__":
    main()
