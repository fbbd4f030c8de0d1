"""`vitlens shards shapes` -> shards + manifest -> reader, with labels checked independently."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from timm.data import create_transform

from tests.data_expectations import brute_force_labels, timm_transformed_mask
from vitlens.cli import main
from vitlens.data.geometry import EvalGeometry
from vitlens.data.manifest import read_manifest, shard_urls, verify_shards
from vitlens.data.reader import iter_batches
from vitlens.data.shapes import iter_shapes_samples, shapes_class_names

CLASSES, PER_CLASS, SIZE = 20, 2, 40
CFG = {
    "input_size": (3, 32, 32), "crop_pct": 0.875, "crop_mode": "center",
    "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
}


def _write_shapes(out: Path, *extra: str) -> int:
    return main([
        "shards", "shapes", "--classes", str(CLASSES), "--per-class", str(PER_CLASS),
        "--size", str(SIZE), "--seed", "0", "--context-correlation", "0.7",
        "--shard-size", "15", "--out", str(out), *extra,
    ])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    assert _write_shapes(out) == 0
    return out


def test_manifest_lists_every_shard_with_count_and_checksum(shapes_dir: Path) -> None:
    manifest = read_manifest(shapes_dir)
    assert manifest["dataset"] == "shapes" and manifest["split"] == "validation"
    assert manifest["num_classes"] == CLASSES
    assert manifest["class_names"] == shapes_class_names(CLASSES)
    assert [s["name"] for s in manifest["shards"]] == [
        f"shapes-validation-{i:06d}.tar" for i in range(3)
    ]
    assert [s["samples"] for s in manifest["shards"]] == [15, 15, 10]
    for shard in manifest["shards"]:
        data = (shapes_dir / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert manifest["rejects"] == []
    assert manifest["created_by"]["options"]["context_correlation"] == 0.7
    assert verify_shards(shapes_dir) == []
    assert sorted(p.name for p in shapes_dir.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for s in manifest["shards"]]
    )


def test_shards_are_byte_identical_across_runs(shapes_dir: Path, tmp_path: Path) -> None:
    assert _write_shapes(tmp_path) == 0
    for shard in read_manifest(shapes_dir)["shards"]:
        assert (tmp_path / shard["name"]).read_bytes() == (shapes_dir / shard["name"]).read_bytes()
    assert (tmp_path / "manifest.json").read_text() == (shapes_dir / "manifest.json").read_text()


def test_webdataset_reads_the_samples_exactly(shapes_dir: Path) -> None:
    """webdataset's own reader sees the generator's images and masks, bit for bit."""
    generated = {
        s.key: s for s in iter_shapes_samples(CLASSES, PER_CLASS, SIZE, 0, "validation", 0.7)
    }
    dataset = webdataset.WebDataset(
        shard_urls(shapes_dir), shardshuffle=False, nodesplitter=None, workersplitter=None
    )
    seen = []
    for sample in dataset:
        source = generated[sample["__key__"]]
        image = np.asarray(Image.open(io.BytesIO(sample["image.png"])))
        np.testing.assert_array_equal(image, source.image)
        rgb = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))).astype(int)
        np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1], source.object_mask * (source.class_index + 1))
        codes = Image.open(io.BytesIO(sample["mask.codes.png"]))  # the token labels' code plane: 1 = object
        assert codes.mode == "P"
        np.testing.assert_array_equal(np.asarray(codes), source.object_mask.astype(np.uint8))
        meta = json.loads(sample["meta.json"])
        assert meta["class_index"] == source.class_index
        assert meta["mask_class_id"] == source.class_index + 1
        assert meta["class_name"] == source.class_name
        assert meta["dataset"] == "shapes" and meta["split"] == "validation"
        seen.append(sample["__key__"])
    assert seen == list(generated)  # generator order, nothing lost


def test_tar_members_have_fixed_metadata(shapes_dir: Path) -> None:
    with tarfile.open(shapes_dir / "shapes-validation-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 4 * 15  # image, mask, mask codes, meta
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}


def test_reader_round_trip_with_token_labels(shapes_dir: Path) -> None:
    geometry = EvalGeometry.from_data_config(CFG)
    transform = create_transform(**CFG, is_training=False)
    generated = {
        s.key: s for s in iter_shapes_samples(CLASSES, PER_CLASS, SIZE, 0, "validation", 0.7)
    }
    batches = list(iter_batches(shard_urls(shapes_dir), geometry, batch_size=4, patch_size=8, num_prefix_tokens=1))
    # Batches never span shards: 15 -> 4,4,4,3; 15 -> 4,4,4,3; 10 -> 4,4,2.
    assert [len(b.keys) for b in batches] == [4, 4, 4, 3, 4, 4, 4, 3, 4, 4, 2]
    assert len({b.shard for b in batches}) == 3
    keys = [key for b in batches for key in b.keys]
    assert keys == list(generated)
    class_tokens = 0
    for batch in batches:
        assert batch.images.shape == (len(batch.keys), 3, 32, 32)
        assert batch.fg_fraction.shape == batch.token_label.shape == (len(batch.keys), 1 + 16)
        for row, key in enumerate(batch.keys):
            source = generated[key]
            expected_image = transform(Image.fromarray(source.image))
            assert torch.equal(batch.images[row], expected_image)  # bit-identical to timm
            assert batch.class_index[row].item() == source.class_index
            moved = timm_transformed_mask(source.object_mask.astype(np.int64), CFG)
            fg, labels = brute_force_labels(moved, 1, 8, 8, 1)
            assert batch.token_label[row].tolist() == labels
            np.testing.assert_allclose(batch.fg_fraction[row, 1:].numpy(), fg[1:], atol=1e-7)
            class_tokens += labels.count(1)
    assert class_tokens > 0


def test_out_dir_with_earlier_shards_needs_overwrite(shapes_dir: Path, tmp_path: Path, capsys) -> None:
    assert _write_shapes(tmp_path) == 0
    assert _write_shapes(tmp_path) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _write_shapes(tmp_path, "--overwrite") == 0
    assert verify_shards(tmp_path) == []


def test_bad_options_are_user_errors(tmp_path: Path, capsys) -> None:
    code = main(["shards", "shapes", "--classes", "99", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "num_classes" in capsys.readouterr().err
