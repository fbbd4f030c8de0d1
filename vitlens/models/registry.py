"""The ONE variant registry: the paper's seven ViTs, the embedded zoo, and any timm ViT by name.

Names:
- the paper's variants by short name (`vit_b32`, `vit_b16`, `vit_l16`, `vit_miil`, `vit_gap`,
  `vit_cifar100`, `deit_refinement`; METHOD §8), hub weights or a required checkpoint file;
- the embedded zoo (`shapes_vit_p16`, ...), discovered from the cards in `vitlens/models/zoo/`;
- any timm model by its timm name, optionally prefixed `timm:` (hub weights); whether the
  lens analyses it is its family adapter's call (`vitlens.lens.families`), not the registry's;
- `open_clip:ARCH[/PRETRAINED]` (open_clip's own image tower, METHOD §1c; without a pretrained
  tag the weights come from a local checkpoint file) and `hf:ORG/NAME` or `hf:/path/to/folder`
  (a Hugging Face transformers classifier, CLIP or SigLIP; `vitlens/models/hf_models.py`): loaded
  by the library's own code, wrapped once (`vitlens.lens.classifiers`); contrastive models get
  their class space from text (a zero-shot head file, `vitlens/models/zeroshot.py`);
- `NAME@random`: the random-initialised twin of NAME (`pretrained=False`, `torch.manual_seed(0)`
  before construction), the paper's baseline.

Per use (`with_options`, the job spec's `[checkpoints]`, `[heads]`, `[models.NAME]`): a
checkpoint file, a linear-head file (headless models such as DINOv2 have no class embedding,
METHOD §1b), and timm kwargs (`num_classes`, `img_size`, ...) for the architecture.

Unknown names and missing weight files raise `UserError`; nothing falls back to random weights,
and no pretrained model gets a random head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.data import resolve_data_config

from vitlens.errors import UserError
from vitlens.lens.families import adapter_for
from vitlens.models import zoo
from vitlens.models.class_names import class_names_for
from vitlens.models.library import LibraryModel
from vitlens.models.weights import (
    attach_head,
    create_hub_model,
    create_random_model,
    load_checkpoint_file,
)
from vitlens.models.zeroshot import head_file_classes

WeightsSource = Literal["hub", "checkpoint", "zoo", "random"]
Library = Literal["timm", "zoo", "open_clip", "transformers"]
RANDOM_SUFFIX = "@random"
TIMM_PREFIX = "timm:"
#: name prefix -> the library that loads the variant
LIBRARY_PREFIXES: dict[str, Library] = {"open_clip:": "open_clip", "hf:": "transformers"}
#: open_clip's own model-name schemas: a hub repo or a local folder in that layout (config + weights)
OPEN_CLIP_SCHEMAS: tuple[str, ...] = ("hf-hub:", "local-dir:")
RANDOM_SEED = 0


@dataclass(frozen=True)
class VariantSpec:
    """How to build one model variant; `load_variant` turns it into a model."""

    name: str
    timm_name: str | None  # None for zoo models (built from their card's VisionTransformer kwargs)
    role: str  # the paper's variant it stands for, e.g. "B/32", "GAP"
    weights: WeightsSource
    checkpoint_path: str | None = None
    num_classes: int | None = None  # None: the timm default of `timm_name`
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    random_seed: int = RANDOM_SEED
    data_config_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: a linear-head file (`weight` [C, d], optional `bias` [C]) that becomes the classifier,
    #: after the model's own weights: the class embedding of a headless model (METHOD §1b)
    head_path: str | None = None
    #: key prefixes of `checkpoint_path` that are dropped before the otherwise strict load
    #: (the Refinement checkpoint's `transformerheads.`, METHOD §8); nothing else is ever dropped
    ignored_checkpoint_keys: tuple[str, ...] = ()
    #: who builds the model: timm (`timm_name`), the zoo (a card), open_clip or transformers (`source`)
    library: Library = "timm"
    #: open_clip: "ARCH" or "ARCH/PRETRAINED"; transformers: a hub id or a local folder
    source: str | None = None


@dataclass
class LoadedVariant:
    """A built model (eval mode, on its device) with the preprocessing and labels that go with it."""

    spec: VariantSpec
    model: torch.nn.Module  # a timm model or a wrapped library model (`vitlens.lens.classifiers`)
    data_config: dict[str, Any]  # timm `resolve_data_config` dict merged with the spec's overrides
    class_names: list[str]
    ignored_keys: tuple[str, ...] = ()  # checkpoint keys dropped under `spec.ignored_checkpoint_keys`


PAPER_VARIANTS: tuple[VariantSpec, ...] = (
    VariantSpec("vit_b32", "vit_base_patch32_224.augreg_in21k_ft_in1k", "B/32", "hub",
                description="ViT-B/32, AugReg in21k->in1k"),
    VariantSpec("vit_b16", "vit_base_patch16_224.augreg_in21k_ft_in1k", "B/16", "hub",
                description="ViT-B/16, AugReg in21k->in1k"),
    VariantSpec("vit_l16", "vit_large_patch16_224.augreg_in21k_ft_in1k", "L/16", "hub",
                description="ViT-L/16, AugReg in21k->in1k"),
    VariantSpec("vit_miil", "vit_base_patch16_224_miil.in21k_ft_in1k", "MIIL", "hub",
                description="ViT-B/16 trained by Alibaba MIIL on ImageNet-21k-P, fine-tuned in1k"),
    VariantSpec("vit_gap", "vit_base_patch16_rpn_224.sw_in1k", "GAP", "hub",
                description="ViT-B/16, no CLS token, global average pooling, residual post-norm"),
    VariantSpec("vit_cifar100", "vit_base_patch16_224.augreg_in21k_ft_in1k", "CIFAR-100",
                "checkpoint", num_classes=100,
                description="ViT-B/16 fine-tuned on CIFAR-100: needs the fine-tuned checkpoint file"),
    VariantSpec("deit_refinement", "deit_base_patch16_224.fb_in1k", "Refinement", "checkpoint",
                ignored_checkpoint_keys=("transformerheads.",),
                description="DeiT-B of Naseer et al. 2022: needs deit_base_trm.pth; its refinement "
                            "modules (transformerheads.*) are dropped, as the authors' strict=False "
                            "load did, and every other key must match timm's deit_base_patch16_224"),
)


def _zoo_variants() -> list[VariantSpec]:
    """One spec per committed zoo card (sorted by name)."""
    return [
        VariantSpec(card["name"], None, card["role"], "zoo",
                    num_classes=len(card["class_names"]), library="zoo",
                    description=f"embedded zoo model ({card['role']} role), trained on the shapes set")
        for card in zoo.list_zoo_cards()
    ]


def list_variants() -> list[VariantSpec]:
    """Every named variant: the paper's seven, then the zoo (random twins and timm names are implicit)."""
    return list(PAPER_VARIANTS) + _zoo_variants()


