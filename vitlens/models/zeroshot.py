"""Class spaces from text (METHOD §1c): prompts, class names, the class embedding, head files.

For class `c` with name `n_c` and templates `t_1..t_K`, every prompt `t_k(n_c)` is embedded by
the model's own text tower, each embedding L2-normalised, their mean taken and normalised
again: `E_c`. The class space is then a linear layer over the normalised image feature,
`weight = s · E` (s = exp(logit_scale)) and `bias = b` for every class (SigLIP's logit_bias),
so that `head(n(features(x)))` are the library's own zero-shot logits.

A zero-shot head file is an ordinary vitlens head file (`weight` [C, d'], optional `bias` [C],
`vitlens.models.weights.read_head_file`) in `.safetensors`, whose metadata also records what
built it (string values, lists as JSON): the class names (which the variant then reports), the label
space they index, the templates, the model and the scale. `vitlens heads zeroshot` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitlens.errors import UserError
from vitlens.models.library import LibraryModel, TextEncoder

#: `--classes imagenet`: the 1000 CLIP-curated ImageNet-1k names, in ImageNet-1k index order
IMAGENET_CLASSES = "imagenet"
#: the label space of ImageNet-1k indices (ImageNet-S shards' `class_index` is one of them)
IMAGENET_LABEL_SPACE = "imagenet-1k"
#: the placeholder of a class name in a template line
PLACEHOLDER = "{}"


def _resource_lines(name: str) -> list[str]:
    """The non-empty lines of a file in `vitlens/resources/zeroshot/`."""
    text = resources.files("vitlens").joinpath("resources", "zeroshot", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def openai_imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates (open_clip's zero-shot metadata), `{}` = the name."""
    return _resource_lines("openai_imagenet_templates.txt")


def imagenet_class_names() -> list[str]:
    """The 1000 CLIP-curated ImageNet-1k class names, in index order (open_clip's `IMAGENET_CLASSNAMES`)."""
    return _resource_lines("openai_imagenet_classnames.txt")


@dataclass(frozen=True)
class ClassList:
    """Class names in label-index order, and the label space their indices are."""

    names: tuple[str, ...]
    label_space: str  # "imagenet-1k", "dataset:<name>" (a shard manifest), or "names:<file name>"


def read_class_names(source: str | Path) -> ClassList:
    """Class names from `imagenet` (the bundled CLIP names), a shard `manifest.json` (its
    `class_names`, e.g. the shapes set's own), or a text file with one name per line.

    Raises UserError naming the file for a missing file, an empty list or a repeated name.
    """
    if str(source) == IMAGENET_CLASSES:
        return ClassList(tuple(imagenet_class_names()), IMAGENET_LABEL_SPACE)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"class names file not found: {path} (give a text file, one name per line, "
                        f"a shard manifest.json, or '{IMAGENET_CLASSES}')")
    if path.suffix.lower() == ".json":
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            names = manifest["class_names"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a shard manifest with class_names ({err})") from err
        if data_label_space(manifest) == IMAGENET_LABEL_SPACE:  # ImageNet-S: its 1000-class index space
            return ClassList(tuple(imagenet_class_names()), IMAGENET_LABEL_SPACE)
        return ClassList(_checked_names(names, path), data_label_space(manifest))
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return ClassList(_checked_names([line for line in lines if line], path), f"names:{path.name}")


def data_label_space(manifest: dict) -> str:
    """The label space a shard manifest's `class_index` values index: ImageNet-S shards
    (`dataset` imagenet_s50 / 300 / 919) use ImageNet-1k indices; other sets their own list."""
    dataset = str(manifest.get("dataset", ""))
    return IMAGENET_LABEL_SPACE if dataset.startswith("imagenet_s") else f"dataset:{dataset}"


def class_space_mismatch(classes: ClassList, manifest: dict) -> str | None:
    """Why a class space cannot label a data set's images (None when it can): ImageNet-S data
    needs the ImageNet-1k label space; any other set exactly its manifest's class names, in order."""
    space = data_label_space(manifest)
    if space == IMAGENET_LABEL_SPACE:
        if classes.label_space != IMAGENET_LABEL_SPACE:
            return (f"the data ({manifest.get('dataset')}) is labelled with ImageNet-1k indices but the class "
                    f"space is {classes.label_space!r} ({len(classes.names)} classes); build it with --classes imagenet")
        return None
    names = list(manifest.get("class_names") or [])
    if list(classes.names) != names:
        first = next((i for i, (a, b) in enumerate(zip(classes.names, names)) if a != b), min(len(names), len(classes.names)))
        return (f"the class space ({classes.label_space}, {len(classes.names)} classes) is not the data's "
                f"{manifest.get('dataset')!r} class list ({len(names)} classes; first difference at index {first}); "
                "build it from the data's manifest: --classes MANIFEST")
    return None


def _checked_names(names: Sequence[str], path: Path) -> tuple[str, ...]:
    """`names` as a tuple, refusing an empty list or a repeated name (naming the file)."""
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise UserError(f"{path}: no class names (or an empty one)")
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise UserError(f"{path}: class name {name!r} appears twice (again at index {index})")
        seen.add(name)
    return tuple(names)


def read_templates(path: str | Path | None) -> list[str]:
    """Prompt templates from a text file, one per line with one `{}` for the class name; None
    gives the 80 OpenAI ImageNet templates. Raises UserError naming the file and line."""
    if path is None:
        return openai_imagenet_templates()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"templates file not found: {path}")
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.count(PLACEHOLDER) != 1:
            raise UserError(f"{path}:{number}: a template needs exactly one {PLACEHOLDER} for the class name: {line!r}")
        templates.append(line)
    if not templates:
        raise UserError(f"{path}: no templates")
    return templates


