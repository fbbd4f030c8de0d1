"""How the lens projects one batch of streams onto class space and reduces it (METHOD §1–§2):
`ExactProjection` (fp32, the default) or `FastProjection` (`[resources] projections = "fast"`:
low precision with a rigorous per-token error bound, the near ties recomputed in fp32).

Both return the same `LogitReduction`, bit for bit: "fast" decides from the low-precision
logits only what the bound makes certain, and takes every value it keeps (correct logit,
top-k logits) and every comparison it cannot decide from the values of the fp32 GEMM the
default path runs (`F.linear(norm_final(h), W, b)` over all rows), recomputed for a subset
by `exact_logits`; tokens with ties are reduced by `reduce_logits` itself.

**Why a recompute equals the full GEMM.** The default path computes `F.linear(x, W, b)` on
all M = B·T' rows at once. A recompute runs the same function on a subset of rows (padded
with zero rows to at least `MIN_ROWS`) and, for the values of a few classes, on a subset of
`W`'s rows. Each logit then comes from the same BLAS kernel over the same K = d terms in the
same order, so it is bitwise the full GEMM's — measured, not promised: MKL's sgemm on this
project's AVX-512 machines gives other values for fewer than 16 rows or one column, so
`FastProjection` checks the identities on random data of the model's own shapes when it is
built (`reproduces_full_gemm`) and, where they fail (another BLAS, a GPU library choosing
other kernels per shape), falls back to the fp32 path (the outputs stay exact, only slower).

**The error bound** (`FastProjection.token_bound`, per token t, over all classes c). With
u the unit roundoff of the low-precision inputs (bf16: 2^-8; their products are exact in
fp32), u_a that of the accumulation (fp32, round to nearest: 2^-24; tensor cores, which may
truncate: 2^-22 is assumed), γ = (d+2)·u_a / (1 - (d+2)·u_a) (d products, the bias, and on
CUDA the bias added after the GEMM), and
s = Σ_i x_i·w_ci + b_c the exact value:

    |low - s|  <= (2u + u²) Σ|x_i||w_ci| + γ (1+u)² (Σ|x_i||w_ci| + |b_c|)    (inputs, then the sum)
    |fp32 - s| <= γ (Σ|x_i||w_ci| + |b_c|)                                     (the default GEMM)
    Σ|x_i||w_ci| + |b_c| <= ‖x‖₂ · max_c ‖w_c‖₂ + max_c |b_c| =: A_t            (Cauchy–Schwarz)

so |low - fp32| <= e_t := (2u + u² + γ((1+u)² + 1)) · A_t, plus, where the low-precision GEMM
rounds its output (bf16 on CUDA), u_o·max_c|low_tc|/(1 - u_o), and an absolute term for
subnormal inputs and products (2^-133·√d·(‖x‖₂ + max‖w_c‖₂) + 2(d+2)·2^-149). The bound is
evaluated in float64 and widened by 2^-10 before it is rounded to fp32. Then, with D = 2e_t:
- class c is certainly above the correct class y when fl(low_c - low_y) > D, certainly below
  when < -D (fl is monotone and D is a float); the rest ("near") is compared in fp32;
- the top-k lie among the candidates {c : fl(low_c - v_k) >= -D}, v_k the k-th largest low
  logit (the k classes at or above v_k have fp32 values >= v_k - e, so anything in the true
  top-k has low >= v_k - 2e), and every other class is strictly below the k-th fp32 value.
Per stream, the fp32 values of the union of every token's near classes and candidates are
one GEMM; a token whose top k+1 candidate values are not strictly ordered (a tie: the order
torch.topk gives equal values is its own), that has more than `MAX_NEEDED` such classes, or
whose bound is not finite, is recomputed as a whole fp32 row and reduced by `reduce_logits`
itself. `RecomputeStats` counts what was recomputed.

Where the projection is not `x -> norm_final(x) @ Wᵀ + b` (a family overriding
`ModelAdapter.project`), "fast" is the fp32 path (`projection_for`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from vitlens.errors import UserError
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.reduce import LogitReduction, reduce_logits
from vitlens.settings import PROJECTIONS

#: fewest rows of a recompute GEMM (zero rows pad it): MKL takes another kernel below 16
MIN_ROWS = 16
#: fewest classes of a column-subset recompute (other classes pad it)
MIN_COLUMNS = 16
#: tokens needing more fp32 classes than this are recomputed as whole rows
MAX_NEEDED = 64
#: A_t above this may overflow fp32 logits: such a token is recomputed whole
FINITE_LIMIT = 2.0 ** 120


class Projection(Protocol):
    """One (block, stream) batch of streams -> its `LogitReduction`."""

    def reduce(self, hidden: torch.Tensor, class_index: torch.Tensor) -> LogitReduction:
        """# hidden: [B, T, d], class_index: [B] -> LogitReduction ([B, T] fields)"""


