"""The MLP sub-layer from the unmodified timm module, exposing its memory coefficients.

Value vectors are the columns of `fc2.weight` for every MLP type (METHOD §3). The memory
coefficients are what multiplies them:
- `Mlp` (GELU MLP): the `fc1` output before the activation (METHOD §3 as written);
- gated MLPs (`GluMlp`/`SwiGLUPacked`, `SwiGLU`, ViTamin's `GeGluMlp`): there is no single
  pre-activation per memory (each is `act(gate) * value`), so the coefficient is the input of
  the output projection itself (after the gating, dropout and the MLP's own norm): the signed
  weight each value vector receives. `GeGluMlp` names its projections `w0` (gate), `w1`, `w2`
  (output) and norms its input first.
"""

from __future__ import annotations

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.vitamin import GeGluMlp

from vitlens.errors import UserError

MLP_TYPES = (Mlp, GluMlp, SwiGLU, GeGluMlp)


def check_mlp(mlp: torch.nn.Module, where: str) -> None:
    """Raise `UserError` for an MLP type whose memories are not defined here."""
    if type(mlp) not in MLP_TYPES:
        names = ", ".join(t.__name__ for t in MLP_TYPES)
        raise UserError(f"{where}: unsupported MLP {type(mlp).__name__} (supported: {names})")
    if getattr(mlp, "use_conv", False) or isinstance(getattr(mlp, "fc1", None), torch.nn.Conv2d):
        raise UserError(f"{where}: convolutional MLP {type(mlp).__name__} is not supported")


def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mlp(x)` in timm's order, and the memory coefficients of every token.

    # x: [B, T, d] -> (output [B, T, d], coefficients [B, T, M])
    """
    if type(mlp) is Mlp:
        coefficients = mlp.fc1(x)
        hidden = mlp.norm(mlp.drop1(mlp.act(coefficients)))
    elif type(mlp) is GluMlp:
        x1, x2 = mlp.fc1(x).chunk(2, dim=mlp.chunk_dim)
        gated = x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
        hidden = coefficients = mlp.norm(mlp.drop1(gated))
    elif type(mlp) is SwiGLU:
        gated = mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)
        hidden = coefficients = mlp.norm(mlp.drop1(gated))
    elif type(mlp) is GeGluMlp:
        normed = mlp.norm(x)
        hidden = coefficients = mlp.drop1(mlp.act(mlp.w0(normed)) * mlp.w1(normed))
        return mlp.drop2(mlp.w2(hidden)), coefficients
    else:
        raise UserError(f"unsupported MLP {type(mlp).__name__}")
    return mlp.drop2(mlp.fc2(hidden)), coefficients


def mlp_values(mlp: torch.nn.Module) -> torch.Tensor:
    """The MLP's value vectors as columns.

    # -> values: [d, M]
    """
    return mlp.w2.weight if type(mlp) is GeGluMlp else mlp.fc2.weight
