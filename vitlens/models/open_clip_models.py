"""open_clip models through open_clip's own code: `load_open_clip(...) -> LibraryModel`.

The image tower (`model.visual`) is wrapped once in a `ZeroShotClassifier` whose features are the
tower's own output (CoCa towers, built with `output_tokens`, give their pooled embedding: the
first of the two outputs); the text tower stays with the returned `text` encoder, which builds
class spaces (METHOD §1c). The architecture is a built-in open_clip name (`open_clip.list_models()`)
or one of open_clip's own schemas, `hf-hub:ORG/REPO` / `local-dir:FOLDER` (config and weights
from that place). Weights, exactly one source:
- `pretrained`: an open_clip pretrained tag (open_clip's own download). A tag trained with
  QuickGELU on an architecture without it (e.g. `ViT-B-32` + `openai`) is built with QuickGELU,
  as the weights were trained (open_clip itself only warns);
- `checkpoint`: a local file in open_clip's layout (a state dict, `.pt`/`.bin`/`.safetensors`),
  loaded by `open_clip.load_checkpoint` (strict);
- `random_seed`: `torch.manual_seed(seed)` (on a forked RNG) then open_clip's random init.
`meta=True` builds only the image tower on the meta device, no weights and no text tower (the
variant check before a job). The eval preprocessing (`data_config`) is the tower's
`preprocess_cfg` as timm keys: `crop_pct = 1`, `crop_mode` "center" (open_clip's "shortest":
resize the shorter side, centre crop) or "squash"; open_clip's "longest" (pads with
`fill_color`, vitlens pads with the mean colour) is refused. Note: with a checkpoint file open_clip
uses its default (OpenAI) mean / std, as `open_clip.create_model(arch, pretrained=FILE)` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from vitlens.errors import UserError
from vitlens.lens.classifiers import ZeroShotClassifier
from vitlens.models.library import LibraryModel, TextEncoder, TextUnavailable, require

#: open_clip's own model-name schemas: config (and weights) from a hub repo or a local folder
SCHEMAS: tuple[str, ...] = ("hf-hub:", "local-dir:")
#: open_clip `resize_mode` -> vitlens `crop_mode` (with crop_pct 1.0 both are open_clip's eval transform)
CROP_MODES: dict[str, str] = {"shortest": "center", "squash": "squash"}
TEXT_BATCH = 256
LIST_HINT = ("see python -c 'import open_clip; print(open_clip.list_models())', "
             "or use hf-hub:ORG/REPO / local-dir:FOLDER")


class PooledFeatures:
    """`tower(x)[0]`: the pooled image embedding of a tower built with `output_tokens` (CoCa)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.tower = tower

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """# images: [B, 3, H, W] -> [B, d']"""
        return self.tower(images)[0]


def open_clip_architectures() -> list[str]:
    """Every built-in open_clip architecture name (`open_clip.list_models()`)."""
    return list(require("open_clip").list_models())


