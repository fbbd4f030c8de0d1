"""How close the lens gets to its roofline on the CPU, measured in one run (issue 22, item 6).

For the B/32 and B/16 architectures (224 px, 1000 classes, random weights) it times, in
interleaved rounds, and prints each as a multiple of `plain`:
- plain:      timm's own `model(x)`;
- roofline:   plain + the bare projections `head(norm(h))` of all (L+1) + 2L (block, stream)
              token sets — the least any lens must do;
- hooks:      a naive forward-hook lens (below, ~20 lines): hooks collect every block's
              residual, attention and MLP outputs, each is projected, top-5 and rank taken;
- peers:      `Lens(memory_flags=False, input_logits=False)`: rank, correct logit and top-5
              of every token, block and stream — what other logit lenses give;
- +inputs:    peers + the sub-layers' input logits;  +flags: peers + the §3 memory flags;
- full:       `Lens.run` with every output (the default);
- fast:       peers with `projections="fast"` (bf16 emulated on the CPU: no speed-up there).
Each timing is the best (minimum) of the interleaved repeats after a warm-up: on a shared
machine other processes only ever add time, so the minimum is the closest to each
computation's own cost.

    python benchmarks/bench_lens.py [--batch-size 8] [--repeats 5] [--device cpu] [--shapes B/32 B/16]
                                    [--threads N] [--no-fast]

`--shares VARIANT ...` instead runs `projections="fast"` on `--batch-size` random images per
variant, checks its outputs equal the fp32 path's bit for bit, and prints the share of tokens
whose rank or top-5 the bf16 logits left open, of tokens recomputed as whole fp32 rows, of
(token, class) logits computed in fp32, and of those the decisions needed (candidates and
near classes: what a per-token recompute would cost).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from vitlens.lens import Lens, project
from vitlens.models import load_variant

SHAPES = {"B/32": "vit_b32@random", "B/16": "vit_b16@random"}
LENSES = {  # name: Lens options
    "peers": dict(memory_flags=False, input_logits=False),
    "+inputs": dict(memory_flags=False),
    "+flags": dict(input_logits=False),
    "full": {},
    "fast": dict(memory_flags=False, input_logits=False, projections="fast"),
}


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (synchronising the accelerator around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def hook_lens(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> list:
    """The naive lens: forward hooks on every block, then each stream projected and reduced.

    # images: [B, 3, H, W], labels: [B] -> [(rank [B, T], correct [B, T], top-k values, classes)]
    """
    streams: list[torch.Tensor] = []
    hooks = [module.register_forward_hook(lambda _m, _i, output: streams.append(output))
             for block in model.blocks for module in (block.attn, block.mlp, block)]
    hooks.append(model.blocks[0].register_forward_pre_hook(lambda _m, inputs: streams.append(inputs[0])))
    try:
        with torch.inference_mode():
            model(images)
            results = []
            for hidden in streams:
                logits = model.head(model.norm(hidden))  # [B, T, C]
                correct = logits.gather(-1, labels[:, None, None].expand(-1, logits.shape[1], 1))
                top = logits.topk(top_k, dim=-1)
                results.append(((logits > correct).sum(-1), correct[..., 0], top.values, top.indices))
    finally:
        for hook in hooks:
            hook.remove()
    return results


def bench_shape(role: str, batch_size: int, repeats: int, device: torch.device, fast: bool) -> dict[str, float]:
    """Best-of-repeats seconds of every computation for one architecture."""
    model = load_variant(SHAPES[role], device=device).model
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

    functions: dict[str, Callable[[], object]] = {
        "plain": plain, "roofline": roofline, "hooks": lambda: hook_lens(model, images, labels)}
    for name, options in LENSES.items():
        if name != "fast" or fast:
            lens = Lens(model, **options)
            functions[name] = lambda lens=lens: lens.run(images, labels)
    runs: dict[str, list[float]] = {name: [] for name in functions}
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for name, function in functions.items():
            seconds = timed(function, device)
            if repeat:
                runs[name].append(seconds)
    return {name: min(values) for name, values in runs.items()}


def recompute_shares(name: str, batch_size: int, device: torch.device) -> str:
    """One line: `projections="fast"` against fp32 on random images of variant `name`."""
    variant = load_variant(name, device=device)
    size = variant.data_config["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, variant.model.num_classes, (batch_size,), generator=generator).to(device)
    reference = Lens(variant.model, **LENSES["peers"]).run(images, labels)
    lens = Lens(variant.model, **LENSES["fast"])
    out = lens.run(images, labels)
    same = all(torch.equal(getattr(out, f).nan_to_num(7.0), getattr(reference, f).nan_to_num(7.0))
               for f in ("rank", "correct_logit", "topk_class", "topk_logit"))
    stats = lens.projection.stats
    return (f"{name:24} classes={variant.model.num_classes:5} equal={same} open={stats.undecided_share:6.1%} "
            f"rows={stats.row_share:6.1%} fp32 pairs={stats.pair_share:6.1%} needed={stats.needed_share:6.1%}")


def main() -> None:
    """Parse options, run every shape, print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--no-fast", action="store_true", help='skip projections="fast"')
    parser.add_argument("--shares", nargs="+", default=None, metavar="VARIANT", help="recompute shares instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.shares:
        for name in args.shares:
            print(recompute_shares(name, args.batch_size, device))
        return
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"repeats={args.repeats} torch={torch.__version__}; x plain, best of interleaved repeats")
    for role in args.shapes:
        result = bench_shape(role, args.batch_size, args.repeats, device, not args.no_fast)
        names = [name for name in result if name != "plain"]
        if role == args.shapes[0]:
            print(f"{'shape':6} {'plain s':>8} " + " ".join(f"{name:>9}" for name in names))
        print(f"{role:6} {result['plain']:8.3f} " + " ".join(f"{result[name] / result['plain']:9.3f}" for name in names))


if __name__ == "__main__":
    main()
