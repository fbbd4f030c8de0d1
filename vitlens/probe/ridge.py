"""Many independent ridge regressions from streamed sufficient statistics (METHOD §7).

Each of `K` probes is scikit-learn's `Ridge(alpha, fit_intercept=True)` on targets `-1`
everywhere and `+1` at the true class: with centred `Xc`, `Yc`,
`W = (XcᵀXc + αI)⁻¹ XcᵀYc` and `b = ȳ − x̄ᵀW` (the intercept is not penalised).

`RidgeAccumulator` never keeps a sample. Per probe it sums, relative to a shift `s` (the
first batch's mean of that probe, so float32 sums do not cancel on streams with large
means), the count `n`, `Σ(x−s)`, `Σ(x−s)(x−s)ᵀ`, and per class the count `n_c` and the
feature sum `Σ_{y=c}(x−s)`. Since `Σ_i (x_i − x̄) y_ic = 2 Σ_{y=c}(x_i − x̄)` for ±1 targets,
`XcᵀYc[:, c] = 2 (Σ_{y=c}(x−s) − n_c m)` with `m = Σ(x−s)/n`, and `ȳ_c = 2 n_c/n − 1`:
no dense ±1 matrix is ever formed. `solve` runs one batched Cholesky per chunk of probes,
in float64 whatever the accumulation dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

#: float64 working memory one solve chunk may use (the chunk size follows from it)
SOLVE_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class RidgeProbes:
    """`K` solved ridge probes. `scores` evaluates them in the centred form
    `(x − x̄)ᵀW + ȳ`, which equals `xᵀW + b` without the cancellation of `x̄ᵀW` and `b`."""

    weight: torch.Tensor  # [K, d, C]
    bias: torch.Tensor  # [K, C] = target_mean − centerᵀ weight
    center: torch.Tensor  # [K, d] x̄, the training features' mean
    target_mean: torch.Tensor  # [K, C] ȳ, the training targets' mean
    count: torch.Tensor  # [K] int64 training samples each probe saw

    @property
    def num_probes(self) -> int:
        """K."""
        return int(self.weight.shape[0])

    def subset(self, start: int, stop: int) -> "RidgeProbes":
        """Probes `start .. stop-1` (views, no copy).

        # -> RidgeProbes with K = stop - start
        """
        part = slice(start, stop)
        return RidgeProbes(self.weight[part], self.bias[part], self.center[part],
                           self.target_mean[part], self.count[part])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Every probe on its own feature column, in the probes' dtype.

        # features: [B, K, d] -> scores: [B, K, C]
        """
        if features.ndim != 3 or features.shape[1:] != self.weight.shape[:2]:
            raise ValueError(f"features must be [B, {self.num_probes}, {self.weight.shape[1]}], "
                             f"got {tuple(features.shape)}")
        centred = features.to(self.weight.dtype) - self.center[None]  # [B, K, d]
        out = torch.bmm(centred.transpose(0, 1), self.weight)  # [K, B, C]
        return out.transpose(0, 1) + self.target_mean[None]  # [B, K, C]


