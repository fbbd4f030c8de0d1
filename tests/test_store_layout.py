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
    shard_stem,
    table_file,
    write_json_atomic,
    write_parquet_atomic,
)
from vitlens.store.schema import SCHEMA_VERSION, to_table


def test_paths_are_hive_partitioned_and_deterministic(tmp_path: Path) -> None:
    path = table_file(tmp_path, "tokens", "vit b/32@random", "baseline", shard_stem("https://h/x/shapes-validation-000003.tar"))
    assert path == tmp_path / "table=tokens" / "variant=vit_b_32@random" / "experiment=baseline" / "shapes-validation-000003.parquet"
    assert shard_stem("/a/b/c-000001.tar") == "c-000001"


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "t" / "x.parquet"
    bad = pa.table({"a": [1, 2]})
    with pytest.raises(TypeError):
        write_parquet_atomic(bad, target, row_group_size="many")  # type: ignore[arg-type]
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
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
