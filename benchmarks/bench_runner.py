"""Runner throughput: token rows per second per actor, and 1- vs 2-actor scaling.

Builds a shapes shard set, starts ONE local Ray cluster, and runs the same job (one zoo
variant, baseline experiment) with 1 and then 2 CPU actors (1 CPU and 1 torch thread
each), all in one run. Prints ratios and rates measured in this run:

    rows/s per actor     = token rows / summed in-actor shard seconds
    steady scaling       = (2 x rows/s per actor with 2 actors) / (rows/s with 1 actor) (ideal 2.0)
    wall scaling         = wall time with 1 actor / wall time with 2 actors, actor start-up
                           (process, imports, model load) included (ideal 2.0)

    .venv/bin/python benchmarks/bench_runner.py [--variant shapes_vit_p8] [--per-class 20]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import ray

from vitlens.cli import main as cli_main
from vitlens.runner.driver import run_job
from vitlens.runner.spec import DataSpec, JobSpec, ResourceSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="shapes_vit_p8")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        cli_main(["shards", "shapes", "--per-class", str(args.per_class), "--shard-size", str(args.shard_size),
                  "--out", str(shards)])
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        job = JobSpec(name="bench", output=str(Path(tmp) / "r1"), variants=(args.variant,),
                      data=DataSpec(manifest=str(shards / "manifest.json")), batch_size=args.batch_size,
                      resources=ResourceSpec(device="cpu", cpus_per_actor=1, max_actors=1))
        reports = {}
        for actors in (1, 2):
            spec = replace(job, output=str(Path(tmp) / f"r{actors}"),
                           resources=replace(job.resources, max_actors=actors))
            reports[actors] = run_job(spec, progress=False)
        ray.shutdown()

    print(f"variant {args.variant}, {reports[1].shards_done} shards of {args.shard_size} images, batch {args.batch_size}")
    print("actors  rows         wall s  rows/s per actor  rows/s total")
    for actors, report in reports.items():
        rows = sum(s["rows"] for s in report.shard_stats)
        busy = sum(s["seconds"] for s in report.shard_stats)
        print(f"{actors:<7} {rows:<12} {report.wall_seconds:6.1f}  {rows / busy:16.0f}  {rows / report.wall_seconds:12.0f}")
    per_actor = {a: sum(s["rows"] for s in r.shard_stats) / sum(s["seconds"] for s in r.shard_stats)
                 for a, r in reports.items()}
    print(f"steady scaling 2 vs 1 actor: {2 * per_actor[2] / per_actor[1]:.2f}  (ideal 2.00)")
    print(f"wall scaling 2 vs 1 actor:   {reports[1].wall_seconds / reports[2].wall_seconds:.2f}  (ideal 2.00)")


if __name__ == "__main__":
    main()
