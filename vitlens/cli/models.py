"""`vitlens models list`, `vitlens models show NAME` and `vitlens models check NAME...`: what
the variant registry knows, and whether the lens analyses a model exactly."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

from vitlens.errors import UserError

if TYPE_CHECKING:
    from vitlens.models.coverage import CoverageRow
    from vitlens.models.registry import VariantSpec

WEIGHT_SOURCES = {
    "hub": "timm hub (needs cached weights or internet)",
    "checkpoint": "local checkpoint file",
    "zoo": "embedded zoo (ships with vitlens)",
    "random": "random initialisation, fixed seed",
}
#: `vitlens models check` exits with this when some model is not ok (a partial result).
EXIT_PARTIAL = 3


#: the other libraries' variants: their classes come from their own config or a head file
LIBRARIES = ("open_clip", "transformers")


def _model_source(spec: "VariantSpec") -> str:
    """What builds the variant, as printed: the timm name, the zoo card, or the library's name."""
    if spec.library in LIBRARIES:
        return f"{spec.library} {spec.source}"
    return f"timm {spec.timm_name}" if spec.timm_name else "(zoo card)"


def _weights_text(spec: "VariantSpec") -> str:
    """Where the weights come from, as printed."""
    if spec.library in LIBRARIES and spec.weights == "hub":
        return f"{spec.library}'s own download or cache (or its local folder)"
    if spec.library in LIBRARIES and spec.weights == "checkpoint":
        return "local checkpoint file (open_clip) or save_pretrained folder (transformers)"
    return WEIGHT_SOURCES[spec.weights]


def _classes(spec: "VariantSpec") -> str:
    """The class count of a spec as printed (timm default when the spec does not fix it)."""
    return str(spec.num_classes) if spec.num_classes is not None else "1000"


def list_command(args: argparse.Namespace) -> int:
    """Print one line per registered variant."""
    from vitlens.models.registry import RANDOM_SUFFIX, list_variants

    rows = [("NAME", "ROLE", "WEIGHTS", "CLASSES", "TIMM MODEL")]
    for spec in list_variants():
        rows.append((spec.name, spec.role, spec.weights, _classes(spec), spec.timm_name or "(zoo card)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\nAlso: any timm ViT by name (timm:<name>), open_clip:ARCH[/PRETRAINED], hf:ORG/NAME or "
          f"hf:FOLDER, and NAME{RANDOM_SUFFIX} for the random twin.")
    print("Check which the lens analyses exactly: vitlens models check NAME... (or --all-timm).")
    return 0


def show_command(args: argparse.Namespace) -> int:
    """Print one variant's spec; with --load also build it and print what the lens sees."""
    from vitlens.lens.anatomy import describe_model
    from vitlens.models.registry import get_variant, load_variant, parameter_count

    spec = get_variant(args.name)
    print(f"name:        {spec.name}")
    print(f"role:        {spec.role}")
    print(f"model:       {_model_source(spec)}")
    print(f"weights:     {spec.weights} — {_weights_text(spec)}")
    if spec.weights == "checkpoint":
        print(f"checkpoint:  {args.checkpoint or spec.checkpoint_path or '(required: --checkpoint FILE)'}")
    if spec.ignored_checkpoint_keys:
        print(f"ignores:     checkpoint keys under {', '.join(spec.ignored_checkpoint_keys)} "
              "(dropped; every other key loads strictly)")
    if args.head:
        print(f"head file:   {args.head}")
    if spec.weights == "random":
        print(f"seed:        {spec.random_seed}")
    if spec.library not in LIBRARIES:
        print(f"classes:     {_classes(spec)}")
    if spec.description:
        print(f"description: {spec.description}")
    if args.load:
        loaded = load_variant(spec, checkpoint_path=args.checkpoint, head_path=args.head)
        model = loaded.model
        print(f"parameters:  {parameter_count(model):,}")
        print(f"classes:     {model.num_classes} (as built)")
        if loaded.ignored_keys:
            print(f"ignored:     {len(loaded.ignored_keys)} checkpoint key(s): {', '.join(loaded.ignored_keys[:4])}"
                  + (", ..." if len(loaded.ignored_keys) > 4 else ""))
        try:
            anatomy = describe_model(model)
        except UserError as err:
            print(f"lens:        refused: {err}")
        else:
            print(f"family:      {anatomy.family}")
            print(f"blocks:      {anatomy.num_blocks}  width: {anatomy.embed_dim}  "
                  f"prefix tokens: {anatomy.num_prefix_tokens}  image tokens: {anatomy.num_image_tokens}")
            print(f"token grid:  {_pair(anatomy.grid_size)}, {_pair(anatomy.token_cell)} px per token")
            for experiment, reason in anatomy.skipped:
                print(f"skips:       {experiment}: {reason}")
        for key, value in loaded.data_config.items():
            print(f"data.{key}: {value}")
    return 0


def _pair(pair: Sequence[int] | None) -> str:
    """(14, 14) -> "14x14"; None -> "-"."""
    return "x".join(str(v) for v in pair) if pair else "-"


def _millions(count: int | None) -> str:
    """A parameter count as printed: 5.7M, 632.0M."""
    return "-" if count is None else f"{count / 1e6:.1f}M"


def _experiments(row: "CoverageRow", notes: dict[tuple[str, str], int]) -> str:
    """Which experiments apply, with numbered skip reasons (collected in `notes`)."""
    if not row.skipped:
        return "all"
    marks = []
    for experiment, reason in row.skipped:
        number = notes.setdefault((experiment, reason), len(notes) + 1)
        marks.append(f"{experiment}[{number}]")
    return "all but " + ", ".join(marks)


def check_command(args: argparse.Namespace) -> int:
    """One table row per model: family, parameters, parity, prefix, grid, cell, experiments."""
    from vitlens.models.coverage import DEFAULT_MAX_PARAMS, HEADLESS_CLASSES, check_model, random_spec, timm_models
    from vitlens.models.weights import read_head_file

    if args.all_timm and args.names:
        raise UserError("give model names or --all-timm, not both")
    if not args.all_timm and not args.names:
        raise UserError("give one or more model names, or --all-timm for every timm ViT-family model")
    names = timm_models() if args.all_timm else list(args.names)
    if args.head is not None:
        if len(names) != 1:
            raise UserError("--head FILE gives the head of one model: name exactly one")
        read_head_file(args.head)  # a missing or malformed file is the user's to fix, before any build
    for name in names:
        random_spec(name)  # unknown names: one line, exit 2, before anything is built
    max_params = args.max_params if args.max_params is not None else DEFAULT_MAX_PARAMS
    headless_classes = HEADLESS_CLASSES if args.all_timm else None
    width = max(len(name) for name in ["MODEL", *names])
    columns = ("FAMILY", 18), ("PARAMS", 8), ("PARITY", 9), ("PREFIX", 6), ("GRID", 7), ("CELL", 7)
    header = "MODEL".ljust(width) + "  " + "  ".join(title.ljust(size) for title, size in columns) + "  EXPERIMENTS"
    print(header, flush=True)
    notes: dict[tuple[str, str], int] = {}
    counts: dict[str, int] = {}
    for name in names:
        row = check_model(name, max_params, args.head, headless_classes)
        counts[row.status] = counts.get(row.status, 0) + 1
        start = f"{row.name.ljust(width)}  {row.family[:18].ljust(18)}  {_millions(row.params).ljust(8)}  "
        if row.status == "ok":
            cells = ("ok", str(row.prefix), _pair(row.grid), _pair(row.cell))
            line = start + "  ".join(c.ljust(s) for c, (_, s) in zip(cells, columns[2:]))
            line += "  " + _experiments(row, notes)
        else:
            line = start + f"{row.status.replace('_', ' ')}: {row.reason}"
        print(line + (f"  ({row.note})" if row.note else ""), flush=True)
    for (experiment, reason), number in sorted(notes.items(), key=lambda item: item[1]):
        print(f"[{number}] {experiment} does not apply: {reason}")
    summary = ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in ("ok", "refused", "wrong", "crash", "too_large")
                        if counts.get(s))
    print(f"{len(names)} model(s): {summary}")
    return 0 if counts.get("ok", 0) == len(names) else EXIT_PARTIAL


