"""Names of job settings shared by the torch-free job spec and the code that implements them
(defined here once; this module imports nothing)."""

from __future__ import annotations

#: `[resources] precision`: the forward's arithmetic (vitlens.lens.precision).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

#: `detail`: which per-token tables a job writes (vitlens.store.schema.DETAIL_TIERS):
#: every token's row, or the sums every paper table needs (~1 % of the bytes).
DETAILS: tuple[str, ...] = ("tokens", "summary")
