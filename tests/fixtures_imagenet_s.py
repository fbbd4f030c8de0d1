"""Build a small ImageNet-S919 tree in the real layout, with good and bad cases.

Layout: `<root>/ImageNetS919/validation/<wnid>/<name>.JPEG` and
`<root>/ImageNetS919/validation-segmentation/<wnid>/<name>.png`. Class ids follow the
real (packaged) `ImageNetS_categories_im919.txt`: n01440764 = 1, n01443537 = 2,
n01484850 = 3, n04355933 = 783 (target of the merged synset n04356056).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

VARIANT = 919
DATASET_DIR = "ImageNetS919"
IGNORE = 1000


@dataclass
class FixtureImage:
    """What the converter should make of one good image."""

    folder_wnid: str
    name: str  # file stem
    mask_ids: np.ndarray  # [h, w] ids as written
    label_id: int  # expected mask_class_id
    label_wnid: str


@dataclass
class ImageNetSFixture:
    """The tree and what a conversion must produce."""

    root: Path
    good: dict[str, list[FixtureImage]] = field(default_factory=dict)  # folder wnid -> images
    rejects: dict[str, str] = field(default_factory=dict)  # path rel. to root -> reason fragment


def _rgb_mask_png(ids: np.ndarray) -> bytes:
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def object_mask(height: int, width: int, class_id: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """ids [h, w]: `class_id` inside box (top, left, bottom, right), a 2-px ignore frame around it."""
    top, left, bottom, right = box
    ids = np.zeros((height, width), dtype=np.int64)
    ids[max(0, top - 2) : bottom + 2, max(0, left - 2) : right + 2] = IGNORE
    ids[top:bottom, left:right] = class_id
    return ids


def build_imagenet_s_tree(root: Path) -> ImageNetSFixture:
    """Write the fixture tree under `root` and return what a conversion must produce."""
    fixture = ImageNetSFixture(root=root)
    images = root / DATASET_DIR / "validation"
    masks = root / DATASET_DIR / "validation-segmentation"

    def write(wnid: str, name: str, jpeg: bytes | None, mask_png: bytes | None) -> None:
        (images / wnid).mkdir(parents=True, exist_ok=True)
        (masks / wnid).mkdir(parents=True, exist_ok=True)
        if jpeg is not None:
            (images / wnid / f"{name}.JPEG").write_bytes(jpeg)
        if mask_png is not None:
            (masks / wnid / f"{name}.png").write_bytes(mask_png)

    def good(wnid: str, name: str, ids: np.ndarray, label_id: int, label_wnid: str, png: bytes) -> None:
        seed = 100 + sum(len(v) for v in fixture.good.values())
        write(wnid, name, _jpeg(*ids.shape, seed=seed), png)
        fixture.good.setdefault(wnid, []).append(FixtureImage(wnid, name, ids, label_id, label_wnid))

    # Class n01440764 (id 1): six good images, non-square sizes; per_class 5 keeps five.
    tench = "n01440764"
    sizes_boxes = [
        ((40, 56), (8, 20, 30, 44)),
        ((56, 40), (10, 4, 40, 30)),
        ((48, 48), (0, 0, 24, 24)),
        ((37, 61), (5, 30, 35, 61)),
        ((44, 52), (12, 12, 40, 40)),
        ((60, 45), (30, 5, 58, 40)),
    ]
    for i, ((height, width), box) in enumerate(sizes_boxes):
        ids = object_mask(height, width, 1, box)
        if i == 1:  # a second, smaller object of class 2: the label stays 1 (most frequent)
            ids[0:4, 0:10] = 2
        good(tench, f"ILSVRC2012_val_{i + 1:08d}", ids, 1, tench, _rgb_mask_png(ids))
    # Merged synset folder n04356056 -> n04355933 (id 783); one mask as 16-bit grey PNG.
    merged = "n04356056"
    ids = object_mask(50, 42, 783, (10, 10, 40, 30))
    good(merged, "ILSVRC2012_val_00000011", ids, 783, "n04355933", _rgb_mask_png(ids))
    ids = object_mask(42, 50, 783, (2, 20, 30, 48))
    grey = io.BytesIO()
    Image.fromarray(ids.astype(np.uint16)).save(grey, format="PNG")
    good(merged, "ILSVRC2012_val_00000012", ids, 783, "n04355933", grey.getvalue())

    # Class n01443537 (id 2): two good images and every kind of bad one.
    goldfish = "n01443537"
    # Relabelled by ImageNet-S: folder n01443537, mask says class 3 (n01484850).
    relabelled = object_mask(40, 56, 3, (4, 4, 36, 30))
    good(goldfish, "ILSVRC2012_val_00000020", relabelled, 3, "n01484850", _rgb_mask_png(relabelled))
    ids = object_mask(40, 56, 2, (10, 10, 30, 40))
    good(goldfish, "ILSVRC2012_val_00000021", ids, 2, goldfish, _rgb_mask_png(ids))
    bad = {
        "ILSVRC2012_val_00000022": (b"this is not a jpeg", _rgb_mask_png(ids), "unreadable image"),
        "ILSVRC2012_val_00000023": (_jpeg(40, 56, 1)[:300], _rgb_mask_png(ids), "unreadable image"),
        "ILSVRC2012_val_00000024": (_jpeg(40, 50, 2), _rgb_mask_png(ids), "is 56x40, image is 50x40"),
        "ILSVRC2012_val_00000025": (
            _jpeg(40, 56, 3), _rgb_mask_png(object_mask(40, 56, 950, (1, 1, 9, 9))), "unknown class id(s) 950"
        ),
        "ILSVRC2012_val_00000026": (_jpeg(40, 56, 4), None, "missing mask"),
        "ILSVRC2012_val_00000027": (
            _jpeg(40, 56, 5), _rgb_mask_png(np.where(ids == 2, IGNORE, 0)), "no object pixels"
        ),
    }
    for name, (jpeg, mask_png, reason) in bad.items():
        write(goldfish, name, jpeg, mask_png)
        fixture.rejects[f"{DATASET_DIR}/validation/{goldfish}/{name}.JPEG"] = reason
    (images / goldfish / "README.txt").write_text("not an image; ignored")

    # A folder that is no category of S919.
    write("n99999999", "ILSVRC2012_val_00000031", _jpeg(40, 56, 6), _rgb_mask_png(ids))
    fixture.rejects[f"{DATASET_DIR}/validation/n99999999"] = "folder is not a category"
    return fixture
