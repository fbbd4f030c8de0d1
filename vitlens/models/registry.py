"""The ONE variant registry: the paper's seven ViTs, the embedded zoo, and any timm ViT by name.

Names:
- the paper's variants by short name (`vit_b32`, `vit_b16`, `vit_l16`, `vit_miil`, `vit_gap`,
  `vit_cifar100`, `deit_refinement`; METHOD §8), hub weights or a required checkpoint file;
- the embedded zoo (`shapes_vit_p16`, ...), discovered from the cards in `vitlens/models/zoo/`;
- any timm model by its timm name, optionally prefixed `timm:` (hub weights); whether the
  lens analyses it is its family adapter's call (`vitlens.lens.families`), not the registry's;
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
from vitlens.models.weights import (
    attach_head,
    create_hub_model,
    create_random_model,
    load_checkpoint_file,
)

WeightsSource = Literal["hub", "checkpoint", "zoo", "random"]
RANDOM_SUFFIX = "@random"
TIMM_PREFIX = "timm:"
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


@dataclass
class LoadedVariant:
    """A built model (eval mode, on its device) with the preprocessing and labels that go with it."""

    spec: VariantSpec
    model: torch.nn.Module  # a timm model (the lens's adapters decide whether they analyse it)
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
                    num_classes=len(card["class_names"]),
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
    """The spec of `name` (registry name, timm name, `timm:<name>`, each optionally `@random`)."""
    if name.endswith(RANDOM_SUFFIX):
        return _random_twin(get_variant(name[: -len(RANDOM_SUFFIX)]))
    for spec in list_variants():
        if spec.name == name:
            return spec
    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if timm.is_model(timm_name):
        return VariantSpec(name, timm_name, "timm", "hub", description=f"timm model {timm_name}")
    known = ", ".join(spec.name for spec in list_variants())
    raise UserError(
        f"unknown model variant {name!r}: use one of {known}, a timm ViT name "
        f"(e.g. timm:vit_small_patch16_224), or append {RANDOM_SUFFIX} for the random twin"
    )


def with_options(
    spec: VariantSpec,
    checkpoint_path: str | Path | None = None,
    head_path: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> VariantSpec:
    """`spec` with a checkpoint file (it becomes `weights="checkpoint"`), a head file, and
    timm kwargs (`num_classes` sets `spec.num_classes`, the rest override `spec.model_kwargs`).

    Zoo variants take none of them (they are built from their card); `pretrained` is the
    weights source's to decide.
    """
    if spec.timm_name is None:
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
    if spec.weights != "hub" or spec.num_classes is None or spec.timm_name is None:
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
    if spec.timm_name is None:  # a zoo model or its random twin
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
    with torch.device("meta"):
        if spec.timm_name is None:
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
    if spec.timm_name is None:
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
    model, dropped = _build_model(spec)
    model = model.eval().to(device)
    if spec.timm_name is None:
        class_names = list(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))["class_names"])
    else:
        class_names = class_names_for(int(model.num_classes))
    return LoadedVariant(spec, model, _data_config(spec, model), class_names, dropped)
