"""`vitlens report`: every query, test and figure of a result set into one folder with index.html."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens report`."""
    parser = subparsers.add_parser(
        "report",
        help="write the paper's tables (Markdown/CSV), figures (PNG) and one HTML page",
        description=(
            "Runs every query of queries/ on --results, adds the statistical tests (Wilcoxon vs "
            "random twin, permutation tests), draws the figures, and writes OUT/index.html, "
            "OUT/report.md, OUT/tables/ and OUT/figures/ (the page links the figures by relative path)."
        ),
    )
    parser.add_argument("--results", type=Path, required=True, help="the results folder a job wrote")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from vitlens.report.build import build_report

    files = build_report(args.results, args.out, progress=not args.no_progress)
    print(f"report: {files.html}  ({len(files.tables)} tables, {len(files.figures)} figures; also {files.markdown})")
    return 0
