"""The tuned lens, fitted in closed form: per block `b < L` an affine map `A_b h + c_b` from
block `b`'s residual stream to the last block's, and tuned logits `proj(A_b h + c_b)` with the
lens's own projection. Block `L`'s map is the identity (not fitted), so its tuned logits are
the lens's.

Fitting follows the linear probes (METHOD §7): a training split disjoint from the analysed
images (the first `shots` images of each class in stream order), every token position a
sample, ridge regression with an unpenalised intercept and the probes' `alpha`, solved from
streamed statistics (`ridge.AffineAccumulator`): `A_bᵀ = W_b = (XcᵀXc + αI)⁻¹ XcᵀYc`,
`c_b = ȳ − x̄ᵀW_b`, with `X` the tokens' residual stream at block slot `b` and `Y` the same
tokens' stream at slot `L`. A sample is a (image, token position) present at both slots
(CaiT / XCiT: the CLS token does not exist before the class-attention blocks).

Unlike Belrose et al.'s tuned lens, whose translators are trained by SGD on the KL divergence
to the model's final logits, this one regresses hidden states on hidden states (squared
error in the residual stream, no softmax), exactly and in one solve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.output import CLASS_FILL, RANK_FILL
from vitlens.lens.reduce import reduce_logits
from vitlens.probe.features import probe_slots, token_features
from vitlens.probe.fit import select_shots
from vitlens.probe.ridge import AffineAccumulator, affine_memory_bytes


@dataclass
class TunedBatch:
    """Per image, block slot (0 = embeddings, b = after block b) and token position: the
    tuned lens's correct-class rank, correct-class logit and top-1 class. Positions a block
    slot does not hold: rank -1, logit NaN, class -1."""

    rank: torch.Tensor  # [B, L+1, T] int32 #{c' : logit[c'] > logit[c]} (ties in the token's favour)
    correct_logit: torch.Tensor  # [B, L+1, T] float32
    top1: torch.Tensor  # [B, L+1, T] int32

    @staticmethod
    def empty(batch: int, num_blocks: int, num_tokens: int, device: torch.device | str) -> "TunedBatch":
        """A batch of fill values to write into.

        # -> TunedBatch with B = batch, L = num_blocks, T = num_tokens
        """
        shape = (batch, num_blocks + 1, num_tokens)
        return TunedBatch(
            rank=torch.full(shape, RANK_FILL, dtype=torch.int32, device=device),
            correct_logit=torch.full(shape, float("nan"), dtype=torch.float32, device=device),
            top1=torch.full(shape, CLASS_FILL, dtype=torch.int32, device=device),
        )


@dataclass
class TunedLens:
    """One fitted affine translator per block slot `0..L-1`: `tuned = h @ weight[b] + bias[b]`,
    evaluated in the centred form `(h − center[b]) @ weight[b] + target_mean[b]` (no
    cancellation of `center @ weight` against `bias` in float32)."""

    weight: torch.Tensor  # [L, d, d] W_b = A_bᵀ
    bias: torch.Tensor  # [L, d] c_b = target_mean − center @ weight
    center: torch.Tensor  # [L, d] x̄_b, the training tokens' mean at block slot b
    target_mean: torch.Tensor  # [L, d] ȳ_b, the same tokens' mean at slot L
    count: torch.Tensor  # [L] int64 training tokens (image, position) each map saw
    train_images: int  # images the maps were fitted on
    images_per_class: torch.Tensor  # [C] int64 training images per class
    seconds: float  # wall time of fitting: training forwards + accumulation + solve

    @property
    def num_blocks(self) -> int:
        """L: the lens covers block slots 0..L (slot L untranslated)."""
        return int(self.weight.shape[0])

    @property
    def embed_dim(self) -> int:
        """d."""
        return int(self.weight.shape[1])

    def translate(self, hidden: torch.Tensor, block: int) -> torch.Tensor:
        """Block slot `block`'s residual stream mapped to the last block's (`block == L`: the
        identity), computed in the maps' dtype and returned in `hidden`'s, on the maps' device.

        # hidden: [..., d] -> [..., d]
        """
        if not 0 <= block <= self.num_blocks:
            raise ValueError(f"block must be in 0..{self.num_blocks}, got {block}")
        if hidden.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden must be [..., {self.embed_dim}], got {tuple(hidden.shape)}")
        if block == self.num_blocks:
            return hidden.to(self.weight.device)
        weight = self.weight[block]  # [d, d]
        centred = hidden.to(weight.device, weight.dtype) - self.center[block]  # [..., d]
        return (centred @ weight + self.target_mean[block]).to(hidden.dtype)

    def reduce(self, adapter: ModelAdapter, images: torch.Tensor, labels: torch.Tensor) -> TunedBatch:
        """The tuned logits of every block slot and token, reduced on the maps' device: one
        forward (embedding and block traces, under `torch.no_grad()`); per block slot, the
        translated stream projected with `adapter.project` and reduced at once (one
        `[B, T, C]` logits tensor alive at a time).

        # images: [B, 3, H, W], labels: [B] int64 -> TunedBatch ([B, L+1, T] fields)
        """
        anatomy = adapter.anatomy
        if (anatomy.num_blocks, anatomy.embed_dim) != (self.num_blocks, self.embed_dim):
            raise ValueError(f"the tuned lens has {self.num_blocks} blocks of width {self.embed_dim}, the model "
                             f"{anatomy.num_blocks} of width {anatomy.embed_dim}")
        device = self.weight.device
        labels = torch.as_tensor(labels).to(device, torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images and {labels.shape[0]} labels")
        outside = (labels < 0) | (labels >= anatomy.num_classes)
        if bool(outside.any()):
            raise ValueError(f"label {int(labels[outside][0])} is outside the model's classes "
                             f"[0, {anatomy.num_classes})")
        out = TunedBatch.empty(images.shape[0], self.num_blocks, anatomy.num_tokens, device)
        with torch.no_grad():
            hidden = adapter.embed(images.to(device))  # [B, T0, d]
            self._write(out, adapter, 0, hidden, labels)
            for trace in adapter.iter_block_traces(hidden):
                self._write(out, adapter, trace.index, trace.resid_post, labels)
        return out

    def _write(self, out: TunedBatch, adapter: ModelAdapter, block: int, hidden: torch.Tensor,
               labels: torch.Tensor) -> None:
        """Project block slot `block`'s translated stream and write its reduction into `out` at
        the last `T'` positions (the ones the slot holds).

        # hidden: [B, T', d], labels: [B] int64 -> None
        """
        logits = adapter.project(self.translate(hidden.float(), block))  # [B, T', C]
        reduction = reduce_logits(logits, labels, 1)  # consumes logits
        positions = slice(out.rank.shape[2] - hidden.shape[1], None)
        out.rank[:, block, positions] = reduction.rank
        out.correct_logit[:, block, positions] = reduction.correct_logit
        out.top1[:, block, positions] = reduction.topk_class[..., 0]


def shot_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], taken: torch.Tensor, shots: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The part of each batch that is among the first `shots` images of its class in stream
    order (`select_shots`; labels checked, `taken` [C] counted in place); reading stops once
    every class is full, and batches with nothing wanted are skipped.

    # batches: (images [B, 3, H, W], labels [B]) ... -> (images [b, 3, H, W], labels [b] int64 on CPU) ...
    """
    iterator = iter(batches)
    while not bool((taken >= shots).all()):
        item = next(iterator, None)
        if item is None:
            return
        images, raw = item
        labels = torch.as_tensor(raw).to("cpu", torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"a batch has {images.shape[0]} images and {labels.shape[0]} labels")
        wanted = select_shots(labels, taken, shots)  # [B]
        if bool(wanted.any()):
            yield images[wanted.to(images.device)], labels[wanted]


