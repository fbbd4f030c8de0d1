"""The streaming reader: rejects, damaged shards, URL forms, and reading without the whole shard."""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from tests.data_expectations import brute_force_labels, timm_transformed_mask
from vitlens.data.geometry import EvalGeometry
from vitlens.data.loader import shard_batches
from vitlens.data.reader import ShardReadError, iter_shard_batches
from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask, encode_png
from vitlens.data.shard_writer import ShardWriter
from vitlens.errors import UserError

GEOMETRY = EvalGeometry(
    input_size=(32, 32), crop_pct=1.0, crop_mode="center", interpolation="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)


def _sample(i: int, size: int = 32, mask_size: int | None = None) -> EncodedSample:
    """Noise image (incompressible PNG) with the left half of the mask = class id 1."""
    rng = np.random.default_rng(i)
    ids = np.zeros((mask_size or size, mask_size or size), dtype=np.int64)
    ids[:, : ids.shape[1] // 2] = 1
    meta = SampleMeta(i % 3, 1, f"class{i % 3}", None, None, "test", "validation", "test")
    image = encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return EncodedSample(f"sample{i:03d}", "image.png", image, encode_mask(ids), meta)


def _write_shard(directory: Path, samples: list[EncodedSample]) -> Path:
    with ShardWriter(directory, "test", "validation", shard_size=len(samples)) as writer:
        for sample in samples:
            writer.write(sample)
    return directory / writer.shards[0].name


def _append_raw(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Rewrite a shard with extra raw members appended (to craft broken samples)."""
    with tarfile.open(path) as tar:
        existing = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, data in existing:
            tar.addfile(info, io.BytesIO(data))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_reported_and_skipped(tmp_path: Path) -> None:
    good = [_sample(i) for i in range(3)]
    mismatched = _sample(3, size=32, mask_size=16)
    path = _write_shard(tmp_path, [good[0], mismatched, good[1]])
    broken_image = _sample(4).members()
    broken_image[0] = (broken_image[0][0], b"garbage")
    no_meta = _sample(5).members()[:-1]
    bad_meta = _sample(6).members()
    bad_meta[-1] = (bad_meta[-1][0], b"{not json")
    _append_raw(path, broken_image + no_meta + bad_meta + good[2].members())

    rejects: list[tuple[str, str, str, str]] = []
    batches = list(iter_shard_batches(str(path), GEOMETRY, 2, 8, 1, on_reject=lambda *r: rejects.append(r)))
    assert [b.keys for b in batches] == [["sample000", "sample001"], ["sample002"]]
    assert [(shard, key, stage) for shard, key, _, stage in rejects] == [
        (str(path), "sample003", "decode"), (str(path), "sample004", "decode"), (str(path), "sample005", "decode"),
        (str(path), "sample006", "decode"),
    ]
    reasons = [reason for _, _, reason, _ in rejects]
    assert "mask is 16x16 but image is 32x32" in reasons[0]
    assert "UnidentifiedImageError" in reasons[1]
    assert "meta.json" in reasons[2]
    assert "JSONDecodeError" in reasons[3]
    # Labels of a good sample: left half class (id 1), right half context; 8-px patches.
    expected = [3] + [1, 1, 0, 0] * 4
    assert batches[0].token_label[0].tolist() == expected
    assert batches[0].class_index.tolist() == [0, 1]


def _relabelled(i: int, class_index: object) -> list[tuple[str, bytes]]:
    """The members of sample i with its meta.json `class_index` replaced (any JSON value)."""
    members = _sample(i).members()
    meta = json.loads(members[-1][1])
    meta["class_index"] = class_index
    members[-1] = (members[-1][0], json.dumps(meta).encode())
    return members


def test_a_label_outside_the_model_classes_is_a_sample_reject(tmp_path: Path) -> None:
    """One hostile label costs its own sample only: the reader and the DataLoader workers
    batch the good samples and report one `label` reject per bad label, naming the key, the
    value and the model's class count."""
    path = _write_shard(tmp_path, [_sample(i) for i in range(2)])
    _append_raw(path, _relabelled(10, 999999) + _sample(2).members() + _relabelled(11, -1)
                + _relabelled(12, "7") + _relabelled(13, True) + _sample(3).members())
    good = [["sample000", "sample001"], ["sample002", "sample003"]]
    bad = [("sample010", "999999"), ("sample011", "-1"), ("sample012", "'7'"), ("sample013", "True")]
    found: list[list[tuple[str, str, str, str]]] = []
    for read in (lambda on_reject: iter_shard_batches(str(path), GEOMETRY, 2, 8, 1, on_reject, num_classes=20),
                 lambda on_reject: shard_batches(str(path), GEOMETRY, 2, 8, 1, on_reject, num_classes=20, workers=2)):
        rejects: list[tuple[str, str, str, str]] = []
        batches = list(read(lambda *r: rejects.append(r)))
        assert [b.keys for b in batches] == good
        assert [b.class_index.tolist() for b in batches] == [[0, 1], [2, 0]]
        assert [(key, stage) for _, key, _, stage in rejects] == [(key, "label") for key, _ in bad]
        for (_, key, reason, _), (bad_key, value) in zip(rejects, bad):
            assert f"sample {bad_key!r}: class_index {value} " in reason and "20 classes" in reason, reason
            assert "\n" not in reason
        found.append(rejects)
    assert found[0] == found[1]
    # without the class count only what is no label in any model is rejected
    rejects = []
    batches = list(iter_shard_batches(str(path), GEOMETRY, 8, 8, 1, lambda *r: rejects.append(r)))
    assert batches[0].keys == ["sample000", "sample001", "sample010", "sample002", "sample003"]
    assert [r[1] for r in rejects] == ["sample011", "sample012", "sample013"]


def test_default_reject_handler_warns(tmp_path: Path) -> None:
    path = _write_shard(tmp_path, [_sample(0, mask_size=16)])
    with pytest.warns(UserWarning, match="sample000"):
        assert list(iter_shard_batches(str(path), GEOMETRY, 2, 8, 1)) == []


def test_truncated_shard_keeps_what_was_read(tmp_path: Path) -> None:
    """Every complete sample before the break arrives; then ShardReadError, not a reject."""
    path = _write_shard(tmp_path, [_sample(i) for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    rejects: list[tuple[str, str, str, str]] = []
    keys: list[str] = []
    with pytest.raises(ShardReadError) as raised:
        for batch in iter_shard_batches(str(path), GEOMETRY, 1, 8, 0, on_reject=lambda *r: rejects.append(r)):
            keys.extend(batch.keys)
    assert keys == [f"sample{i:03d}" for i in range(len(keys))] and 1 <= len(keys) < 6
    assert rejects == []
    assert raised.value.reason.startswith(f"shard truncated after {len(keys)} samples: ")


_UNDECODABLE_SCRIPT = """
import sys
from tests.test_data_reader import GEOMETRY
from vitlens.data.reader import iter_shard_batches
rejects = []
list(iter_shard_batches(sys.argv[1], GEOMETRY, 2, 8, 1, on_reject=lambda *r: rejects.append(r[2])))
sys.stdout.write(repr(rejects))
"""


def test_decode_reasons_are_one_line_and_the_same_every_run(tmp_path: Path) -> None:
    """PIL's "cannot identify image file <_io.BytesIO object at 0x7f…>" must not leak an address."""
    path = _write_shard(tmp_path, [_sample(0)])
    broken = _sample(1).members()
    broken[0] = (broken[0][0], b"garbage")
    _append_raw(path, broken)
    reasons: list[list[str]] = []
    for _ in range(2):
        run: list[str] = []
        list(iter_shard_batches(str(path), GEOMETRY, 2, 8, 1, on_reject=lambda *r: run.append(r[2])))
        reasons.append(run)
    other_process = subprocess.run(
        [sys.executable, "-c", _UNDECODABLE_SCRIPT, str(path)], capture_output=True, text=True,
        check=True, cwd=Path(__file__).resolve().parents[1],
    )
    reasons.append(ast.literal_eval(other_process.stdout))
    assert reasons[0] == reasons[1] == reasons[2] and len(reasons[0]) == 1
    reason = reasons[0][0]
    assert reason.startswith("UnidentifiedImageError: cannot identify image file")
    assert "0x" not in reason and " at " not in reason and "\n" not in reason


def test_url_forms(tmp_path: Path) -> None:
    path = _write_shard(tmp_path, [_sample(i) for i in range(3)])
    expected = [["sample000", "sample001", "sample002"]]
    for url in (str(path), f"file:{path}", f"pipe:cat {path}"):
        assert [b.keys for b in iter_shard_batches(url, GEOMETRY, 8, 8, 1)] == expected
    with pytest.raises(UserError, match="missing.tar"):
        list(iter_shard_batches(str(tmp_path / "missing.tar"), GEOMETRY, 8, 8, 1))


def test_streams_without_waiting_for_the_whole_shard(tmp_path: Path) -> None:
    """The first batch arrives while the rest of the shard has not been written yet."""
    data = _write_shard(tmp_path, [_sample(i) for i in range(12)]).read_bytes()  # ~3.3 kB / sample
    fifo = tmp_path / "stream.tar"
    os.mkfifo(fifo)
    rest_written = threading.Event()
    release = threading.Event()

    def feed() -> None:
        with open(fifo, "wb") as stream:
            stream.write(data[: len(data) // 2 + 10240])  # about half, plus one tar read block
            stream.flush()
            release.wait(timeout=10)
            stream.write(data[len(data) // 2 + 10240 :])
            rest_written.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    batches = iter_shard_batches(str(fifo), GEOMETRY, 2, 8, 1)
    first = next(batches)
    assert not rest_written.is_set()
    release.set()
    assert first.keys == ["sample000", "sample001"]
    assert sum(len(b.keys) for b in batches) == 10
    feeder.join(timeout=10)


# --- the exact path, the device modes and the mask's code plane ------------------------------

REAL_CFG = {"input_size": (3, 32, 32), "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
PADDED_CFG = {**REAL_CFG, "crop_pct": 1.3, "crop_mode": "border", "interpolation": "bilinear"}  # pads
JPEG_KINDS = {  # name: ((h, w), PIL mode, save options); EXIF orientation 6 = rotated 90 degrees
    "rgb": ((45, 61), "RGB", {}), "tall": ((70, 38), "RGB", {}), "grey": ((50, 50), "L", {}),
    "cmyk": ((41, 57), "CMYK", {}), "progressive": ((47, 66), "RGB", {"progressive": True}),
    "exif": ((40, 52), "RGB", {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
                               b"\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"}),
}


def _real_jpeg_samples() -> list[tuple[EncodedSample, np.ndarray]]:
    """Real-format JPEGs made with PIL, with ImageNet-S-like ids (class 4, another id 9,
    ignore pixels) of their size: (sample, ids)."""
    samples = []
    for i, (name, ((height, width), mode, options)) in enumerate(JPEG_KINDS.items()):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = (np.sin(xx / 5 + i) + np.cos(yy / 7)) * 60 + 128
        pixels = np.clip(smooth[..., None] + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=85, **options)
        ids = np.kron(rng.choice([0, 4, 9, 1000], size=(height // 3 + 1, width // 3 + 1), p=[0.3, 0.4, 0.1, 0.2]),
                      np.ones((3, 3), dtype=np.int64))[:height, :width]
        meta = SampleMeta(3, 4, "class3", None, None, "test", "validation", "test")
        samples.append((EncodedSample(f"jpeg{i}{name}", "image.jpg", buffer.getvalue(), encode_mask(ids), meta), ids))
    return samples


def test_jpeg_exif_reads_back_rotated() -> None:
    """The EXIF fixture really carries orientation 6 (which neither timm nor the reader applies)."""
    data = _real_jpeg_samples()[list(JPEG_KINDS).index("exif")][0].image_bytes
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6


@pytest.mark.parametrize("cfg", [REAL_CFG, PADDED_CFG], ids=["center", "border-padded"])
def test_model_input_is_bit_identical_to_timm_on_real_jpegs(tmp_path: Path, cfg: dict) -> None:
    """The default path: uint8 pixels in the batch, normalised by `model_input`, equal timm's
    `create_transform` on PIL's decode bit for bit; labels equal the per-pixel rule on timm's
    moved mask; every mode (and a shard without the code plane) gives the same labels."""
    samples = _real_jpeg_samples()
    geometry = EvalGeometry.from_data_config(cfg)
    path = _write_shard(tmp_path, [s for s, _ in samples])
    [batch] = iter_shard_batches(str(path), geometry, 8, 8, 1)
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (len(samples), 3, 32, 32)
    transform = create_transform(**cfg, is_training=False)
    expected = torch.stack([transform(Image.open(io.BytesIO(s.image_bytes)).convert("RGB")) for s, _ in samples])
    assert torch.equal(batch.model_input("cpu"), expected)
    for row, (_, ids) in enumerate(samples):
        fg, labels = brute_force_labels(timm_transformed_mask(ids, cfg), 4, 8, 8, 1)
        assert batch.token_label[row].tolist() == labels
        np.testing.assert_array_equal(batch.fg_fraction[row].numpy(), np.array(fg, dtype=np.float32))
    # the same shard without mask.codes.png (written before it existed) reads the same labels
    old = tmp_path / "old.tar"
    with tarfile.open(path) as tar, tarfile.open(old, "w") as out:
        for info in tar.getmembers():
            if not info.name.endswith(".mask.codes.png"):
                out.addfile(info, tar.extractfile(info))
    [old_batch] = iter_shard_batches(str(old), geometry, 8, 8, 1)
    assert torch.equal(old_batch.token_label, batch.token_label)
    assert torch.equal(old_batch.fg_fraction.isnan(), batch.fg_fraction.isnan())
    assert torch.equal(old_batch.fg_fraction.nan_to_num(), batch.fg_fraction.nan_to_num())
    assert torch.equal(old_batch.pixels, batch.pixels)


def test_device_modes_hold_the_decoded_images_or_the_jpeg_bytes(tmp_path: Path) -> None:
    """transform "device": each image as PIL decodes it (uint8 [3, h, w] RGB), no pixels; with
    jpeg_bytes the RGB / grey JPEGs as their bytes (CMYK still decoded). Labels, class index
    and keys as in the timm mode, in the reader and in DataLoader workers."""
    samples = _real_jpeg_samples()
    path = _write_shard(tmp_path, [s for s, _ in samples])
    geometry = EvalGeometry.from_data_config(REAL_CFG)
    [exact] = iter_shard_batches(str(path), geometry, 8, 8, 1)
    decoded = [torch.from_numpy(np.array(Image.open(io.BytesIO(s.image_bytes)).convert("RGB"))).permute(2, 0, 1)
               for s, _ in samples]
    for batch in (next(iter_shard_batches(str(path), geometry, 8, 8, 1, transform="device")),
                  next(shard_batches(str(path), geometry, 8, 8, 1, workers=2, transform="device"))):
        assert batch.pixels is None and len(batch.originals) == len(samples)
        for ours, theirs in zip(batch.originals, decoded):
            assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
        assert batch.keys == exact.keys and torch.equal(batch.token_label, exact.token_label)
        assert torch.equal(batch.class_index, exact.class_index)
    [encoded] = iter_shard_batches(str(path), geometry, 8, 8, 1, transform="device", jpeg_bytes=True)
    for name, ours, (sample, _), theirs in zip(JPEG_KINDS, encoded.originals, samples, decoded):
        if name == "cmyk":
            assert torch.equal(ours, theirs)
        else:
            assert ours == sample.image_bytes
    assert torch.equal(encoded.token_label, exact.token_label)
    with pytest.raises(ValueError, match="transform"):
        next(iter_shard_batches(str(path), geometry, 8, 8, 1, transform="gpu"))
    with pytest.raises(ValueError, match="jpeg_bytes"):
        next(shard_batches(str(path), geometry, 8, 8, 1, jpeg_bytes=True))
