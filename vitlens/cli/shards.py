"""`vitlens shards`: write WebDataset shards (ImageNet-S or the embedded shapes set)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitlens import __version__
from vitlens.data.class_names import imagenet1k_class_names
from vitlens.data.imagenet_s import VARIANTS, ImageNetSConverter
from vitlens.data.shapes import (
    DEFAULT_DIFFICULTY,
    DEFAULT_NUM_CLASSES,
    MAX_DISTRACTORS,
    SHAPES_DIFFICULTIES,
    SPLIT_IDS,
    shapes_class_names,
    shapes_difficulty,
)
from vitlens.data.shapes_samples import SHAPES_DATASET, iter_shapes_encoded
from vitlens.data.shard_writer import DEFAULT_SHARD_SIZE, ShardSummary, write_shards

EXIT_SOME_REJECTED: int = 3

_EPILOG = """\
examples:
  vitlens shards shapes --classes 20 --per-class 10 --size 64 --seed 0 --out data/shapes
  vitlens shards shapes --difficulty hard --seed 0 --out data/shapes_hard
  vitlens shards imagenet-s --root /data/ImageNet-S --variant 919 --split validation \\
      --per-class 5 --seed 0 --out data/imagenet_s919
  vitlens shards imagenet-s --root /data/ImageNet-S --variant 919 --split validation \\
      --per-class all --out data/imagenet_s919_all

