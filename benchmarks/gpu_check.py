"""The GPU check: one prepared run for a session that has a CUDA device (≤ 8 minutes).

1. Lens parity CUDA vs CPU on every zoo model and on `vit_b16@random` (8 images each):
   the share of (token, block, stream) ranks and top-1 classes that agree, and the largest
   correct-logit difference; the same for `tf32` and `bf16` forwards against CUDA fp32.
2. Throughput of `vit_b16@random` on one batch: the plain bf16 forward, and the lens with a
   bf16 forward and `projections = "fp32"` / `"fast"` (img/s, × plain), whether "fast" gave
   the fp32 path's ranks, top-5 and logits bit for bit, and its recompute shares.
3. The device transform (`benchmarks/bench_device_transform.measure`): img/s of the decode
   (nvJPEG on CUDA) and of decode + resize / crop / normalise of 64 ImageNet-like JPEGs.
4. One-actor jobs (`num_gpus=1`, `device = "cuda"`, bf16 forward) on `--images`
   ImageNet-like JPEGs (4 shards), `vit_b16@random`, experiment `baseline`, `detail =
   "summary"`, for `[data] transform` timm / device and `[resources] projections` fp32 /
   fast (`JOBS`): images/s of the shard processing, the device's busy fraction (CUDA-event
   time of the device step over the actor's wall time per shard), the model input's device
   seconds and peak device memory, from the shard statistics.

Writes everything to one JSON file (`--out`, default `$OUT/gpu_check.json` or
`gpu_check.json`) and prints it. `--device cpu` runs the same steps on the CPU with small
sizes (a dry run that checks the script itself).

    bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def lens_parity(device: str, images: int) -> list[dict[str, Any]]:
    """Per model: CUDA (or `device`) lens output vs the CPU's, fp32, tf32 and bf16."""
    from vitlens.lens import Lens
    from vitlens.models.registry import list_variants, load_variant

    names = [spec.name for spec in list_variants() if spec.weights == "zoo"] + ["vit_b16@random"]
    rows = []
    for name in names:
        cpu = load_variant(name, device="cpu")
        size = cpu.data_config["input_size"][1:]
        generator = torch.Generator().manual_seed(0)
        batch = torch.randn(images, 3, *size, generator=generator)
        labels = torch.randint(0, cpu.model.num_classes, (images,), generator=generator)
        reference = Lens(cpu.model).run(batch, labels)
        model = cpu.model.to(device)
        exists = reference.rank >= 0
        for precision in ("fp32", "tf32", "bf16"):
            out = Lens(model, precision=precision).run(batch.to(device), labels.to(device)).to("cpu")
            rows.append({
                "model": name, "precision": precision,
                "rank_agreement": float((out.rank == reference.rank)[exists].float().mean()),
                "top1_agreement": float((out.topk_class[..., 0] == reference.topk_class[..., 0])[exists].float().mean()),
                "max_correct_logit_difference": float((out.correct_logit - reference.correct_logit)[exists].abs().max()),
                "prediction_agreement": float((out.prediction == reference.prediction).float().mean()),
            })
    return rows