def _random_twin(spec: VariantSpec) -> VariantSpec:
    """The random-initialised twin of `spec` (same architecture, seed `spec.random_seed`)."""
    return dataclasses.replace(
        spec, name=spec.name + RANDOM_SUFFIX, weights="random", checkpoint_path=None,
        description=f"random-initialised twin of {spec.name} (seed {spec.random_seed})",
    )


def get_variant(name: str) -> VariantSpec:
    """The spec of `name` (registry name, timm name, `timm:<name>`, `open_clip:ARCH[/TAG]`,
    `hf:ORG/NAME` or `hf:FOLDER`, each optionally `@random`)."""
    if name.endswith(RANDOM_SUFFIX):
        return _random_twin(get_variant(name[: -len(RANDOM_SUFFIX)]))
    library_spec = _library_variant(name)
    if library_spec is not None:
        return library_spec
    for spec in list_variants():
        if spec.name == name:
            return spec
    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if timm.is_model(timm_name):
        return VariantSpec(name, timm_name, "timm", "hub", description=f"timm model {timm_name}")
    known = ", ".join(spec.name for spec in list_variants())
    raise UserError(
        f"unknown model variant {name!r}: use one of {known}, a timm ViT name "
        f"(e.g. timm:vit_small_patch16_224), open_clip:ARCH[/PRETRAINED], hf:ORG/NAME, "
        f"or append {RANDOM_SUFFIX} for the random twin"
    )


