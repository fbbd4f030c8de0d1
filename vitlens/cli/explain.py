"""`vitlens explain IMAGE --variant NAME [--class C] [--blocks ...] [--ln live|frozen]
[--loss ce|logit] --out DIR`: heatmaps of the block- and head-specific class-embedding
gradients (paper §7) and of their global sum. `--ln frozen` / `--loss logit` are beyond the
paper (the final norm's scale detached / the class logit as the target), never the default."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlens.errors import UserError
from vitlens.settings import EXPLAIN_LN, EXPLAIN_LOSSES


def _class_index(choice: str | None, class_names: list[str]) -> int | None:
    """`--class` as an index or a class name (None: the model's prediction)."""
    if choice is None:
        return None
    if choice.isdigit() and int(choice) < len(class_names):
        return int(choice)
    if choice in class_names:
        return class_names.index(choice)
    raise UserError(f"--class {choice!r}: not a class index below {len(class_names)} nor a class name of the variant")


def explain_command(args: argparse.Namespace) -> int:
    """Compute every block's and head's importance for one image and write the PNGs."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from vitlens.data.geometry import EvalGeometry
    from vitlens.explain.evaluate import ours_method_name
    from vitlens.explain.gradients import block_head_importance, global_importance
    from vitlens.explain.heatmaps import save_heatmap, token_grid
    from vitlens.lens.families import adapter_for
    from vitlens.models.registry import load_variant

    image_path = Path(args.image)
    try:
        picture = Image.open(image_path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise UserError(f"{image_path}: cannot read the image ({error})") from error
    loaded = load_variant(args.variant, head_path=args.head)
    model = loaded.model
    anatomy = adapter_for(model).anatomy  # any family: timm, open_clip, transformers
    images = EvalGeometry.from_data_config(loaded.data_config).image(picture)[None]  # [1, 3, H, W], as the job reads it
    chosen = _class_index(args.class_of_interest, loaded.class_names)
    if chosen is None:
        with torch.inference_mode():
            chosen = int(model(images).argmax(dim=1))
    num_blocks = anatomy.num_blocks
    blocks = args.blocks or list(range(1, num_blocks + 1))
    bad = [b for b in blocks if not 1 <= b <= num_blocks]
    if bad:
        raise UserError(f"--blocks {bad}: the variant has blocks 1..{num_blocks}")
    importance = block_head_importance(model, images, torch.tensor([chosen]), args.source,
                                       ln=args.ln, loss=args.loss)[0]  # [L, H, N]
    grid_size = tuple(anatomy.grid_size)
    display = np.asarray(picture.resize((images.shape[-1], images.shape[-2])))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = loaded.class_names[chosen]
    method = ours_method_name(args.ln, args.loss)
    title = label if method == "ours" else f"{label}, {method}"
    written = [save_heatmap(display, token_grid(global_importance(importance[None])[0].numpy(), grid_size),
                            f"global (all blocks, heads): {title}", out_dir / "global.png")]
    for block in blocks:
        for head in range(importance.shape[1]):
            written.append(save_heatmap(
                display, token_grid(importance[block - 1, head].numpy(), grid_size),
                f"block {block} head {head + 1}: {title}", out_dir / f"block{block:02d}_head{head + 1:02d}.png"))
    print(f"class of interest: {chosen} ({label}); method {method}; wrote {len(written)} heatmaps to {out_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitlens explain`."""
    parser = subparsers.add_parser(
        "explain", help="block/head class-embedding gradient heatmaps for one image (paper §7)",
        description="Importance of every image token for every block and head: the negative gradient "
                    "of CE(proj(CLS after block b), c) w.r.t. the attention CLS gives the token. "
                    "Needs a CLS-token model.")
    parser.add_argument("image", help="an image file (any format Pillow reads)")
    parser.add_argument("--variant", required=True, help="a registered variant (see `vitlens models list`)")
    parser.add_argument("--head", default=None, metavar="FILE",
                        help="linear-head file (weight [C, d], bias [C]) for a headless variant")
    parser.add_argument("--class", dest="class_of_interest", default=None,
                        help="class of interest: index or name (default: the model's prediction)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="1-based blocks to draw per head (default: all); the global map sums all")
    parser.add_argument("--source", choices=("resid", "attn"), default="resid",
                        help="CLS token of the residual stream after the block (paper) or of the "
                             "attention sub-layer output (reference code)")
    parser.add_argument("--ln", choices=EXPLAIN_LN, default="live",
                        help="final norm's scale in the backward: live (the paper) or frozen (detached, "
                             "as in direct logit attribution; beyond the paper)")
    parser.add_argument("--loss", choices=EXPLAIN_LOSSES, default="ce",
                        help="per-block target: ce (the paper: cross-entropy on logits) or logit (the class "
                             "of interest's logit; beyond the paper)")
    parser.add_argument("--out", required=True, help="output directory for the PNGs")
    parser.set_defaults(func=explain_command)
