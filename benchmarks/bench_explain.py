"""Explainability cost against one plain forward, and the zoo's deletion-test AUC table.

Timing (default): for the B/32 architecture (224 px, 1000 classes, random weights,
`vit_b32@random`) it times, on the same batch,
- plain:   timm's own `model(x)`;
- explain: `block_head_importance` — importance of every image token for every block and
           head (one forward with materialised attention + one backward over the per-block
           CLS branches);
and prints explain / plain (target <= 3), and one deletion curve (every kept count
n = 0..N, shortened sequences) / plain, beside its ideal (N+1)/2 (the mean length ratio). Each time is the best of interleaved repeats
after a warm-up (on a shared machine other processes only ever add time).

AUC table (`--auc`): negative / positive deletion-test AUCs (trapezoid; the reference
normalisation in brackets) of every method on a fresh shapes test split (drawn with each
model's own context correlation) for each CLS zoo model; the paper's method with both
gradient sources (`ours` = residual stream, the paper's text; `ours_attn` = attention
output, the reference code's choice).

    .venv/bin/python benchmarks/bench_explain.py [--variant vit_b32@random] [--batch-size 8] [--repeats 5]
    .venv/bin/python benchmarks/bench_explain.py --auc [--per-class 5]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch

from vitlens.data.shapes import iter_shapes_samples
from vitlens.explain.deletion import deletion_predictions
from vitlens.explain.evaluate import METHODS, method_importances, perturbation_curves
from vitlens.explain.gradients import block_head_importance, global_importance
from vitlens.models.registry import load_variant, zoo_card
from vitlens.models.zoo import list_zoo_cards

CLS_ZOO = tuple(c["name"] for c in list_zoo_cards() if c["model_kwargs"]["global_pool"] == "token")
TABLE_METHODS = ("ours", "ours_attn") + METHODS[1:]


def wall_time(function: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_ratio(variant: str, batch_size: int, repeats: int) -> None:
    """Print plain / explain times and their ratio for one variant."""
    model = load_variant(variant).model.eval()
    size = model.patch_embed.img_size
    images = torch.randn(batch_size, 3, *size)
    labels = torch.randint(0, model.num_classes, (batch_size,))

    def plain() -> None:
        with torch.inference_mode():
            model(images)

    def explain() -> None:
        block_head_importance(model, images, labels)

    num_image_tokens = model.patch_embed.num_patches
    order = torch.rand(batch_size, num_image_tokens)

    def curve() -> None:
        deletion_predictions(model, images, order, "negative")

    plain(), explain()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "explain": [], "curve": []}
    for repeat in range(repeats):
        times["plain"].append(wall_time(plain))
        times["explain"].append(wall_time(explain))
        if repeat < 2:  # a curve is N+1 forwards: two repeats suffice
            times["curve"].append(wall_time(curve))
    best = {name: min(values) for name, values in times.items()}
    print(f"{variant} batch {batch_size}, threads {torch.get_num_threads()}: "
          f"explain (all blocks x heads) / plain = {best['explain'] / best['plain']:.2f} (target <= 3); "
          f"one deletion curve ({num_image_tokens + 1} points) / plain = {best['curve'] / best['plain']:.1f} "
          f"(ideal (N+1)/2 = {(num_image_tokens + 1) / 2:.1f})")


def auc_table(per_class: int, seed: int) -> None:
    """Print the negative / positive AUC of every method for every CLS zoo model."""
    print("| model | " + " | ".join(TABLE_METHODS) + " |")
    print("|---|" + "---|" * len(TABLE_METHODS))
    for name in CLS_ZOO:
        model = load_variant(name).model.eval()
        data = zoo_card(name)["data"]
        samples = list(iter_shapes_samples(data["num_classes"], per_class, data["size"], seed, "test",
                                           data["context_correlation"]))
        pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
        images = (pixels - 0.5) / 0.5  # the zoo's normalisation (mean = std = 0.5)
        labels = torch.tensor([s.class_index for s in samples])
        importances = method_importances(model, images, labels)
        importances["ours_attn"] = global_importance(block_head_importance(model, images, labels, "attn"))
        curves = perturbation_curves(model, images, labels, importances)
        cell = {(c.method, c.test): f"{c.auc:.3f} ({c.reference_auc:.3f})" for c in curves}
        row = [f"{cell[(m, 'negative')]} / {cell[(m, 'positive')]}" for m in TABLE_METHODS]
        print(f"| {name} ({len(labels)} images) | " + " | ".join(row) + " |")


def main() -> None:
    """Parse arguments and run the timing or the AUC table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vit_b32@random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--auc", action="store_true", help="print the zoo AUC table instead of timing")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seed", type=int, default=321)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.auc:
        auc_table(args.per_class, args.seed)
    else:
        time_ratio(args.variant, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