def _library_variant(name: str) -> VariantSpec | None:
    """The spec of an `open_clip:` / `hf:` name (None for other names)."""
    for prefix, library in LIBRARY_PREFIXES.items():
        if not name.startswith(prefix):
            continue
        source = name[len(prefix):]
        if not source.strip("/"):
            raise UserError(f"variant {name!r} names no model after {prefix!r}")
        if library == "open_clip":
            if source.startswith(OPEN_CLIP_SCHEMAS):  # open_clip's own hub / local folder layout
                return VariantSpec(name, None, "open_clip", "hub", library=library, source=source,
                                   description=f"open_clip model {source} (config and weights from that place)")
            arch, _, tag = source.partition("/")
            if tag:
                return VariantSpec(name, None, "open_clip", "hub", library=library, source=source,
                                   description=f"open_clip {arch}, pretrained {tag!r} (open_clip's own download)")
            return VariantSpec(name, None, "open_clip", "checkpoint", library=library, source=source,
                               description=f"open_clip {arch} with weights from a local open_clip checkpoint file")
        return VariantSpec(name, None, "hf", "hub", library=library, source=source,
                           description=f"transformers model {source} (hub id or local save_pretrained folder)")
    return None


def with_options(
    spec: VariantSpec,
    checkpoint_path: str | Path | None = None,
    head_path: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VariantSpec:
    """`spec` with a checkpoint file (it becomes `weights="checkpoint"`), a head file, and
    timm kwargs (`num_classes` sets `spec.num_classes`, the rest override `spec.model_kwargs`).

    Zoo variants take none of them (they are built from their card); open_clip and transformers
    variants take a checkpoint file (open_clip) or folder (transformers) and a head file, no
    timm kwargs; `pretrained` is the weights source's to decide.
    """
    if spec.library in ("open_clip", "transformers"):
        if model_kwargs:
            raise UserError(f"variant {spec.name!r} is built by {spec.library}; it takes no timm kwargs "
                            f"([models.{spec.name}] is for timm models)")
        if checkpoint_path is not None:
            spec = dataclasses.replace(spec, weights="checkpoint", checkpoint_path=str(checkpoint_path))
        if head_path is not None:
            spec = dataclasses.replace(spec, head_path=str(head_path))
        return spec
    if spec.library == "zoo":
        for what, value in (("checkpoint file", checkpoint_path), ("head file", head_path),
                            ("timm kwargs", model_kwargs)):
            if value:
                raise UserError(f"zoo variant {spec.name!r} is built from its card and loads its own weights; "
                                f"it takes no {what}")
        return spec
    if checkpoint_path is not None:
        spec = dataclasses.replace(spec, weights="checkpoint", checkpoint_path=str(checkpoint_path))
    if head_path is not None:
        spec = dataclasses.replace(spec, head_path=str(head_path))
    if model_kwargs:
        kwargs = dict(model_kwargs)
        if "pretrained" in kwargs:
            raise UserError(f"variant {spec.name!r}: 'pretrained' is set by the weights source "
                            f"({spec.weights}), not by timm kwargs")
        num_classes = kwargs.pop("num_classes", spec.num_classes)
        spec = dataclasses.replace(spec, num_classes=num_classes, model_kwargs={**spec.model_kwargs, **kwargs})
    return spec


def _pretrained_classes(timm_name: str) -> int | None:
    """The class count of `timm_name`'s hub weights (None when timm has no pretrained config)."""
    try:
        config = timm.models.get_pretrained_cfg(timm_name)
    except (RuntimeError, KeyError, ValueError):
        return None
    return None if config is None else config.num_classes


def _check_spec(spec: VariantSpec) -> None:
    """Refuse a spec that would silently give a trained model a random classifier."""
    if spec.weights != "hub" or spec.num_classes is None or spec.library != "timm":
        return
    hub_classes = _pretrained_classes(spec.timm_name)
    if hub_classes is not None and spec.num_classes != hub_classes:
        raise UserError(
            f"variant {spec.name!r}: num_classes = {spec.num_classes} with the hub weights of "
            f"{spec.timm_name} ({hub_classes} classes) would give the pretrained model a random "
            f"classifier; give a head file ([heads] in a job, --head FILE) or use {spec.name}{RANDOM_SUFFIX}"
        )


def _build_model(spec: VariantSpec) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The model of `spec` with its weights (see `weights.py` for each source), its head file
    attached last; and the checkpoint keys dropped under `spec.ignored_checkpoint_keys`."""
    _check_spec(spec)
    if spec.library == "zoo":  # a zoo model or its random twin
        card = zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))
        if spec.weights == "random":
            torch.manual_seed(spec.random_seed)
        return zoo.build_zoo_model(card, load_weights=spec.weights != "random"), ()
    dropped: tuple[str, ...] = ()
    if spec.weights == "hub":
        model = create_hub_model(spec.timm_name, spec.num_classes, spec.model_kwargs)
    else:
        if spec.weights == "checkpoint" and spec.checkpoint_path is None:
            raise UserError(
                f"variant {spec.name!r} needs a checkpoint file: pass checkpoint_path "
                f"(CLI: --checkpoint FILE), or use {spec.name}{RANDOM_SUFFIX} for the baseline"
            )
        model = create_random_model(spec.timm_name, spec.random_seed, spec.num_classes, spec.model_kwargs)
        if spec.checkpoint_path is not None:
            dropped = load_checkpoint_file(model, spec.checkpoint_path, spec.ignored_checkpoint_keys)
    if spec.head_path is not None:
        attach_head(model, spec.head_path)
    return model, dropped


def is_headless(model: torch.nn.Module) -> bool:
    """True for a model without a classifier (`num_classes=0`: timm's head is an Identity)."""
    return getattr(model, "num_classes", None) == 0


def parameter_count(model: torch.nn.Module) -> int:
    """The number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def build_architecture(name_or_spec: str | VariantSpec) -> torch.nn.Module:
    """The variant's model on the meta device: the architecture only, no weight is loaded,
    read or downloaded (seconds, no memory), for checks before a job starts. A head file's
    tensor shapes are read and checked against the model (its values are not loaded).

    Raises UserError for unknown names, models timm cannot build, and head files that do not
    fit; whether the lens analyses the model is `vitlens.lens.describe_model`'s answer.
    """
    spec = get_variant(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    _check_spec(spec)
    if spec.library in ("open_clip", "transformers"):
        model = load_library_model(spec, meta=True).model
        if spec.head_path is not None:
            attach_head(model, spec.head_path, shapes_only=True)
        return model
    with torch.device("meta"):
        if spec.library == "zoo":
            model = zoo.build_zoo_model(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX)), load_weights=False)
        else:
            model = create_random_model(spec.timm_name, spec.random_seed, spec.num_classes, spec.model_kwargs)
        if spec.head_path is not None:
            attach_head(model, spec.head_path, shapes_only=True)
    return model


def zoo_card(name: str) -> dict[str, Any]:
    """The card of the zoo model `name`."""
    for card in zoo.list_zoo_cards():
        if card["name"] == name:
            return card
    raise UserError(f"no zoo card named {name!r} in {zoo.zoo_dir()}")


def _data_config(spec: VariantSpec, model: torch.nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing of `model` at its input size, then the card's and spec's overrides."""
    config = dict(resolve_data_config({}, model=model))
    # the pretrained config keeps its own size when model_kwargs change img_size: trust the model
    # (channels from timm's config: a hybrid's patch_embed.proj reads the CNN stem's features)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    try:  # the family adapter knows the input its token grid covers (NaFlexViT has no patch_embed)
        anatomy = adapter_for(model).anatomy
        img_size = tuple(g * c for g, c in zip(anatomy.grid_size, anatomy.token_cell))
    except UserError:
        pass  # an unsupported model: the lens refuses it with its reason later
    if img_size is not None:
        config["input_size"] = (int(config["input_size"][0]), *(int(i) for i in img_size))
    if spec.library == "zoo":
        config.update(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))["data_config"])
    config.update(spec.data_config_overrides)
    config["input_size"] = tuple(config["input_size"])
    config["mean"] = tuple(config["mean"])
    config["std"] = tuple(config["std"])
    return config


