"""How close the full lens analysis gets to its roofline, measured in one run.

For the B/32 and B/16 architectures (224 px, 1000 classes, random weights) it times:
- plain:     timm's own `model(x)`;
- roofline:  plain + the bare projection matmuls `head(norm(h))` on all (L+1) + 2L
             (block, stream) token sets — the least any lens must do;
- analysis:  `Lens.run`: hooked forward, projection, on-device reduction (ranks, top-5,
             memory flags, sub-layer inputs) of every token, block and stream.
and prints roofline / analysis (target >= 0.85) and analysis / plain. Each timing is the
best (minimum) of interleaved repeats after a warm-up: on a shared machine other processes
only ever add time, so the minimum is the closest to each computation's own cost.

    python benchmarks/bench_lens.py [--batch-size 8] [--repeats 5] [--device cpu] [--shapes B/32 B/16]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from vitlens.lens import Lens, project
from vitlens.models import load_variant

SHAPES = {"B/32": "vit_b32@random", "B/16": "vit_b16@random"}


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (synchronising the accelerator around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_shape(role: str, batch_size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Best-of-repeats plain / roofline / analysis seconds for one architecture."""
    model = load_variant(SHAPES[role], device=device).model
    lens = Lens(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    tokens = model.num_prefix_tokens + model.patch_embed.num_patches
    hidden = torch.randn(batch_size, tokens, model.embed_dim, generator=generator).to(device)
    projections = (len(model.blocks) + 1) + 2 * len(model.blocks)

    def plain() -> None:
        with torch.inference_mode():
            model(images)

    def roofline() -> None:
        with torch.inference_mode():
            model(images)
            for _ in range(projections):
                project(model, hidden)

    def analysis() -> None:
        lens.run(images, labels)

    runs: dict[str, list[float]] = {"plain": [], "roofline": [], "analysis": []}
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for name, function in (("plain", plain), ("roofline", roofline), ("analysis", analysis)):
            seconds = timed(function, device)
            if repeat:
                runs[name].append(seconds)
    return {name: min(values) for name, values in runs.items()}


def main() -> None:
    """Parse options, run every shape, print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"repeats={args.repeats} torch={torch.__version__}")
    print(f"{'shape':6} {'plain s':>9} {'roofline s':>11} {'analysis s':>11} "
          f"{'roofline/analysis':>18} {'analysis/plain':>15}")
    for role in args.shapes:
        result = bench_shape(role, args.batch_size, args.repeats, device)
        print(f"{role:6} {result['plain']:9.3f} {result['roofline']:11.3f} {result['analysis']:11.3f} "
              f"{result['roofline'] / result['analysis']:18.3f} {result['analysis'] / result['plain']:15.3f}")


if __name__ == "__main__":
    main()
