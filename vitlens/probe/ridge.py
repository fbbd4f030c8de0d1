"""Many independent ridge regressions from streamed sufficient statistics (METHOD §7).

Each of `K` problems is scikit-learn's `Ridge(alpha, fit_intercept=True)`: with centred
`Xc`, `Yc`, `W = (XcᵀXc + αI)⁻¹ XcᵀYc` and `b = ȳ − x̄ᵀW` (the intercept is not penalised).

`RidgeStatistics` holds what every problem shares and never keeps a sample: per problem,
relative to a shift `s` (the first batch's mean of that problem, so float32 sums do not
cancel on streams with large means), the count `n`, `Σ(x−s)` and `Σ(x−s)(x−s)ᵀ`; its solve
forms `XcᵀXc + αI = Σ(x−s)(x−s)ᵀ − n m mᵀ + αI` (`m = Σ(x−s)/n`) and runs one batched
Cholesky per chunk of problems, in float64 whatever the accumulation dtype. The targets'
side (`XcᵀYc` and `ȳ`) comes from the subclass:

- `RidgeAccumulator` (the linear probes): targets `-1` everywhere and `+1` at the true
  class. It sums per class the count `n_c` and `Σ_{y=c}(x−s)`; since
  `Σ_i (x_i − x̄) y_ic = 2 Σ_{y=c}(x_i − x̄)` for ±1 targets, `XcᵀYc[:, c] = 2 (Σ_{y=c}(x−s) − n_c m)`
  and `ȳ_c = 2 n_c/n − 1`: no dense ±1 matrix is ever formed.
- `AffineAccumulator` (the tuned lens's translators): dense targets `y` of `d_out` values.
  It sums, relative to a target shift `s_y`, `Σ(y−s_y)` and the cross sum `Σ(x−s)(y−s_y)ᵀ`;
  `XcᵀYc = Σ(x−s)(y−s_y)ᵀ − n m m_yᵀ` with `m_y = Σ(y−s_y)/n`, and `ȳ = s_y + m_y`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

#: float64 working memory one solve chunk may use (the chunk size follows from it)
SOLVE_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class RidgeProbes:
    """`K` solved ridge problems with `C` outputs each (classes for the probes, the target
    dimension for `AffineAccumulator`). `scores` evaluates them in the centred form
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


def affine_memory_bytes(num_problems: int, dim: int, out_dim: int, dtype_bytes: int = 4) -> int:
    """Bytes of `AffineAccumulator`'s statistics: per problem `d²` (Gram) + `d·d_out` (cross
    sum) + `2d` (shift, sum) + `2·d_out` (target shift, target sum) + 1 (count) values, and
    one bool."""
    per_problem = dim * dim + (out_dim + 2) * dim + 2 * out_dim + 1
    return num_problems * (per_problem * dtype_bytes + 1)


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


class ShiftedBatch(NamedTuple):
    """One batch's samples as `RidgeStatistics` accumulated them (for a subclass's sums)."""

    z: torch.Tensor  # [B, K, d] x − s, zero where absent
    weight: torch.Tensor  # [B, K] 1.0 where present, 0.0 where absent
    seen: torch.Tensor  # [K] samples each problem saw in this batch
    new: torch.Tensor  # [K] bool: problems that saw their first sample in this batch


