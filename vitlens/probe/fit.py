"""The linear-probe baseline of paper §8 (METHOD §7): one ridge probe per (block, stream,
token position), trained on the first `shots` images of each class, evaluated as probe ranks,
and the perturbation importance of image tokens from the residual-stream probes.

Probe index: `slot * T + token` over `FittedProbes.slots` and the `T` sequence positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.output import RANK_FILL, STREAMS
from vitlens.probe.features import ProbeSlot, probe_slots, token_features
from vitlens.probe.ridge import RidgeAccumulator, RidgeProbes, probe_rank, ridge_memory_bytes

#: probes scored at once in `FittedProbes.ranks` (bounds the [B, k, C] score tensor)
RANK_CHUNK_PROBES = 512


@dataclass
class FittedProbes:
    """Ridge probes for every slot and token position of one model."""

    slots: tuple[ProbeSlot, ...]  # K (block, stream) slots
    num_tokens: int  # T
    probes: RidgeProbes  # K * T problems, index = slot * T + token
    present: torch.Tensor  # [K, T] bool: the position exists at that slot
    train_images: int  # images the probes were trained on
    images_per_class: torch.Tensor  # [C] int64 training images per class
    seconds: float  # wall time of fitting: training forwards + accumulation + solve

    def ranks(self, adapter: ModelAdapter, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Probe rank of every slot and token (METHOD §7, §2), -1 where a position is absent.

        # images: [B, 3, H, W], labels: [B] int64 -> ranks: [B, K, T] int32 (on the probes' device)
        """
        device = self.probes.weight.device
        features, present = token_features(adapter, images.to(device), self.slots)  # [B, K, T, d], [K, T]
        batch, num_slots, num_tokens, dim = features.shape
        flat = features.reshape(batch, num_slots * num_tokens, dim)  # [B, K*T, d]
        labels = labels.to(device, torch.int64)
        out = torch.empty(batch, num_slots * num_tokens, dtype=torch.int32, device=device)
        for start in range(0, num_slots * num_tokens, RANK_CHUNK_PROBES):
            stop = min(num_slots * num_tokens, start + RANK_CHUNK_PROBES)
            scores = self.probes.subset(start, stop).scores(flat[:, start:stop])  # [B, k, C]
            out[:, start:stop] = probe_rank(scores, labels)
        ranks = out.reshape(batch, num_slots, num_tokens)
        usable = (present & self.present.to(device))[None]  # [1, K, T]
        return ranks.masked_fill(~usable, RANK_FILL)


def select_shots(labels: torch.Tensor, taken: torch.Tensor, shots: int) -> torch.Tensor:
    """Which images of a batch are still wanted: the first `shots` of each class in stream
    order, given `taken` images per class so far (updated in place). Labels are checked.

    # labels: [B] int64, taken: [C] int64 -> keep: [B] bool
    """
    num_classes = taken.shape[0]
    keep = torch.zeros(labels.shape[0], dtype=torch.bool)
    for i, label in enumerate(labels.tolist()):
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} is outside the model's classes [0, {num_classes})")
        if taken[label] < shots:
            taken[label] += 1
            keep[i] = True
    return keep


def fit_probes(
    adapter: ModelAdapter,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    streams: tuple[str, ...] = STREAMS,
    shots: int = 10,
    alpha: float = 1.0,
    device: torch.device | str | None = None,
) -> FittedProbes:
    """Train one ridge probe per (block, stream, token) on the first `shots` images of each
    class in stream order (the rest of a batch is dropped; reading stops once every class
    is full). Raw hidden states are never kept: statistics accumulate on `device` (default:
    the model's) and one batched solve ends it.

    # batches: (images [B, 3, H, W], labels [B] int64) ... -> FittedProbes (K*T probes)
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    started = time.perf_counter()
    anatomy = adapter.anatomy
    if device is None:
        device = next(adapter.model.parameters()).device
    device = torch.device(device)
    slots = probe_slots(anatomy.num_blocks, streams)
    num_tokens, dim = anatomy.num_tokens, anatomy.embed_dim
    accumulator = RidgeAccumulator(len(slots) * num_tokens, dim, num_classes, device=device)
    taken = torch.zeros(num_classes, dtype=torch.int64)
    present: torch.Tensor | None = None
    for images, labels in batches:
        labels = torch.as_tensor(labels).to("cpu", torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"a batch has {images.shape[0]} images and {labels.shape[0]} labels")
        keep = select_shots(labels, taken, shots)
        if bool(keep.any()):
            chosen = images[keep.to(images.device)].to(device)
            features, present = token_features(adapter, chosen, slots)  # [b, K, T, d], [K, T]
            b = features.shape[0]
            flat = features.reshape(b, len(slots) * num_tokens, dim)  # [b, K*T, d]
            mask = None if bool(present.all()) else present.reshape(1, -1).expand(b, -1)  # [b, K*T]
            accumulator.add(flat, labels[keep].to(device), mask)
        if bool((taken >= shots).all()):
            break
    if present is None:
        raise ValueError("no training image: the probe's training split is empty")
    probes = accumulator.solve(alpha)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return FittedProbes(
        slots=slots, num_tokens=num_tokens, probes=probes, present=present.to(device),
        train_images=int(taken.sum()), images_per_class=taken,
        seconds=time.perf_counter() - started,
    )


def probe_importance(ranks: torch.Tensor, slots: Sequence[ProbeSlot], num_prefix_tokens: int) -> torch.Tensor:
    """Perturbation importance of each image token (METHOD §7): minus the sum of its probe
    ranks over the residual stream after every block (resid slots with block >= 1); higher =
    more important. Absent entries (rank -1) add nothing.

    # ranks: [B, K, T] int32, slots: K -> importance: [B, N] float32 (N = T - num_prefix_tokens)
    """
    chosen = [k for k, (block, stream) in enumerate(slots) if stream == "resid" and block >= 1]
    if len(slots) != ranks.shape[1]:
        raise ValueError(f"ranks has {ranks.shape[1]} slots, {len(slots)} slots given")
    if not chosen:
        raise ValueError("no residual-stream slot after a block (block >= 1) among the slots")
    image = ranks[:, chosen, num_prefix_tokens:].to(torch.float32)  # [B, k, N]
    return -image.clamp(min=0).sum(dim=1)


def probe_memory_bytes(num_slots: int, num_tokens: int, dim: int, num_classes: int, dtype_bytes: int = 4) -> int:
    """Peak bytes of `fit_probes` on its device, besides the model and one batch: the
    accumulator's statistics plus the solved probes (weight `d·C`, bias and target mean
    `2C`, center `d` per probe, and an int64 count). The float64 solve works in chunks of
    at most `ridge.SOLVE_CHUNK_BYTES`."""
    probes = num_slots * num_tokens
    solved = probes * ((dim * num_classes + 2 * num_classes + dim) * dtype_bytes + 8)
    return ridge_memory_bytes(probes, dim, num_classes, dtype_bytes) + solved