def class_embedding_from_text(
    text: TextEncoder, class_names: Sequence[str], templates: Sequence[str], progress: bool = False,
) -> torch.Tensor:
    """E (METHOD §1c): per class, the normalised mean of the normalised prompt embeddings.

    `text` maps prompts to the library's own text features; one call per class (all its
    templates in one batch, as open_clip's `build_zero_shot_classifier` does).

    # -> E: [C, d'] float32, unit rows
    """
    rows = []
    for name in tqdm(class_names, desc="class prompts", unit="class", disable=not progress):
        prompts = [template.replace(PLACEHOLDER, name) for template in templates]
        with torch.inference_mode():
            features = F.normalize(text(prompts).float(), dim=-1)  # [K, d']
        rows.append(F.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zeroshot_head_tensors(
    embedding: torch.Tensor, logit_scale: float, logit_bias: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head file's tensors: `weight = s · E`, `bias = b` repeated per class (or None).

    # embedding: [C, d'] -> (weight [C, d'], bias [C] | None)
    """
    weight = embedding.float() * float(logit_scale)
    bias = None if logit_bias is None else torch.full((embedding.shape[0],), float(logit_bias))
    return weight.contiguous(), bias


def attach_class_space(
    loaded: LibraryModel, class_names: Sequence[str], templates: Sequence[str],
) -> torch.nn.Module:
    """Give a loaded contrastive model the class space of `class_names` in place (what a head
    file written by `vitlens heads zeroshot` would give it) and return the model."""
    if loaded.text is None or loaded.logit_scale is None:
        raise UserError(f"{loaded.description or type(loaded.model).__name__}: no text tower to build a class space")
    weight, bias = zeroshot_head_tensors(class_embedding_from_text(loaded.text, class_names, templates),
                                         loaded.logit_scale, loaded.logit_bias)
    model = loaded.model
    model.reset_classifier(len(class_names))
    head = model.head
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        if bias is None:
            head.bias = None
        else:
            head.bias.copy_(bias.to(head.bias))
    return model


def write_zeroshot_head(
    path: str | Path, weight: torch.Tensor, bias: torch.Tensor | None, classes: ClassList,
    templates: Sequence[str], model: str, logit_scale: float, logit_bias: float | None,
) -> Path:
    """Write a zero-shot head file (`.safetensors`, its metadata as the module notes say).

    # weight: [C, d'], bias: [C] | None
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: a zero-shot head file is written as .safetensors (its metadata keeps the class names)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": weight.contiguous()} if bias is None else {"weight": weight.contiguous(), "bias": bias.contiguous()}
    metadata = {
        "vitlens_head": "zeroshot", "class_names": json.dumps(list(classes.names)),
        "label_space": classes.label_space, "templates": json.dumps(list(templates)), "model": model,
        "logit_scale": repr(float(logit_scale)), "logit_bias": "" if logit_bias is None else repr(float(logit_bias)),
    }
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def head_file_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a `.safetensors` head file (empty for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a broken header
        raise UserError(f"cannot read head file {path} ({type(err).__name__}: {err})") from err


def head_file_classes(path: str | Path) -> ClassList | None:
    """The class names and label space a head file records (None when it records none)."""
    metadata = head_file_metadata(path)
    if "class_names" not in metadata:
        return None
    try:
        names = json.loads(metadata["class_names"])
    except ValueError as err:
        raise UserError(f"head file {path}: its class_names metadata is not JSON ({err})") from err
    return ClassList(tuple(names), metadata.get("label_space", ""))