def lens_throughput(device: str, batch_size: int, rounds: int) -> dict[str, Any]:
    """`vit_b16@random` on one batch: img/s of the plain bf16 forward, and of the lens with a
    bf16 forward and `fp32` / `fast` projections (best of `rounds`, interleaved), with the
    recompute shares of "fast" and whether its ranks, top-5 and logits equal the fp32 path's."""
    from vitlens.lens import Lens
    from vitlens.models.registry import load_variant

    model = load_variant("vit_b16@random", device=device).model
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    lenses = {p: Lens(model, precision="bf16", projections=p) for p in ("fp32", "fast")}

    def plain() -> None:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            model(images)

    runs = {"plain_bf16": plain, "lens_fp32": lambda: lenses["fp32"].run(images, labels),
            "lens_fast": lambda: lenses["fast"].run(images, labels)}
    best = {name: float("inf") for name in runs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_:
                best[name] = min(best[name], time.perf_counter() - started)
    exact, fast = (lenses[p].run(images, labels).to("cpu") for p in ("fp32", "fast"))
    projection = lenses["fast"].projection
    stats = getattr(projection, "stats", None)
    result: dict[str, Any] = {f"{name}_img_per_s": batch_size / seconds for name, seconds in best.items()}
    result.update({
        "batch_size": batch_size,
        "lens_fp32_x_plain": best["lens_fp32"] / best["plain_bf16"],
        "lens_fast_x_plain": best["lens_fast"] / best["plain_bf16"],
        "fast_projection": type(projection).__name__ + ("" if getattr(projection, "enabled", True) else " (fp32 fallback)"),
        "fast_equals_fp32": bool(torch.equal(exact.rank, fast.rank) and torch.equal(exact.topk_class, fast.topk_class)
                                 and torch.equal(exact.topk_logit.nan_to_num(), fast.topk_logit.nan_to_num())
                                 and torch.equal(exact.correct_logit.nan_to_num(), fast.correct_logit.nan_to_num())),
    })
    if stats is not None:
        result.update({"fast_undecided_token_share": stats.undecided_share, "fast_row_share": stats.row_share,
                       "fast_pair_share": stats.pair_share})
    return result


#: The one-actor jobs: (name, [data] transform, [resources] projections), all with a bf16 forward.
JOBS: tuple[tuple[str, str, str], ...] = (
    ("timm_fp32", "timm", "fp32"),        # the exact host transform, fp32 projections (the defaults)
    ("device_fp32", "device", "fp32"),    # the device transform (nvJPEG decode on CUDA)
    ("device_fast", "device", "fast"),    # ... and the fast projections
)


def one_actor_jobs(device: str, images: int, batch_size: int) -> dict[str, Any]:
    """The one-actor jobs of `JOBS` on the same ImageNet-like JPEG shards (4 shards of
    `images` / 4, `benchmarks/bench_pipeline.make_shard`), each summarised from its shard
    statistics: images/s in the actor, the device's busy fraction, peak device memory."""
    import ray

    from bench_pipeline import make_shard  # benchmarks/ is the script's folder: on sys.path
    from vitlens.runner.driver import run_job
    from vitlens.runner.spec import DataSpec, JobSpec, ResourceSpec

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for index in range(4):  # shard ids are file names: one shard per folder, renamed apart
            made, _ = make_shard(Path(tmp) / f"shards{index}", max(1, images // 4))
            shards.append(str(made.rename(made.with_name(f"bench-validation-{index:06d}.tar"))))
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False)
        try:
            for name, transform, projections in JOBS:
                job = JobSpec(
                    name=f"gpu_check_{name}", output=str(Path(tmp) / f"results_{name}"),
                    variants=("vit_b16@random",), experiments=("baseline",), batch_size=batch_size,
                    detail="summary", data=DataSpec(shards=tuple(shards), transform=transform),
                    resources=ResourceSpec(device=device, cpus_per_actor=float(max(1, min(8, cpus - 1))),
                                           max_actors=1, precision="bf16", projections=projections),
                )
                started = time.perf_counter()
                report = run_job(job, progress=False)
                results[name] = _job_summary(report, time.perf_counter() - started)
        finally:
            ray.shutdown()
    return results


def _job_summary(report: Any, wall: float) -> dict[str, Any]:
    """Images/s, device-busy fraction and peak memory of one job from its shard statistics."""
    stats = report.shard_stats
    analysed = sum(s["images"] for s in stats)
    busy_seconds = sum(s.get("seconds", 0.0) for s in stats)
    device_seconds = sum(s.get("device_seconds", 0.0) for s in stats)
    return {
        "images": analysed, "shards": len(stats), "job_wall_seconds": wall,
        "images_per_second_in_actor": analysed / busy_seconds if busy_seconds else None,
        "device_busy_fraction": device_seconds / busy_seconds if busy_seconds else None,
        "model_input_seconds": sum(s.get("experiment_seconds", {}).get("model_input", 0.0) for s in stats),
        "peak_device_bytes": max((s.get("peak_device_bytes", 0) for s in stats), default=0),
        "failed_shards": [f"{f.shard}: {f.reason}" for f in report.failures],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parity-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the lens throughput")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --device cpu for a dry run)")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    started = time.perf_counter()
    result["lens_parity"] = lens_parity(args.device, args.parity_images)
    result["parity_seconds"] = time.perf_counter() - started
    result["lens_throughput"] = lens_throughput(args.device, args.batch_size, args.rounds)
    from bench_device_transform import measure  # benchmarks/ is the script's folder: on sys.path

    result["device_transform"] = measure(args.device)
    result["jobs"] = one_actor_jobs(args.device, args.images, args.batch_size)
    result["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
