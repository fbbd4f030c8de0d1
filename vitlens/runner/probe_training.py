"""The training pass of the `probe` experiment (paper §8, METHOD §7) inside one actor.

The runner only streams: the [probe] training shards are read once with the same decode
pipeline as the analysed shards, and each batch goes to `vitlens.probe.fit_probes`, which
accumulates the ridge statistics on the device and solves every probe at once (no hidden
state is written anywhere). The fitted probes stay in the actor's memory for every analysed
shard of its variant; an actor that restarts fits them again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from vitlens.data.geometry import EvalGeometry
from vitlens.data.loader import reader_options, shard_batches
from vitlens.data.manifest import shard_entries
from vitlens.errors import UserError
from vitlens.probe import FittedProbes, TunedLens, fit_probes, fit_tuned_lens
from vitlens.runner.spec import JobSpec


@dataclass(frozen=True)
class Trained:
    """What one training pass fitted (the probes or the tuned lens), with what the analysed
    shards are checked against."""

    fitted: FittedProbes | TunedLens
    train_keys: frozenset[str]  # every training image key read (used or not)
    seconds: float  # the training pass and the solve


def _training_shards(job: JobSpec) -> list[tuple[str, int | None, str | None]]:
    """(url, expected samples, expected sha256) of each [probe] training shard."""
    data = job.probe.data
    if data is None:
        raise UserError("experiment 'probe' needs [probe] training shards")
    if data.manifest is not None:
        return [(e.url, e.samples, e.sha256 if data.verify else None) for e in shard_entries(data.manifest)]
    return [(url, None, None) for url in data.shards]


def _training_batches(
    job: JobSpec, model: torch.nn.Module, geometry: EvalGeometry, token_cell: tuple[int, int],
    num_prefix_tokens: int, device: torch.device, keys: set[str],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The [probe] training shards' batches on `device`, every key read added to `keys`.

    Rejected training samples are skipped: those that do not decode, and those whose
    `class_index` is no class of `model` (stage `label`: the ridge targets need a class
    below `model.num_classes`); they are not written anywhere (the `rejects` table holds
    the analysed shards' samples). A damaged training shard raises its `ShardReadError`
    (the analysed shard that needed the fit fails).

    # -> (images [B, 3, H, W], labels [B] int64) per batch
    """
    for url, samples, sha256 in _training_shards(job):
        for batch in shard_batches(url, geometry, job.batch_size, token_cell, num_prefix_tokens,
                                   on_reject=lambda shard, key, reason, stage: None,
                                   expected_samples=samples, expected_sha256=sha256,
                                   workers=job.resources.workers, pin_memory=device.type == "cuda",
                                   num_classes=model.num_classes,
                                   **reader_options(getattr(job.data, "transform", "timm"), device)):
            keys.update(batch.keys)
            yield batch.model_input(device), batch.class_index.to(device)


def train(
    experiment: str,
    job: JobSpec,
    model: torch.nn.Module,
    geometry: EvalGeometry,
    token_cell: tuple[int, int],
    num_prefix_tokens: int,
    device: torch.device,
) -> Trained:
    """Stream the job's [probe] training shards through `model` and fit, for `experiment`
    "probe", every linear probe (METHOD §7) or, for "tuned", the tuned lens's maps (METHOD §7b;
    the same shots per class and ridge penalty)."""
    from vitlens.lens.families import adapter_for

    started = time.perf_counter()
    keys: set[str] = set()
    settings, adapter = job.probe, adapter_for(model)
    batches = _training_batches(job, model, geometry, token_cell, num_prefix_tokens, device, keys)
    with torch.no_grad():
        if experiment == "tuned":
            fitted: FittedProbes | TunedLens = fit_tuned_lens(
                adapter, batches, num_classes=model.num_classes, shots=settings.shots, alpha=settings.alpha,
                device=device)
        else:
            fitted = fit_probes(adapter, batches, num_classes=model.num_classes, streams=settings.streams,
                                shots=settings.shots, alpha=settings.alpha, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Trained(fitted, frozenset(keys), time.perf_counter() - started)


def check_disjoint(trained: Trained, keys: list[str], shard: str) -> None:
    """Refuse an analysed batch holding a training image (the key check for shards that are
    not local files, which the driver's preflight could not list)."""
    overlap = sorted(trained.train_keys.intersection(keys))
    if overlap:
        raise UserError(f"analysed shard {shard} holds {len(overlap)} image(s) of the [probe] training shards, "
                        f"e.g. {overlap[0]}; train the probes on disjoint images")
