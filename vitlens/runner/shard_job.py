"""Analyse one shard with one loaded variant under every experiment of a job (no Ray here).

`ShardProcessor` reads the shard once, as an overlapped pipeline:

    decode workers (DataLoader processes)  ->  device step (this thread)  ->  background writer
    JPEG/PNG decode, resize, token labels      every experiment's lens run     rows + Parquet

The shard's samples are decoded `resources.workers` processes ahead (`vitlens.data.loader`,
pinned memory and non-blocking copies on CUDA); each batch goes through every experiment's
lens run (or, for `explain`, `vitlens.explain.evaluate.explain_batch`); the results become
rows of the job's detail tier — `tokens` (or `token_summary` / `residual_match`) and
`images`, or `explain` / `perturbation_curves` (vitlens.store.records,
vitlens.store.explain_records) — built and streamed into staged files by one background
thread (`vitlens.store.background`) in batch order, so the device never waits for Parquet.
Only when every file of the shard is complete are they renamed into place and the
done-marker written. A crash at any point (a decode worker, the device step, the writer)
leaves no partial file behind.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, Callable, NamedTuple

import torch

from vitlens.data.geometry import EvalGeometry
from vitlens.data.loader import reader_options, shard_batches
from vitlens.data.token_labels import LABEL_CLASS, LABEL_CONTEXT
from vitlens.explain.deletion import kept_token_counts
from vitlens.explain.evaluate import PerturbationCurve, explain_batch, perturbation_curves
from vitlens.lens import Lens, token_keep_from_labels
from vitlens.lens.anatomy import EXPLAIN_EXPERIMENT, ViTAnatomy
from vitlens.lens.heads import HEADS_EXPERIMENT, head_attribution
from vitlens.lens.memories import SUBLAYERS
from vitlens.metrics.sublayers import class_value_agreement
from vitlens.models.registry import load_variant
from vitlens.probe import probe_importance
from vitlens.runner.device_clock import DeviceClock
from vitlens.runner.probe_training import Trained, check_disjoint, train
from vitlens.runner.spec import JobSpec
from vitlens.store.background import BackgroundWriter
from vitlens.store.layout import (
    NO_EXPERIMENT,
    StagedParquetWriter,
    commit_marker,
    earlier_marker,
    kept_files,
    table_key,
)
from vitlens.store.explain_records import explain_table, perturbation_curves_table
from vitlens.store.head_records import head_tables, tuned_table
from vitlens.store.probe_records import probes_table
from vitlens.store.records import images_table, summary_tables, tokens_table
from vitlens.store.schema import DETAIL_TIERS, schema_of, to_table
from vitlens.store.storage import open_storage

#: The experiment that runs the explainability methods instead of the lens (EXPLAIN_EXPERIMENT), and its tables.
EXPLAIN_TABLES: tuple[str, ...] = ("explain", "perturbation_curves")
#: The §8 linear-probe experiment: probe ranks per token, and the deletion curves of method `linear_probe`.
PROBE_EXPERIMENT = "probe"
PROBE_TABLES: tuple[str, ...] = ("probes", "perturbation_curves")
#: The per-head attribution experiment (METHOD §3b, HEADS_EXPERIMENT): per tier, its tables.
HEADS_TABLES: dict[str, tuple[str, ...]] = {"tokens": ("heads", "head_sources"),
                                            "summary": ("head_summary", "head_sources")}
#: The tuned lens (METHOD §7b), fitted on the [probe] training shards.
TUNED_EXPERIMENT = "tuned"
#: The deletion method whose importance comes from the probes (METHOD §7).
PROBE_METHOD = "linear_probe"
#: An experiment that deletion tests need, to tell whether a family can shorten its sequence.
TOKEN_REMOVAL = "remove_class_tokens"
#: The device time of each batch's model input (normalisation, or the device transform),
#: made once per batch for every experiment: a key of the shard's `experiment_seconds`.
MODEL_INPUT = "model_input"


class ProbeBatch(NamedTuple):
    """What the `probe` experiment keeps of one batch."""

    ranks: torch.Tensor  # [B, K, T] int32, -1 where a slot does not cover a position
    curves: list[PerturbationCurve]  # method linear_probe, both deletion tests (none when tokens cannot be removed)

#: lens experiment -> (attention perturbation, label of the image tokens to remove)
EXPERIMENT_SETTINGS: dict[str, tuple[str | None, int | None]] = {
    "baseline": (None, None),
    "attn_self_only": ("self_only", None),
    "attn_no_cls": ("no_cls", None),
    "remove_class_tokens": (None, LABEL_CLASS),
    "remove_context_tokens": (None, LABEL_CONTEXT),
}


def applicable_experiments(experiments: tuple[str, ...], anatomy: ViTAnatomy) -> tuple[str, ...]:
    """The experiments that exist for a model: its family adapter names those that do not
    (`attn_no_cls` without a CLS token, `explain` unless the head reads the CLS token, the
    attention experiments for XCiT, ...) in `anatomy.skipped`."""
    return tuple(e for e in experiments if anatomy.skip_reason(e) is None)


def tables_of(experiment: str, detail: str = "tokens") -> tuple[str, ...]:
    """The tables an experiment writes in a job of `detail` tier."""
    if experiment == EXPLAIN_EXPERIMENT:
        return EXPLAIN_TABLES
    if experiment == PROBE_EXPERIMENT:
        return PROBE_TABLES
    if experiment == HEADS_EXPERIMENT:
        return HEADS_TABLES[detail]
    if experiment == TUNED_EXPERIMENT:
        return ("tuned",)
    return DETAIL_TIERS[detail] + ("images",)


class ShardProcessor:
    """One loaded variant; `process(shard)` writes every table of every experiment of the shard."""

    def __init__(self, variant: str, job: JobSpec, device: str = "cpu") -> None:
        self.variant = variant
        self.job = job
        self.device = torch.device(device)
        self.storage = open_storage(job.output)
        loaded = load_variant(variant, device=self.device, checkpoint_path=job.checkpoint_for(variant),
                              head_path=job.head_for(variant), model_kwargs=job.model_kwargs_for(variant))
        self.model = loaded.model
        self.class_names = loaded.class_names
        self.data_config = loaded.data_config
        self.lens = Lens(self.model, precision=job.resources.precision, projections=job.resources.projections)
        self.geometry = EvalGeometry.from_data_config(loaded.data_config)
        self.patch_size = self.lens.anatomy.token_cell  # the input pixels of one image token (hybrids: the stem's stride)
        self.has_class_token = self.lens.anatomy.has_class_token
        self.num_prefix_tokens = self.lens.anatomy.num_prefix_tokens
        self.experiments = applicable_experiments(job.experiments, self.lens.anatomy)
        self.probes: Trained | None = None  # fitted on the first shard that runs `probe`
        self.tuned: Trained | None = None  # fitted on the first shard that runs `tuned`
        self._write_params()
        self._write_variant()

    def _write_variant(self) -> None:
        """The `variants` row of this variant: what the report needs to draw its token grid."""
        key = table_key("variants", self.variant, NO_EXPERIMENT, "variant")
        if self.storage.exists(key):
            return
        anatomy = self.lens.anatomy
        height, width = self.geometry.input_size
        table = to_table("variants", {
            "family": [anatomy.family], "num_blocks": [anatomy.num_blocks],
            "num_prefix_tokens": [anatomy.num_prefix_tokens],
            "grid_rows": [anatomy.grid_size[0]], "grid_cols": [anatomy.grid_size[1]],
            "input_height": [height], "input_width": [width], "num_classes": [anatomy.num_classes],
            "data_config": [json.dumps(self.data_config, sort_keys=True, default=list)],
            "class_names": [list(self.class_names)],
        })
        self.storage.write_table(table, key)

    def _write_params(self) -> None:
        """The parameter-only `params` table of this variant (same content on every actor)."""
        key = table_key("params", self.variant, NO_EXPERIMENT, "params")
        if self.storage.exists(key):
            return
        adapter = self.lens.adapter
        blocks, sublayers, classes, scores = [], [], [], []
        with torch.inference_mode():
            head = adapter.class_embedding()[0].detach()
            for block in range(1, self.lens.anatomy.num_blocks + 1):
                for sublayer in SUBLAYERS:
                    agreement = class_value_agreement(head, adapter.value_vectors(block, sublayer).detach())
                    blocks.append(torch.full_like(agreement, block, dtype=torch.int16))
                    sublayers += [sublayer] * agreement.numel()
                    classes.append(torch.arange(agreement.numel()))
                    scores.append(agreement)
        table = to_table("params", {
            "block": torch.cat(blocks).cpu().numpy(),
            "sublayer": sublayers,
            "class_index": torch.cat(classes).numpy(),
            "class_value_agreement": torch.cat(scores).float().cpu().numpy(),
        })
        self.storage.write_table(table, key)

    def process(
        self,
        shard_url: str,
        stem: str,
        on_batch: Callable[[int], None] | None = None,
        experiments: tuple[str, ...] | None = None,
        expected_samples: int | None = None,
        expected_sha256: str | None = None,
        fresh: bool = False,
        before_marker: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Analyse one shard with `experiments` (default: every experiment of the job), then
        write the done-marker listing them with those done before.

        `stem` is the shard's id. With `expected_samples` / `expected_sha256` (its manifest
        entry) a shard that holds another number of samples or other bytes is not done;
        neither is one that does not read to its end: `vitlens.data.reader.ShardReadError`
        is raised after every staged file was dropped, so nothing of the shard is written
        and the next run redoes it.

        The marker names every file of the shard with its size and sha256: those written now,
        and those of the experiments an earlier marker lists that were not redone (none with
        `fresh`, for a shard whose earlier files were found damaged). Files of the earlier
        marker that the new one does not name are deleted after it is written.

        Returns {variant, shard, images, rows, rejects, seconds, experiments}.
        """
        started = time.perf_counter()
        requested = self.job.experiments if experiments is None else tuple(experiments)
        unknown = [e for e in requested if e not in self.job.experiments]
        if unknown:
            raise ValueError(f"experiments {unknown} are not in job {self.job.name!r}")
        run = [e for e in self.experiments if e in requested]
        rejects: list[tuple[str, str, str]] = []  # (image key, reason, stage)
        detail = self.job.detail
        writers = {
            (table, experiment): StagedParquetWriter(
                self.storage, table_key(table, self.variant, experiment, stem), schema_of(table)
            )
            for experiment in run
            for table in tables_of(experiment, detail)
        }
        images = 0
        clocks = {name: DeviceClock(self.device) for name in (MODEL_INPUT, *run)}
        seconds: dict[str, float] = {}
        background = BackgroundWriter(depth=4)
        try:
            if PROBE_EXPERIMENT in run and self.probes is None:
                self.probes = train(PROBE_EXPERIMENT, self.job, self.model, self.geometry, self.patch_size,
                                    self.num_prefix_tokens, self.device)
                seconds["probe_fit"] = self.probes.seconds
            if TUNED_EXPERIMENT in run and self.tuned is None:
                self.tuned = train(TUNED_EXPERIMENT, self.job, self.model, self.geometry, self.patch_size,
                                   self.num_prefix_tokens, self.device)
                seconds["tuned_fit"] = self.tuned.seconds
            batches = shard_batches(
                shard_url, self.geometry, self.job.batch_size, self.patch_size, self.num_prefix_tokens,
                on_reject=lambda shard, key, reason, stage: rejects.append((key, reason, stage)),
                expected_samples=expected_samples, expected_sha256=expected_sha256,
                workers=self.job.resources.workers, pin_memory=self.device.type == "cuda",
                num_classes=self.lens.anatomy.num_classes,
                **reader_options(getattr(self.job.data, "transform", "timm"), self.device),
            )
            for batch_index, batch in enumerate(batches):
                images += len(batch.keys)
                with clocks[MODEL_INPUT]:  # once per batch, shared by every experiment (read only)
                    model_input = batch.model_input(self.device)  # [B, 3, H, W] float32
                for experiment in run:
                    with clocks[experiment]:
                        result = self._device_step(batch, model_input, experiment, stem)
                    background.submit(self._row_writer(writers, experiment, batch, result, stem))
                if on_batch is not None:
                    on_batch(batch_index)
            background.close()
            reject_rows = to_table("rejects", {
                "shard": [stem] * len(rejects),
                "image_key": [key for key, _, _ in rejects],
                "stage": [stage for _, _, stage in rejects],
                "reason": [reason for _, reason, _ in rejects],
            })
            rejects_key = self.storage.unique_key(table_key("rejects", self.variant, NO_EXPERIMENT, stem))
            committed = [self.storage.write_table(reject_rows, rejects_key)]
        except BaseException:
            try:
                background.close()
            except BaseException:
                pass  # the first error is the one raised
            for writer in writers.values():
                writer.abort()
            raise
        committed += [writer.commit() for writer in writers.values()]
        rows = sum(w.rows for (table, _), w in writers.items()
                   if table in ("tokens", "token_summary", "explain", "probes", "heads", "head_summary", "tuned"))
        seconds.update({experiment: clock.seconds for experiment, clock in clocks.items()})
        earlier = earlier_marker(self.storage, self.variant, stem, expected_sha256, fresh)
        carried = sorted(set(earlier.get("experiments", ())) - set(run)) if earlier else []
        # A requested experiment that does not apply to this model (e.g. explain for GAP) counts as done.
        done = sorted(set(carried) | set(requested))
        stats = {
            "variant": self.variant, "shard": shard_url, "images": images, "rows": rows,
            "rejects": len(rejects),  # sample rejects, counted per stage (decode, label) below
            "rejects_by_stage": {stage: sum(r[2] == stage for r in rejects) for stage in sorted({r[2] for r in rejects})},
            "seconds": time.perf_counter() - started, "experiments": done,
            "sha256": expected_sha256,  # verified in the read; a later run redoes the shard if it changes
            "device_seconds": sum(clock.seconds for clock in clocks.values()),  # the device step alone
            "experiment_seconds": seconds,  # per experiment (CUDA events on a GPU), model_input, probe_fit
            "peak_device_bytes": max((clock.peak_bytes() for clock in clocks.values()), default=0),
        }
        if before_marker is not None:
            before_marker()
        commit_marker(self.storage, self.variant, stem, stats,
                      kept_files(self.storage, earlier, carried, self.variant, stem) + committed, earlier)
        return stats

    def _device_step(self, batch: Any, images: torch.Tensor, experiment: str, stem: str) -> Any:
        """One experiment's device step on one batch (its result stays on the device).

        # images: [B, 3, H, W] float32 on the device, `batch.model_input` (never modified)
        """
        if experiment == EXPLAIN_EXPERIMENT:
            return self._explain(batch, images)
        if experiment == PROBE_EXPERIMENT:
            return self._probe(batch, images, stem)
        labels = batch.class_index.to(self.device)
        if experiment == HEADS_EXPERIMENT:
            return head_attribution(self.lens.adapter, images, labels, batch.token_label)
        if experiment == TUNED_EXPERIMENT:
            assert self.tuned is not None
            check_disjoint(self.tuned, batch.keys, stem)
            with torch.no_grad():
                return self.tuned.fitted.reduce(self.lens.adapter, images, labels)
        return self._analyse(batch, images, experiment)

    def _analyse(self, batch: Any, images: torch.Tensor, experiment: str) -> Any:
        """The device step of one lens experiment on one batch: its `LensBatch` (on the device)."""
        perturbation, drop_label = EXPERIMENT_SETTINGS[experiment]
        token_keep = None
        if drop_label is not None:
            token_keep = token_keep_from_labels(batch.token_label, drop_label, self.num_prefix_tokens)
        return self.lens.run(images, batch.class_index, attention_perturbation=perturbation, token_keep=token_keep)

    def _explain(self, batch: Any, images: torch.Tensor) -> Any:
        """The device step of `explain` on one batch: every method and deletion test."""
        settings = self.job.explain
        labels = batch.class_index.to(self.device)
        seed = zlib.crc32("\n".join(batch.keys).encode())  # the random baseline, stable per batch
        return explain_batch(self.model, images, labels, settings.target, settings.source, settings.curve_points, seed,
                             ln=settings.ln, loss=settings.loss, random_orders=settings.random_orders)

    def _probe(self, batch: Any, images: torch.Tensor, stem: str) -> ProbeBatch:
        """The device step of `probe` on one batch: every probe's rank of the true class, and
        the deletion tests of the probes' importance (METHOD §7)."""
        assert self.probes is not None
        check_disjoint(self.probes, batch.keys, stem)
        labels = batch.class_index.to(self.device)
        probes = self.probes.fitted
        with torch.no_grad():
            ranks = probes.ranks(self.lens.adapter, images, labels)
        curves: list[PerturbationCurve] = []
        if self.lens.anatomy.skip_reason(TOKEN_REMOVAL) is None:
            importance = probe_importance(ranks, probes.slots, self.num_prefix_tokens)
            kept = kept_token_counts(importance.shape[1], self.job.explain.curve_points)
            curves = perturbation_curves(self.model, images, labels, {PROBE_METHOD: importance}, kept)
        return ProbeBatch(ranks, curves)

    def _row_writer(
        self, writers: dict[tuple[str, str], StagedParquetWriter], experiment: str, batch: Any, result: Any, stem: str
    ) -> Callable[[], None]:
        """The background task that turns one device result into its tables' rows and writes them."""

        def write() -> None:
            if experiment == EXPLAIN_EXPERIMENT:
                tables = {
                    "explain": explain_table(result, batch.keys, batch.token_label, batch.fg_fraction,
                                             self.num_prefix_tokens),
                    "perturbation_curves": perturbation_curves_table(result.curves, batch.keys),
                }
            elif experiment == HEADS_EXPERIMENT:
                tables = head_tables(result, batch.keys, batch.token_label, self.job.detail)
            elif experiment == TUNED_EXPERIMENT:
                tables = {"tuned": tuned_table(result.rank, result.correct_logit, batch.keys, batch.token_label,
                                               self.num_prefix_tokens, self.has_class_token)}
            elif experiment == PROBE_EXPERIMENT:
                tables = {
                    "probes": probes_table(result.ranks, self.probes.fitted.slots, batch.keys, batch.token_label,
                                           self.num_prefix_tokens, self.has_class_token),
                    "perturbation_curves": perturbation_curves_table(result.curves, batch.keys),
                }
            else:
                names = [self.class_names[i] if 0 <= i < len(self.class_names) else None
                         for i in batch.class_index.tolist()]
                tables = {"images": images_table(result, batch.keys, stem, names, batch.token_label)}
                if self.job.detail == "summary":
                    tables["token_summary"], tables["residual_match"] = summary_tables(
                        result, batch.keys, batch.token_label, self.has_class_token)
                else:
                    tables["tokens"] = tokens_table(result, batch.keys, batch.fg_fraction, batch.token_label,
                                                    self.has_class_token)
            for table, rows in tables.items():
                writers[table, experiment].write(rows)

        return write
