"""Linear-probe baseline (paper §8, METHOD §7): ridge probes per (block, stream, token),
fitted from streamed sufficient statistics in one batched solve; and the tuned lens, affine
maps from each block's residual stream to the last block's, fitted the same way. See
`README.md` here."""

from vitlens.probe.features import ProbeSlot, probe_slots, token_features
from vitlens.probe.fit import FittedProbes, fit_probes, probe_importance, probe_memory_bytes
from vitlens.probe.ridge import (
    AffineAccumulator,
    RidgeAccumulator,
    RidgeProbes,
    RidgeStatistics,
    affine_memory_bytes,
    probe_rank,
    ridge_memory_bytes,
)
from vitlens.probe.tuned import TunedBatch, TunedLens, fit_tuned_lens, tuned_memory_bytes

__all__ = [
    "AffineAccumulator",
    "FittedProbes",
    "ProbeSlot",
    "RidgeAccumulator",
    "RidgeProbes",
    "RidgeStatistics",
    "TunedBatch",
    "TunedLens",
    "affine_memory_bytes",
    "fit_probes",
    "fit_tuned_lens",
    "probe_importance",
    "probe_memory_bytes",
    "probe_rank",
    "probe_slots",
    "ridge_memory_bytes",
    "token_features",
    "tuned_memory_bytes",
]
