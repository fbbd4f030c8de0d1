"""Error rate of every embedded zoo model on a shapes split, per difficulty (docs/shapes.md).

Writes the split with `vitlens shards shapes` (the demo's command), reads it back through
the shard reader with each model's own eval geometry, and prints one Markdown row per
(difficulty, seed) with each model's share of misclassified images. Knob options override
the preset, for tuning (e.g. `--noise 0.3`).

    .venv/bin/python benchmarks/shapes_difficulty.py [--seeds 0 1] [--difficulty standard hard]
        [--per-class 10] [--occlusion F] [--noise STD] [--contrast F] [--distractors N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vitlens.cli import main as cli_main
from vitlens.data.geometry import EvalGeometry
from vitlens.data.manifest import shard_urls
from vitlens.data.reader import iter_batches
from vitlens.data.shapes import SHAPES_DIFFICULTIES, SHAPES_KNOBS
from vitlens.models.registry import LoadedVariant, load_variant
from vitlens.models.zoo import list_zoo_cards

ZOO: tuple[str, ...] = tuple(card["name"] for card in list_zoo_cards())


def write_split(out: Path, seed: int, difficulty: str, per_class: int, knobs: dict[str, float]) -> Path:
    """The demo's split (20 classes, 64 px, validation, c = 0.5) as shards in `out`."""
    extra = [arg for key, value in knobs.items() for arg in (f"--{key}", str(value))]
    code = cli_main(["shards", "shapes", "--classes", "20", "--per-class", str(per_class), "--size", "64",
                     "--seed", str(seed), "--split", "validation", "--context-correlation", "0.5",
                     "--difficulty", difficulty, "--out", str(out), *extra])
    if code != 0:
        raise SystemExit(code)
    return out


def error_rate(loaded: LoadedVariant, shards: Path) -> float:
    """Share of the split's images that `loaded` misclassifies (top-1)."""
    geometry = EvalGeometry.from_data_config(loaded.data_config)
    patch = loaded.model.patch_embed.patch_size
    prefix = loaded.model.num_prefix_tokens
    wrong = total = 0
    for batch in iter_batches(shard_urls(shards), geometry, 100, patch, prefix):
        with torch.no_grad():
            predicted = loaded.model(batch.images).argmax(dim=-1)
        wrong += int((predicted != batch.class_index).sum())
        total += len(batch.keys)
    return wrong / total


def main() -> None:
    """Parse options, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--difficulty", nargs="+", default=sorted(SHAPES_DIFFICULTIES, reverse=True))
    parser.add_argument("--per-class", type=int, default=10)
    for key in SHAPES_KNOBS:
        parser.add_argument(f"--{key}", type=int if key == "distractors" else float, default=None)
    args = parser.parse_args()
    knobs = {key: getattr(args, key) for key in SHAPES_KNOBS if getattr(args, key) is not None}
    models = {name: load_variant(name) for name in ZOO}
    print("| difficulty | seed | " + " | ".join(ZOO) + " |")
    print("|---|---|" + "---|" * len(ZOO))
    with tempfile.TemporaryDirectory() as tmp:
        for difficulty in args.difficulty:
            for seed in args.seeds:
                out = Path(tmp) / f"{difficulty}-{seed}"
                shards = write_split(out, seed, difficulty, args.per_class, knobs)
                rates = [error_rate(models[name], shards) for name in ZOO]
                print(f"| {difficulty} | {seed} | " + " | ".join(f"{100 * r:.1f} %" for r in rates) + " |")


if __name__ == "__main__":
    main()