def parse_count(text: str) -> int:
    """A parameter count such as `700M` (argparse type; `vitlens.models.coverage.parse_count`)."""
    from vitlens.models.coverage import parse_count as parse

    return parse(text)


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens models {list,show,check}`."""
    parser = subparsers.add_parser(
        "models", help="list, inspect and check the model variants",
        description="The variant registry: the paper's ViTs, the embedded zoo, any timm ViT.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    commands.required = True
    list_parser = commands.add_parser("list", help="list the registered variants")
    list_parser.set_defaults(func=list_command)
    show_parser = commands.add_parser(
        "show", help="show one variant",
        epilog="examples: vitlens models show vit_b32 | vitlens models show shapes_vit_p8@random --load | "
               "vitlens models show vit_small_patch14_dinov2@random --load --head dinov2_head.pth",
    )
    show_parser.add_argument("name", help="variant name, timm name, or NAME@random")
    show_parser.add_argument(
        "--load", action="store_true", help="build the model and print its preprocessing"
    )
    show_parser.add_argument("--checkpoint", default=None, help="local checkpoint file to load with --load")
    show_parser.add_argument("--head", default=None, metavar="FILE",
                             help="linear-head file (weight [C, d], bias [C]) for a headless model")
    show_parser.set_defaults(func=show_command)
    check_parser = commands.add_parser(
        "check", help="check that the lens analyses models exactly (parity on random weights)",
        description=(
            "Build each model's random twin (NAME@random), run the parity check (METHOD §1b) on 2 random "
            "images at its input size, and print one row per model: family, parameters, parity, prefix "
            "tokens, token grid and cell, and the experiments that apply. Exit codes: 0 every model ok, "
            "2 bad input (nothing was checked), 3 some model refused, wrong, crashed or too large."
        ),
        epilog="examples:\n  vitlens models check vit_b32 deit_tiny_patch16_224\n"
               "  vitlens models check vit_small_patch14_dinov2 --head dinov2_s14_head.pth\n"
               "  vitlens models check --all-timm --max-params 100M",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check_parser.add_argument("names", nargs="*", metavar="NAME", help="registry or timm model names")
    check_parser.add_argument("--all-timm", action="store_true",
                              help="every timm ViT-family architecture (headless ones get num_classes=1000)")
    check_parser.add_argument("--max-params", type=parse_count, default=None, metavar="N",
                              help="skip (too large) models with more parameters, e.g. 700M (the default)")
    check_parser.add_argument("--head", default=None, metavar="FILE",
                              help="linear-head file for the one model named (headless models)")
    check_parser.set_defaults(func=check_command)
