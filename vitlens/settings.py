"""Names of job settings shared by the torch-free job spec and the code that implements them
(defined here once; this module imports nothing)."""

from __future__ import annotations

#: `[resources] precision`: the forward's arithmetic (vitlens.lens.precision).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

#: `[resources] projections`: the class-space projections' arithmetic (vitlens.lens.projection):
#: fp32, or "fast" (low precision, near ties recomputed in fp32: the same ranks and top-k, bit for bit).
PROJECTIONS: tuple[str, ...] = ("fp32", "fast")

#: `detail`: which per-token tables a job writes (vitlens.store.schema.DETAIL_TIERS):
#: every token's row, or the sums every paper table needs (~1 % of the bytes).
DETAILS: tuple[str, ...] = ("tokens", "summary")

#: `[explain] ln`: the final norm's scale in the §7 gradients: "live" (the paper: differentiated)
#: or "frozen" (detached, as in direct logit attribution; beyond the paper, never the default).
EXPLAIN_LN: tuple[str, ...] = ("live", "frozen")

#: `[explain] loss`: the per-block target of the §7 gradients: "ce" (the paper: cross-entropy on
#: logits) or "logit" (the class of interest's logit; beyond the paper, never the default).
EXPLAIN_LOSSES: tuple[str, ...] = ("ce", "logit")

#: `[data] transform`: where an image is resized, cropped and normalised: "timm" (on the host, bit-identical
#: to timm's eval transform) or "device" (on the actor's device, nvJPEG decode on CUDA;
#: vitlens.data.device_transform, close to timm but not bit-identical: docs/scale.md).
TRANSFORMS: tuple[str, ...] = ("timm", "device")

#: `[probe] streams`: the hidden streams a §8 linear probe may read (vitlens.lens.output.STREAMS).
PROBE_STREAMS: tuple[str, ...] = ("resid", "attn", "mlp")