def tuned_samples(
    features: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch's regression samples: every (image, token) is a sample of map `b` when the
    token exists both at block slot `b` and at slot `L`; the target is its slot-`L` stream.

    # features: [B, L+1, T, d], present: [L+1, T] bool
    #   -> source [B*T, L, d], target [B*T, L, d] (expanded view), mask [B*T, L] bool | None (all present)
    """
    batch, slots, tokens, dim = features.shape
    blocks = slots - 1
    source = features[:, :blocks].permute(0, 2, 1, 3).reshape(batch * tokens, blocks, dim)  # [B*T, L, d]
    target = features[:, blocks].reshape(batch * tokens, 1, dim).expand(-1, blocks, -1)  # [B*T, L, d]
    usable = present[:blocks] & present[blocks][None]  # [L, T]
    if bool(usable.all()):
        return source, target, None
    mask = usable.transpose(0, 1)[None].expand(batch, -1, -1).reshape(batch * tokens, blocks)  # [B*T, L]
    return source, target, mask


def fit_tuned_lens(
    adapter: ModelAdapter,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    shots: int = 10,
    alpha: float = 1.0,
    device: torch.device | str | None = None,
) -> TunedLens:
    """Fit the tuned lens's `L` affine maps on the first `shots` images of each class in
    stream order (the rest of a batch is dropped; reading stops once every class is full),
    all token positions. Hidden states are never kept past their batch: statistics
    accumulate on `device` (default: the model's) and one batched ridge solve ends it.

    # batches: (images [B, 3, H, W], labels [B] int64) ... -> TunedLens (weight [L, d, d])
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    started = time.perf_counter()
    anatomy = adapter.anatomy
    device = torch.device(device if device is not None else next(adapter.model.parameters()).device)
    slots = probe_slots(anatomy.num_blocks, ("resid",))  # block slots 0..L
    accumulator = AffineAccumulator(anatomy.num_blocks, anatomy.embed_dim, anatomy.embed_dim, device=device)
    taken = torch.zeros(num_classes, dtype=torch.int64)
    for images, labels in shot_batches(batches, taken, shots):
        features, present = token_features(adapter, images.to(device), slots)  # [b, L+1, T, d], [L+1, T]
        accumulator.add(*tuned_samples(features, present))
    if not bool(taken.any()):
        raise ValueError("no training image: the tuned lens's training split is empty")
    maps = accumulator.solve(alpha)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TunedLens(
        weight=maps.weight, bias=maps.bias, center=maps.center, target_mean=maps.target_mean,
        count=maps.count, train_images=int(taken.sum()), images_per_class=taken,
        seconds=time.perf_counter() - started,
    )


def tuned_memory_bytes(num_blocks: int, dim: int, dtype_bytes: int = 4) -> int:
    """Peak bytes of `fit_tuned_lens` on its device, besides the model and one batch: the
    statistics of `L` affine problems `d → d` (`affine_memory_bytes`) plus the solved maps
    (weight `d²`, bias, center and target mean `3d` per map, and an int64 count). The float64
    solve works in chunks of at most `ridge.SOLVE_CHUNK_BYTES`."""
    solved = num_blocks * ((dim * dim + 3 * dim) * dtype_bytes + 8)
    return affine_memory_bytes(num_blocks, dim, dim, dtype_bytes) + solved
