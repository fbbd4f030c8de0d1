"""Where a result set lives: a local folder, or a prefix on an object store (`s3://`, `gs://`,
`abfs://`, ... — any file system fsspec opens).

`open_storage(root)` gives one `Storage` with the few operations the store needs, each on a
key relative to the root (`table=tokens/variant=v/experiment=e/s.parquet`):

- whole-object writes (`write_bytes`, `write_table`): on a local folder a temporary name
  beside the target and an atomic rename; on an object store one PUT, which becomes visible
  whole or not at all;
- streamed writes (`StagedFile`): written while hashing (size + sha256 for the done-marker),
  then committed (local: renamed into place; object store: the upload is completed) or
  aborted (nothing appears);
- `create_exclusive`: a conditional create of a whole object (a hard link, which fails when
  the name exists, locally; `If-None-Match: *` on S3 via fsspec's `mode="create"`), the
  primitive of the output lock;
- listing, reading, deleting, and the fsspec file system itself for DuckDB and PyArrow.

Object stores have no rename, so the commit protocol of the store (`vitlens.store.layout`)
gives every data object of an object-store result set a name no other write uses
(`Storage.renames` says which protocol applies) and lets the done-marker name them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from vitlens.errors import UserError, one_line_reason

#: zstd level of whole-table writes (`write_table`).
TABLE_ZSTD_LEVEL = 3


def is_remote(root: str | Path) -> bool:
    """True for a URL with a scheme other than `file:` (`s3://b/p`, `gs://b/p`, `memory://p`)."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def normalise_root(root: str | Path, base: Path | None = None) -> str:
    """The canonical spelling of a result root: an absolute local path (a `file://` URL loses
    its scheme; a relative path resolves against `base`, default the working directory), or
    the URL as given without a trailing `/`."""
    text = str(root)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(path.resolve())


@dataclass(frozen=True)
class FileRecord:
    """What a done-marker records of one committed file."""

    key: str  # relative to the result root, '/'-separated
    size: int  # bytes
    sha256: str  # hex

    def as_json(self) -> dict[str, Any]:
        """The marker's entry: {"size": ..., "sha256": ...} (the key is the entry's name)."""
        return {"size": self.size, "sha256": self.sha256}


