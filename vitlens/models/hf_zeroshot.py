"""Hugging Face transformers contrastive models (CLIP, SigLIP) as zero-shot towers (METHOD §1c).

`load_hf_zeroshot(source)` reads a hub id or a local `save_pretrained` folder with
transformers' own `from_pretrained` (`config.json`, the weights, the tokenizer, the image
processor) and returns a `LibraryModel`:
- `model`: a `ZeroShotClassifier` around the `CLIPModel` / `SiglipModel` itself (no class space
  yet: a zero-shot head file gives it one), whose features are the library's own
  `get_image_features(pixel_values=x).pooler_output` (CLIP: `visual_projection` of the pooled CLS;
  SigLIP: the attention-pooling head's output);
- `data_config`: the model's own image processor (`AutoImageProcessor`) as the timm-style dict
  `vitlens.data.geometry.EvalGeometry` reproduces (CLIP: resize the shortest edge, centre crop;
  SigLIP: resize to the square input, no crop; both bicubic, with the processor's mean / std);
- `text`: prompts -> `get_text_features(...).pooler_output` with the model's own tokenizer,
  padded as the model expects (CLIP: to the longest prompt, with the attention mask; SigLIP:
  `padding="max_length"` to the text tower's `max_position_embeddings` (64), input ids only, as
  it was trained: its pooled token is the last position, padding included);
- `logit_scale = exp(model.logit_scale)`, `logit_bias` = SigLIP's `logit_bias` (None for CLIP).

With `random_seed` the architecture of `source` is built from its config under
`torch.manual_seed(seed)` (the random-weights baseline; tokenizer and processor still from
`source`); with `meta` it is built on the meta device without weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch

from vitlens.errors import UserError
from vitlens.lens.classifiers import ZeroShotClassifier
from vitlens.models.library import LibraryModel, TextUnavailable, require

#: the transformers `model_type`s this loader builds
MODEL_TYPES: tuple[str, ...] = ("clip", "siglip")
#: the model class of each model type (names in `transformers`)
MODEL_CLASSES: dict[str, str] = {"clip": "CLIPModel", "siglip": "SiglipModel"}
#: prompts embedded per text-tower call
TEXT_BATCH = 256
#: PIL resampling filter ids (`PIL.Image.Resampling`) -> timm interpolation names
RESAMPLE_NAMES: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def image_features(tower: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The library's own image embedding: `get_image_features(pixel_values=images).pooler_output`.

    # images: [B, 3, H, W] -> [B, d']
    """
    return tower.get_image_features(pixel_values=images).pooler_output


def feature_dim(tower: torch.nn.Module) -> int:
    """d', the width of the image (and text) embedding: CLIP's `projection_dim`, SigLIP's vision
    width (its pooling head keeps it), which must equal the text head's `projection_size`."""
    config = tower.config
    if config.model_type == "clip":
        return int(config.projection_dim)
    width, text_width = int(config.vision_config.hidden_size), int(config.text_config.projection_size)
    if width != text_width:
        raise UserError(f"SigLIP image embedding width {width} differs from its text embedding width {text_width}")
    return width


def wrap_zeroshot(tower: torch.nn.Module) -> ZeroShotClassifier:
    """`tower` (a `CLIPModel` / `SiglipModel`) as a `ZeroShotClassifier` without a class space
    (features: `image_features`; a partial of a module-level function, so the wrapper copies
    and pickles with its tower)."""
    return ZeroShotClassifier(tower, functools.partial(image_features, tower), feature_dim(tower), "transformers")


def load_hf_zeroshot(
    source: str, *, random_seed: int | None = None, device: str = "cpu", meta: bool = False,
) -> LibraryModel:
    """The CLIP / SigLIP model at `source` (hub id or local `save_pretrained` folder) as a
    zero-shot tower (see the module notes); raises `UserError` naming what is wrong."""
    transformers = require("transformers")
    config = _read(transformers.AutoConfig, source, "config")
    model_type = str(config.model_type)
    if model_type not in MODEL_TYPES:
        raise UserError(f"transformers model {source!r} is a {model_type!r}, not a contrastive model this loader "
                        f"builds ({', '.join(MODEL_TYPES)})")
    model_class = getattr(transformers, MODEL_CLASSES[model_type])
    if meta:
        with torch.device("meta"):
            tower = model_class(config)
        weights = "no weights (meta device)"
    elif random_seed is not None:
        torch.manual_seed(random_seed)
        tower = model_class(config)
        weights = f"random weights (seed {random_seed})"
    else:
        tower = _read(model_class, source, "weights", dtype=torch.float32)  # not the checkpoint's dtype
        weights = "pretrained weights"
    tower = tower.eval()
    if not meta:
        tower = tower.to(device)
    processor = _read(transformers.AutoImageProcessor, source, "image processor")
    data_config = processor_data_config(processor, int(config.vision_config.image_size))
    text = None
    logit_scale = logit_bias = None
    if not meta:  # the tokenizer is read on first use: a job with a head file never needs it
        text = functools.partial(_encode_with_tokenizer_of, source, tower, [])
        logit_scale = float(tower.logit_scale.detach().exp())
        logit_bias = float(tower.logit_bias.detach()) if model_type == "siglip" else None
    vision = config.vision_config
    description = (f"transformers {model_class.__name__} {source}: {vision.num_hidden_layers} blocks, width "
                   f"{vision.hidden_size}, patch {vision.patch_size}, {vision.image_size} px; {weights}")
    return LibraryModel(model=wrap_zeroshot(tower), data_config=data_config, text=text,
                        logit_scale=logit_scale, logit_bias=logit_bias, description=description)


