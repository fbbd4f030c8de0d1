"""`vitlens run JOB`: run (or resume) an analysis job on a local or remote Ray cluster."""

from __future__ import annotations

import argparse

from vitlens.errors import UserError


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens run`."""
    parser = subparsers.add_parser(
        "run",
        help="run an analysis job (TOML spec) on Ray; re-running resumes",
        description=(
            "Run every (variant, shard) of a job spec with one Ray actor per variant and device, "
            "writing partitioned Parquet. Shards already done are skipped, so re-running after a "
            "crash only does what is missing. Exit codes: 0 done, 2 bad input (nothing was run), 3 some shards failed (the rest is written)."
        ),
        epilog="examples:\n  vitlens run jobs/demo.toml\n  vitlens run jobs/paper.toml --address auto --output /results/paper",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="path of the job spec (TOML)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    parser.add_argument("--output", default=None, help="override the spec's output folder")
    parser.add_argument("--batch-size", type=int, default=None, help="override the spec's batch size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check shards' sha256 against the manifest (remote shards, speed)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from vitlens.runner.driver import run_job
    from vitlens.runner.spec import load_job_spec

    overrides: dict = {}
    if args.output:
        overrides["output"] = str(Path(args.output).resolve())
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        overrides["batch_size"] = args.batch_size
    job = load_job_spec(args.job, overrides)
    if args.no_verify:
        job = replace(job, data=replace(job.data, verify=False))
    report = run_job(job, address=args.address, progress=not args.no_progress)
    rows = sum(s.get("rows", 0) for s in report.shard_stats)
    print(
        f"{job.name}: {report.shards_done} shard×variant done, {report.shards_skipped} skipped (done before), "
        f"{len(report.failures)} failed; {rows} token rows in {report.wall_seconds:.1f} s "
        + (f"on {report.actors} {report.device} actor(s)" if report.actors else "(nothing left to do)")
        + f" -> {job.output} (run {report.run_id})"
    )
    for failure in report.failures:
        print(f"  FAILED {failure.variant} {failure.shard} ({failure.stage}): {failure.reason}")
    if report.failures:
        print("  failed shards are not marked done: fix them and run the job again to redo only those")
    return 3 if report.failures else 0
