"""`manifest.json`: the list of a data set split's shards, their sizes and checksums.

```
{"format_version": 1, "dataset": str, "split": str, "num_classes": int,
 "class_names": [str, ...],            # index = class_index of the samples
 "shards": [{"name": str, "samples": int, "sha256": str}, ...],
 "rejects": [{"path": str, "reason": str}, ...],
 "created_by": {"command": str, "vitlens": str, "options": {...}}}
```
The manifest lies in the same directory as its shards; shard names are relative to it. A
manifest may be a local file or an object-store URL (`s3://bucket/shards/manifest.json`,
or the prefix `s3://bucket/shards`; see `vitlens.data.urls`): its shards are then URLs
beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlens.data import urls
from vitlens.errors import UserError

MANIFEST_NAME: str = "manifest.json"
MANIFEST_FORMAT_VERSION: int = 1
_REQUIRED_KEYS: tuple[str, ...] = (
    "format_version", "dataset", "split", "num_classes", "class_names", "shards"
)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a manifest: where it is, and what the manifest says it holds.

    `url`: the shard's absolute path (as `shard_urls` gives it; set by `shard_entries`;
    None only for an entry the writer has just made, before it is written to a manifest).
    `name`: the file name relative to the manifest. `samples` / `sha256`: the sample
    count and hex sha256 the manifest records, None where it records none. The reader
    checks a shard against them (`iter_shard_batches(..., expected_samples=entry.samples,
    expected_sha256=entry.sha256)`).

    Fields are in the order `ShardWriter` builds entries (`ShardEntry(name, samples,
    sha256)`); pass `url` by keyword.
    """

    name: str
    samples: int | None
    sha256: str | None
    url: str | None = None


@dataclass(frozen=True)
class Reject:
    """A source file that was not converted, and why."""

    path: str
    reason: str


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (not http(s)://, pipe:, gs://, ...)."""
    return url.startswith("file:") or "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> Path:
    """The file of a local shard URL."""
    return Path(url[len("file://"):] if url.startswith("file://") else url.removeprefix("file:"))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(
    out_dir: Path,
    dataset: str,
    split: str,
    class_names: list[str],
    shards: list[ShardEntry],
    rejects: list[Reject],
    created_by: dict[str, Any],
) -> Path:
    """Write `out_dir/manifest.json` (deterministic: sorted keys, no timestamps)."""
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "dataset": dataset,
        "split": split,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "shards": [{"name": s.name, "samples": s.samples, "sha256": s.sha256} for s in shards],
        "rejects": [{"path": r.path, "reason": r.reason} for r in rejects],
        "created_by": created_by,
    }
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def _manifest_path(manifest_or_dir: str | Path) -> Path:
    path = Path(manifest_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def _manifest_location(manifest_or_dir: str | Path) -> str:
    """The manifest file's path, or its URL on an object store (a URL not ending in `.json`
    is the prefix holding `manifest.json`)."""
    text = str(manifest_or_dir)
    if urls.is_object_url(text):
        return text if text.endswith(".json") else urls.join(text, MANIFEST_NAME)
    return str(_manifest_path(manifest_or_dir))


def read_manifest(manifest_or_dir: str | Path) -> dict[str, Any]:
    """Read and check a manifest (the file, or the directory holding `manifest.json`; either
    may be an object-store URL)."""
    path = _manifest_location(manifest_or_dir)
    try:
        if urls.is_object_url(path):
            text = urls.read_bytes(path).decode()
        elif not Path(path).is_file():
            raise UserError(f"no shard manifest at {path}")
        else:
            text = Path(path).read_text()
        manifest = json.loads(text)
    except FileNotFoundError:
        raise UserError(f"no shard manifest at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"unreadable shard manifest {path}: {err}") from err
    if not isinstance(manifest, dict):
        raise UserError(f"shard manifest {path} is not a JSON object")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise UserError(f"shard manifest {path} lacks key(s): {', '.join(missing)}")
    if manifest["format_version"] != MANIFEST_FORMAT_VERSION:
        raise UserError(
            f"shard manifest {path} has format_version {manifest['format_version']}; "
            f"this vitlens reads {MANIFEST_FORMAT_VERSION}"
        )
    return manifest


def shard_entries(manifest_or_dir: str | Path) -> list[ShardEntry]:
    """The shards of a manifest (the file, or its directory), in manifest order.

    Each entry's `url` is the shard's absolute path (the manifest's directory joined with
    the shard's `name`, resolved), or its URL beside an object-store manifest; `samples` and `sha256` are None where the manifest
    lacks them. A shard record without a string `name`, or with a `samples` that is not an
    integer, or a `sha256` that is not a string, raises UserError naming the manifest.
    """
    path = _manifest_location(manifest_or_dir)
    manifest = read_manifest(path)
    remote = urls.is_object_url(path)
    entries = []
    for index, shard in enumerate(manifest["shards"]):
        name = shard.get("name") if isinstance(shard, dict) else None
        samples = shard.get("samples") if isinstance(shard, dict) else None
        sha256 = shard.get("sha256") if isinstance(shard, dict) else None
        if (
            not isinstance(name, str) or not name
            or (samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)))
            or (sha256 is not None and not isinstance(sha256, str))
        ):
            raise UserError(
                f"shard manifest {path}: shards[{index}] must be "
                '{"name": str, "samples": int, "sha256": str}'
            )
        url = urls.join(urls.parent(path), name) if remote else str((Path(path).parent / name).resolve())
        entries.append(ShardEntry(name=name, samples=samples, sha256=sha256, url=url))
    return entries


def shard_urls(manifest_or_dir: str | Path) -> list[str]:
    """Absolute paths of a manifest's shards, in manifest order (the urls of `shard_entries`)."""
    return [str(entry.url) for entry in shard_entries(manifest_or_dir)]


def verify_shards(manifest_or_dir: str | Path) -> list[str]:
    """Check every shard of a manifest exists with its recorded sha256; returns the problems."""
    problems = []
    for entry in shard_entries(manifest_or_dir):
        url = str(entry.url)
        try:
            digest = _url_sha256(url)
        except FileNotFoundError:
            problems.append(f"{url}: missing")
            continue
        if digest != entry.sha256:
            problems.append(f"{url}: sha256 differs from the manifest")
    return problems


def _url_sha256(url: str) -> str:
    """Hex sha256 of a local file or an object; FileNotFoundError when there is none."""
    if not urls.is_object_url(url):
        if not Path(url).is_file():
            raise FileNotFoundError(url)
        return file_sha256(Path(url))
    digest = hashlib.sha256()
    with urls.open_binary(url) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
