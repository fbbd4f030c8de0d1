"""The `vitlens` command: parsing, messages and exit codes only.

Each sub-command lives in its own module under `vitlens.cli` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from vitlens import __version__
from vitlens.errors import UserError

# Sub-command modules, in the order `vitlens --help` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "vitlens.cli.shards",
    "vitlens.cli.models",
    "vitlens.cli.heads",
    "vitlens.cli.run",
    "vitlens.cli.train",
    "vitlens.cli.demo",
    "vitlens.cli.query",
    "vitlens.cli.report",
    "vitlens.cli.verify",
    "vitlens.cli.show",
    "vitlens.cli.explore",
    "vitlens.cli.explain",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="vitlens",
        description="A logit lens for Vision Transformers (Vilas et al., NeurIPS 2023).",
    )
    parser.add_argument("--version", action="version", version=f"vitlens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"vitlens {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"vitlens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