def _model_config(arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess overlay of the config's source) of a name or schema; refuses unknown names."""
    open_clip = require("open_clip")
    if arch.startswith("local-dir:"):
        path = Path(arch[len("local-dir:"):]) / "open_clip_config.json"
        if not path.is_file():
            raise UserError(f"{arch}: no open_clip_config.json in that folder (open_clip's local-dir layout)")
        config = json.loads(path.read_text(encoding="utf-8"))
        return config.get("model_cfg", config), config.get("preprocess_cfg", {})
    if arch.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        try:
            config = _get_hf_config(arch[len("hf-hub:"):])
        except Exception as err:  # no network, no such repo
            raise UserError(f"{arch}: open_clip could not read its config ({_first_line(err)})") from err
        return config.get("model_cfg", config), config.get("preprocess_cfg", {})
    config = open_clip.get_model_config(arch.replace("/", "-"))
    if config is None:
        raise UserError(f"unknown open_clip architecture {arch!r}: {LIST_HINT}")
    return config, {}


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (one-line errors)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def data_config_from_preprocess(preprocess: dict[str, Any]) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` (size, mean, std, interpolation, resize_mode) as the
    timm-style eval data config of `vitlens.data.geometry.EvalGeometry`, which then equals
    `open_clip.image_transform(..., is_train=False)` step by step."""
    height, width = (preprocess["size"],) * 2 if isinstance(preprocess["size"], int) else preprocess["size"]
    resize_mode = preprocess.get("resize_mode") or "shortest"
    if resize_mode not in CROP_MODES:
        raise UserError(f"open_clip resize_mode {resize_mode!r} is not supported (supported: {', '.join(CROP_MODES)}): "
                        "'longest' pads with fill_color where vitlens's eval geometry pads with the mean colour")
    interpolation = "bilinear" if preprocess.get("interpolation") == "bilinear" else "bicubic"  # 'random': bicubic
    if resize_mode == "shortest" and height != width:
        interpolation = "bicubic"  # open_clip's non-square `ResizeKeepRatio(size)` is always bicubic
    mean, std = preprocess["mean"], preprocess["std"]
    return {
        "input_size": (3, int(height), int(width)),
        "interpolation": interpolation,
        "mean": tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else (mean,) * 3)),
        "std": tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else (std,) * 3)),
        "crop_pct": 1.0,
        "crop_mode": CROP_MODES[resize_mode],
    }


def _weights_source(arch: str, pretrained: str | None, checkpoint: str | None, random_seed: int | None,
                    meta: bool) -> str:
    """Check that exactly one weight source is named (any with `meta`); describe it in words."""
    given = [name for name, value in (("pretrained", pretrained), ("checkpoint", checkpoint),
                                      ("random_seed", random_seed)) if value is not None]
    if len(given) > 1:
        raise UserError(f"open_clip {arch}: give one weight source, not {' and '.join(given)}")
    if not given and not meta and not arch.startswith(SCHEMAS):
        raise UserError(f"open_clip {arch}: name its weights (a pretrained tag, a checkpoint file or a random "
                        "seed): a silently random model is never built")
    if pretrained is not None and arch.startswith(SCHEMAS):
        raise UserError(f"{arch}: a hf-hub:/local-dir: model brings its own weights; a pretrained tag "
                        f"({pretrained!r}) does not apply")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"open_clip checkpoint file {checkpoint} does not exist")
    if meta:
        return "meta device, no weights"
    if pretrained is not None:
        return f"pretrained {pretrained!r}"
    if checkpoint is not None:
        return f"checkpoint {checkpoint}"
    if random_seed is not None:
        return f"random weights (seed {random_seed})"
    return "its own weights"


def _pretrained_config(open_clip: Any, arch: str, pretrained: str) -> dict[str, Any]:
    """open_clip's config of a pretrained tag (no download); refuses unknown tags, listing the known."""
    if arch.startswith(SCHEMAS):
        return {}
    config = open_clip.get_pretrained_cfg(arch, pretrained)
    if not config:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"open_clip {arch} has no pretrained tag {pretrained!r} (its tags: {tags})")
    return config


#: the preprocessing keys a pretrained tag sets (open_clip's `PreprocessCfg` fields)
TAG_PREPROCESS_KEYS: tuple[str, ...] = ("mean", "std", "interpolation", "resize_mode")


def _shared_tag_preprocess(arch: str, tag: str | None) -> dict[str, Any]:
    """The preprocessing of pretrained `tag` of `arch`, or (no tag) the one every tag of `arch`
    shares; empty for schemas, architectures without tags, and tags that disagree."""
    open_clip = require("open_clip")
    if arch.startswith(SCHEMAS):
        return {}
    tags = [tag] if tag is not None else open_clip.list_pretrained_tags_by_model(arch.replace("/", "-"))
    found = set()
    for name in tags:
        config = _pretrained_config(open_clip, arch.replace("/", "-"), name)
        found.add(tuple((key, tuple(value) if isinstance(value, list) else value)
                        for key, value in config.items() if key in TAG_PREPROCESS_KEYS))
    return dict(found.pop()) if len(found) == 1 else {}


def _build_meta_tower(arch: str, pretrained: str | None) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The image tower alone on the meta device; (tower, preprocess_cfg, model_cfg)."""
    open_clip = require("open_clip")
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config, overlay = _model_config(arch)
    tag = _pretrained_config(open_clip, arch, pretrained) if pretrained is not None else {}
    quick_gelu = bool(config.get("quick_gelu", False) or tag.get("quick_gelu", False))
    with torch.device("meta"):
        tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu, None)
    preprocess = merge_preprocess_dict(merge_preprocess_dict(asdict(PreprocessCfg()), overlay), tag)
    preprocess["size"] = tower.image_size
    return tower, preprocess, config


def _build_model(arch: str, pretrained: str | None, checkpoint: str | None, random_seed: int | None,
                 device: str) -> torch.nn.Module:
    """The whole open_clip model (eval mode) by open_clip's own `create_model` / `load_checkpoint`."""
    open_clip = require("open_clip")
    config, _ = _model_config(arch)
    name = arch if arch.startswith(SCHEMAS) else arch.replace("/", "-")
    try:
        if pretrained is not None:
            tag = _pretrained_config(open_clip, name, pretrained)
            quick_gelu = bool(tag.get("quick_gelu", False)) and not config.get("quick_gelu", False)
            model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
        elif checkpoint is not None:
            model = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_image=False,
                                           pretrained_text=False, device=device)
            open_clip.load_checkpoint(model, checkpoint, device=device)
        elif random_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_seed)
                model = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_image=False,
                                               pretrained_text=False, device="cpu")
            model = model.to(device)
        else:
            model = open_clip.create_model(name, device=device)  # a schema's own weights
    except UserError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        weights = pretrained or checkpoint or (f"seed {random_seed}" if random_seed is not None else "its weights")
        raise UserError(f"open_clip could not build {arch} with {weights}: {_first_line(err)}") from err
    return model.eval()


def _text_encoder(model: torch.nn.Module, arch: str, device: str) -> TextEncoder:
    """prompts -> `model.encode_text(tokenizer(prompts))` [n, d'] (not normalised), in batches,
    with open_clip's own tokenizer for `arch` (built on first use)."""
    open_clip = require("open_clip")
    tokenizer: list[Any] = []

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        if not tokenizer:
            try:
                tokenizer.append(open_clip.get_tokenizer(arch))
            except Exception as err:  # hub / network / file errors of HF tokenizers share no base class
                raise TextUnavailable(
                    f"open_clip cannot build the tokenizer of {arch} ({type(err).__name__}: {_first_line(err)}); "
                    "its text tower uses a Hugging Face tokenizer: download it once (it is cached) or run "
                    "where the hub is reachable") from err
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(prompts), TEXT_BATCH):
                tokens = tokenizer[0](list(prompts[start:start + TEXT_BATCH])).to(device)
                outputs.append(model.encode_text(tokens, normalize=False))
        return torch.cat(outputs)

    return encode


def _wrap(tower: torch.nn.Module, feature_dim: int) -> ZeroShotClassifier:
    """The tower in a `ZeroShotClassifier` (no class space yet)."""
    features = PooledFeatures(tower) if getattr(tower, "output_tokens", False) else tower
    return ZeroShotClassifier(tower, features, feature_dim, "open_clip").eval()


def load_open_clip(
    arch: str,
    pretrained: str | None = None,
    *,
    checkpoint: str | None = None,
    random_seed: int | None = None,
    device: str = "cpu",
    meta: bool = False,
    preprocess_from: str | None = None,
) -> LibraryModel:
    """An open_clip model's image tower as a `ZeroShotClassifier` (no class space yet), its eval
    preprocessing, its text encoder and `exp(logit_scale)` / `logit_bias` (see the module notes).

    Weights from a checkpoint file or a random seed take the preprocessing (mean, std,
    interpolation, resize mode) of the pretrained tag `preprocess_from` (the tag the file was
    fine-tuned from; the trained twin's tag for a random twin), else the one all of the
    architecture's tags share (SigLIP's 0.5 / 0.5), else open_clip's defaults.

    Raises `UserError` (one line) for unknown architectures or tags, missing files, more or
    fewer than one weight source, and anything open_clip refuses while building.
    """
    require("open_clip")
    weights = _weights_source(arch, pretrained, checkpoint, None if meta else random_seed, meta)
    description = f"open_clip {arch} ({weights})"
    tag_preprocess = {} if pretrained is not None else _shared_tag_preprocess(arch, preprocess_from)
    if meta:
        tower, preprocess, config = _build_meta_tower(arch, pretrained)
        preprocess = {**preprocess, **tag_preprocess}
        scale = config.get("init_logit_scale", math.log(1 / 0.07))
        bias = config.get("init_logit_bias")
        return LibraryModel(model=_wrap(tower, int(config["embed_dim"])),
                            data_config=data_config_from_preprocess(preprocess),
                            logit_scale=math.exp(float(scale)), logit_bias=None if bias is None else float(bias),
                            description=description)
    model = _build_model(arch, pretrained, checkpoint, random_seed, device)
    config, _ = _model_config(arch)
    name = arch if arch.startswith(SCHEMAS) else arch.replace("/", "-")
    bias = getattr(model, "logit_bias", None)
    return LibraryModel(
        model=_wrap(model.visual, int(config["embed_dim"])),
        data_config=data_config_from_preprocess({**model.visual.preprocess_cfg, **tag_preprocess}),
        text=_text_encoder(model, name, device),
        logit_scale=float(model.logit_scale.detach().exp()),
        logit_bias=None if bias is None else float(bias.detach()),
        description=description,
    )
