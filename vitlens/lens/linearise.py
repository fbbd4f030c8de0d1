"""The head path with its per-token scales detached: what METHOD §6's `ln="frozen"` gradients
and §3b's direct logit attribution (DLA) linearise.

- `frozen_final_norm(model)`: the head-path norms (`adapter.final_norms()`: timm's `norm` /
  `fc_norm`, open_clip's `ln_post`, transformers' final layernorms) compute the same values
  with their per-token scale (LayerNorm's 1/σ, RmsNorm's 1/rms) detached.
- `unit_length(x)`: the L2 normalisation of the text class spaces (METHOD §1c), written once;
  inside `frozen_unit_length()` its 1/‖x‖ is detached too.
- `readout_direction(adapter, resid, class_index)`: the gradient of the correct-class logit with
  both scales detached, evaluated at `resid` — the linear map §3b applies to any component
  written into that residual stream: `DLA(c) = c · u(t)`. For a LayerNorm with weight `w` that is
  `u = centred(w ⊙ E_y) / σ(t)`; the centring stays live, biases drop out (METHOD §3b).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import torch
from timm.layers import norm as timm_norm

from vitlens.errors import UserError

def _norm_dims(norm: torch.nn.Module) -> tuple[int, ...]:
    """The trailing dimensions a norm normalises over (its `normalized_shape`)."""
    return tuple(range(-len(norm.normalized_shape), 0))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision computed in float32 (as timm's *Fp32 norms); float32 / float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _frozen_layer_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm `(x − μ) · [1/√(σ² + ε)] · w + b` with the bracket detached (μ stays live).

    # x: [..., d] -> [..., d]
    """
    dims = _norm_dims(norm)
    h = _upcast(x)
    centred = h - h.mean(dim=dims, keepdim=True)
    scale = torch.rsqrt(h.var(dim=dims, unbiased=False, keepdim=True) + norm.eps).detach()
    out = centred * scale
    if norm.weight is not None:
        out = out * norm.weight.to(h.dtype)
    if norm.bias is not None:
        out = out + norm.bias.to(h.dtype)
    return out.to(x.dtype)


def _frozen_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RmsNorm `x · [1/√(mean x² + ε)] · w` with the bracket detached.

    # x: [..., d] -> [..., d]
    """
    dims = _norm_dims(norm)
    h = _upcast(x)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    out = h * torch.rsqrt(h.pow(2).mean(dim=dims, keepdim=True) + eps).detach()
    if norm.weight is not None:
        out = out * norm.weight.to(h.dtype)
    return out.to(x.dtype)


def _frozen_simple_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's SimpleNorm `x · [1/√(var x + ε)] · w` (unbiased variance, no centring, as timm)
    with the bracket detached.

    # x: [..., d] -> [..., d]
    """
    dims = _norm_dims(norm)
    h = _upcast(x)
    out = h * torch.rsqrt(h.var(dim=dims, keepdim=True) + norm.eps).detach()
    if norm.weight is not None:
        out = out * norm.weight.to(h.dtype)
    return out.to(x.dtype)


#: Exact norm class -> its forward with the per-token scale detached.
FROZEN_NORMS: dict[type, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    torch.nn.LayerNorm: _frozen_layer_norm,
    timm_norm.LayerNorm: _frozen_layer_norm,
    timm_norm.LayerNormFp32: _frozen_layer_norm,
    timm_norm.RmsNorm: _frozen_rms_norm,
    timm_norm.RmsNormFp32: _frozen_rms_norm,
    timm_norm.SimpleNorm: _frozen_simple_norm,
    timm_norm.SimpleNormFp32: _frozen_simple_norm,
}
if hasattr(torch.nn, "RMSNorm"):
    FROZEN_NORMS[torch.nn.RMSNorm] = _frozen_rms_norm