class RidgeStatistics:
    """The feature side of `num_probes` ridge problems with `dim` features and `out_dim`
    outputs: the shifted sums of `x`, accumulated batch by batch on `device`, and the
    batched solve. A subclass allocates its targets' sums in `_allocate_targets`, its `add`
    calls `add_features` and sums the targets against the returned `ShiftedBatch`, and its
    `_targets` says how they enter the solve."""

    #: how the error message names `out_dim`, and its least value
    OUT_NAME, OUT_MIN = "out_dim", 1

    def __init__(
        self,
        num_probes: int,
        dim: int,
        out_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Zeroed statistics (`dtype` default: float64 on CPU, float32 on CUDA)."""
        if num_probes < 1 or dim < 1 or out_dim < self.OUT_MIN:
            raise ValueError(f"need num_probes >= 1, dim >= 1, {self.OUT_NAME} >= {self.OUT_MIN} "
                             f"(got {num_probes}, {dim}, {out_dim})")
        self.num_probes, self.dim, self.out_dim = num_probes, dim, out_dim
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.count = self.zeros(num_probes)  # [K]
        self.shift = self.zeros(num_probes, dim)  # [K, d]
        self.shift_set = torch.zeros(num_probes, dtype=torch.bool, device=self.device)  # [K]
        self.sum = self.zeros(num_probes, dim)  # [K, d] Σ (x − s)
        self.gram = self.zeros(num_probes, dim, dim)  # [K, d, d] Σ (x − s)(x − s)ᵀ
        self._allocate_targets()

    def _allocate_targets(self) -> None:
        """Zero the targets' sums (a subclass's)."""
        raise NotImplementedError

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zeroed statistic in the accumulation dtype, on the device.

        # -> [*shape]
        """
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    @property
    def memory_bytes(self) -> int:
        """Bytes the statistics (every tensor the accumulator holds) occupy; equals
        `ridge_memory_bytes` / `affine_memory_bytes`."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def check_features(self, features: torch.Tensor) -> int:
        """Raise ValueError unless `features` is `[B, K, d]`; returns B.

        # features: [B, K, d] -> B
        """
        if features.ndim != 3 or features.shape[1:] != (self.num_probes, self.dim):
            raise ValueError(f"features must be [B, {self.num_probes}, {self.dim}], got {tuple(features.shape)}")
        return int(features.shape[0])

    def shifted(self, values: torch.Tensor, weight: torch.Tensor, seen: torch.Tensor, shift: torch.Tensor,
                new: torch.Tensor) -> torch.Tensor:
        """`values − shift`, zero where absent (absent values never enter, even if not
        finite); the problems in `new` first get their shift: this batch's mean.

        # values: [B, K, e], weight: [B, K], seen: [K] (weight summed over B),
        #   shift: [K, e] (updated in place), new: [K] bool -> [B, K, e]
        """
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        keep = weight[..., None] > 0  # [B, K, 1]
        x = values.to(self.device, self.dtype)  # [B, K, e]
        if bool(new.any()):
            mean = torch.where(keep, x, zero).sum(dim=0) / seen.clamp(min=1)[:, None]  # [K, e]
            shift[new] = mean[new]
        return torch.where(keep, x - shift[None], zero)

    def add_features(self, features: torch.Tensor, present: torch.Tensor | None) -> ShiftedBatch:
        """Accumulate the feature sums of one checked batch; problem `k` sees sample `i`
        only where `present[i, k]`.

        # features: [B, K, d], present: [B, K] bool | None -> ShiftedBatch
        """
        batch = features.shape[0]
        if present is None:
            weight = torch.ones(batch, self.num_probes, device=self.device, dtype=self.dtype)  # [B, K]
        else:
            if present.shape != (batch, self.num_probes):
                raise ValueError(f"present must be [{batch}, {self.num_probes}], got {tuple(present.shape)}")
            weight = present.to(self.device, self.dtype)  # [B, K]
        seen = weight.sum(dim=0)  # [K]
        new = (~self.shift_set) & (seen > 0)  # [K] problems seen for the first time
        z = self.shifted(features, weight, seen, self.shift, new)  # [B, K, d]
        self.shift_set |= new
        self.count += seen
        self.sum += z.sum(dim=0)
        zt = z.permute(1, 2, 0)  # [K, d, B]
        self.gram.baddbmm_(zt, zt.transpose(1, 2))  # [K, d, d]
        return ShiftedBatch(z, weight, seen, new)

    def _targets(self, part: slice, n_safe: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' side of problems `part` in float64: `XcᵀYc` and `ȳ`.

        # n_safe: [k, 1] counts (at least 1), m: [k, d] feature mean relative to the shift
        #   -> (XcᵀYc [k, d, C], ȳ [k, C])
        """
        raise NotImplementedError

    def solve(self, alpha: float = 1.0) -> RidgeProbes:
        """Every problem's ridge solution (float64 batched Cholesky, chunked over problems; a
        problem whose system is not positive definite, possible only with alpha <= 0, falls
        back to the pseudo-inverse). A problem that saw no sample gets W = 0 (alpha > 0). The
        result has the accumulator's dtype and device.

        # -> RidgeProbes: weight [K, d, C], bias [K, C], center [K, d], target_mean [K, C]
        """
        K, d, C = self.num_probes, self.dim, self.out_dim
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
            rhs, mean_y = self._targets(part, n_safe, m)  # [k, d, C] XcᵀYc, [k, C]
            with lapack_threads(self.device):
                factor, info = torch.linalg.cholesky_ex(system)  # [k, d, d], [k]
                solution = torch.cholesky_solve(rhs, factor)  # [k, d, C]
                failed = info != 0
                if bool(failed.any()):
                    solution[failed] = torch.linalg.pinv(system[failed], hermitian=True) @ rhs[failed]
            mean_x = self.shift[part].to(torch.float64) + m  # [k, d]
            weight[part] = solution.to(self.dtype)
            center[part] = mean_x.to(self.dtype)
            target_mean[part] = mean_y.to(self.dtype)
            bias[part] = (mean_y - torch.einsum("kd,kdc->kc", mean_x, solution)).to(self.dtype)
        count = self.count.round().to(torch.int64)
        return RidgeProbes(weight=weight, bias=bias, center=center, target_mean=target_mean, count=count)


