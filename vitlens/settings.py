"""Names of job settings shared by the torch-free job spec and the code that implements them
(defined here once; this module imports nothing)."""

from __future__ import annotations

#: `[resources] precision`: the forward's arithmetic (vitlens.lens.precision).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

#: `detail`: which per-token tables a job writes (vitlens.store.schema.DETAIL_TIERS):
#: every token's row, or the sums every paper table needs (~1 % of the bytes).
DETAILS: tuple[str, ...] = ("tokens", "summary")

#: `[explain] ln`: the final norm's scale in the §7 gradients: "live" (the paper: differentiated)
#: or "frozen" (detached, as in direct logit attribution; beyond the paper, never the default).
EXPLAIN_LN: tuple[str, ...] = ("live", "frozen")

#: `[explain] loss`: the per-block target of the §7 gradients: "ce" (the paper: cross-entropy on
#: logits) or "logit" (the class of interest's logit; beyond the paper, never the default).
EXPLAIN_LOSSES: tuple[str, ...] = ("ce", "logit")

#: `[probe] streams`: the hidden streams a §8 linear probe may read (vitlens.lens.output.STREAMS).
PROBE_STREAMS: tuple[str, ...] = ("resid", "attn", "mlp")