def check_projections(projections: str) -> str:
    """`projections`, or a `UserError` naming the allowed values."""
    if projections not in PROJECTIONS:
        raise UserError(f"unknown projections {projections!r}: use one of {PROJECTIONS}")
    return projections


class ExactProjection:
    """The default: the adapter's own fp32 projection, reduced by `reduce_logits`."""

    def __init__(self, adapter: ModelAdapter, top_k: int) -> None:
        """Project through `adapter.project`, keep `top_k` classes per token."""
        self.adapter, self.top_k = adapter, top_k

    def reduce(self, hidden: torch.Tensor, class_index: torch.Tensor) -> LogitReduction:
        """# hidden: [B, T, d], class_index: [B] -> LogitReduction ([B, T] fields)"""
        return reduce_logits(self.adapter.project(hidden.float()), class_index, self.top_k)


def exact_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fp32 logits `F.linear(x, weight, bias)` of any row subset, bitwise those of the full
    GEMM (rows padded with zeros to `MIN_ROWS`; see the module notes).

    # x: [m, d], weight: [n, d], bias: [n] -> [m, n]
    """
    rows = x.shape[0]
    if rows < MIN_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_ROWS - rows, x.shape[1])])
    return F.linear(x, weight, bias)[:rows]


@dataclass(frozen=True)
class LowPrecision:
    """The low-precision GEMM of one device kind: its unit roundoffs (module notes)."""

    input_unit: float  # u: rounding of x and W
    accumulate_unit: float  # u_a: of the fp32 accumulation
    output_unit: float  # u_o: of the GEMM's output (0: fp32 output)


#: CPU: bf16 emulated (inputs rounded to bf16, fp32 GEMM, round to nearest)
CPU_BF16 = LowPrecision(2.0 ** -8, 2.0 ** -24, 0.0)
#: CUDA: bf16 tensor cores, fp32 accumulation (assumed to truncate: 2^-22), bf16 output
CUDA_BF16 = LowPrecision(2.0 ** -8, 2.0 ** -22, 2.0 ** -8)


@dataclass
class RecomputeStats:
    """What `FastProjection` has recomputed in fp32 since it was built (or reset)."""

    tokens: int = 0  # tokens reduced
    undecided: int = 0  # tokens whose rank or top-k set the low-precision logits left open
    rows: int = 0  # tokens recomputed as whole fp32 rows (ties, > MAX_NEEDED open classes, fallback)
    pairs: int = 0  # (token, class) pairs reduced
    pairs_recomputed: int = 0  # (token, class) fp32 values computed (rows × C + the union GEMMs)
    pairs_needed: int = 0  # (token, class) fp32 values the decisions needed (candidates, near classes)

    @property
    def undecided_share(self) -> float:
        """Share of tokens that needed an fp32 comparison."""
        return self.undecided / max(self.tokens, 1)

    @property
    def row_share(self) -> float:
        """Share of tokens recomputed as whole rows."""
        return self.rows / max(self.tokens, 1)

    @property
    def needed_share(self) -> float:
        """Share of (token, class) logits the decisions needed in fp32 (a per-token recompute's cost)."""
        return self.pairs_needed / max(self.pairs, 1)

    @property
    def pair_share(self) -> float:
        """Share of (token, class) logits computed in fp32."""
        return self.pairs_recomputed / max(self.pairs, 1)


class FastProjection:
    """`projections = "fast"`: low-precision logits, exact results (module notes)."""

    def __init__(self, adapter: ModelAdapter, top_k: int) -> None:
        """Cache the head's fp32 and bf16 weights and norms (like the memory tables: built once
        from the model's parameters) and check that recomputes reproduce the full GEMM."""
        self.adapter, self.top_k = adapter, top_k
        weight, bias = adapter.class_embedding()
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()
        self.device = self.weight.device
        self.low = CUDA_BF16 if self.device.type == "cuda" else CPU_BF16
        low_weight = self.weight.to(torch.bfloat16)
        self.low_weight = low_weight if self.device.type == "cuda" else low_weight.float()
        norms = self.weight.double().norm(dim=1)
        self.weight_norm = float(norms.max())
        self.bias_max = 0.0 if self.bias is None else float(self.bias.double().abs().max())
        self.stats = RecomputeStats()
        self.exact = ExactProjection(adapter, top_k)
        num_classes, width = self.weight.shape
        self.enabled = num_classes >= max(MIN_COLUMNS, top_k + 1) and reproduces_full_gemm(
            width, num_classes, self.device)
        if not self.enabled:
            warnings.warn("projections='fast': recomputed fp32 logits would not reproduce the full GEMM "
                          "here (or too few classes); using the fp32 projection", stacklevel=2)

    # ---- the low-precision side --------------------------------------------------------------
    def low_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from bf16-rounded inputs (CPU: emulated, fp32 accumulation).

        # x: [M, d] -> [M, C] fp32
        """
        if self.device.type == "cuda":
            low = (x.to(torch.bfloat16) @ self.low_weight.T).float()
            return low if self.bias is None else low + self.bias
        x_low = x.to(torch.bfloat16).float()
        return F.linear(x_low, self.low_weight, self.bias)

    def token_bound(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """D_t = 2·e_t, rounded up to fp32; inf where it is not finite or A_t is too large.

        # x: [M, d], low: [M, C] -> [M] fp32
        """
        width = x.shape[1]
        unit, acc, out = self.low.input_unit, self.low.accumulate_unit, self.low.output_unit
        gamma = (width + 2) * acc / (1 - (width + 2) * acc)
        relative = 2 * unit + unit * unit + gamma * ((1 + unit) ** 2 + 1)
        x_norm = x.double().norm(dim=1)  # [M]
        scale = x_norm * self.weight_norm + self.bias_max  # A_t
        error = relative * scale + 2.0 ** -133 * math.sqrt(width) * (x_norm + self.weight_norm) \
            + 2 * (width + 2) * 2.0 ** -149
        if out:
            error = error + out / (1 - out) * (low.abs().amax(dim=1).double() + self.bias_max)  # before the bias
        bound = (2 * error * (1 + 2.0 ** -10)).float()
        return bound.masked_fill(~(scale < FINITE_LIMIT), float("inf"))

    # ---- the reduction -------------------------------------------------------------------------
    def reduce(self, hidden: torch.Tensor, class_index: torch.Tensor) -> LogitReduction:
        """The `LogitReduction` of the fp32 path, from low-precision logits and the few fp32
        values the bound cannot decide.

        # hidden: [B, T, d], class_index: [B] -> LogitReduction ([B, T] fields)
        """
        batch, tokens = hidden.shape[:2]
        rows = batch * tokens
        num_classes = self.weight.shape[0]
        self.stats.tokens += rows
        self.stats.pairs += rows * num_classes
        if not self.enabled or rows < MIN_ROWS:
            self.stats.rows += rows
            self.stats.undecided += rows
            self.stats.pairs_recomputed += rows * num_classes
            return self.exact.reduce(hidden, class_index)
        x = self.adapter.norm_final(hidden.float()).reshape(rows, -1)  # [M, d]
        labels = class_index.repeat_interleave(tokens)  # [M]
        result = self._reduce_rows(x, labels)
        k = self.top_k
        return LogitReduction(
            rank=result.rank.view(batch, tokens), correct_logit=result.correct_logit.view(batch, tokens),
            topk_class=result.topk_class.view(batch, tokens, k), topk_logit=result.topk_logit.view(batch, tokens, k),
        )

    def _reduce_rows(self, x: torch.Tensor, labels: torch.Tensor) -> LogitReduction:
        """# x: [M, d] normed tokens, labels: [M] -> LogitReduction ([M] and [M, k] fields)"""
        k, (rows, num_classes) = self.top_k, (x.shape[0], self.weight.shape[0])
        low = self.low_logits(x)  # [M, C]
        bound = self.token_bound(x, low)[:, None]  # [M, 1]
        low_correct = low.gather(1, labels[:, None])  # [M, 1]
        kth = low.topk(k, dim=1).values[:, -1:]  # [M, 1]
        candidate = (low - kth) >= -bound  # [M, C]: holds the fp32 top-k (a difference: fl is monotone)
        diff = low.sub_(low_correct)  # consumes low: [M, C] low_c - low_y
        above = (diff > bound).sum(dim=1)  # certainly above the correct class
        near = diff.abs_() <= bound  # undecided (the correct class itself included)
        needed = candidate | near
        whole = ~torch.isfinite(bound[:, 0]) | (needed.sum(dim=1) > MAX_NEEDED)  # [M]
        union = needed[~whole].any(dim=0).nonzero()[:, 0]  # [U] class ids
        self.stats.undecided += int(((near.sum(dim=1) > 1) | (candidate.sum(dim=1) > k)).sum())
        self.stats.pairs_needed += int(needed.sum())
        out = LogitReduction(
            rank=torch.empty(rows, 1, dtype=torch.int32, device=x.device),
            correct_logit=torch.empty(rows, 1, device=x.device),
            topk_class=torch.empty(rows, 1, k, dtype=torch.int32, device=x.device),
            topk_logit=torch.empty(rows, 1, k, device=x.device),
        )
        partial = (~whole).nonzero()[:, 0]
        if partial.numel():
            union = _padded_columns(union, num_classes)
            exact = exact_logits(x[partial], self.weight[union], None if self.bias is None else self.bias[union])
            self.stats.pairs_recomputed += partial.numel() * union.numel()
            ordered = self._partial_rows(exact, union, candidate[partial][:, union], near[partial][:, union],
                                         above[partial], labels[partial], out, partial)
            whole[partial[~ordered]] = True
        full = whole.nonzero()[:, 0]
        if full.numel():
            self.stats.rows += full.numel()
            self.stats.pairs_recomputed += full.numel() * num_classes
            logits = exact_logits(x[full], self.weight, self.bias)[:, None]  # [m, 1, C]
            reduction = reduce_logits(logits, labels[full], k)
            _put(out, full, reduction)
        return LogitReduction(out.rank[:, 0], out.correct_logit[:, 0], out.topk_class[:, 0], out.topk_logit[:, 0])

    def _partial_rows(
        self, exact: torch.Tensor, union: torch.Tensor, candidate: torch.Tensor, near: torch.Tensor,
        above: torch.Tensor, labels: torch.Tensor, out: LogitReduction, rows: torch.Tensor,
    ) -> torch.Tensor:
        """Write the reductions of tokens decided from the union's fp32 values; return which
        were (False: a tie in their top k+1 candidates, recompute the row whole).

        # exact, candidate, near: [m, U], above, labels: [m], rows: [m] -> [m] bool
        """
        k = self.top_k
        position = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=exact.device)
        position[union] = torch.arange(union.numel(), device=exact.device)
        correct = exact.gather(1, position[labels][:, None])  # [m, 1]
        rank = above + ((exact > correct) & near).sum(dim=1)
        top = exact.masked_fill(~candidate, float("-inf")).topk(k + 1, dim=1)
        values = top.values  # [m, k+1]: the k-th must be strictly above the (k+1)-th
        ordered = (values[:, :-1] > values[:, 1:]).all(dim=1)
        decided = rows[ordered]
        _put(out, decided, LogitReduction(
            rank=rank[ordered].to(torch.int32)[:, None], correct_logit=correct[ordered],
            topk_class=union[top.indices[ordered, :k]].to(torch.int32)[:, None], topk_logit=values[ordered, None, :k],
        ))
        return ordered