class RidgeAccumulator(RidgeStatistics):
    """Sufficient statistics of `num_probes` ridge problems with `dim` features and
    `num_classes` ±1 targets, accumulated batch by batch on `device`."""

    OUT_NAME, OUT_MIN = "num_classes", 2

    def __init__(self, num_probes: int, dim: int, num_classes: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        """Zeroed statistics (`dtype` default: float64 on CPU, float32 on CUDA)."""
        self.num_classes = num_classes
        super().__init__(num_probes, dim, num_classes, device, dtype)

    def _allocate_targets(self) -> None:
        """Per class, the feature sums and counts."""
        self.class_sum = self.zeros(self.num_classes, self.num_probes, self.dim)  # [C, K, d] Σ_{y=c} (x − s)
        self.class_count = self.zeros(self.num_probes, self.num_classes)  # [K, C]

    def add(self, features: torch.Tensor, labels: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Add one batch; probe `k` sees sample `i` only where `present[i, k]`.

        # features: [B, K, d], labels: [B] int64, present: [B, K] bool | None -> None
        """
        batch = self.check_features(features)
        if labels.shape != (batch,):
            raise ValueError(f"labels must be [{batch}], got {tuple(labels.shape)}")
        labels = labels.to(self.device, torch.int64)
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise ValueError(f"label {int(bad)} is outside [0, {self.num_classes})")
        sample = self.add_features(features, present)
        self.class_sum.index_add_(0, labels, sample.z)  # [C, K, d]
        self.class_count.index_add_(1, labels, sample.weight.transpose(0, 1).contiguous())  # [K, C]

    def _targets(self, part: slice, n_safe: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`XcᵀYc[:, c] = 2 (Σ_{y=c}(x−s) − n_c m)` and `ȳ_c = 2 n_c / n − 1` (a probe that saw
        no sample: ȳ = −1).

        # n_safe: [k, 1], m: [k, d] -> (XcᵀYc [k, d, C], ȳ [k, C])
        """
        n_c = self.class_count[part].to(torch.float64)  # [k, C]
        class_sum = self.class_sum[:, part].to(torch.float64)  # [C, k, d]
        rhs = (2.0 * (class_sum - n_c.T[:, :, None] * m[None])).permute(1, 2, 0).contiguous()  # [k, d, C]
        return rhs, 2.0 * n_c / n_safe - 1.0


class AffineAccumulator(RidgeStatistics):
    """Sufficient statistics of `num_probes` ridge regressions (here: affine maps
    `x ↦ xᵀW + b`) from `dim` features onto dense targets of `out_dim` values, accumulated
    batch by batch on `device`."""

    def _allocate_targets(self) -> None:
        """The target shift, the shifted target sum and the cross sum."""
        K, d, e = self.num_probes, self.dim, self.out_dim
        self.target_shift = self.zeros(K, e)  # [K, d_out] s_y
        self.target_sum = self.zeros(K, e)  # [K, d_out] Σ (y − s_y)
        self.cross = self.zeros(K, d, e)  # [K, d, d_out] Σ (x − s)(y − s_y)ᵀ

    def add(self, features: torch.Tensor, targets: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Add one batch; problem `k` sees sample `i` (features and target) only where
        `present[i, k]`.

        # features: [B, K, d], targets: [B, K, d_out], present: [B, K] bool | None -> None
        """
        batch = self.check_features(features)
        if targets.shape != (batch, self.num_probes, self.out_dim):
            raise ValueError(f"targets must be [{batch}, {self.num_probes}, {self.out_dim}], "
                             f"got {tuple(targets.shape)}")
        sample = self.add_features(features, present)
        zy = self.shifted(targets, sample.weight, sample.seen, self.target_shift, sample.new)  # [B, K, d_out]
        self.target_sum += zy.sum(dim=0)
        self.cross.baddbmm_(sample.z.permute(1, 2, 0), zy.transpose(0, 1))  # [K, d, d_out]

    def _targets(self, part: slice, n_safe: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`XcᵀYc = Σ(x−s)(y−s_y)ᵀ − n m m_yᵀ` and `ȳ = s_y + m_y`, `m_y = Σ(y−s_y)/n` (a
        problem that saw no sample: ȳ = 0).

        # n_safe: [k, 1], m: [k, d] -> (XcᵀYc [k, d, d_out], ȳ [k, d_out])
        """
        m_y = self.target_sum[part].to(torch.float64) / n_safe  # [k, d_out]
        n = self.count[part].to(torch.float64)  # [k]
        rhs = torch.baddbmm(self.cross[part].to(torch.float64), (-n[:, None] * m)[:, :, None], m_y[:, None, :])
        return rhs, self.target_shift[part].to(torch.float64) + m_y