try:  # open_clip's LayerNorms: torch's arithmetic, cast back to the input dtype (optional extra)
    from open_clip.transformer import LayerNorm as _OpenClipLayerNorm, LayerNormFp32 as _OpenClipLayerNormFp32
except ImportError:
    pass
else:
    FROZEN_NORMS[_OpenClipLayerNorm] = FROZEN_NORMS[_OpenClipLayerNormFp32] = _frozen_layer_norm


def final_norms(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The head-path norms of `model` (a model, or its family adapter when the caller has one)
    that normalise a token, as the family adapter names them (timm: `norm`, `fc_norm`;
    open_clip: `ln_post`; transformers: the final layernorms); raises `UserError` naming a norm
    class `ln="frozen"` does not know.
    """
    from vitlens.lens.families import ModelAdapter, adapter_for  # the adapters import this module

    adapter = model if isinstance(model, ModelAdapter) else adapter_for(model)
    found = []
    for name, module in adapter.final_norms():
        if type(module) not in FROZEN_NORMS:
            known = sorted({f"{c.__module__}.{c.__name__}" for c in FROZEN_NORMS})
            raise UserError(f"ln='frozen' cannot detach the scale of model.{name} ({type(module).__name__}): "
                            f"it knows {', '.join(known)}")
        found.append((name, module))
    return found


@contextlib.contextmanager
def frozen_final_norm(model: Any) -> Iterator[None]:
    """Inside the `with` block, the model's head-path norms (`final_norms`: timm's `model.norm` and
    `model.fc_norm`, open_clip's `ln_post`, ...) compute the same values with their
    per-token scale detached (LayerNorm's 1/σ, RmsNorm's 1/rms), so gradients flow through the
    norm as if the scale were a constant. Swaps the modules' `forward` and restores it on exit;
    the family adapters are untouched (`adapter.project` calls the modules).
    """
    swapped: list[tuple[torch.nn.Module, object]] = []
    try:
        for _, module in final_norms(model):
            frozen = FROZEN_NORMS[type(module)]
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = (lambda x, _m=module, _f=frozen: _f(_m, x))  # type: ignore[method-assign]
        yield
    finally:
        for module, previous in reversed(swapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous  # type: ignore[method-assign]


_UNIT_LENGTH_FROZEN: contextvars.ContextVar[bool] = contextvars.ContextVar("unit_length_frozen", default=False)


def unit_length(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`x / max(‖x‖, eps)` over the last dimension (`F.normalize`); inside `frozen_unit_length()`
    the scale 1/‖x‖ is detached, so the map is linear in `x` for gradients.

    # x: [..., d'] -> [..., d']
    """
    length = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    if _UNIT_LENGTH_FROZEN.get():
        length = length.detach()
    return x / length


@contextlib.contextmanager
def frozen_unit_length() -> Iterator[None]:
    """Inside the `with` block `unit_length` detaches its scale (METHOD §3b: the L2
    normalisation of a text class space is linearised at the token's own scale)."""
    token = _UNIT_LENGTH_FROZEN.set(True)
    try:
        yield
    finally:
        _UNIT_LENGTH_FROZEN.reset(token)


def readout_direction(adapter: Any, resid: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """The linearised correct-class readout of every token (METHOD §3b): the gradient of
    `adapter.correct_class_logit` at `resid` with every head-path scale detached (the final
    norms' and the text class space's L2 normalisation). Each token's logit depends on that
    token alone, so one backward of the summed logits gives every token's direction.
    Works under `torch.no_grad()` (not under `torch.inference_mode()`).

    # resid: [B, T, d], class_index: [B] -> u: [B, T, d] (float32 or resid's dtype)
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("readout_direction needs autograd: call it outside torch.inference_mode()")
    with torch.enable_grad():
        x = resid.detach().clone().requires_grad_(True)
        with frozen_final_norm(adapter), frozen_unit_length():
            logit = adapter.correct_class_logit(x, class_index).sum()
        (direction,) = torch.autograd.grad(logit, x)
    return direction
