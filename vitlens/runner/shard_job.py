"""Analyse one shard with one loaded variant under every experiment of a job (no Ray here).

`ShardProcessor` reads the shard once; each batch goes through every experiment's lens
run (or, for `explain`, `vitlens.explain.evaluate.explain_batch`), the results become
`tokens`/`images` (or `explain`/`perturbation_curves`) rows (vitlens.store.records,
vitlens.store.explain_records) streamed into staged files, and only when every file of
the shard is complete are they renamed into place and the done-marker written. A crash
at any point leaves no partial file behind.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable

import torch

from vitlens.data.geometry import EvalGeometry
from vitlens.data.reader import iter_shard_batches
from vitlens.data.token_labels import LABEL_CLASS, LABEL_CONTEXT
from vitlens.explain.evaluate import explain_batch
from vitlens.lens import Lens, token_keep_from_labels
from vitlens.lens.anatomy import EXPLAIN_EXPERIMENT, ViTAnatomy
from vitlens.lens.memories import SUBLAYERS
from vitlens.metrics.sublayers import class_value_agreement
from vitlens.models.registry import load_variant
from vitlens.runner.spec import JobSpec
from vitlens.store.layout import (
    NO_EXPERIMENT,
    StagedParquetWriter,
    done_experiments,
    done_marker,
    table_file,
    write_json_atomic,
    write_parquet_atomic,
)
from vitlens.store.explain_records import explain_table, perturbation_curves_table
from vitlens.store.records import images_table, tokens_table
from vitlens.store.schema import schema_of, to_table

#: The experiment that runs the explainability methods instead of the lens (EXPLAIN_EXPERIMENT), and its tables.
EXPLAIN_TABLES: tuple[str, ...] = ("explain", "perturbation_curves")
LENS_TABLES: tuple[str, ...] = ("tokens", "images")

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


def tables_of(experiment: str) -> tuple[str, ...]:
    """The tables an experiment writes."""
    return EXPLAIN_TABLES if experiment == EXPLAIN_EXPERIMENT else LENS_TABLES


class ShardProcessor:
    """One loaded variant; `process(shard)` writes every table of every experiment of the shard."""

    def __init__(self, variant: str, job: JobSpec, device: str = "cpu") -> None:
        self.variant = variant
        self.job = job
        self.device = torch.device(device)
        loaded = load_variant(variant, device=self.device, checkpoint_path=job.checkpoint_for(variant),
                              head_path=job.head_for(variant), model_kwargs=job.model_kwargs_for(variant))
        self.model = loaded.model
        self.class_names = loaded.class_names
        self.lens = Lens(self.model)
        self.geometry = EvalGeometry.from_data_config(loaded.data_config)
        self.patch_size = self.lens.anatomy.token_cell  # the input pixels of one image token (hybrids: the stem's stride)
        self.has_class_token = self.lens.anatomy.has_class_token
        self.num_prefix_tokens = self.lens.anatomy.num_prefix_tokens
        self.experiments = applicable_experiments(job.experiments, self.lens.anatomy)
        self._write_params()

    def _write_params(self) -> None:
        """The parameter-only `params` table of this variant (same content on every actor)."""
        path = table_file(self.job.output, "params", self.variant, NO_EXPERIMENT, "params")
        if path.is_file():
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
        write_parquet_atomic(table, path)

    def process(
        self,
        shard_url: str,
        stem: str,
        on_batch: Callable[[int], None] | None = None,
        experiments: tuple[str, ...] | None = None,
        expected_samples: int | None = None,
        expected_sha256: str | None = None,
    ) -> dict[str, Any]:
        """Analyse one shard with `experiments` (default: every experiment of the job), then
        write the done-marker listing them with those done before.

        `stem` is the shard's id. With `expected_samples` / `expected_sha256` (its manifest
        entry) a shard that holds another number of samples or other bytes is not done;
        neither is one that does not read to its end: `vitlens.data.reader.ShardReadError`
        is raised after every staged file was dropped, so nothing of the shard is written
        and the next run redoes it.

        Returns {variant, shard, images, rows, rejects, seconds, experiments}.
        """
        started = time.perf_counter()
        requested = self.job.experiments if experiments is None else tuple(experiments)
        unknown = [e for e in requested if e not in self.job.experiments]
        if unknown:
            raise ValueError(f"experiments {unknown} are not in job {self.job.name!r}")
        run = [e for e in self.experiments if e in requested]
        rejects: list[tuple[str, str]] = []
        writers = {
            (table, experiment): StagedParquetWriter(
                table_file(self.job.output, table, self.variant, experiment, stem), schema_of(table)
            )
            for experiment in run
            for table in tables_of(experiment)
        }
        images = 0
        try:
            batches = iter_shard_batches(
                shard_url, self.geometry, self.job.batch_size, self.patch_size, self.num_prefix_tokens,
                on_reject=lambda shard, key, reason: rejects.append((key, reason)),
                expected_samples=expected_samples, expected_sha256=expected_sha256,
            )
            for batch_index, batch in enumerate(batches):
                images += len(batch.keys)
                for experiment in run:
                    rows = self._explain(batch) if experiment == EXPLAIN_EXPERIMENT else self._analyse(batch, experiment, stem)
                    for table, table_rows in zip(tables_of(experiment), rows):
                        writers[table, experiment].write(table_rows)
                if on_batch is not None:
                    on_batch(batch_index)
            reject_rows = to_table("rejects", {
                "shard": [stem] * len(rejects),
                "image_key": [key for key, _ in rejects],
                "stage": ["decode"] * len(rejects),
                "reason": [reason for _, reason in rejects],
            })
            write_parquet_atomic(reject_rows, table_file(self.job.output, "rejects", self.variant, NO_EXPERIMENT, stem))
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for writer in writers.values():
            writer.commit()
        rows = sum(w.rows for (table, _), w in writers.items() if table in ("tokens", "explain"))
        # A requested experiment that does not apply to this model (e.g. explain for GAP) counts as done.
        done = sorted(done_experiments(self.job.output, self.variant, stem, expected_sha256) | set(requested))
        stats = {
            "variant": self.variant, "shard": shard_url, "images": images, "rows": rows,
            "rejects": len(rejects), "seconds": time.perf_counter() - started, "experiments": done,
            "sha256": expected_sha256,  # verified in the read; a later run redoes the shard if it changes
        }
        write_json_atomic(stats, done_marker(self.job.output, self.variant, stem))
        return stats

    def _analyse(self, batch: Any, experiment: str, shard_id: str) -> tuple[Any, Any]:
        """Run one experiment on one batch and turn it into (tokens, images) rows."""
        perturbation, drop_label = EXPERIMENT_SETTINGS[experiment]
        token_keep = None
        if drop_label is not None:
            token_keep = token_keep_from_labels(batch.token_label, drop_label, self.num_prefix_tokens)
        images = batch.images.to(self.device, non_blocking=True)
        result = self.lens.run(images, batch.class_index, attention_perturbation=perturbation, token_keep=token_keep)
        names = [self.class_names[i] if 0 <= i < len(self.class_names) else None for i in batch.class_index.tolist()]
        return (
            tokens_table(result, batch.keys, batch.fg_fraction, batch.token_label, self.has_class_token),
            images_table(result, batch.keys, shard_id, names, batch.token_label),
        )


    def _explain(self, batch: Any) -> tuple[Any, Any]:
        """Run the explainability methods and deletion tests on one batch: (explain, curves) rows."""
        settings = self.job.explain
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.class_index.to(self.device)
        seed = zlib.crc32("\n".join(batch.keys).encode())  # the random baseline, stable per batch
        result = explain_batch(self.model, images, labels, settings.target, settings.source,
                               settings.curve_points, seed)
        return (
            explain_table(result, batch.keys, batch.token_label, batch.fg_fraction, self.num_prefix_tokens),
            perturbation_curves_table(result, batch.keys),
        )
