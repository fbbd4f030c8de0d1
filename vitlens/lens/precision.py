"""The forward's arithmetic: `fp32` (exact), `tf32` (CUDA tensor cores, fp32 storage) or
`bf16` (autocast). The projections, ranks and top-k always come from fp32 logits: the lens
runs each block under the chosen precision and every projection outside it, on the block's
streams cast to fp32 (`Lens._write_streams`; `projections = "fast"` computes them at low
precision with the same results, `vitlens.lens.projection`).

On the CPU `tf32` changes nothing (no tensor cores); `bf16` runs CPU autocast.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, TypeVar

import torch

from vitlens.errors import UserError
from vitlens.settings import PRECISIONS

Precision = Literal["fp32", "tf32", "bf16"]  # = vitlens.settings.PRECISIONS
T = TypeVar("T")


def check_precision(precision: str) -> Precision:
    """`precision`, or a `UserError` naming the allowed values."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    return precision  # type: ignore[return-value]


@contextlib.contextmanager
def forward_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """Run the enclosed forward computation in `precision` on `device`'s kind of hardware."""
    if precision == "fp32":
        yield
    elif precision == "tf32":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    else:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield


def in_precision(steps: Iterator[T], precision: Precision, device: torch.device) -> Iterator[T]:
    """Advance the generator `steps` (e.g. the block traces) under `precision`, and hand each
    item to the consumer outside it (where the lens projects in fp32)."""
    while True:
        with forward_precision(precision, device):
            item = next(steps, None)
        if item is None:
            return
        yield item
