"""`vitlens models list` and `vitlens models show NAME`: what the variant registry knows."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitlens.models.registry import VariantSpec

WEIGHT_SOURCES = {
    "hub": "timm hub (needs cached weights or internet)",
    "checkpoint": "local checkpoint file",
    "zoo": "embedded zoo (ships with vitlens)",
    "random": "random initialisation, fixed seed",
}


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
    print(f"\nAlso: any timm ViT by name (timm:<name>), and NAME{RANDOM_SUFFIX} for the random twin.")
    return 0


def show_command(args: argparse.Namespace) -> int:
    """Print one variant's spec; with --load also build it and print its preprocessing."""
    from vitlens.models.registry import get_variant, load_variant

    spec = get_variant(args.name)
    print(f"name:        {spec.name}")
    print(f"role:        {spec.role}")
    print(f"timm model:  {spec.timm_name or '(zoo card)'}")
    print(f"weights:     {spec.weights} — {WEIGHT_SOURCES[spec.weights]}")
    if spec.weights == "checkpoint":
        print(f"checkpoint:  {args.checkpoint or spec.checkpoint_path or '(required: --checkpoint FILE)'}")
    if spec.weights == "random":
        print(f"seed:        {spec.random_seed}")
    print(f"classes:     {_classes(spec)}")
    if spec.description:
        print(f"description: {spec.description}")
    if args.load:
        loaded = load_variant(spec, checkpoint_path=args.checkpoint)
        model = loaded.model
        print(f"parameters:  {sum(p.numel() for p in model.parameters()):,}")
        print(f"blocks:      {len(model.blocks)}  width: {model.embed_dim}  "
              f"prefix tokens: {model.num_prefix_tokens}  image tokens: {model.patch_embed.num_patches}")
        for key, value in loaded.data_config.items():
            print(f"data.{key}: {value}")
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens models {list,show}`."""
    parser = subparsers.add_parser(
        "models", help="list and inspect the model variants",
        description="The variant registry: the paper's ViTs, the embedded zoo, any timm ViT.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    commands.required = True
    list_parser = commands.add_parser("list", help="list the registered variants")
    list_parser.set_defaults(func=list_command)
    show_parser = commands.add_parser(
        "show", help="show one variant",
        epilog="examples: vitlens models show vit_b32 | vitlens models show shapes_vit_p8@random --load",
    )
    show_parser.add_argument("name", help="variant name, timm name, or NAME@random")
    show_parser.add_argument(
        "--load", action="store_true", help="build the model and print its preprocessing"
    )
    show_parser.add_argument("--checkpoint", default=None, help="local checkpoint file to load with --load")
    show_parser.set_defaults(func=show_command)