Each writes {dataset}-{split}-NNNNNN.tar shards and manifest.json into --out.
exit codes: 0 all converted, 2 user error, 3 some source files rejected (listed on
stderr and in the manifest), the rest converted.
"""


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards + manifest.json")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier manifest and this split's shards in --out",
    )
    parser.add_argument("--seed", type=int, default=0, help="selection / generation seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens shards {imagenet-s,shapes}`."""
    parser = subparsers.add_parser(
        "shards", help="write WebDataset shards (ImageNet-S or the embedded shapes set)",
        description="Write a data set as WebDataset shards plus manifest.json.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    imagenet_s = kinds.add_parser(
        "imagenet-s", help="convert an ImageNet-S tree (per-class selection, labels from masks)",
        description=(
            "Convert ImageNet-S (ImageNetS{V}/{split}/<wnid>/*.JPEG with masks in "
            "{split}-segmentation/). --root is the folder holding ImageNetS{V} or that folder "
            "itself. Exit code 3 when some images were rejected (the rest are converted)."
        ),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imagenet_s.add_argument("--root", type=Path, required=True, help="ImageNet-S root directory")
    imagenet_s.add_argument(
        "--variant", type=int, choices=VARIANTS, default=919, help="50, 300 or 919 (default 919)"
    )
    imagenet_s.add_argument("--split", default="validation", help="split folder name (default validation)")
    imagenet_s.add_argument(
        "--per-class", type=_per_class, default=5, metavar="N|all",
        help="images per class, or 'all' for every image of every class (default 5)",
    )
    _add_output_options(imagenet_s)
    imagenet_s.set_defaults(func=run_imagenet_s)

    shapes = kinds.add_parser(
        "shapes", help="generate the embedded shapes set (exact masks, offline)",
        description="Generate the procedural shapes data set (shape x pattern classes) as shards.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shapes.add_argument(
        "--classes", type=int, default=DEFAULT_NUM_CLASSES,
        help=f"number of classes K (default {DEFAULT_NUM_CLASSES})",
    )
    shapes.add_argument("--per-class", type=int, default=10, help="images per class (default 10)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument(
        "--context-correlation", type=float, default=0.5,
        help="probability that the background carries the class's typical hue (default 0.5)",
    )
    shapes.add_argument(
        "--split", choices=sorted(SPLIT_IDS), default="validation", help="split (default validation)"
    )
    _add_difficulty_options(shapes)
    _add_output_options(shapes)
    shapes.set_defaults(func=run_shapes)


def _add_difficulty_options(parser: argparse.ArgumentParser) -> None:
    """`--difficulty` and the knobs it sets (a knob given explicitly overrides the preset)."""
    hard = SHAPES_DIFFICULTIES["hard"]
    group = parser.add_argument_group(
        "difficulty", "harder settings (docs/shapes.md); the defaults give the standard set"
    )
    group.add_argument(
        "--difficulty", choices=sorted(SHAPES_DIFFICULTIES), default=DEFAULT_DIFFICULTY,
        help=(
            f"preset of the knobs below (default {DEFAULT_DIFFICULTY}; hard: "
            + ", ".join(f"{key} {value}" for key, value in hard.items()) + ")"
        ),
    )
    group.add_argument(
        "--occlusion", type=float, default=None, metavar="F",
        help="share of the object's pixels hidden by a dark bar, in [0, 1) (they become context)",
    )
    group.add_argument(
        "--noise", type=float, default=None, metavar="STD",
        help="std of Gaussian pixel noise as a share of the 0..255 range, in [0, 1]",
    )
    group.add_argument(
        "--contrast", type=float, default=None, metavar="F",
        help="blend every pixel towards the background texture: 1 = unchanged, in (0, 1]",
    )
    group.add_argument(
        "--distractors", type=int, default=None, metavar="N",
        help=f"smaller shapes of other classes under the object (context), 0..{MAX_DISTRACTORS}",
    )


def _per_class(text: str) -> int | None:
    """`--per-class`: a count >= 1, or `all` (None: every image of every class)."""
    if text.strip().lower() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'all', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'all', got {text!r}")
    return count


def _option_value(key: str, value: Any) -> Any:
    """An option as the manifest records it: paths absolute, `--per-class all` as "all"."""
    if isinstance(value, Path):
        return str(value.resolve())
    if key == "per_class" and value is None:
        return "all"
    return value


def _created_by(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        key: _option_value(key, value)
        for key, value in sorted(vars(args).items())
        if key not in ("func", "command", "kind", "out", "overwrite", "no_progress")
    }
    return {"command": f"vitlens shards {args.kind}", "vitlens": __version__, "options": options}


def _report(summary: ShardSummary) -> int:
    for reject in summary.rejects:
        print(f"rejected {reject.path}: {reject.reason}", file=sys.stderr)
    print(
        f"wrote {summary.samples} samples of {summary.classes} classes in {summary.shards} shard(s), "
        f"{len(summary.rejects)} rejected -> {summary.manifest}"
    )
    return EXIT_SOME_REJECTED if summary.rejects else 0


def run_imagenet_s(args: argparse.Namespace) -> int:
    """Convert ImageNet-S; exit code 3 when some source files were rejected."""
    converter = ImageNetSConverter(args.root, args.variant, args.split, args.per_class, args.seed)
    summary = write_shards(
        converter.iter_results(), args.out, converter.dataset, args.split,
        list(imagenet1k_class_names()), _created_by(args), args.shard_size, args.overwrite,
        expected_samples=converter.expected_samples(), progress=not args.no_progress,
    )
    return _report(summary)


def run_shapes(args: argparse.Namespace) -> int:
    """Generate the shapes set into shards."""
    class_names = shapes_class_names(args.classes)  # validates --classes
    knobs = shapes_difficulty(args.difficulty, args.occlusion, args.noise, args.contrast, args.distractors)
    vars(args).update(knobs)  # the manifest records the values used, not None
    samples = iter_shapes_encoded(
        args.classes, args.per_class, args.size, args.seed, args.split, args.context_correlation,
        args.difficulty, **knobs,
    )
    summary = write_shards(
        samples, args.out, SHAPES_DATASET, args.split, class_names, _created_by(args),
        args.shard_size, args.overwrite, expected_samples=args.classes * args.per_class,
        progress=not args.no_progress,
    )
    return _report(summary)
