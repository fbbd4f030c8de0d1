"""`vitlens heads zeroshot MODEL --classes FILE [--templates FILE] --out HEAD`: a class space
from text (METHOD §1c) written as a head file that every experiment and job can use."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlens.errors import UserError


def zeroshot_command(args: argparse.Namespace) -> int:
    """Embed every class's prompts with the model's own text tower and write the head file."""
    from vitlens.models.registry import get_variant, load_library_model, with_options
    from vitlens.models.zeroshot import (
        class_embedding_from_text,
        read_class_names,
        read_templates,
        write_zeroshot_head,
        zeroshot_head_tensors,
    )

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: write the head as a .safetensors file (its metadata keeps the class names)")
    classes = read_class_names(args.classes)
    templates = read_templates(args.templates)
    spec = with_options(get_variant(args.model), checkpoint_path=args.checkpoint)
    if spec.library not in ("open_clip", "transformers"):
        raise UserError(f"{args.model!r} is a {spec.library} model with its own classifier; a zero-shot class "
                        "space needs a contrastive model's text tower (open_clip:ARCH[/PRETRAINED], hf: CLIP or SigLIP)")
    loaded = load_library_model(spec, device=args.device)
    if loaded.text is None or loaded.logit_scale is None:
        raise UserError(f"{args.model!r} is an image classifier without a text tower; zero-shot class spaces "
                        "come from contrastive models (CLIP, SigLIP)")
    embedding = class_embedding_from_text(loaded.text, classes.names, templates, progress=not args.no_progress)
    weight, bias = zeroshot_head_tensors(embedding, loaded.logit_scale, loaded.logit_bias)
    write_zeroshot_head(out, weight.cpu(), None if bias is None else bias.cpu(), classes, templates, args.model,
                        loaded.logit_scale, loaded.logit_bias)
    bias_text = "" if loaded.logit_bias is None else f", bias {loaded.logit_bias:.4g}"
    print(f"{out}: {len(classes.names)} classes ({classes.label_space}) x {weight.shape[1]} dims from "
          f"{len(templates)} templates, scale {loaded.logit_scale:.4g}{bias_text}; use it as [heads] "
          f'"{args.model}" = "{out}" in a job, or --head {out}')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitlens heads`."""
    parser = subparsers.add_parser("heads", help="build class spaces (head files) for models without a classifier")
    commands = parser.add_subparsers(dest="heads_command", metavar="SUBCOMMAND")
    zeroshot = commands.add_parser(
        "zeroshot", help="a zero-shot class space from class names and prompt templates (CLIP, SigLIP)",
        description="Embed each class's prompts with the model's own text tower (normalised, averaged, "
                    "normalised: METHOD §1c) and write weight = exp(logit_scale)·E (and SigLIP's bias) as a "
                    "head file whose metadata keeps the class names, templates and model.")
    zeroshot.add_argument("model", metavar="MODEL", help="open_clip:ARCH[/PRETRAINED] or hf:ORG/NAME (or @random)")
    zeroshot.add_argument("--classes", required=True, metavar="FILE",
                          help="class names: a text file (one per line, label-index order), a shard "
                               "manifest.json (its class_names), or 'imagenet' (the 1000 CLIP ImageNet names)")
    zeroshot.add_argument("--templates", metavar="FILE", default=None,
                          help="prompt templates, one per line with {} for the name (default: the 80 OpenAI "
                               "ImageNet templates)")
    zeroshot.add_argument("--checkpoint", metavar="PATH", default=None,
                          help="local weights: an open_clip checkpoint file or a save_pretrained folder")
    zeroshot.add_argument("--out", required=True, metavar="HEAD", help="the head file to write (.safetensors)")
    zeroshot.add_argument("--device", default="cpu", help="torch device for the text tower (default cpu)")
    zeroshot.add_argument("--no-progress", action="store_true", help="no progress bar")
    zeroshot.set_defaults(func=zeroshot_command)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
