"""`vitlens models` (being written)."""

import argparse


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Placeholder until the sub-command lands."""
    return None