def probe_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of classes scoring strictly above the true class (METHOD §2: ties in the
    token's favour, by comparison, not argsort); 0 = identifiable.

    # scores: [B, K, C], labels: [B] int64 -> rank: [B, K] int32
    """
    index = labels.to(scores.device, torch.int64)[:, None, None].expand(-1, scores.shape[1], 1)  # [B, K, 1]
    true = scores.gather(-1, index)  # [B, K, 1]
    return (scores > true).sum(dim=-1, dtype=torch.int32)


def ridge_memory_bytes(num_probes: int, dim: int, num_classes: int, dtype_bytes: int = 4) -> int:
    """Bytes of `RidgeAccumulator`'s statistics: per probe `d²` (Gram) + `C·d` (class sums)
    + `2d` (shift, sum) + `C` (class counts) + 1 (count) values, and one bool."""
    per_probe = dim * dim + (num_classes + 2) * dim + num_classes + 1
    return num_probes * (per_probe * dtype_bytes + 1)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on CPU, float32 elsewhere (the shift keeps float32 sums well conditioned)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@contextmanager
def lapack_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread for batched CPU LAPACK calls: torch parallelises over the batch
    and MKL again inside each small factorisation, and the oversubscription made a batched
    Cholesky 3-10x slower than single-threaded on a loaded 2-core machine. No-op on CUDA."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RidgeAccumulator:
    """Sufficient statistics of `num_probes` ridge problems with `dim` features and
    `num_classes` ±1 targets, accumulated batch by batch on `device`."""

    def __init__(
        self,
        num_probes: int,
        dim: int,
        num_classes: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Zeroed statistics (`dtype` default: float64 on CPU, float32 on CUDA)."""
        if num_probes < 1 or dim < 1 or num_classes < 2:
            raise ValueError(f"need num_probes >= 1, dim >= 1, num_classes >= 2 "
                             f"(got {num_probes}, {dim}, {num_classes})")
        self.num_probes, self.dim, self.num_classes = num_probes, dim, num_classes
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        zeros = dict(device=self.device, dtype=self.dtype)
        self.count = torch.zeros(num_probes, **zeros)  # [K]
        self.shift = torch.zeros(num_probes, dim, **zeros)  # [K, d]
        self.shift_set = torch.zeros(num_probes, dtype=torch.bool, device=self.device)  # [K]
        self.sum = torch.zeros(num_probes, dim, **zeros)  # [K, d] Σ (x − s)
        self.gram = torch.zeros(num_probes, dim, dim, **zeros)  # [K, d, d] Σ (x − s)(x − s)ᵀ
        self.class_sum = torch.zeros(num_classes, num_probes, dim, **zeros)  # [C, K, d] Σ_{y=c} (x − s)
        self.class_count = torch.zeros(num_probes, num_classes, **zeros)  # [K, C]

    @property
    def memory_bytes(self) -> int:
        """Bytes the statistics occupy (equals `ridge_memory_bytes`)."""
        tensors = (self.count, self.shift, self.shift_set, self.sum, self.gram, self.class_sum, self.class_count)
        return sum(t.numel() * t.element_size() for t in tensors)

    def add(self, features: torch.Tensor, labels: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Add one batch; probe `k` sees sample `i` only where `present[i, k]`.

        # features: [B, K, d], labels: [B] int64, present: [B, K] bool | None -> None
        """
        batch = features.shape[0]
        if features.ndim != 3 or features.shape[1:] != (self.num_probes, self.dim):
            raise ValueError(f"features must be [B, {self.num_probes}, {self.dim}], got {tuple(features.shape)}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must be [{batch}], got {tuple(labels.shape)}")
        labels = labels.to(self.device, torch.int64)
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise ValueError(f"label {int(bad)} is outside [0, {self.num_classes})")
        x = features.to(self.device, self.dtype)  # [B, K, d]
        if present is None:
            weight = torch.ones(batch, self.num_probes, device=self.device, dtype=self.dtype)  # [B, K]
        else:
            if present.shape != (batch, self.num_probes):
                raise ValueError(f"present must be [{batch}, {self.num_probes}], got {tuple(present.shape)}")
            weight = present.to(self.device, self.dtype)  # [B, K]
        seen = weight.sum(dim=0)  # [K]
        new = (~self.shift_set) & (seen > 0)  # [K] probes seen for the first time
        if bool(new.any()):
            masked = torch.where(weight[..., None] > 0, x, torch.zeros((), dtype=self.dtype, device=self.device))
            mean = masked.sum(dim=0) / seen.clamp(min=1)[:, None]  # [K, d]
            self.shift[new] = mean[new]
            self.shift_set |= new
        # shifted features, zero where absent (absent values never enter, even if not finite)
        z = torch.where(weight[..., None] > 0, x - self.shift[None],
                        torch.zeros((), dtype=self.dtype, device=self.device))  # [B, K, d]
        self.count += seen
        self.sum += z.sum(dim=0)
        zt = z.permute(1, 2, 0)  # [K, d, B]
        self.gram.baddbmm_(zt, zt.transpose(1, 2))  # [K, d, d]
        self.class_sum.index_add_(0, labels, z)  # [C, K, d]
        self.class_count.index_add_(1, labels, weight.transpose(0, 1).contiguous())  # [K, C]

    def solve(self, alpha: float = 1.0) -> RidgeProbes:
        """Every probe's ridge solution (float64 batched Cholesky, chunked over probes; a
        probe whose system is not positive definite, possible only with alpha <= 0, falls
        back to the pseudo-inverse). Probes that saw no sample get W = 0, ȳ = −1. The result
        has the accumulator's dtype and device.

        # -> RidgeProbes: weight [K, d, C], bias [K, C], center [K, d], target_mean [K, C]
        """
        K, d, C = self.num_probes, self.dim, self.num_classes
        weight = torch.empty(K, d, C, device=self.device, dtype=self.dtype)
        bias = torch.empty(K, C, device=self.device, dtype=self.dtype)
        center = torch.empty(K, d, device=self.device, dtype=self.dtype)
        target_mean = torch.empty(K, C, device=self.device, dtype=self.dtype)
        chunk = max(1, SOLVE_CHUNK_BYTES // (8 * 3 * (d * d + d * C)))
        for start in range(0, K, chunk):
            part = slice(start, min(K, start + chunk))
            n = self.count[part].to(torch.float64)  # [k]
            n_safe = n.clamp(min=1)[:, None]  # [k, 1]
            m = self.sum[part].to(torch.float64) / n_safe  # [k, d] mean relative to the shift
            # XcᵀXc + αI = Σ(x−s)(x−s)ᵀ − n m mᵀ + αI (Cholesky reads the lower triangle only)
            system = torch.baddbmm(self.gram[part].to(torch.float64), (-n[:, None] * m)[:, :, None], m[:, None, :])
            system.diagonal(dim1=-2, dim2=-1).add_(alpha)  # [k, d, d]
            n_c = self.class_count[part].to(torch.float64)  # [k, C]
            class_sum = self.class_sum[:, part].to(torch.float64)  # [C, k, d]
            rhs = (2.0 * (class_sum - n_c.T[:, :, None] * m[None])).permute(1, 2, 0).contiguous()  # [k, d, C] XcᵀYc
            with lapack_threads(self.device):
                factor, info = torch.linalg.cholesky_ex(system)  # [k, d, d], [k]
                solution = torch.cholesky_solve(rhs, factor)  # [k, d, C]
                failed = info != 0
                if bool(failed.any()):
                    solution[failed] = torch.linalg.pinv(system[failed], hermitian=True) @ rhs[failed]
            mean_x = self.shift[part].to(torch.float64) + m  # [k, d]
            mean_y = 2.0 * n_c / n_safe - 1.0  # [k, C]
            weight[part] = solution.to(self.dtype)
            center[part] = mean_x.to(self.dtype)
            target_mean[part] = mean_y.to(self.dtype)
            bias[part] = (mean_y - torch.einsum("kd,kdc->kc", mean_x, solution)).to(self.dtype)
        count = self.count.round().to(torch.int64)
        return RidgeProbes(weight=weight, bias=bias, center=center, target_mean=target_mean, count=count)
