"""The `probe` experiment (paper §8) in a job: its spec, the refusal of overlapping training
images, the `probes` rows, the `linear_probe` deletion curves and the timings in `runs`.

Uses the smallest embedded zoo model (16 image tokens at 64 px, 6 blocks, 20 classes).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import ray
import torch

from vitlens.cli import main as cli_main
from vitlens.errors import UserError
from vitlens.explain.deletion import deletion_predictions, kept_token_counts
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import DataSpec, JobSpec, ProbeSpec, load_job_spec

VARIANT = "shapes_vit_p16"
DEPTH, TOKENS, PREFIX = 6, 17, 1


def _shapes(out: Path, split: str, per_class: int, seed: int = 0) -> Path:
    code = cli_main(["shards", "shapes", "--classes", "20", "--per-class", str(per_class), "--size", "64",
                     "--shard-size", "20", "--seed", str(seed), "--split", split, "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe-data")
    return _shapes(root / "train", "train", 3), _shapes(root / "validation", "validation", 1)


def _job(output: Path, analysed: Path, training: Path, streams=("resid", "attn", "mlp"), shots: int = 2) -> JobSpec:
    return JobSpec(name="probe-test", output=str(output), variants=(VARIANT,),
                   data=DataSpec(manifest=str(analysed / "manifest.json")),
                   experiments=("baseline", "probe"), batch_size=8,
                   probe=ProbeSpec(manifest=str(training / "manifest.json"), shots=shots, streams=streams))


def test_probe_spec_needs_training_shards_and_known_streams(tmp_path: Path):
    with pytest.raises(UserError, match="'probe' needs its training shards"):
        JobSpec(name="j", output="o", variants=(VARIANT,), data=DataSpec(manifest="m"), experiments=("probe",))
    with pytest.raises(UserError, match="neither 'probe' nor 'tuned'"):
        JobSpec(name="j", output="o", variants=(VARIANT,), data=DataSpec(manifest="m"),
                probe=ProbeSpec(manifest="t"))
    spec = tmp_path / "job.toml"
    spec.write_text('name = "j"\noutput = "out"\nvariants = ["v"]\nexperiments = ["probe"]\n'
                    '[data]\nmanifest = "a/manifest.json"\n[probe]\nmanifest = "b/manifest.json"\n'
                    'streams = ["mlp", "resid"]\nshots = 4\nalpha = 2\n')
    job = load_job_spec(spec)
    assert job.probe.manifest == str((tmp_path / "b/manifest.json").resolve())
    assert job.probe.streams == ("resid", "mlp") and job.probe.shots == 4 and job.probe.alpha == 2.0
    spec.write_text(spec.read_text().replace('["mlp", "resid"]', '["mlp", "keys"]'))
    with pytest.raises(UserError, match=r"job.toml: 'probe.streams' must be"):
        load_job_spec(spec)


def test_overlapping_training_images_are_refused(data: tuple[Path, Path], tmp_path: Path, capsys):
    training, analysed = data
    # the same shards on both sides
    spec = tmp_path / "same.toml"
    spec.write_text(f'name = "j"\noutput = "out"\nvariants = ["{VARIANT}"]\nexperiments = ["probe"]\n'
                    f'[data]\nmanifest = "{analysed}/manifest.json"\n[probe]\nmanifest = "{analysed}/manifest.json"\n')
    assert cli_main(["run", str(spec)]) == 2
    assert "is also an analysed shard" in capsys.readouterr().err
    # other shard files that share image keys: the validation split written again elsewhere
    copy = _shapes(tmp_path / "copy", "validation", 1)
    spec.write_text(spec.read_text().replace(f'[probe]\nmanifest = "{analysed}', f'[probe]\nmanifest = "{copy}'))
    assert cli_main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "share 20 image key(s)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("table=*"))


@pytest.fixture(scope="module")
def probed(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, dict, Path]:
    training, analysed = data
    job = _job(tmp_path_factory.mktemp("probe-results"), analysed, training)
    processor = ShardProcessor(VARIANT, job)
    url = str(analysed / "shapes-validation-000000.tar")
    stats = processor.process(url, "shapes-validation-000000")
    return job, stats, Path(url)


def _rows(job: JobSpec, sql: str) -> list[tuple]:
    con = duckdb.connect()
    return con.execute(sql.replace("ROOT", job.output)).fetchall()


def test_probes_rows_cover_every_slot_and_token(probed):
    job, stats, _ = probed
    rows = _rows(job, "SELECT stream, block, token, count(*), min(probe_rank), max(probe_rank) FROM "
                      "read_parquet('ROOT/table=probes/variant=*/experiment=probe/*.parquet') "
                      "GROUP BY ALL ORDER BY ALL")
    expected = {("resid", b) for b in range(DEPTH + 1)} | {(s, b) for s in ("attn", "mlp") for b in range(1, DEPTH + 1)}
    assert {(stream, block) for stream, block, *_ in rows} == expected
    assert all(count == 20 and 0 <= low <= high < 20 for *_, count, low, high in rows)  # 20 images, 20 classes
    assert {token for _, _, token, *_ in rows} == set(range(TOKENS))
    assert set(stats["experiment_seconds"]) == {"model_input", "baseline", "probe", "probe_fit"}


def test_an_analysed_batch_holding_training_images_is_refused(data, tmp_path: Path):
    """The actor's key check, for shards the preflight cannot list (URLs): analysing the
    training shard itself fails the shard with a one-line reason and writes nothing."""
    training, _ = data
    job = _job(tmp_path / "results", training, training, streams=("resid",), shots=1)
    processor = ShardProcessor(VARIANT, job)
    with pytest.raises(UserError, match=r"holds \d+ image\(s\) of the \[probe\] training shards"):
        processor.process(str(training / "shapes-train-000000.tar"), "train-0", experiments=("probe",))
    assert not list(Path(job.output).glob("table=probes/**/*.parquet"))


def test_linear_probe_curves_follow_the_summed_residual_ranks(probed):
    """The deletion order of `linear_probe` is −Σ_b rank over the residual probes of blocks
    1..L (METHOD §7), recomputed here from the stored `probes` rows with SQL."""
    job, _, url = probed
    importance = _rows(job, "SELECT image_key, token, -sum(probe_rank) FROM "
                            "read_parquet('ROOT/table=probes/variant=*/experiment=probe/*.parquet') "
                            "WHERE stream = 'resid' AND block >= 1 AND token_kind = 'image' GROUP BY ALL ORDER BY ALL")
    keys = sorted({key for key, _, _ in importance})
    table = np.zeros((len(keys), TOKENS - PREFIX), dtype=np.float32)
    for key, token, value in importance:
        table[keys.index(key), token - PREFIX] = value
    curves = _rows(job, "SELECT image_key, test, kept_tokens, prediction, \"order\" FROM "
                        "read_parquet('ROOT/table=perturbation_curves/variant=*/experiment=probe/*.parquet') "
                        "WHERE method = 'linear_probe' ORDER BY ALL")
    assert {c[4] for c in curves} == {0}
    processor = ShardProcessor(VARIANT, job)
    from vitlens.data.reader import iter_shard_batches

    batch = next(iter_shard_batches(str(url), processor.geometry, 50, processor.patch_size, PREFIX))
    order = [batch.keys.index(k) for k in keys]
    images, labels = batch.images[order], batch.class_index[order]
    kept = kept_token_counts(TOKENS - PREFIX)
    for test in ("negative", "positive"):
        expected = deletion_predictions(processor.model, images, torch.from_numpy(table), test, kept)
        got = {(key, n): p for key, t, n, p, _ in curves if t == test}
        assert len(got) == len(keys) * len(kept)
        assert [[got[key, n] for key in keys] for n in kept.tolist()] == expected.tolist()


def test_run_records_probe_and_lens_seconds(data, tmp_path: Path):
    training, analysed = data
    spec = tmp_path / "job.toml"
    spec.write_text(f'name = "j"\noutput = "out"\nvariants = ["{VARIANT}"]\nexperiments = ["baseline", "probe"]\n'
                    f'batch_size = 10\n[data]\nmanifest = "{analysed}/manifest.json"\n'
                    f'[probe]\nmanifest = "{training}/manifest.json"\nshots = 1\n'
                    '[resources]\ndevice = "cpu"\nmax_actors = 1\n')
    try:
        assert cli_main(["run", str(spec), "--no-progress"]) == 0
    finally:
        ray.shutdown()  # the run started a local cluster in this process; later tests start their own
    (row,) = _rows(JobSpec(name="x", output=str(tmp_path / "out"), variants=("v",), data=DataSpec(manifest="m")),
                   "SELECT experiment_seconds FROM read_parquet('ROOT/table=runs/*/*/*.parquet')")
    seconds = json.loads(row[0])
    assert set(seconds) == {"model_input", "baseline", "probe", "probe_fit"}
    assert all(set(per_variant) == {VARIANT} and per_variant[VARIANT] > 0 for per_variant in seconds.values())
