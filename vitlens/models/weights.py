"""Building a timm model with its weights from one source: the hub, a local checkpoint, or a
fixed seed; and a linear head from its own file (headless models, METHOD §1b).

Every path either returns a model carrying the requested weights or raises `UserError`;
none falls back to random weights, and none loads a checkpoint partially: the only keys a
checkpoint may carry beyond the model's are those under the prefixes the variant names
(`VariantSpec.ignored_checkpoint_keys`, e.g. the Refinement variant's `transformerheads.`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from timm.models import load_checkpoint, load_state_dict

from vitlens.errors import UserError

#: Keys of a head file (a state dict of one linear layer), bare or under `head.`.
HEAD_KEYS: tuple[str, ...] = ("weight", "bias")
HEAD_PREFIX = "head."
#: At most this many keys are named in a mismatch message (then "and N more").
KEYS_NAMED = 8


def create_random_model(
    timm_name: str, seed: int, num_classes: int | None, model_kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """A `pretrained=False` timm model initialised under `torch.manual_seed(seed)` (the baseline)."""
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)
    try:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError, NotImplementedError) as err:
        raise UserError(f"cannot build timm model {timm_name!r} with {kwargs}: {err}") from err


def create_hub_model(
    timm_name: str, num_classes: int | None, model_kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """A timm model with its pretrained hub weights (needs the weights cached or internet access)."""
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # network/cache errors come in many types; all mean "no weights"
        raise UserError(
            f"cannot load the hub weights of timm model {timm_name!r} ({type(err).__name__}: {err}); "
            "download them first, pass a local checkpoint file, or use the NAME@random baseline"
        ) from err


def _named(keys: Sequence[str]) -> str:
    """`keys` for a one-line message: the first `KEYS_NAMED`, then how many more."""
    shown = ", ".join(keys[:KEYS_NAMED])
    return shown + (f" and {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else "")


def load_checkpoint_file(
    model: torch.nn.Module, checkpoint_path: str | Path, ignored_prefixes: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """Load a local checkpoint into `model`; return the checkpoint keys it dropped.

    PyTorch (`.pth`, `.pt`, `.bin`) and `.safetensors` files are read as state dicts: the
    `state_dict` entry, else `model`, else the file itself (EMA entries are never picked
    silently; `module.` wrappers are stripped). Keys starting with one of `ignored_prefixes`
    are dropped (and returned); every other key must match the model exactly — a missing or
    unexpected key, or a shape mismatch, raises `UserError` naming them, and the model is
    then not to be used. Original JAX `.npz` files go to the model's own `load_pretrained`
    (timm's `custom_load` path).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        if path.suffix.lower() in (".npz", ".npy"):
            load_checkpoint(model, str(path), strict=True)
            return ()
        state = load_state_dict(str(path), use_ema=False)
    except Exception as err:  # torch.load / numpy / safetensors errors share no base class
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"cannot read checkpoint {path}: it holds no state dict of tensors")
    dropped = tuple(key for key in state if ignored_prefixes and key.startswith(ignored_prefixes))
    kept = {key: value for key, value in state.items() if key not in set(dropped)}
    expected = model.state_dict()
    missing = [key for key in expected if key not in kept]
    unexpected = [key for key in kept if key not in expected]
    wrong_shape = [f"{key} {list(kept[key].shape)} (model: {list(expected[key].shape)})"
                   for key in kept if key in expected and kept[key].shape != expected[key].shape]
    problems = [f"{what} key(s) {_named(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape)) if keys]
    if problems:
        ignored = (f" (keys under {', '.join(ignored_prefixes)} are ignored for this variant)"
                   if ignored_prefixes else "")
        raise UserError(f"checkpoint {path} does not match the model architecture: {'; '.join(problems)}{ignored}")
    model.load_state_dict(kept, strict=True)
    return dropped


def read_head_file(head_path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear head stored in `head_path`: (weight [C, d], bias [C] or None).

    A head file is the state dict of one linear layer — `weight` and optional `bias`, or the
    same under `head.` — saved by `torch.save` (optionally wrapped in `state_dict`/`model`)
    or as `.safetensors`. Any other key, or tensors of the wrong rank or sizes, raise
    `UserError` naming the file.
    """
    path = Path(head_path)
    if not path.is_file():
        raise UserError(f"head file not found: {path}")
    try:
        state = load_state_dict(str(path), use_ema=False)
    except Exception as err:  # torch.load / safetensors errors share no base class
        raise UserError(f"cannot read head file {path} ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise UserError(f"cannot read head file {path}: it holds no state dict")
    bare = {key.removeprefix(HEAD_PREFIX): value for key, value in state.items()}
    extra = [key for key in state if key.removeprefix(HEAD_PREFIX) not in HEAD_KEYS]
    if extra or len(bare) != len(state) or "weight" not in bare:  # len: both 'weight' and 'head.weight'?
        found = _named(sorted(state)) or "nothing"
        raise UserError(f"head file {path} must hold 'weight' [C, d] and optionally 'bias' [C] "
                        f"(or 'head.weight' / 'head.bias'), not {found}")
    weight, bias = bare["weight"], bare.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[0] < 1:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UserError(f"head file {path}: 'weight' must be a [C, d] tensor, not {shape}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise UserError(f"head file {path}: 'bias' must be a [{weight.shape[0]}] tensor "
                        f"(one per row of weight {list(weight.shape)}), not {shape}")
    return weight, bias


def attach_head(model: torch.nn.Module, head_path: str | Path, shapes_only: bool = False) -> torch.nn.Module:
    """Give `model` the linear head of `head_path` (METHOD §1b, headless models).

    The classifier is rebuilt for the file's C classes (`model.reset_classifier(C)`, so
    `model.num_classes == C` and `model(x)` uses it), then the file's tensors are loaded
    into it strictly: a `d` other than the head input the model feeds refuses with both
    shapes. A file without `bias` leaves the head without one. `shapes_only` checks and
    rebuilds without copying values (for models on the meta device).
    """
    weight, bias = read_head_file(head_path)
    if not hasattr(model, "reset_classifier") or not hasattr(model, "head"):
        raise UserError(f"head file {head_path}: {type(model).__name__} has no timm classifier head to replace")
    if isinstance(getattr(model, "head_dist", None), torch.nn.Module):
        raise UserError(f"head file {head_path}: {type(model).__name__} has two heads (head and head_dist); "
                        "a head file gives one")
    model.reset_classifier(int(weight.shape[0]))
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"head file {head_path}: {type(model).__name__}'s classifier is a "
                        f"{type(head).__name__}, not a linear layer")
    if tuple(head.weight.shape) != tuple(weight.shape):
        raise UserError(f"head file {head_path} does not fit {type(model).__name__}: its weight is "
                        f"{list(weight.shape)}, the model's head takes [{weight.shape[0]}, {head.in_features}]")
    if bias is None:
        head.bias = None
    if not shapes_only:
        state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        head.load_state_dict(state, strict=True)
    return model
