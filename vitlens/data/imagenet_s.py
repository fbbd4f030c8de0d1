"""Convert an ImageNet-S tree (Gao et al., LUSSeg/ImageNet-S) into vitlens samples.

Layout read (variant V in 50, 300, 919; split e.g. `validation`):
`ImageNetS{V}/{split}/<wnid>/<name>.JPEG` and
`ImageNetS{V}/{split}-segmentation/<wnid>/<name>.png`; `root` may be the folder holding
`ImageNetS{V}` or `ImageNetS{V}` itself. The category file `ImageNetS_categories_im{V}.txt`
(line i = class id i) is taken from the root if it is there, else the packaged copy.

- Class index: the ImageNet-1k index (position in the sorted 1,000 ILSVRC-2012 synsets)
  of the mask label's synset. S919 merges five synsets into others
  (`MERGED_SYNSETS`, source -> target); its category file lists the targets, which are
  all ImageNet-1k synsets. A folder named after a merged source counts as its target.
- Label: taken from the mask — the most frequent id that is neither 0 (other) nor
  1000 (ignore); on a tie the smallest id. The folder's synset is kept as `folder_wnid`.
- Selection: per class folder, the image names sorted, permuted with
  `np.random.default_rng([seed, class_id])` (class_id of the folder), and the first
  `per_class` of them that convert cleanly are taken (a rejected image is replaced by
  the next one in that order). `per_class=None` (`--per-class all`) takes every image
  that converts, in that same order.
- Class name: `vitlens.data.class_names.imagenet1k_class_names()` (the one definition,
  first synonym: "tench"), the same names the models report.
- Rejects (path + reason): unreadable image, missing mask, mask of another size than its
  image, a mask id not in the category list, a mask without any object id, a folder
  that is not a category, a file whose sample key another file already took.
- The original image bytes are stored unchanged (`image.jpg`; `image.png` for a PNG
  file; anything else is re-encoded losslessly as PNG); the mask keeps its original
  bytes when it is an RGB PNG, else it is re-encoded; its code plane for the token labels
  (`mask.codes.png`: context / the label's class / ignore) is written beside it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitlens.data.class_names import imagenet1k_class_names, imagenet1k_info
from vitlens.data.manifest import Reject
from vitlens.data.sample_format import (
    MASK_CONTEXT_ID,
    MASK_IGNORE_ID,
    EncodedSample,
    SampleMeta,
    decode_mask,
    encode_mask,
    encode_mask_codes,
    encode_png,
    is_imagenet_s_mask_png,
    mask_codes,
)
from vitlens.errors import UserError, one_line_reason

VARIANTS: tuple[int, ...] = (50, 300, 919)
MERGED_SYNSETS: dict[str, str] = {
    "n04356056": "n04355933",
    "n04493381": "n02808440",
    "n03642806": "n03832673",
    "n04008634": "n03773504",
    "n03887697": "n15075141",
}
IMAGE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")


def dataset_name(variant: int) -> str:
    """The `dataset` part of shard names and metadata, e.g. `imagenet_s919`."""
    return f"imagenet_s{variant}"


def category_file_name(variant: int) -> str:
    """`ImageNetS_categories_im{variant}.txt`."""
    return f"ImageNetS_categories_im{variant}.txt"


def _parse_categories(text: str, source: str) -> list[str]:
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [w for w in wnids if not (w.startswith("n") and w[1:].isdigit())]
    if not wnids or bad:
        raise UserError(f"category file {source} is not a list of wnids (first bad line: {bad[:1]})")
    return wnids


def load_categories(variant: int, search_dirs: tuple[Path, ...] = ()) -> tuple[list[str], str]:
    """The category wnids (index i-1 = class id i) and where they were read from.

    The first `search_dirs` entry holding the category file wins; else the packaged copy.
    """
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {VARIANTS}, got {variant}")
    name = category_file_name(variant)
    for directory in search_dirs:
        path = Path(directory) / name
        if path.is_file():
            return _parse_categories(path.read_text(), str(path)), str(path)
    packaged = resources.files("vitlens") / "resources" / "imagenet_s" / name
    return _parse_categories(packaged.read_text(), f"packaged {name}"), f"packaged {name}"


def imagenet1k_index(wnid: str) -> int:
    """ImageNet-1k class index of a synset (merged S919 sources count as their target)."""
    target = MERGED_SYNSETS.get(wnid, wnid)
    synsets = imagenet1k_info().label_names()
    if target not in synsets:
        raise UserError(f"synset {wnid} is not an ImageNet-1k class")
    return synsets.index(target)


def resolve_dataset_dir(root: Path, variant: int, split: str) -> Path:
    """The `ImageNetS{variant}` folder, given it or its parent as `--root`."""
    root = Path(root)
    candidates = (root / f"ImageNetS{variant}", root)
    for candidate in candidates:
        if (candidate / split).is_dir():
            return candidate
    raise UserError(
        f"--root {root}: found neither {candidates[0] / split} nor {root / split} "
        f"(expected the ImageNet-S layout ImageNetS{variant}/{split}/<wnid>/<name>.JPEG)"
    )


def selection_order(names: list[str], seed: int, class_id: int) -> list[str]:
    """Names sorted, then permuted with `default_rng([seed, class_id])` (the order images are tried)."""
    ordered = sorted(names)
    permutation = np.random.default_rng([seed, class_id]).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def mask_label(ids: np.ndarray, num_categories: int) -> int:
    """Most frequent object id of a mask [h, w] (ties: smallest); ValueError if none or unknown."""
    values, counts = np.unique(ids, return_counts=True)
    is_object = (values != MASK_CONTEXT_ID) & (values != MASK_IGNORE_ID)
    unknown = values[is_object & ((values < 1) | (values > num_categories))]
    if unknown.size:
        raise ValueError(
            f"unknown class id(s) {', '.join(map(str, unknown.tolist()))} in mask "
            f"(category file has ids 1..{num_categories})"
        )
    if not is_object.any():
        raise ValueError("mask has no object pixels (only ids 0 and 1000)")
    object_values, object_counts = values[is_object], counts[is_object]
    return int(object_values[np.argmax(object_counts)])  # argmax: first = smallest id on ties


@dataclass(frozen=True)
class _ClassFolder:
    wnid: str
    class_id: int
    image_dir: Path
    mask_dir: Path


def _image_member(data: bytes) -> tuple[str, bytes]:
    """(member, bytes) storing an image losslessly; decodes it fully to prove it is readable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "JPEG":
                return "image.jpg", data
            if image.format == "PNG":
                return "image.png", data
            return "image.png", encode_png(np.asarray(image.convert("RGB")))
    except UnidentifiedImageError:
        raise ValueError("unreadable image: not an image format PIL can identify") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"unreadable image: {err}") from err


