"""`vitlens train`: train one embedded-zoo model from its TOML config."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `vitlens train`."""
    parser = subparsers.add_parser(
        "train",
        help="train a tiny ViT of the embedded zoo on the shapes set (CPU, minutes)",
        description=(
            "Train a timm VisionTransformer on the procedural shapes set, deterministic per seed, "
            "and write <name>.safetensors + <name>.json (its card) into --out. "
            "The zoo's configs are jobs/zoo/*.toml; jobs/train_zoo.sh rebuilds the whole zoo."
        ),
        epilog="example:\n  vitlens train --config jobs/zoo/shapes_vit_p16.toml --out vitlens/models/zoo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="training config (TOML)")
    parser.add_argument("--out", type=Path, default=Path("zoo-out"), help="output folder (default zoo-out)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's number of steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from vitlens.errors import UserError
    from vitlens.models.training import card_for, load_train_config, train
    from vitlens.models.zoo import save_zoo_model

    overrides = {}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError("--steps must be >= 1")
        overrides["steps"] = args.steps
    config = load_train_config(args.config, overrides)
    result = train(config, progress=not args.no_progress)
    command = f"vitlens train --config {shlex.quote(str(args.config))} --out {shlex.quote(str(args.out))}"
    path = save_zoo_model(result.model, card_for(config, result, command), args.out)
    print(f"{config.name}: held-out accuracy {100 * result.accuracy:.1f} % "
          f"({config.test_per_class} per class), {result.train_seconds:.0f} s, "
          f"{path.stat().st_size / 1e6:.2f} MB -> {path}")
    return 0
