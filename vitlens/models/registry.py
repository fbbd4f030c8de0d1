"""The ONE variant registry: the paper's seven ViTs, the embedded zoo, and any timm ViT by name.

Names:
- the paper's variants by short name (`vit_b32`, `vit_b16`, `vit_l16`, `vit_miil`, `vit_gap`,
  `vit_cifar100`, `deit_refinement`; METHOD §8), hub weights or a required checkpoint file;
- the embedded zoo (`shapes_vit_p16`, ...), discovered from the cards in `vitlens/models/zoo/`;
- any timm `VisionTransformer` by its timm name, optionally prefixed `timm:` (hub weights);
- `NAME@random`: the random-initialised twin of NAME (`pretrained=False`, `torch.manual_seed(0)`
  before construction), the paper's baseline.

Unknown names and missing weight files raise `UserError`; nothing falls back to random weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.models import zoo
from vitlens.models.class_names import class_names_for
from vitlens.models.weights import (
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


@dataclass
class LoadedVariant:
    """A built model (eval mode, on its device) with the preprocessing and labels that go with it."""

    spec: VariantSpec
    model: VisionTransformer
    data_config: dict[str, Any]  # timm `resolve_data_config` dict merged with the spec's overrides
    class_names: list[str]


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
                description="DeiT-B of Naseer et al. 2022: needs deit_base_trm.pth; only checkpoints "
                            "whose keys match timm's deit_base_patch16_224 load (refinement modules "
                            "are not in timm and are rejected with the offending keys)"),
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


def _build_model(spec: VariantSpec) -> torch.nn.Module:
    """The model of `spec` with its weights (see `weights.py` for each source)."""
    if spec.timm_name is None:  # a zoo model or its random twin
        card = zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))
        if spec.weights == "random":
            torch.manual_seed(spec.random_seed)
        return zoo.build_zoo_model(card, load_weights=spec.weights != "random")
    if spec.weights == "hub":
        return create_hub_model(spec.timm_name, spec.num_classes, spec.model_kwargs)
    if spec.weights == "checkpoint" and spec.checkpoint_path is None:
        raise UserError(
            f"variant {spec.name!r} needs a checkpoint file: pass checkpoint_path "
            f"(CLI: --checkpoint FILE), or use {spec.name}{RANDOM_SUFFIX} for the baseline"
        )
    model = create_random_model(spec.timm_name, spec.random_seed, spec.num_classes, spec.model_kwargs)
    if spec.checkpoint_path is not None:
        load_checkpoint_file(model, spec.checkpoint_path)
    return model


def _require_vit(spec: VariantSpec, model: torch.nn.Module) -> VisionTransformer:
    """`model`, or the registry's one-line refusal when it is no timm VisionTransformer."""
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"variant {spec.name!r} is a {type(model).__name__}, not a timm VisionTransformer"
        )
    return model


def build_architecture(name_or_spec: str | VariantSpec) -> VisionTransformer:
    """The variant's model on the meta device: the architecture only, no weight is loaded,
    read or downloaded (seconds, no memory), for checks before a job starts.

    Raises UserError for unknown names, models timm cannot build, and non-ViT models.
    """
    spec = get_variant(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    with torch.device("meta"):
        if spec.timm_name is None:
            model = zoo.build_zoo_model(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX)), load_weights=False)
        else:
            model = create_random_model(spec.timm_name, spec.random_seed, spec.num_classes, spec.model_kwargs)
    return _require_vit(spec, model)


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
    config["input_size"] = (int(config["input_size"][0]), *model.patch_embed.img_size)
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
) -> LoadedVariant:
    """Build a variant in eval mode on `device`, with its data config and class names.

    `checkpoint_path` loads that file instead of the spec's weights (the spec becomes
    `weights="checkpoint"`), e.g. the CIFAR-100 or Refinement checkpoints.
    """
    spec = get_variant(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    if checkpoint_path is not None:
        if spec.timm_name is None:
            raise UserError(f"zoo variant {spec.name!r} loads its own weights; drop the checkpoint")
        spec = dataclasses.replace(spec, weights="checkpoint", checkpoint_path=str(checkpoint_path))
    model = _require_vit(spec, _build_model(spec))
    model = model.eval().to(device)
    if spec.timm_name is None:
        class_names = list(zoo_card(spec.name.removesuffix(RANDOM_SUFFIX))["class_names"])
    else:
        class_names = class_names_for(model.num_classes)
    return LoadedVariant(spec, model, _data_config(spec, model), class_names)
