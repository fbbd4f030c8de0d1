"""`vitlens report`: every query, test and figure of a result set into one folder with index.html."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitlens.report.gallery import GallerySelection


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
    parser.add_argument("--results", required=True, help="the results a job wrote: a folder or an object-store URL (s3://bucket/prefix)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    gallery = parser.add_argument_group(
        "gallery", "a few images per variant with the token maps drawn over them (OUT/gallery/; needs a job "
        'with detail = "tokens"; the images are re-read from their shards)')
    gallery.add_argument("--gallery-keys", nargs="+", metavar="KEY", default=(),
                         help="draw these image keys (default: the first images of each class)")
    gallery.add_argument("--gallery-per-class", type=_positive_int, default=1, metavar="K",
                         help="without --gallery-keys: the first K correct and the first K misclassified "
                              "images of each class, at most 8 per variant (default 1)")
    gallery.add_argument("--no-gallery", action="store_true", help="no gallery")
    parser.set_defaults(func=_report)


def _positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def gallery_selection(args: argparse.Namespace) -> "GallerySelection | None":
    """The gallery the options ask for (None with --no-gallery)."""
    from vitlens.report.gallery import GallerySelection

    if args.no_gallery:
        return None
    return GallerySelection(keys=tuple(args.gallery_keys), per_class=args.gallery_per_class)


def _report(args: argparse.Namespace) -> int:
    from vitlens.report.build import build_report

    files = build_report(args.results, args.out, progress=not args.no_progress, gallery=gallery_selection(args))
    print(f"report: {files.html}  ({len(files.tables)} tables, {len(files.figures)} figures; also {files.markdown})")
    return 0
