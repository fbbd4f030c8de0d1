"""Re-read one analysed sample's image and mask from its shard, through the variant's eval transform.

The result set does not store pixels; it stores where they came from. A sample is found as:

    images.shard (the shard id, `vitlens.store.layout.shard_stem` of its URL)
      -> the shard URL, from `runs.job_spec` (JSON of the job spec: `data.manifest`, read with
         `vitlens.data.manifest.shard_entries`, or the explicit `data.shards`)
      -> the tar (a local file or an object-store URL), scanned member by member for `KEY.image.*`, `KEY.mask.png`, `KEY.meta.json`
      -> the variant's eval resize/crop (`variants.data_config` through
         `vitlens.data.geometry.EvalGeometry`), applied to the image and (nearest) to the mask,
         so the token grid lies on the pixels exactly as the model saw them.

Nothing here raises for a shard that is gone, remote or unreadable: `load_sample` returns an
`ImageLookup` whose `reason` says (one line) why there is no image, and the gallery draws the
token maps without it.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from vitlens.data import urls
from vitlens.data.manifest import is_local, local_path, shard_entries
from vitlens.data.sample_format import (
    IMAGE_MEMBERS,
    MASK_MEMBER,
    META_MEMBER,
    decode_image,
    decode_mask,
    decode_meta,
    split_member_name,
)
from vitlens.errors import UserError, one_line_reason
from vitlens.store.layout import shard_stem


@dataclass(frozen=True)
class SampleImage:
    """One sample as the model saw it (after the eval resize/crop, before normalisation).

    `pixels`: [H, W, 3] uint8; `object_mask`: [H, W] bool, the pixels of `mask_class_id`
    (None when the shard holds no mask); `ignore_mask`: [H, W] bool, ignore id 1000 (padding
    included); `meta`: the sample's `meta.json`.
    """

    pixels: np.ndarray
    object_mask: np.ndarray | None
    ignore_mask: np.ndarray | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class ImageLookup:
    """Where a sample's image came from: `image` when it was read, else `reason` (one line,
    naming the shard or sample) and `short` (a few words, for inside a figure)."""

    image: SampleImage | None
    shard_url: str | None
    reason: str | None = None
    short: str | None = None


def job_shard_urls(job_spec_json: str) -> list[str]:
    """The shard URLs a job read (`data.manifest`'s shards, or `data.shards`), in job order.

    A manifest that is gone or unreadable gives no URLs (the caller reports the shard as
    not found); a job spec that is not JSON gives none either.
    """
    try:
        spec = json.loads(job_spec_json)
        data = spec.get("data") or {}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return []
    if data.get("manifest"):
        try:
            return [str(entry.url) for entry in shard_entries(data["manifest"])]
        except UserError:
            return []
    return [str(url) for url in data.get("shards") or ()]


def shard_url_index(job_specs: Iterable[str]) -> dict[str, str]:
    """shard id (`shard_stem`) -> shard URL over the job specs of every run (later runs win)."""
    index: dict[str, str] = {}
    for spec in job_specs:
        for url in job_shard_urls(spec):
            index[shard_stem(url)] = url
    return index


def read_sample_members(shard: Path | str, key: str) -> dict[str, bytes]:
    """The members of sample `key` in a tar (a local file or an object-store URL), as
    {member: bytes} (e.g. `image.png`, `mask.png`, `meta.json`); empty when the shard holds no
    such sample. Streams the tar (members are read only for `key`) and stops after the
    sample's last member."""
    found: dict[str, bytes] = {}
    opened = urls.open_binary(shard) if isinstance(shard, str) and urls.is_object_url(shard) else open(shard, "rb")
    with opened as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            try:
                member_key, name = split_member_name(member.name.rsplit("/", 1)[-1])
            except ValueError:
                continue  # not a sample member
            if member_key != key:
                if found:
                    break  # members of one sample are consecutive
                continue
            stream = tar.extractfile(member)
            if stream is not None:
                found[name] = stream.read()
    return found


def transform_sample(members: Mapping[str, bytes], data_config: Mapping[str, Any]) -> SampleImage:
    """Decode a sample's members and apply the eval resize/crop of `data_config` (timm's
    resolved eval transform) to the image (its interpolation) and the mask (nearest)."""
    from vitlens.data.geometry import EvalGeometry  # imports torch: only when an image is drawn
    from vitlens.data.sample_format import MASK_IGNORE_ID

    geometry = EvalGeometry.from_data_config(data_config)
    image_member = next((m for m in IMAGE_MEMBERS if m in members), None)
    if image_member is None:
        raise ValueError(f"no {' or '.join(IMAGE_MEMBERS)} member")
    pixels = geometry.image_pixels(decode_image(members[image_member]))
    meta = decode_meta(members[META_MEMBER]) if META_MEMBER in members else {}
    object_mask = ignore_mask = None
    if MASK_MEMBER in members:
        ids = geometry.mask(decode_mask(members[MASK_MEMBER]))
        ignore_mask = ids == MASK_IGNORE_ID
        if "mask_class_id" in meta:
            object_mask = ids == int(meta["mask_class_id"])
    return SampleImage(pixels=pixels, object_mask=object_mask, ignore_mask=ignore_mask, meta=meta)


def load_sample(shard_url: str | None, shard_id: str, key: str, data_config: Mapping[str, Any] | None) -> ImageLookup:
    """Re-read sample `key` of shard `shard_id` (at `shard_url`), transformed as the model saw it.

    Never raises for a missing, remote or unreadable shard or sample: the lookup's `reason`
    says why there is no image.
    """
    if data_config is None:
        return ImageLookup(None, shard_url,
                           "the result set has no eval transform (variants.data_config) for this variant",
                           "no eval transform")
    if shard_url is None:
        return ImageLookup(None, None, f"no run's job spec names shard {shard_id}", "shard unknown")
    if urls.is_object_url(shard_url):
        path: Path | str = shard_url  # read from the object store
    elif not is_local(shard_url):
        return ImageLookup(None, shard_url, f"shard {shard_url} is not a local file", "shard not local")
    else:
        path = local_path(shard_url)
        if not path.is_file():
            return ImageLookup(None, shard_url, f"shard {path} is gone", "shard gone")
    try:
        members = read_sample_members(path, key)
        if not members:
            return ImageLookup(None, shard_url, f"shard {path} holds no sample {key}", "sample not in shard")
        return ImageLookup(transform_sample(members, data_config), shard_url)
    except FileNotFoundError:
        return ImageLookup(None, shard_url, f"shard {path} is gone", "shard gone")
    except (OSError, tarfile.TarError, ValueError, UserError) as err:
        return ImageLookup(None, shard_url, f"sample {key} of {path} is unreadable: {one_line_reason(err)}",
                           "unreadable sample")
