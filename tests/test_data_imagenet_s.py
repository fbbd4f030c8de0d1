"""`vitlens shards imagenet-s` on a fixture tree in the real ImageNet-S layout."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image
from timm.data import ImageNetInfo

from tests.data_expectations import brute_force_labels, timm_transformed_mask
from tests.fixtures_imagenet_s import DATASET_DIR, ImageNetSFixture, build_imagenet_s_tree
from vitlens.cli import main
from vitlens.data.geometry import EvalGeometry
from vitlens.data.imagenet_s import MERGED_SYNSETS, imagenet1k_index, load_categories, mask_label
from vitlens.data.manifest import read_manifest, shard_urls
from vitlens.data.reader import iter_batches
from vitlens.errors import UserError
from vitlens.models.class_names import class_names_for

SYNSETS_1K = sorted(ImageNetInfo().label_names())  # ILSVRC-2012 order = sorted wnids


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory: pytest.TempPathFactory) -> ImageNetSFixture:
    return build_imagenet_s_tree(tmp_path_factory.mktemp("imagenet_s"))


@pytest.fixture(scope="module")
def converted(fixture_tree: ImageNetSFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imagenet_s_shards")
    code = main([
        "shards", "imagenet-s", "--root", str(fixture_tree.root), "--variant", "919",
        "--split", "validation", "--per-class", "5", "--seed", "0", "--shard-size", "4", "--out", str(out),
    ])
    assert code == 3  # some rejected, the rest converted
    return out


def _samples(out: Path) -> dict[str, dict]:
    dataset = webdataset.WebDataset(shard_urls(out), shardshuffle=False, nodesplitter=None, workersplitter=None)
    return {sample["__key__"]: sample for sample in dataset}


@pytest.mark.parametrize("variant,count", [(50, 50), (300, 300), (919, 919)])
def test_every_category_maps_to_an_imagenet_1k_index(variant: int, count: int) -> None:
    categories, source = load_categories(variant)
    assert source.startswith("packaged") and len(categories) == len(set(categories)) == count
    indices = [imagenet1k_index(wnid) for wnid in categories]
    assert indices == [SYNSETS_1K.index(wnid) for wnid in categories]
    assert len(set(indices)) == count


def test_merged_synsets_map_to_their_targets() -> None:
    categories, _ = load_categories(919)
    for source, target in MERGED_SYNSETS.items():
        assert target in categories and source not in categories
        assert imagenet1k_index(source) == imagenet1k_index(target) == SYNSETS_1K.index(target)
    with pytest.raises(UserError, match="n99999999"):
        imagenet1k_index("n99999999")


def test_mask_label_is_the_most_frequent_object_id() -> None:
    assert mask_label(np.array([[0, 1000, 5, 5, 7]]), 919) == 5
    assert mask_label(np.array([[7, 7, 5, 5, 0]]), 919) == 5  # tie -> smallest id
    with pytest.raises(ValueError, match="unknown class id"):
        mask_label(np.array([[1, 920]]), 919)
    with pytest.raises(ValueError, match="no object"):
        mask_label(np.array([[0, 1000]]), 919)


def test_selection_is_the_seeded_permutation_of_sorted_names(fixture_tree, converted) -> None:
    keys = set(_samples(converted))
    tench = sorted(f"{image.name}.JPEG" for image in fixture_tree.good["n01440764"])
    order = np.random.default_rng([0, 1]).permutation(len(tench))  # class id 1, seed 0
    expected = {f"n01440764_{tench[i].removesuffix('.JPEG')}" for i in order[:5]}
    assert {k for k in keys if k.startswith("n01440764_")} == expected


def test_converted_samples(fixture_tree: ImageNetSFixture, converted: Path) -> None:
    samples = _samples(converted)
    good = [img for images in fixture_tree.good.values() for img in images]
    taken = [img for img in good if f"{img.folder_wnid}_{img.name}" in samples]
    assert len(taken) == len(samples) == 5 + 2 + 2  # tench 5 of 6, merged 2, goldfish 2
    for image in taken:
        sample = samples[f"{image.folder_wnid}_{image.name}"]
        source = fixture_tree.root / DATASET_DIR / "validation" / image.folder_wnid / f"{image.name}.JPEG"
        assert sample["image.jpg"] == source.read_bytes()  # original JPEG bytes
        rgb = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert rgb.ndim == 3 and rgb.shape[2] == 3  # always an RGB PNG, also for the 16-bit grey one
        rgb = rgb.astype(int)
        np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1], image.mask_ids)
        codes = np.asarray(Image.open(io.BytesIO(sample["mask.codes.png"])))  # the label's class 1, ignore 2
        np.testing.assert_array_equal(codes, np.select([image.mask_ids == image.label_id, image.mask_ids == 1000],
                                                       [1, 2], 0))
        meta = json.loads(sample["meta.json"])
        assert meta["mask_class_id"] == image.label_id
        assert meta["wnid"] == image.label_wnid
        assert meta["folder_wnid"] == image.folder_wnid
        assert meta["class_index"] == SYNSETS_1K.index(image.label_wnid)
        # The one definition: the first synonym of timm's description ("tench, Tinca tinca" -> "tench").
        assert meta["class_name"] == ImageNetInfo().index_to_description(meta["class_index"]).split(",")[0]
        assert meta["source"] == f"{DATASET_DIR}/validation/{image.folder_wnid}/{image.name}.JPEG"
        assert meta["dataset"] == "imagenet_s919" and meta["split"] == "validation"
    relabelled = json.loads(samples["n01443537_ILSVRC2012_val_00000020"]["meta.json"])
    assert relabelled["wnid"] == "n01484850" and relabelled["class_index"] == 2


def test_rejects_are_in_the_manifest_and_printed(fixture_tree, tmp_path: Path, capsys) -> None:
    code = main(["shards", "imagenet-s", "--root", str(fixture_tree.root), "--out", str(tmp_path)])
    assert code == 3
    printed = capsys.readouterr()
    rejects = {r["path"]: r["reason"] for r in read_manifest(tmp_path)["rejects"]}
    assert set(rejects) == set(fixture_tree.rejects)
    for path, fragment in fixture_tree.rejects.items():
        assert fragment in rejects[path], (path, rejects[path])
        assert f"rejected {path}: " in printed.err
    assert "9 samples of 4 classes" in printed.out and "7 rejected" in printed.out
    manifest = read_manifest(tmp_path)
    assert manifest["num_classes"] == 1000 and len(manifest["class_names"]) == 1000


def test_root_may_be_the_variant_folder_itself(fixture_tree, converted, tmp_path: Path) -> None:
    code = main([
        "shards", "imagenet-s", "--root", str(fixture_tree.root / DATASET_DIR), "--per-class", "5",
        "--shard-size", "4", "--out", str(tmp_path),
    ])
    assert code == 3
    ours, theirs = read_manifest(tmp_path), read_manifest(converted)
    assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]


def test_category_file_in_root_wins(fixture_tree, tmp_path: Path) -> None:
    """A root with its own (here: shortened) category file: ids beyond it are unknown."""
    root = tmp_path / "root"
    shutil.copytree(fixture_tree.root, root)
    (root / "ImageNetS_categories_im919.txt").write_text("n01440764\nn01443537\n")
    code = main(["shards", "imagenet-s", "--root", str(root), "--out", str(tmp_path / "out")])
    assert code == 3
    rejects = read_manifest(tmp_path / "out")["rejects"]
    reasons = " ".join(r["reason"] for r in rejects)
    assert "unknown class id(s) 3 " in reasons  # the relabelled image
    assert f"{DATASET_DIR}/validation/n04356056" in {r["path"] for r in rejects}  # no longer a category


def test_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["shards", "imagenet-s", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "ImageNetS919/validation" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "imagenet-s", "--root", str(tmp_path), "--variant", "100", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_reader_labels_on_imagenet_s_shards(fixture_tree: ImageNetSFixture, converted: Path) -> None:
    cfg = {
        "input_size": (3, 32, 32), "crop_pct": 0.9, "crop_mode": "center",
        "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    }
    by_key = {f"{img.folder_wnid}_{img.name}": img for imgs in fixture_tree.good.values() for img in imgs}
    batches = list(iter_batches(shard_urls(converted), EvalGeometry.from_data_config(cfg), 3, 16, 1))
    assert sum(len(b.keys) for b in batches) == 9
    labels_seen = set()
    for batch in batches:
        for row, key in enumerate(batch.keys):
            image = by_key[key]
            moved = timm_transformed_mask(image.mask_ids, cfg)
            fg, labels = brute_force_labels(moved, image.label_id, 16, 16, 1)
            assert batch.token_label[row].tolist() == labels
            np.testing.assert_allclose(batch.fg_fraction[row, 1:].numpy(), fg[1:], atol=1e-7)
            assert batch.class_index[row].item() == SYNSETS_1K.index(image.label_wnid)
            labels_seen.update(labels)
    assert labels_seen >= {0, 1, 3}


def test_colliding_sample_keys_are_rejected(fixture_tree, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(fixture_tree.root, root)
    folder = root / DATASET_DIR / "validation" / "n04356056"
    shutil.copy(folder / "ILSVRC2012_val_00000011.JPEG", folder / "ILSVRC2012_val_00000011.jpg")
    assert main(["shards", "imagenet-s", "--root", str(root), "--out", str(tmp_path / "out")]) == 3
    manifest = read_manifest(tmp_path / "out")
    collisions = [r for r in manifest["rejects"] if "already used" in r["reason"]]
    assert len(collisions) == 1 and "ILSVRC2012_val_00000011" in collisions[0]["path"]
    assert sum(s["samples"] for s in manifest["shards"]) == 9


def test_class_name_is_the_models_class_name(converted: Path) -> None:
    """One definition: the shard meta's class_name is the name the models report."""
    samples = _samples(converted)
    model_names = class_names_for(1000)
    metas = [json.loads(sample["meta.json"]) for sample in samples.values()]
    assert {meta["class_index"] for meta in metas} >= {0, 1, 2}
    for meta in metas:
        assert meta["class_name"] == model_names[meta["class_index"]]
    tench = [meta for meta in metas if meta["class_index"] == 0]
    assert tench and {meta["class_name"] for meta in tench} == {"tench"}
    assert model_names[0] == "tench" and model_names[1] == "goldfish"
    assert read_manifest(converted)["class_names"][:2] == ["tench", "goldfish"]


