"""Hugging Face transformers image classifiers: `load_hf_classifier(source)` -> `LibraryModel`.

`source` is a hub id ("ORG/NAME", downloaded by transformers' own `from_pretrained`) or a local
`save_pretrained` folder — one code path. The model is transformers' `AutoModelForImageClassification`
wrapped in `HFImageClassifier` (`model(images)` = its `.logits`), in eval mode and float32; its
family adapter is in `vitlens/lens/families/hf_vit.py` / `hf_beit.py`. The model's default attention
implementation is kept (sdpa): the lens recomputes attention from the query/key/value weights
itself, so eager attention is not needed for exactness (it would only change `model(x)`, which
parity compares at float tolerance).

`data_config` is the model's own image processor (`AutoImageProcessor` from the same source)
mapped to timm's eval-transform keys, which `vitlens.data.geometry.EvalGeometry` reproduces:
- `size={"height", "width"}` (ViT, DeiT, BEiT): resize both sides (aspect ratio not kept) = timm's
  `squash`, then the optional centre crop: `crop_pct = crop / size`, chosen so that
  `floor(crop / crop_pct) == size` exactly;
- `size={"shortest_edge"}` with a square centre crop (DINOv2, BiT): the shorter side to the size,
  the longer one `int(size * long / short)`, then the crop = timm's `center` mode.
The resize filter is the processor's `resample`; rescaling must be 1/255; mean/std as given (none:
0 and 1). Refused in one line: no resize, a shortest edge without a crop (the input size would
vary), a non-square crop after a shortest-edge resize, `longest_edge` / `max_height` sizes, padding,
another rescale factor. Known difference: transformers' centre crop starts at
`int((size - crop) / 2)` where torchvision's (and `EvalGeometry`'s) rounds half to even, so when
`size - crop` is odd and its half rounds up (3, 7, 11, ...) the crop is one pixel further along
that axis; with the fixed-size `squash` resize this never happens for the sizes models use.

`image_size` on the returned wrapper is the processor's output (H, W): the family adapter builds
its token grid from it (DINOv2 checkpoints keep `image_size=518` in their config and are run at
224 with interpolated position embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vitlens.errors import UserError, one_line_reason
from vitlens.lens.classifiers import HFImageClassifier
from vitlens.models.library import LibraryModel, require

#: `config.model_type` values whose `*ForImageClassification` the lens analyses
MODEL_TYPES: tuple[str, ...] = ("beit", "data2vec-vision", "deit", "dinov2", "dinov2_with_registers", "vit")

#: model types refused with their reason
REFUSED: dict[str, str] = {
    kind: "hierarchical (windowed attention, patch merging that halves the grid and doubles the width "
          "between stages): no single residual stream of one width to project at every block"
    for kind in ("swin", "swinv2", "donut-swin")
}

#: PIL resampling filters (transformers' `resample`) -> timm interpolation names
RESAMPLE: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def load_hf_classifier(
    source: str, *, random_seed: int | None = None, device: str = "cpu", meta: bool = False
) -> LibraryModel:
    """Load a transformers image classifier from a hub id or a `save_pretrained` folder.

    `random_seed`: the same architecture, randomly initialised after `torch.manual_seed(seed)`
    (the random-weights twin); `meta`: built on the meta device without weights (for checks
    before a job). Raises `UserError` (one line) for unsupported models and unreadable sources.
    """
    transformers = require("transformers")
    config = _from_source(source, "config", transformers.AutoConfig.from_pretrained)
    check_model_type(config)
    processor = _from_source(source, "image processor", transformers.AutoImageProcessor.from_pretrained)
    data_config = processor_data_config(processor, source)
    auto = transformers.AutoModelForImageClassification
    if meta:
        with torch.device("meta"):
            tower = auto.from_config(config)
        weights = "no weights (meta)"
    elif random_seed is not None:
        torch.manual_seed(random_seed)
        tower = auto.from_config(config)
        weights = f"random weights (seed {random_seed})"
    else:
        tower, info = _from_source(source, "model", lambda s: auto.from_pretrained(s, output_loading_info=True))
        missing = list(info.get("missing_keys") or [])
        if missing:
            raise UserError(f"{source}: the checkpoint lacks {', '.join(sorted(missing)[:4])}"
                            f"{' ...' if len(missing) > 4 else ''} (transformers would initialise them randomly)")
        weights = "pretrained weights"
    tower = tower.float().eval()
    if not meta:
        tower = tower.to(device)
    model = HFImageClassifier(tower, image_size=tuple(data_config["input_size"][1:])).eval()  # the token grid
    labels = config.id2label or {}
    class_names = [str(labels.get(i, labels.get(str(i), i))) for i in range(int(config.num_labels))]
    return LibraryModel(
        model=model, data_config=data_config, class_names=class_names,
        description=f"transformers {type(tower).__name__} from {source}, {weights}",
    )


def check_model_type(config: Any) -> None:
    """Refuse (one line) a model type the lens does not analyse, or a config without a classifier."""
    kind = str(getattr(config, "model_type", ""))
    if kind in REFUSED:
        raise UserError(f"transformers model type {kind!r} is not supported: {REFUSED[kind]}")
    if kind not in MODEL_TYPES:
        raise UserError(f"transformers model type {kind!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any("ForImageClassification" in name for name in architectures):
        raise UserError(f"{', '.join(architectures)} has no image classification head "
                        "(a *ForImageClassification checkpoint is needed)")


def _from_source(source: str, what: str, load: Any) -> Any:
    """`load(source)`, its failures as one-line `UserError`s naming the source."""
    try:
        return load(source)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"cannot load the {what} of {source!r} with transformers: {one_line_reason(err)}") from err


def _size(value: Any) -> dict[str, int]:
    """A transformers size (dict, `SizeDict` or int) as a dict of its set keys."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if isinstance(value, Mapping) else ((k, getattr(value, k, None)) for k in SIZE_KEYS)
    return {k: int(v) for k, v in items if v is not None and k in SIZE_KEYS}


