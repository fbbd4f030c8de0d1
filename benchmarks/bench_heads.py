"""Cost of the `heads` and `tuned` experiments against the lens's `baseline`, on one batch.

Times, interleaved on the same batch (best of `--repeats` after a warm-up; on a shared
machine other processes only ever add time):
- baseline: `Lens(model).run(images, labels)` (every block, stream and token projected and reduced);
- heads:    `head_attribution` (per-head DLA, source split per label and the CLS's sources);
- tuned:    `TunedLens.reduce` (every block's translated stream projected and reduced), with maps
            fitted once beforehand on the same images (the fit is timed once and printed apart);
and prints heads / baseline and tuned / baseline, and the largest extra tensors of `heads`
(its `[B, H, T, T]` source terms per block and its `HeadBatch`) against `LensBatch`'s bytes.

    .venv/bin/python benchmarks/bench_heads.py [--variant shapes_vit_p8] [--batch-size 32] [--repeats 5]
    .venv/bin/python benchmarks/bench_heads.py --variant vit_b16@random --batch-size 8
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from vitlens.lens import Lens
from vitlens.lens.heads import head_attribution
from vitlens.models.registry import load_variant
from vitlens.probe import fit_tuned_lens


def wall_time(function: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def nbytes(obj: object) -> int:
    """Bytes of every tensor field of a dataclass-like result."""
    return sum(v.numel() * v.element_size() for v in vars(obj).values() if isinstance(v, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="shapes_vit_p8")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_variant(args.variant).model.eval()
    lens = Lens(model)
    anatomy = lens.anatomy
    size = model.patch_embed.img_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *size, generator=generator)
    labels = torch.randint(0, model.num_classes, (args.batch_size,), generator=generator)
    token_label = torch.randint(0, 3, (args.batch_size, anatomy.num_tokens), generator=generator)
    fit_start = time.perf_counter()
    tuned = fit_tuned_lens(lens.adapter, [(images, labels)], num_classes=model.num_classes, shots=args.batch_size)
    fit_seconds = time.perf_counter() - fit_start
    runs: dict[str, Callable[[], object]] = {
        "baseline": lambda: lens.run(images, labels),
        "heads": lambda: head_attribution(lens.adapter, images, labels, token_label),
        "tuned": lambda: tuned.reduce(lens.adapter, images, labels),
    }
    results = {name: run() for name, run in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(wall_time(run))
    best = {name: min(values) for name, values in times.items()}
    heads = results["heads"]
    terms = args.batch_size * heads.num_heads * anatomy.num_tokens ** 2 * 4
    print(f"{args.variant} batch {args.batch_size}, threads {torch.get_num_threads()}, L={anatomy.num_blocks}, "
          f"H={heads.num_heads}, T={anatomy.num_tokens}:")
    print(f"  heads / baseline = {best['heads'] / best['baseline']:.2f}; "
          f"tuned / baseline = {best['tuned'] / best['baseline']:.2f}; "
          f"tuned fit ({args.batch_size} images) / baseline = {fit_seconds / best['baseline']:.2f}")
    print(f"  extra memory of heads: HeadBatch / LensBatch = {nbytes(heads) / nbytes(results['baseline']):.2f}; "
          f"source terms of one block = {terms / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