def _padded_columns(union: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`union` with the lowest other classes added up to `MIN_COLUMNS` columns.

    # union: [U] sorted class ids -> [max(U, MIN_COLUMNS)]
    """
    if union.numel() >= MIN_COLUMNS:
        return union
    taken = torch.zeros(num_classes, dtype=torch.bool, device=union.device)
    taken[union] = True
    extra = (~taken).nonzero()[: MIN_COLUMNS - union.numel(), 0]
    return torch.cat([union, extra]).sort().values


def _put(out: LogitReduction, rows: torch.Tensor, values: LogitReduction) -> None:
    """Write `values` (fields [m, 1, ...]) into `out`'s rows `rows`."""
    out.rank[rows] = values.rank
    out.correct_logit[rows] = values.correct_logit
    out.topk_class[rows] = values.topk_class
    out.topk_logit[rows] = values.topk_logit


def reproduces_full_gemm(width: int, num_classes: int, device: torch.device) -> bool:
    """Whether `exact_logits` on row and class subsets gives the full GEMM's values bitwise on
    `device`, for a head of these shapes (random data; the module notes say why it is checked).
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(num_classes, width, generator=generator).to(device)
    bias = torch.randn(num_classes, generator=generator).to(device)
    x = torch.randn(4 * MIN_ROWS + 3, width, generator=generator).to(device)
    full = F.linear(x, weight, bias)
    rows = torch.randperm(x.shape[0], generator=generator).to(device)
    columns = torch.randperm(num_classes, generator=generator)[:MIN_COLUMNS].sort().values.to(device)
    for count in (1, MIN_ROWS - 1, MIN_ROWS + 1, x.shape[0] - 1):
        picked = rows[:count]
        if not torch.equal(exact_logits(x[picked], weight, bias), full[picked]):
            return False
        if not torch.equal(exact_logits(x[picked], weight[columns], bias[columns]), full[picked][:, columns]):
            return False
    return True


def projection_for(adapter: ModelAdapter, projections: str, top_k: int) -> Projection:
    """The projection a `Lens` uses: "fp32", or "fast" where the adapter's projection is the
    affine `norm_final(h) @ Wᵀ + b` (`ModelAdapter.project` not overridden); otherwise fp32."""
    if check_projections(projections) == "fast" and type(adapter).project is ModelAdapter.project:
        return FastProjection(adapter, top_k)
    return ExactProjection(adapter, top_k)