def _crop_pct(crop: tuple[int, int], size: tuple[int, int]) -> float | None:
    """A `crop_pct` with `floor(crop / crop_pct) == size` on both axes (EvalGeometry's scale), or None."""
    candidates = [c / s for c, s in zip(crop, size)]
    for pct in candidates + [math.nextafter(p, direction) for p in candidates for direction in (0.0, 2.0)]:
        if pct > 0 and all(math.floor(c / pct) == s for c, s in zip(crop, size)):
            return pct
    return None


def processor_data_config(processor: Any, source: str = "") -> dict[str, Any]:
    """The image processor's eval preprocessing as timm's data-config keys (see the module notes).

    # -> {"input_size": (3, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    """
    where = f"{source}: image processor {type(processor).__name__}"
    size, crop = _size(getattr(processor, "size", None)), _size(getattr(processor, "crop_size", None))
    center_crop = bool(getattr(processor, "do_center_crop", False))
    if not getattr(processor, "do_resize", False):
        raise UserError(f"{where} does not resize (do_resize=False): the input size would vary with the image")
    if getattr(processor, "do_pad", False):
        raise UserError(f"{where} pads (do_pad=True): EvalGeometry does not reproduce it")
    rescale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    if not math.isclose(rescale, 1 / 255, rel_tol=1e-9):
        raise UserError(f"{where} rescales by {rescale}: EvalGeometry scales pixels by 1/255")
    resample = int(getattr(processor, "resample", 2))
    if resample not in RESAMPLE:
        raise UserError(f"{where} resamples with filter {resample}: not one of {sorted(RESAMPLE)}")
    if center_crop and not {"height", "width"} <= crop.keys():
        raise UserError(f"{where} crops to {crop}: a crop needs height and width")
    if set(size) == {"height", "width"}:
        resized = (size["height"], size["width"])
        output = (crop["height"], crop["width"]) if center_crop else resized
        mode = "squash"
    elif set(size) == {"shortest_edge"} and center_crop:
        output = (crop["height"], crop["width"])
        if output[0] != output[1]:
            raise UserError(f"{where} crops {output} after a shortest-edge resize: EvalGeometry's shortest-edge "
                            "mode needs a square crop")
        resized, mode = (size["shortest_edge"],) * 2, "center"
    else:
        raise UserError(f"{where} resizes with {size}{'' if center_crop else ' and no centre crop'}: "
                        "EvalGeometry reproduces height/width, or shortest_edge then a centre crop")
    crop_pct = _crop_pct(output, resized)
    if crop_pct is None:
        raise UserError(f"{where} crops {output} from {resized}: no one crop_pct gives both sides")
    if getattr(processor, "do_normalize", True):
        mean, std = _triple(processor.image_mean), _triple(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {"input_size": (3, *output), "interpolation": RESAMPLE[resample], "mean": mean, "std": std,
            "crop_pct": crop_pct, "crop_mode": mode, "crop_offset": "floor"}  # transformers crops at (L - c) // 2


def _triple(value: Any) -> tuple[float, float, float]:
    """A per-channel value (a scalar or three) as three floats."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    return values[0], values[1], values[2]
