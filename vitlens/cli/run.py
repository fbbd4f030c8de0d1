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
            "crash only does what is missing. A sample that does not decode, or whose class_index is no class "
            "of the model, is skipped and recorded in the rejects table (stage decode or label); the summary "
            "counts them per stage. Exit codes: 0 done (also with rejected samples), 2 bad input (nothing was "
            "run), 3 some shards failed (the rest is written), or --fail-on-rejects and the results hold "
            "rejected samples."
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
    parser.add_argument("--fail-on-rejects", action="store_true",
                        help="exit 3 when the results hold samples of the job's variants that were rejected "
                             "(this run's or an earlier run's), for pipelines that need every sample")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vitlens.runner.driver import run_job
    from vitlens.runner.spec import load_job_spec
    from vitlens.store.storage import normalise_root

    overrides: dict = {}
    if args.output:
        overrides["output"] = normalise_root(args.output)  # a folder, or an object-store URL as given
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
    rejected = {stage: sum(per_variant.values()) for stage, per_variant in report.samples_rejected().items()}
    if rejected:
        print(f"  {sum(rejected.values())} sample(s) rejected and skipped ({_per_stage(rejected)}"
              + (", counted per variant" if len(job.variants) > 1 else "") + "); the rest of their shards is analysed")
        print(f"  {_REJECTS_HINT.format(output=job.output)}")
    if args.fail_on_rejects:
        stored = _stored_sample_rejects(job.output, job.variants)
        if stored:
            print(f"  --fail-on-rejects: the results hold {sum(stored.values())} rejected sample(s) "
                  f"({_per_stage(stored)}): exit 3")
            if not rejected:
                print(f"  {_REJECTS_HINT.format(output=job.output)}")
            return 3
    return 3 if report.failures else 0


#: Where the rejected samples are listed, one per line with their reason.
_REJECTS_HINT = ('each with its reason: vitlens query --results {output} --shell, then '
                 'sql("SELECT * FROM rejects WHERE image_key IS NOT NULL")')


def _per_stage(counts: dict[str, int]) -> str:
    """`decode 5, label 2`."""
    return ", ".join(f"{stage} {count}" for stage, count in sorted(counts.items()))


def _stored_sample_rejects(output: str, variants: tuple[str, ...]) -> dict[str, int]:
    """Rejected samples of `variants` in the results (every run's), per stage."""
    from vitlens.report.results import open_results

    try:
        con = open_results(output)
    except UserError:  # no table written yet
        return {}
    rows = con.execute("SELECT stage, count(*) FROM rejects WHERE image_key IS NOT NULL "
                       "AND list_contains(?, variant) GROUP BY stage", [list(variants)]).fetchall()
    return {stage: int(count) for stage, count in rows}
