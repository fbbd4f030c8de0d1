"""Linear-probe baseline (paper §8, METHOD §7): ridge probes per (block, stream, token),
fitted from streamed sufficient statistics in one batched solve. See `README.md` here."""

from vitlens.probe.features import ProbeSlot, probe_slots, token_features
from vitlens.probe.fit import FittedProbes, fit_probes, probe_importance, probe_memory_bytes
from vitlens.probe.ridge import RidgeAccumulator, RidgeProbes, probe_rank, ridge_memory_bytes

__all__ = [
    "FittedProbes",
    "ProbeSlot",
    "RidgeAccumulator",
    "RidgeProbes",
    "fit_probes",
    "probe_importance",
    "probe_memory_bytes",
    "probe_rank",
    "probe_slots",
    "ridge_memory_bytes",
    "token_features",
]