def load_variant(
    name_or_spec: str | VariantSpec,
    device: str | torch.device = "cpu",
    checkpoint_path: str | Path | None = None,
    head_path: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedVariant:
    """Build a variant in eval mode on `device`, with its data config and class names.

    `checkpoint_path` loads that file instead of the spec's weights (the spec becomes
    `weights="checkpoint"`), e.g. the CIFAR-100 or Refinement checkpoints; `head_path` gives
    the model that linear head (headless models); `model_kwargs` are timm kwargs
    (`num_classes`, `img_size`, ...; see `with_options`).
    """
    spec = get_variant(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    spec = with_options(spec, checkpoint_path, head_path, model_kwargs)
    if spec.library in ("open_clip", "transformers"):
        return _load_library_variant(spec, device)
    model, dropped = _build_model(spec)
    model = model.eval().to(device)
    if spec.library == "zoo":
        class_names = list(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))["class_names"])
    else:
        class_names = _head_class_names(spec, int(model.num_classes)) or class_names_for(int(model.num_classes))
    return LoadedVariant(spec, model, _data_config(spec, model), class_names, dropped)


def _head_class_names(spec: VariantSpec, num_classes: int) -> list[str] | None:
    """The class names the spec's head file records (zero-shot heads do), checked against C."""
    if spec.head_path is None:
        return None
    classes = head_file_classes(spec.head_path)
    if classes is None:
        return None
    if len(classes.names) != num_classes:
        raise UserError(f"head file {spec.head_path} names {len(classes.names)} classes but holds {num_classes} rows")
    return list(classes.names)


