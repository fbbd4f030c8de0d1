"""The actor pipeline changes nothing but speed: the same `tokens` files (content and row
order) with 0, 1 and 2 decode workers and the background writer; every query gives the
same numbers from the summary tier as from the tokens tier; a crash in a decode worker or
in the writer loses nothing and marks nothing done.

Runs `ShardProcessor` directly (no Ray) on the smallest zoo model and its random twin.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vitlens.cli import main as cli_main
from vitlens.data import loader
from vitlens.report.queries import list_queries, run_query
from vitlens.report.results import open_results
from vitlens.runner import shard_job
from vitlens.runner.shard_job import ShardProcessor
from vitlens.runner.spec import DataSpec, JobSpec, ResourceSpec

VARIANTS = ("shapes_vit_p16", "shapes_vit_p16@random")
EXPERIMENTS = ("baseline", "attn_self_only", "attn_no_cls", "remove_class_tokens", "remove_context_tokens")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("shards")
    assert cli_main(["shards", "shapes", "--classes", "20", "--per-class", "2", "--size", "64",
                     "--shard-size", "20", "--seed", "5", "--out", str(out)]) == 0
    return sorted(out.glob("*.tar"))


def run(shards: list[Path], output: Path, detail: str = "tokens", workers: int = 0,
        variants: tuple[str, ...] = VARIANTS[:1], experiments: tuple[str, ...] = ("baseline",),
        transform: str = "timm", projections: str = "fp32") -> None:
    job = JobSpec(name="pipeline", output=str(output), variants=variants, experiments=experiments,
                  batch_size=6, detail=detail,
                  data=DataSpec(shards=tuple(str(s) for s in shards), transform=transform),
                  resources=ResourceSpec(device="cpu", decode_workers=workers, projections=projections))
    for variant in variants:
        processor = ShardProcessor(variant, job)
        for shard in shards:
            processor.process(str(shard), shard.stem)


def test_decode_workers_and_background_writer_give_identical_files(shards: list[Path], tmp_path: Path) -> None:
    """Also the device transform (the 64 px shapes need no resize: the same input as timm's) and
    the fast projections (the same ranks, top-5 and logits as fp32, bit for bit)."""
    settings = {"w0": {}, "w1": {"workers": 1}, "w2": {"workers": 2},
                "device": {"workers": 1, "transform": "device"}, "fast": {"projections": "fast"}}
    tables = {}
    for name, options in settings.items():
        run(shards, tmp_path / name, **options)
        files = sorted((tmp_path / name).glob("table=tokens/*/*/*.parquet"))
        assert files
        tables[name] = [pq.read_table(f) for f in files]
    for name in settings:
        assert len(tables[name]) == len(tables["w0"])
        assert all(a.equals(b) for a, b in zip(tables["w0"], tables[name])), name  # content and row order


def test_every_query_gives_the_same_numbers_from_either_tier(shards: list[Path], tmp_path: Path) -> None:
    for detail in ("tokens", "summary"):
        run(shards, tmp_path / detail, detail=detail, variants=VARIANTS, experiments=EXPERIMENTS)
    assert not list((tmp_path / "summary").glob("table=tokens/*/*/*.parquet"))
    assert list((tmp_path / "summary").glob("table=token_summary/*/*/*.parquet"))
    tokens, summary = open_results(tmp_path / "tokens"), open_results(tmp_path / "summary")
    compared = 0
    for query in list_queries() + list_queries("stats"):
        want, got = run_query(tokens, query), run_query(summary, query)
        assert got.equals(want), query.name
        compared += want.num_rows
    assert compared > 100
    sizes = {detail: sum(f.stat().st_size for f in (tmp_path / detail).glob("table=*/*/*/*.parquet")
                         if "table=tokens" in str(f) or "table=token_summary" in str(f)
                         or "table=residual_match" in str(f)) for detail in ("tokens", "summary")}
    assert sizes["summary"] < 0.25 * sizes["tokens"]  # 16 image tokens: far from the B/16 ratio, still smaller


def assert_nothing_written(output: Path) -> None:
    assert not list(output.glob("table=tokens/*/*/*.parquet"))
    assert not list(output.glob("_done/*/*.json"))
    assert not list(output.rglob("*.tmp"))


def test_a_crash_in_the_writer_loses_nothing(shards: list[Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = shard_job.tokens_table

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_job, "tokens_table", failing)
    with pytest.raises(OSError, match="disk full"):
        run(shards[:1], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_dying_decode_worker_loses_nothing(shards: list[Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = loader._decode_sample

    def dying(key, *args):
        if "-007-" in key:
            os._exit(9)
        return real(key, *args)

    monkeypatch.setattr(loader, "_decode_sample", dying)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        run(shards[:1], tmp_path / "out", workers=2)
    assert_nothing_written(tmp_path / "out")
    monkeypatch.setattr(loader, "_decode_sample", real)
    run(shards[:1], tmp_path / "out", workers=2)  # the next run does the shard
    assert list((tmp_path / "out").glob("_done/*/*.json"))