class _HashingWriter:
    """A binary sink that forwards writes to `sink` and keeps their size and sha256."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += view.nbytes
        self.sink.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.sink.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # PyArrow closes its sink; the real close is commit / abort
        self.closed = True


class StagedFile:
    """A file being written under a name nobody reads yet; `commit()` makes it `key`.

    Locally it is a temporary file beside the target, renamed into place; on an object store
    it is an upload to `key` itself (which must be a name no other write uses: an upload
    only becomes visible once complete, and `abort()` discards it).
    """

    def __init__(self, storage: "Storage", key: str) -> None:
        self.storage, self.key = storage, key
        if storage.renames:
            target = storage.local_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp: Path | None = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            raw: IO[bytes] = open(self._tmp, "wb")
        else:
            self._tmp = None
            raw = storage.fs.open(storage.fs_path(key), "wb")
        self._raw = raw
        self.stream = _HashingWriter(raw)

    def commit(self) -> FileRecord:
        """Finish the file; returns its record (key, size, sha256)."""
        self._raw.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.storage.local_path(self.key))
        return FileRecord(self.key, self.stream.size, self.stream.digest.hexdigest())

    def abort(self) -> None:
        """Drop what was written (nothing at `key` changes)."""
        if self._tmp is not None:
            try:
                self._raw.close()
            finally:
                self._tmp.unlink(missing_ok=True)
            return
        discard = getattr(self._raw, "discard", None)  # fsspec buffered files: abort the upload
        try:
            if discard is not None:
                discard()
            else:
                self._raw.close()
                self.storage.delete(self.key)
        except Exception:
            pass  # an upload that never completes is invisible; a leftover object is named by no marker


class Storage:
    """A result root; every key is relative to it and '/'-separated."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.renames = not is_remote(root)
        if self.renames:
            self.fs: Any = None
            self._base = root
        else:
            import fsspec

            try:
                self.fs, self._base = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as err:
                protocol = root.split("://", 1)[0]
                raise UserError(f"{root}: no file system for {protocol}:// ({one_line_reason(err)}; "
                                "s3:// needs `pip install 'vitlens[s3]'`, gs:// 'vitlens[gcs]', az:// 'vitlens[azure]')") from None
            self._base = self._base.rstrip("/")

    # -- names -------------------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        """The full path or URL of `key` (what DuckDB and messages show)."""
        return f"{self.root}/{key}" if key else self.root

    def fs_path(self, key: str) -> str:
        """`key` as the fsspec file system spells it (no scheme)."""
        return f"{self._base}/{key}" if key else self._base

    def local_path(self, key: str) -> Path:
        """`key` as a local path (local roots only)."""
        return Path(self.root) / key

    def unique_key(self, key: str) -> str:
        """`key` itself where files are renamed into place (local), else `key` with a fresh
        token before its suffix (`s.parquet` -> `s.1a2b3c4d5e6f.parquet`): a name no other
        write uses, as object stores need."""
        if self.renames:
            return key
        head, _, suffix = key.rpartition(".")
        return f"{head}.{uuid.uuid4().hex[:12]}.{suffix}"

    # -- reading -----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether an object / file `key` exists."""
        if self.renames:
            return self.local_path(key).is_file()
        self.fs.invalidate_cache()
        return bool(self.fs.isfile(self.fs_path(key)))

    def size(self, key: str) -> int:
        """The size in bytes of `key` (FileNotFoundError when it does not exist)."""
        if self.renames:
            return self.local_path(key).stat().st_size
        return int(self.fs.size(self.fs_path(key)))

    def read_bytes(self, key: str) -> bytes:
        """The bytes of `key` (FileNotFoundError when it does not exist)."""
        if self.renames:
            return self.local_path(key).read_bytes()
        return self.fs.cat_file(self.fs_path(key))

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """The bytes of each key (None where it cannot be read); concurrent on object stores."""
        if self.renames:
            found: dict[str, bytes | None] = {}
            for key in keys:
                try:
                    found[key] = self.local_path(key).read_bytes()
                except OSError:
                    found[key] = None
            return found
        if not keys:
            return {}
        paths = {self.fs_path(key): key for key in keys}
        raw = self.fs.cat(list(paths), on_error="return")
        return {paths[p]: (v if isinstance(v, bytes) else None) for p, v in raw.items()}

    def list_files(self, prefix: str = "") -> dict[str, int]:
        """Every file under `prefix` (recursive) -> its size; keys relative to the root."""
        if self.renames:
            base = self.local_path(prefix)
            if not base.is_dir():
                return {}
            root = Path(self.root)
            found = {}
            for dirpath, _, names in os.walk(base):
                for name in names:
                    path = Path(dirpath) / name
                    try:
                        found[path.relative_to(root).as_posix()] = path.stat().st_size
                    except OSError:
                        continue  # removed while listing (a temporary renamed away)
            return found
        start = self.fs_path(prefix)
        self.fs.invalidate_cache()  # other processes write here: never answer from a cached listing
        try:
            listed = self.fs.find(start, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as err:  # credentials, network, permissions: one line, not a traceback
            raise UserError(f"{self.root}: cannot list it ({one_line_reason(err)})") from None
        cut = len(self._base) + 1
        return {path[cut:]: int(info.get("size") or 0) for path, info in listed.items()
                if info.get("type", "file") == "file"}

    def sha256(self, key: str) -> str:
        """Hex sha256 of `key`'s bytes, streamed in 4 MiB chunks."""
        digest = hashlib.sha256()
        with (open(self.local_path(key), "rb") if self.renames else self.fs.open(self.fs_path(key), "rb")) as stream:
            for chunk in iter(lambda: stream.read(4 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    # -- writing -----------------------------------------------------------------------------
    def write_bytes(self, data: bytes, key: str) -> FileRecord:
        """Write a whole object / file (readers see the old one or the new one, never a part)."""
        if self.renames:
            self._place_local(data, key, os.replace)
        else:
            self.fs.pipe_file(self.fs_path(key), data)
        return FileRecord(key, len(data), hashlib.sha256(data).hexdigest())

    def write_table(self, table: pa.Table, key: str, row_group_size: int = 256 * 1024) -> FileRecord:
        """Write `table` as zstd Parquet to `key` in one piece (`write_bytes`)."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=TABLE_ZSTD_LEVEL,
                       row_group_size=row_group_size, use_dictionary=True, write_statistics=True)
        return self.write_bytes(sink.getvalue().to_pybytes(), key)

    def create_exclusive(self, data: bytes, key: str) -> bool:
        """Create `key` holding `data` only if it does not exist; False when it does."""
        if self.renames:  # written aside, then hard-linked into place: it appears whole or not at all
            try:
                self._place_local(data, key, os.link)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system (some FUSE / SMB mounts): O_EXCL
                return self._create_in_place(self.local_path(key), data)
            return True
        try:
            self.fs.pipe_file(self.fs_path(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def _place_local(self, data: bytes, key: str, place: Any) -> None:
        """Write `data` to a temporary file beside `key`'s path, then `place(tmp, path)` it
        (`os.replace`: replace; `os.link`: create, FileExistsError when it exists)."""
        path = self.local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            place(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_in_place(path: Path, data: bytes) -> bool:
        """An exclusive create written in place (a reader may see it empty for a moment)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def delete(self, key: str) -> None:
        """Remove `key` if it exists."""
        if self.renames:
            self.local_path(key).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self.fs_path(key))
        except FileNotFoundError:
            pass

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key that exists."""
        keys = list(keys)
        if self.renames or not keys:
            for key in keys:
                self.delete(key)
            return
        try:
            self.fs.rm([self.fs_path(k) for k in keys])
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """The root exists or can be made, and an object can be written and removed there;
        UserError naming the root otherwise."""
        key = f".vitlens-write-probe-{uuid.uuid4().hex}.tmp"
        if self.renames:
            path = Path(self.root)
            if path.exists() and not path.is_dir():
                raise UserError(f"output {path} is a file, not a folder")
            try:
                path.mkdir(parents=True, exist_ok=True)
                with open(path / key, "wb") as handle:
                    handle.write(b"ok")
                    handle.flush()
                    os.fsync(handle.fileno())
                (path / key).unlink()
            except OSError as err:
                raise UserError(f"output {path} is not writable: {err.strerror or err}") from None
            return
        try:
            self.fs.pipe_file(self.fs_path(key), b"ok")
            self.fs.rm_file(self.fs_path(key))
        except Exception as err:  # credentials, missing bucket, network: one line
            raise UserError(f"output {self.root} is not writable: {one_line_reason(err)}") from None


def open_storage(root: str | Path) -> Storage:
    """The `Storage` of a result root: a local folder (path or `file://` URL) or an fsspec URL."""
    return Storage(normalise_root(root))
