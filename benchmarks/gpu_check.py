"""The GPU check: one prepared run for a session that has a CUDA device (≤ 5 minutes).

1. Lens parity CUDA vs CPU on every zoo model and on `vit_b16@random` (8 images each):
   the share of (token, block, stream) ranks and top-1 classes that agree, and the largest
   correct-logit difference; the same for `tf32` and `bf16` forwards against CUDA fp32.
2. A one-actor job (`num_gpus=1`, `device = "cuda"`) on `--images` shapes images resized
   to 224 px, `vit_b16@random`, experiment `baseline`, `detail = "summary"`: images/s of
   the shard processing, the device's busy fraction (CUDA-event time of the device step over
   the actor's wall time per shard) and peak device memory, from the shard statistics.

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


def one_actor_job(device: str, images: int, batch_size: int) -> dict[str, Any]:
    """Run the job and summarise its shard statistics."""
    import ray

    from vitlens.cli import main as cli_main
    from vitlens.runner.driver import run_job
    from vitlens.runner.spec import DataSpec, JobSpec, ResourceSpec

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        per_class = max(1, images // 20)
        cli_main(["shards", "shapes", "--per-class", str(per_class), "--shard-size", "250", "--size", "224",
                  "--out", str(shards)])
        cpus = os.cpu_count() or 2
        ray.init(address="local", num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False)
        try:
            job = JobSpec(
                name="gpu_check", output=str(Path(tmp) / "results"), variants=("vit_b16@random",),
                experiments=("baseline",), batch_size=batch_size, detail="summary",
                data=DataSpec(manifest=str(shards / "manifest.json")),
                resources=ResourceSpec(device=device, cpus_per_actor=float(max(1, min(8, cpus - 1))), max_actors=1),
            )
            started = time.perf_counter()
            report = run_job(job, progress=False)
            wall = time.perf_counter() - started
        finally:
            ray.shutdown()
    stats = report.shard_stats
    analysed = sum(s["images"] for s in stats)
    busy_seconds = sum(s.get("seconds", 0.0) for s in stats)
    device_seconds = sum(s.get("device_seconds", 0.0) for s in stats)
    return {
        "images": analysed, "shards": len(stats), "job_wall_seconds": wall,
        "images_per_second_in_actor": analysed / busy_seconds if busy_seconds else None,
        "device_busy_fraction": device_seconds / busy_seconds if busy_seconds else None,
        "peak_device_bytes": max((s.get("peak_device_bytes", 0) for s in stats), default=0),
        "failed_shards": [f"{f.shard}: {f.reason}" for f in report.failures],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parity-images", type=int, default=8)
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
    result["job"] = one_actor_job(args.device, args.images, args.batch_size)
    result["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