def test_per_class_all_converts_every_image(fixture_tree: ImageNetSFixture, tmp_path: Path) -> None:
    code = main([
        "shards", "imagenet-s", "--root", str(fixture_tree.root), "--per-class", "all",
        "--shard-size", "4", "--out", str(tmp_path),
    ])
    assert code == 3  # the fixture's bad images are still rejected
    good = {f"{img.folder_wnid}_{img.name}" for images in fixture_tree.good.values() for img in images}
    assert len(good) == 6 + 2 + 2  # tench 6, merged 2, goldfish 2: every good image
    assert set(_samples(tmp_path)) == good
    manifest = read_manifest(tmp_path)
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert {r["path"] for r in manifest["rejects"]} == set(fixture_tree.rejects)
    assert manifest["created_by"]["options"]["per_class"] == "all"


@pytest.mark.parametrize("value", ["0", "-1", "some", "1.5"])
def test_per_class_must_be_a_positive_count_or_all(fixture_tree, tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "imagenet-s", "--root", str(fixture_tree.root), "--per-class", value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_manifest_records_the_root_as_an_absolute_path(
    fixture_tree: ImageNetSFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fixture_tree.root.parent)
    relative = fixture_tree.root.name  # e.g. "imagenet_s0", relative to the working directory
    assert not Path(relative).is_absolute()
    code = main(["shards", "imagenet-s", "--root", relative, "--per-class", "1", "--out", str(tmp_path)])
    assert code == 3
    recorded = read_manifest(tmp_path)["created_by"]["options"]["root"]
    assert recorded == os.path.realpath(fixture_tree.root) and os.path.isabs(recorded)
