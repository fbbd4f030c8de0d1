"""`vitlens demo`: the whole path on the embedded data, offline, in a few minutes on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="build the shapes shards, run the zoo job, write the report, print the headline numbers",
        description=(
            "Writes the embedded shapes sets as shards (OUT/shards: the harder validation split; "
            "OUT/shards-train: the probes' training split; OUT/shards-context0: uninformative "
            "context), runs the demo job (zoo models and their random twins, every Section 5-8 "
            "experiment) into OUT/results and the baseline on uninformative context into "
            "OUT/results-context0, writes the reports (OUT/report, OUT/report-context0) and prints Table 1. "
            "Re-running resumes: shards and finished (variant, shard) pairs are kept."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="analyse only these variants (default: the zoo and its random twins)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vitlens.cli import main as cli_main
    from vitlens.report.build import build_report
    from vitlens.report.gallery import GallerySelection
    from vitlens.report.queries import find_query, format_table, run_query
    from vitlens.report.results import open_results
    from vitlens.runner.demo import DEMO_SHAPES, DEMO_VARIANTS, context0_job, demo_job, shapes_arguments
    from vitlens.runner.driver import run_job

    for folder in DEMO_SHAPES:
        shards = args.out / folder
        if not (shards / "manifest.json").is_file():
            code = cli_main(["shards", "shapes", *shapes_arguments(folder), "--out", str(shards), "--overwrite",
                             *(["--no-progress"] if args.no_progress else [])])
            if code != 0:
                return code
    variants = tuple(args.variants) if args.variants else DEMO_VARIANTS
    failures = 0
    for job in (demo_job(args.out, variants), context0_job(args.out, variants)):
        report = run_job(job, progress=not args.no_progress)
        failures += len(report.failures)
        print(f"\njob {job.name}: {report.shards_done} shard×variant analysed, {report.shards_skipped} already "
              f"done, {len(report.failures)} failed, {report.wall_seconds:.1f} s on {report.actors} "
              f"{report.device} actor(s)")
    job = demo_job(args.out, variants)
    con = open_results(job.output)
    for name in ("table1_identifiability", "images_with_identifiable_token"):
        query = find_query(name)
        print(f"\n{query.title}:\n")
        print(format_table(run_query(con, query)))
    files = build_report(job.output, args.out / "report", progress=not args.no_progress, gallery=GallerySelection())
    context0 = build_report(context0_job(args.out, variants).output, args.out / "report-context0",
                            progress=not args.no_progress)
    print(f"\nParquet results: {job.output}  (query them: vitlens query --list / --shell --results {job.output})")
    print(f"Report: {files.html}  ({len(files.tables)} tables, {len(files.figures)} figures; Markdown: {files.markdown})")
    print(f"Uninformative context (Fig. 3a the other way): {context0.html}")
    return 3 if failures else 0