class ImageNetSConverter:
    """Plans and performs the conversion of one ImageNet-S split."""

    def __init__(self, root: Path, variant: int, split: str, per_class: int | None, seed: int):
        """Locate the data set and its categories; raises UserError for a bad root/variant.

        `per_class`: images per class folder, or None for every image of every folder.
        """
        if per_class is not None and per_class < 1:
            raise UserError(f"--per-class must be >= 1, got {per_class}")
        self.variant, self.split, self.per_class, self.seed = variant, split, per_class, seed
        self.dataset_dir = resolve_dataset_dir(root, variant, split)
        self.categories, self.categories_source = load_categories(
            variant, (Path(root), self.dataset_dir, self.dataset_dir.parent)
        )
        for wnid in self.categories:
            imagenet1k_index(wnid)  # every category must have a model class

    @property
    def dataset(self) -> str:
        """The `dataset` name of the shards."""
        return dataset_name(self.variant)

    def class_folders(self) -> tuple[list[_ClassFolder], list[Reject]]:
        """The split's class folders in sorted order, and folders that are no category."""
        image_root = self.dataset_dir / self.split
        mask_root = self.dataset_dir / f"{self.split}-segmentation"
        category_ids = {wnid: i + 1 for i, wnid in enumerate(self.categories)}
        folders, rejects = [], []
        for path in sorted(p for p in image_root.iterdir() if p.is_dir()):
            class_id = category_ids.get(MERGED_SYNSETS.get(path.name, path.name))
            if class_id is None:
                reason = f"folder is not a category of {self.categories_source}"
                rejects.append(Reject(self._relative(path), reason))
                continue
            folders.append(_ClassFolder(path.name, class_id, path, mask_root / path.name))
        return folders, rejects

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.dataset_dir.parent))

    def _convert_one(self, folder: _ClassFolder, image_path: Path) -> EncodedSample:
        """One image -> sample; raises ValueError/OSError with the reason."""
        mask_path = folder.mask_dir / f"{image_path.stem}.png"
        image_member, image_bytes = _image_member(image_path.read_bytes())
        if not mask_path.is_file():
            raise ValueError(f"missing mask {self._relative(mask_path)}")
        mask_bytes = mask_path.read_bytes()
        try:
            ids = decode_mask(mask_bytes)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"unreadable mask {self._relative(mask_path)}: {err}") from err
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
        if ids.shape != (height, width):
            raise ValueError(
                f"mask {self._relative(mask_path)} is {ids.shape[1]}x{ids.shape[0]}, "
                f"image is {width}x{height}"
            )
        label = mask_label(ids, len(self.categories))
        wnid = self.categories[label - 1]
        class_index = imagenet1k_index(wnid)
        meta = SampleMeta(
            class_index=class_index,
            mask_class_id=label,
            class_name=imagenet1k_class_names()[class_index],
            wnid=wnid,
            folder_wnid=folder.wnid,
            source=self._relative(image_path),
            split=self.split,
            dataset=self.dataset,
        )
        if not is_imagenet_s_mask_png(mask_bytes):
            mask_bytes = encode_mask(ids)
        key = f"{folder.wnid}_{image_path.stem}".replace(".", "_").replace(" ", "_")
        codes = encode_mask_codes(mask_codes(ids, label))
        return EncodedSample(key, image_member, image_bytes, mask_bytes, meta, codes)

    @staticmethod
    def _image_names(folder: _ClassFolder) -> list[str]:
        return [p.name for p in folder.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]

    def expected_samples(self) -> int:
        """Samples a conversion without rejects would write (for the progress bar)."""
        folders, _ = self.class_folders()
        counts = [len(self._image_names(folder)) for folder in folders]
        return sum(counts) if self.per_class is None else sum(min(self.per_class, n) for n in counts)

    def iter_results(self) -> Iterator[EncodedSample | Reject]:
        """Converted samples and rejects, class by class in sorted folder order."""
        folders, folder_rejects = self.class_folders()
        yield from folder_rejects
        keys: set[str] = set()
        for folder in folders:
            taken = 0
            for name in selection_order(self._image_names(folder), self.seed, folder.class_id):
                if self.per_class is not None and taken == self.per_class:
                    break
                image_path = folder.image_dir / name
                try:
                    sample = self._convert_one(folder, image_path)
                except (ValueError, OSError) as err:
                    yield Reject(self._relative(image_path), one_line_reason(str(err)))
                    continue
                if sample.key in keys:  # e.g. x.JPEG beside x.jpg
                    yield Reject(self._relative(image_path), f"sample key {sample.key} already used")
                    continue
                keys.add(sample.key)
                taken += 1
                yield sample