def _encode_with_tokenizer_of(source: str, tower: torch.nn.Module, cache: list[Any],
                              prompts: Sequence[str]) -> torch.Tensor:
    """`encode_text` with the tokenizer of `source`, read once into `cache` (TextUnavailable,
    one line, when it cannot be read).

    # -> [n, d'] text features
    """
    if not cache:
        transformers = require("transformers")
        try:
            cache.append(_read(transformers.AutoTokenizer, source, "tokenizer"))
        except UserError as err:
            raise TextUnavailable(str(err)) from err
    return encode_text(tower, cache[0], prompts)


def _read(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(source, **kwargs)`, a missing or unreadable file refused in one line."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"cannot read the {what} of transformers model {source!r} "
                        f"({type(err).__name__}: {first})") from err


def encode_text(tower: torch.nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The library's own text features of `prompts`, tokenised as the model expects (CLIP: padded
    to the longest, attention mask passed; SigLIP: padded to max_length, input ids only).

    # prompts: n strings -> features: [n, d'] (before normalisation)
    """
    siglip = tower.config.model_type == "siglip"
    max_length = int(tower.config.text_config.max_position_embeddings)
    device = next(tower.parameters()).device
    features = []
    for start in range(0, len(prompts), TEXT_BATCH):
        batch = tokenizer(list(prompts[start:start + TEXT_BATCH]), padding="max_length" if siglip else "longest",
                          truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(device)}
        if not siglip and "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        with torch.inference_mode():
            features.append(tower.get_text_features(**inputs).pooler_output)
    return torch.cat(features)


def _size(size: Any, key: str) -> int | None:
    """`size[key]` of an image processor's size (a transformers `SizeDict` or a plain dict)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _per_channel(value: Any) -> tuple[float, float, float]:
    """A processor's mean / std (one float or three) as three floats."""
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise UserError(f"image mean / std {value!r} does not have 3 channels")
    return values[0], values[1], values[2]


def _interpolation(resample: Any) -> str:
    """timm's interpolation name of a processor's `resample` (PIL filter id or torchvision mode)."""
    if isinstance(getattr(resample, "value", None), str):  # torchvision InterpolationMode
        return str(resample.value).replace("nearest-exact", "nearest")
    try:
        return RESAMPLE_NAMES[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"image processor resample {resample!r} is not a known interpolation") from None


def _crop_pct(crop: int, scale: int) -> float:
    """The largest crop_pct with `floor(crop / crop_pct) == scale` (EvalGeometry's rule)."""
    pct = crop / scale
    while math.floor(crop / pct) < scale:
        pct = math.nextafter(pct, 0.0)
    return pct


def processor_data_config(processor: Any, image_size: int) -> dict[str, Any]:
    """The timm-style data config (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`,
    `crop_mode`) whose `EvalGeometry` resizes and crops as `processor` does; refuses settings it
    cannot express, and an output size other than the model's `image_size`.

    Geometry: shortest edge `s` then a centre crop `c` -> `center`, `crop_pct = c / s`; a resize
    to (H, W) -> `squash` (then a centre crop of `c`: `crop_pct = c / H`, when W scales alike).
    """
    name = type(processor).__name__
    size = processor.size
    if not getattr(processor, "do_resize", True) or getattr(processor, "do_pad", False):
        raise UserError(f"{name}: do_resize=False or do_pad=True: no fixed eval geometry")
    crop = (_size(processor.crop_size, "height"), _size(processor.crop_size, "width")) \
        if getattr(processor, "do_center_crop", False) else None
    shortest = _size(size, "shortest_edge")
    height, width = _size(size, "height"), _size(size, "width")
    if shortest is not None and crop is not None and crop[0] == crop[1] and _size(size, "longest_edge") is None:
        input_size, crop_mode, crop_pct = crop, "center", _crop_pct(crop[0], shortest)
    elif height is not None and width is not None and crop is None:
        input_size, crop_mode, crop_pct = (height, width), "squash", 1.0
    elif height is not None and width is not None and crop is not None and crop[0] * width == crop[1] * height:
        input_size, crop_mode, crop_pct = crop, "squash", _crop_pct(crop[0], height)
        if math.floor(crop[1] / crop_pct) != width:
            raise UserError(f"{name}: resize {height}x{width} then crop {crop} is not one crop_pct")
    else:
        raise UserError(f"{name}: size {size} with crop {crop} is not a resize + centre crop vitlens reproduces")
    if input_size != (image_size, image_size):
        raise UserError(f"{name} gives {input_size[0]}x{input_size[1]} images but the model reads "
                        f"{image_size}x{image_size}")
    if not getattr(processor, "do_rescale", True) or not math.isclose(float(processor.rescale_factor), 1 / 255):
        raise UserError(f"{name}: pixels are not rescaled by 1/255 (do_rescale={processor.do_rescale}, "
                        f"rescale_factor={processor.rescale_factor})")
    if getattr(processor, "do_normalize", True):
        mean, std = _per_channel(processor.image_mean), _per_channel(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {"input_size": (3, *input_size), "interpolation": _interpolation(processor.resample),
            "mean": mean, "std": std, "crop_pct": crop_pct, "crop_mode": crop_mode,
            "crop_offset": "floor"}  # transformers starts its centre crop at (L - c) // 2
