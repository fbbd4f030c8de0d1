"""`vitlens show`: the gallery's figures of one image (token maps per block, explainability maps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlens.store.layout import partition_value


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens show`."""
    parser = subparsers.add_parser(
        "show",
        help="draw the token maps (and explainability maps) of one analysed image",
        description=(
            "Draws, for IMAGE_KEY of --variant, the residual stream's token grid over the image block by "
            "block (coloured by the true class's identifiability score 1 - rank/C, rank 0 dotted), the "
            "object's outline, the top-1 class per token in the last block, where experiment explain "
            "ran its global and per-block maps, and where experiment heads ran where the CLS reads its class "
            "from, block by block. The image is re-read from its shard; when the shard is "
            "gone the maps are drawn without it. Needs a job with detail = \"tokens\" for the token maps."
        ),
    )
    parser.add_argument("image_key", metavar="IMAGE_KEY", help="the sample's key (images.image_key)")
    parser.add_argument("--results", required=True, help="the results a job wrote: a folder or an object-store URL (s3://bucket/prefix)")
    parser.add_argument("--variant", required=True, help="the variant (as in the job spec)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default ./show-IMAGE_KEY/)")
    parser.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from vitlens.report.gallery import write_image_figures

    out = args.out if args.out is not None else Path(f"show-{partition_value(args.image_key)}")
    figures = write_image_figures(args.results, args.variant, args.image_key, out)
    for figure in figures:
        if figure.path is None:
            print(f"note: {figure.caption}")
        else:
            print(out / figure.path)
    return 0