def load_library_model(spec: VariantSpec, device: str | torch.device = "cpu", meta: bool = False) -> LibraryModel:
    """The open_clip / transformers model of `spec` through its library's loader (no head file
    attached yet); `meta` builds the architecture only, on the meta device."""
    seed = spec.random_seed if spec.weights == "random" else None
    if spec.weights == "checkpoint" and spec.checkpoint_path is None:
        what = "open_clip checkpoint file" if spec.library == "open_clip" else "save_pretrained folder"
        raise UserError(f"variant {spec.name!r} needs a local {what}: give it under [checkpoints] in the job "
                        f"(CLI: --checkpoint PATH), name pretrained weights, or use {spec.name}{RANDOM_SUFFIX}")
    if spec.library == "open_clip":
        from vitlens.models.open_clip_models import load_open_clip

        source = spec.source or ""
        arch, _, tag = (source, "", "") if source.startswith(OPEN_CLIP_SCHEMAS) else source.partition("/")
        return load_open_clip(arch, tag or None if spec.weights == "hub" else None,
                              checkpoint=spec.checkpoint_path if spec.weights == "checkpoint" else None,
                              random_seed=seed, device=str(device), meta=meta,
                              preprocess_from=tag or None)  # a random twin sees the trained twin's pixels
    from vitlens.models.hf_models import load_hf_model

    source = spec.checkpoint_path if spec.weights == "checkpoint" else spec.source
    return load_hf_model(str(source), random_seed=seed, device=str(device), meta=meta)


def _load_library_variant(spec: VariantSpec, device: str | torch.device) -> LoadedVariant:
    """An open_clip / transformers variant: the library's model, its head file, its names."""
    loaded = load_library_model(spec, device)
    model = loaded.model
    if spec.head_path is not None:
        attach_head(model, spec.head_path)
    model = model.eval().to(device)
    num_classes = int(model.num_classes)
    class_names = _head_class_names(spec, num_classes)
    if class_names is None:
        own = loaded.class_names if spec.head_path is None else None
        class_names = list(own) if own is not None and len(own) == num_classes else class_names_for(num_classes)
    config = {**loaded.data_config, **spec.data_config_overrides}
    for key in ("input_size", "mean", "std"):
        config[key] = tuple(config[key])
    return LoadedVariant(spec, model, config, class_names)
