"""Store layout: deterministic names, atomic writes, done-markers, schema conformance."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitlens.store.layout import (
    clean_temporaries,
    done_marker,
    done_experiments,
    partition_value,
    shard_ids,
    shard_stem,
    table_file,
    write_json_atomic,
    write_parquet_atomic,
)
from vitlens.errors import UserError
from vitlens.store.schema import SCHEMA_VERSION, to_table


def test_paths_are_hive_partitioned_and_deterministic(tmp_path: Path) -> None:
    path = table_file(tmp_path, "tokens", "vit b/32@random", "baseline", shard_stem("https://h/x/shapes-validation-000003.tar"))
    # percent-encoding by hand: ' ' = %20, '/' = %2F; '@' stays
    assert path == tmp_path / "table=tokens" / "variant=vit%20b%2F32@random" / "experiment=baseline" / "shapes-validation-000003.parquet"
    assert shard_stem("/a/b/c-000001.tar") == "c-000001"
    assert partition_value("shapes_vit_p16@random") == "shapes_vit_p16@random"  # the usual names keep their folders


@pytest.mark.parametrize("variant", [
    "timm:vit_tiny_patch16_224@random", "a b/c", "x=y%z", "ünï+code", "vit_b32_vit_b32", "timm_vit_tiny_patch16_224@random",
])
def test_views_show_exactly_the_spec_variant_name(tmp_path: Path, variant: str) -> None:
    from vitlens.report.results import open_results

    other = "timm_vit_tiny_patch16_224@random" if variant != "timm_vit_tiny_patch16_224@random" else "timm:vit_tiny_patch16_224@random"
    for name, key in ((variant, "mine"), (other, "other")):
        rejects = to_table("rejects", {"shard": ["s"], "image_key": [key], "stage": ["decode"], "reason": ["r"]})
        write_parquet_atomic(rejects, table_file(tmp_path, "rejects", name, "none", "s-000000"))
    con = open_results(tmp_path)
    assert con.execute("SELECT image_key FROM rejects WHERE variant = ?", [variant]).fetchall() == [("mine",)]
    assert sorted(r[0] for r in con.execute("SELECT DISTINCT variant FROM rejects").fetchall()) == sorted([variant, other])


def test_two_shards_with_one_id_are_refused() -> None:
    assert shard_ids(["/d/a/x-000000.tar", "/d/a/x-000001.tar"]) == ["x-000000", "x-000001"]
    with pytest.raises(UserError, match=r"a/x-000000.tar and /d/b/x-000000.tar have the same shard id 'x-000000'"):
        shard_ids(["/d/a/x-000000.tar", "/d/b/x-000000.tar"])
    with pytest.raises(UserError, match="listed twice"):
        shard_ids(["/d/a/x-000000.tar", "/d/a/x-000000.tar"])


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "t" / "x.parquet"
    bad = pa.table({"a": [1, 2]})
    with pytest.raises(TypeError):
        write_parquet_atomic(bad, target, row_group_size="many")  # type: ignore[arg-type]
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    write_parquet_atomic(bad, target)
    assert pq.read_table(target).column("a").to_pylist() == [1, 2]
    assert pq.ParquetFile(target).metadata.row_group(0).column(0).compression == "ZSTD"


def test_done_markers_and_cleanup(tmp_path: Path) -> None:
    assert done_experiments(tmp_path, "v", "s-000000") == frozenset()
    write_json_atomic({"rows": 3, "experiments": ["baseline"]}, done_marker(tmp_path, "v", "s-000000"))
    assert done_experiments(tmp_path, "v", "s-000000") == {"baseline"}
    (tmp_path / "table=tokens").mkdir()
    (tmp_path / "table=tokens" / ".x.parquet.123.tmp").write_text("half")
    assert clean_temporaries(tmp_path) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_marker_of_other_shard_bytes_counts_as_not_done(tmp_path: Path) -> None:
    write_json_atomic({"experiments": ["baseline"], "sha256": "aa"}, done_marker(tmp_path, "v", "s-000000"))
    assert done_experiments(tmp_path, "v", "s-000000", sha256="aa") == {"baseline"}
    assert done_experiments(tmp_path, "v", "s-000000", sha256="bb") == frozenset()  # replaced data: redo
    assert done_experiments(tmp_path, "v", "s-000000") == {"baseline"}  # not verified now: trust the marker
    write_json_atomic({"experiments": ["baseline"], "sha256": None}, done_marker(tmp_path, "v", "s-000001"))
    assert done_experiments(tmp_path, "v", "s-000001", sha256="bb") == {"baseline"}  # not verified then


def test_to_table_casts_and_names_missing_columns() -> None:
    table = to_table(
        "rejects",
        {"shard": ["s"], "image_key": [None], "stage": ["decode"], "reason": ["bad png"]},
    )
    assert table.schema.metadata[b"vitlens.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.column("image_key").null_count == 1
    with pytest.raises(KeyError, match="reason"):
        to_table("rejects", {"shard": ["s"], "image_key": [None], "stage": ["decode"]})
    params = to_table(
        "params",
        {"block": np.array([1]), "sublayer": ["mlp"], "class_index": np.array([7]), "class_value_agreement": np.array([0.25])},
    )
    assert params.column("block").type == pa.int16()
    assert params.column("sublayer").to_pylist() == ["mlp"]
