"""Which models the lens analyses exactly: one `CoverageRow` per model, shared by
`vitlens models check` and `benchmarks/coverage_sweep.py`.

For one model name, `check_model` builds its random twin (`NAME@random`: no download), runs
`vitlens.lens.parity.check_parity` on two random images at the model's input size, and
reports what the lens sees (family, prefix tokens, token grid and cell, experiments that do
not apply). open_clip and transformers names (`open_clip:ARCH`, `hf:ORG/NAME`) are checked the
same way; a contrastive tower gets a zero-shot class space from its own (random) text tower
for the check (`ZERO_SHOT_CHECK_CLASSES`), as a job gets one from a head file. Every outcome
is one of `STATUSES`:

- `ok`: both parity checks hold (METHOD §1b);
- `refused`: the registry, timm or the family adapter refused it with a one-line reason;
- `wrong`: the adapter accepted the model but parity fails — a bug to fix, never analysed;
- `crash`: any other exception (a bug), its last line as the reason;
- `too_large`: more parameters (counted on the meta device) than the limit; not built.

`python -m vitlens.models.coverage NAME` prints one row as JSON (the sweep runs each model in
its own subprocess with a timeout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import timm
import torch

from vitlens.errors import UserError, one_line_reason
from vitlens.lens.classifiers import ZeroShotClassifier, adapter_key
from vitlens.lens.families import adapter_for
from vitlens.lens.parity import check_parity
from vitlens.models.registry import (
    RANDOM_SUFFIX,
    VariantSpec,
    build_architecture,
    get_variant,
    is_headless,
    load_library_model,
    load_variant,
    parameter_count,
    with_options,
)
from vitlens.models.library import LibraryModel, TextUnavailable
from vitlens.models.zeroshot import attach_class_space, imagenet_class_names, openai_imagenet_templates

#: The timm modules (`timm.models._registry._model_to_module`) whose architectures the sweep covers.
COVERED_MODULES: tuple[str, ...] = (
    "vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit", "cait", "xcit",
    "naflexvit", "vision_transformer_relpos", "vitamin",
)
STATUSES: tuple[str, ...] = ("ok", "refused", "wrong", "crash", "too_large")
DEFAULT_MAX_PARAMS = 700_000_000
#: The classes a headless model's random twin gets when the check gives it a head itself.
HEADLESS_CLASSES = 1000
PARITY_IMAGES = 2
#: a zero-shot tower's check builds its class space from these class names and templates
ZERO_SHOT_CHECK_CLASSES: tuple[str, ...] = tuple(imagenet_class_names()[:10])
ZERO_SHOT_CHECK_TEMPLATES = 2
IMAGE_SEED = 0


@dataclass(frozen=True)
class CoverageRow:
    """What the check found for one model (None / empty where it did not get that far)."""

    name: str
    timm_module: str  # timm's module of the architecture, e.g. "eva" ("" when unknown)
    model_class: str  # the timm class, e.g. "Eva" ("" when timm could not build it)
    family: str  # the adapter's family, else the timm class
    params: int | None
    status: str  # one of STATUSES
    reason: str = ""  # one line: why refused / wrong / crash / too_large
    forward_error: float | None = None  # max |hooked forward - model(x)|
    projection_error: float | None = None  # max |parity_logits - model(x)|
    prefix: int | None = None  # prefix tokens (CLS, distillation, registers)
    grid: tuple[int, int] | None = None  # image-token grid (rows, columns)
    cell: tuple[int, int] | None = None  # input pixels one image token covers
    skipped: tuple[tuple[str, str], ...] = ()  # (experiment, reason) that do not apply
    note: str = ""  # e.g. that a headless model was given num_classes for the check

    @property
    def ok(self) -> bool:
        """True when the lens analyses the model exactly."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CoverageRow":
        """The row `to_json` wrote."""
        values = dict(data)
        for key in ("grid", "cell"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        values["skipped"] = tuple(tuple(pair) for pair in values.get("skipped") or ())
        return cls(**values)


def timm_module_of(timm_name: str | None, model: torch.nn.Module | None = None) -> str:
    """timm's module of an architecture name (tag dropped), else the model class's module."""
    from timm.models._registry import _model_to_module  # the only table of name -> module

    if timm_name is not None:
        module = _model_to_module.get(timm_name.split(".")[0])
        if module:
            return module
    return type(model).__module__.rsplit(".", 1)[-1] if model is not None else ""


def timm_models(modules: Sequence[str] = COVERED_MODULES) -> list[str]:
    """Every `timm.list_models()` architecture whose timm module is one of `modules`, sorted."""
    return sorted(name for name in timm.list_models() if timm_module_of(name) in modules)


def random_spec(name: str) -> VariantSpec:
    """The `NAME@random` twin of `name` (raises `UserError` for an unknown name)."""
    return get_variant(name if name.endswith(RANDOM_SUFFIX) else name + RANDOM_SUFFIX)


def check_model(
    name: str,
    max_params: int = DEFAULT_MAX_PARAMS,
    head_path: str | None = None,
    headless_classes: int | None = None,
    seed: int = IMAGE_SEED,
) -> CoverageRow:
    """Build the random twin of `name`, check parity, and describe what the lens sees.

    `head_path` gives the model that linear head; `headless_classes` (the `--all-timm` mode)
    builds a headless model with that many classes instead of refusing it, and says so in
    `note`. Raises `UserError` only for an unknown name (or a head file for a zoo model);
    every other outcome is a row.
    """
    spec = with_options(random_spec(name), head_path=head_path)
    display = name.removesuffix(RANDOM_SUFFIX)
    library = spec.library in ("open_clip", "transformers")
    module = spec.library if library else timm_module_of(spec.timm_name)
    row = dict(name=display, timm_module=module, model_class="", family="", params=None)

    def finish(status: str, reason: str = "", **found: Any) -> CoverageRow:
        values = {**row, **found}
        values["family"] = values["family"] or values["model_class"] or values["timm_module"]
        return CoverageRow(status=status, reason=one_line_reason(reason) if reason else "", **values)

    try:
        meta = build_architecture(spec)
        row.update(model_class=adapter_key(meta).__name__,
                   timm_module=module if library else timm_module_of(spec.timm_name, meta))
        zero_shot = isinstance(meta, ZeroShotClassifier) and meta.num_classes == 0
        if zero_shot:  # a contrastive tower: a class space from its own text tower, as a job's head file
            meta.reset_classifier(len(ZERO_SHOT_CHECK_CLASSES))
            row["note"] = (f"zero-shot: class space from {len(ZERO_SHOT_CHECK_CLASSES)} ImageNet names x "
                           f"{ZERO_SHOT_CHECK_TEMPLATES} templates")
        if is_headless(meta) and head_path is None and headless_classes is not None:
            spec = dataclasses.replace(spec, num_classes=headless_classes)
            meta = build_architecture(spec)
            row["note"] = f"headless: checked with num_classes={headless_classes}"
        row["params"] = parameter_count(meta)
        if row["params"] > max_params:
            return finish("too_large", f"{row['params']:,} parameters > the limit of {max_params:,}")
        row["family"] = adapter_for(meta).family  # refused on the meta device as a job's variant check does
        del meta
        if zero_shot:
            library_model = load_library_model(spec)
            model, row["note"] = _with_check_class_space(library_model, row["note"])
            input_size = library_model.data_config["input_size"]
        else:
            loaded = load_variant(spec)
            model, input_size = loaded.model, loaded.data_config["input_size"]
        adapter = adapter_for(model)
        anatomy = adapter.anatomy
        row.update(family=adapter.family or row["model_class"], prefix=anatomy.num_prefix_tokens,
                   grid=tuple(anatomy.grid_size), cell=tuple(anatomy.token_cell), skipped=tuple(anatomy.skipped))
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(PARITY_IMAGES, *input_size, generator=generator)
        parity = check_parity(model, images)
    except UserError as err:
        return finish("refused", str(err))
    except Exception as err:  # a bug in an adapter or in timm: reported, never hidden
        return finish("crash", one_line_reason(err))
    errors = dict(forward_error=parity.forward_error, projection_error=parity.projection_error)
    if parity.ok:
        return finish("ok", **errors)
    return finish("wrong", f"parity fails: forward error {parity.forward_error:.2e}, projection error "
                           f"{parity.projection_error:.2e} (tolerance {parity.tolerance:.1e})", **errors)


def _with_check_class_space(loaded: LibraryModel, note: str) -> tuple[torch.nn.Module, str]:
    """The zero-shot tower with the check's class space from its own text tower; where that
    tower's tokenizer cannot be built here (a hub tokenizer, offline), random unit rows (the
    image-side parity does not depend on which rows), said in the note."""
    templates = openai_imagenet_templates()[:ZERO_SHOT_CHECK_TEMPLATES]
    try:
        return attach_class_space(loaded, ZERO_SHOT_CHECK_CLASSES, templates).eval(), note
    except TextUnavailable:
        generator = torch.Generator().manual_seed(IMAGE_SEED)
        rows = torch.nn.functional.normalize(torch.randn(len(ZERO_SHOT_CHECK_CLASSES), loaded.model.feature_dim,
                                                         generator=generator), dim=-1)
        model = loaded.model
        model.reset_classifier(len(rows))
        with torch.no_grad():
            model.head.weight.copy_(rows * float(loaded.logit_scale or 1.0))
            model.head.bias = None
        return model.eval(), "zero-shot: text tokenizer unavailable offline, class space of 10 random unit rows"


def parse_count(text: str) -> int:
    """A parameter count such as `700000000`, `700M`, `1.5B` or `86k` (argparse type)."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 700M, 1.5B, 86000000)") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"a parameter count must be >= 1, not {text!r}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Check one model and print its row as one line of JSON (exit 0 whatever the status;
    2 with a one-line message for an unknown name)."""
    parser = argparse.ArgumentParser(prog="python -m vitlens.models.coverage", description=main.__doc__)
    parser.add_argument("name", help="a registry or timm model name (its random twin is checked)")
    parser.add_argument("--max-params", type=parse_count, default=DEFAULT_MAX_PARAMS)
    parser.add_argument("--head", default=None, help="linear-head file for the model")
    parser.add_argument("--headless-classes", type=int, default=None,
                        help=f"give a headless model this many classes (the sweep: {HEADLESS_CLASSES})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        row = check_model(args.name, args.max_params, args.head, args.headless_classes)
    except UserError as err:
        print(f"coverage: error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(row.to_json()), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
