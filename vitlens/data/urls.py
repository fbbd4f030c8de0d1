"""Where data lives: local paths, object stores, and whatever else webdataset opens.

- a plain path or `file:` URL is a local file;
- an object-store URL (`s3://`, `gs://`, `az://`, `abfs://`, ... — a `scheme://` that is not
  `http(s)://` or `file://`) is opened through fsspec, so it takes the same credentials and
  endpoint settings as the result store (`AWS_*` variables, `~/.aws`, gcloud, ...) and needs
  the file system's package (`pip install 'vitlens[s3]'`, `[gcs]`, `[azure]`);
- anything else (`http(s)://`, `pipe:`) goes to `webdataset.gopen`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import IO, Iterator

from vitlens.errors import UserError, one_line_reason

#: Schemes that `webdataset.gopen` opens itself (or that are local).
_GOPEN_SCHEMES: tuple[str, ...] = ("http", "https", "file")


def is_object_url(url: str) -> bool:
    """True for an object-store URL that fsspec opens (`s3://b/k`, `gs://b/k`, `memory://k`)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme not in _GOPEN_SCHEMES and "/" not in scheme and ":" not in scheme


def _fsspec_fs(url: str):  # -> (fsspec.AbstractFileSystem, path)
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        scheme = url.split("://", 1)[0]
        raise UserError(f"{url}: no file system for {scheme}:// ({one_line_reason(err)}; s3:// needs "
                        "`pip install 'vitlens[s3]'`, gs:// 'vitlens[gcs]', az:// 'vitlens[azure]')") from None


@contextmanager
def _as_os_error() -> Iterator[None]:
    """Object-store client errors (credentials, network, botocore's own types) as OSError,
    so callers handle them like a file that cannot be read; FileNotFoundError stays itself."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        raise OSError(one_line_reason(err)) from err


def open_binary(url: str) -> IO[bytes]:
    """A binary stream of `url`'s bytes (the caller closes it); raises OSError (e.g.
    FileNotFoundError) when it cannot be opened, UserError for an unknown scheme."""
    if is_object_url(url):
        fs, path = _fsspec_fs(url)
        with _as_os_error():
            return fs.open(path, "rb", block_size=1 << 22)
    import webdataset  # imports torch: only where a shard is read, never in the driver

    return webdataset.gopen(url, "rb")


def read_bytes(url: str) -> bytes:
    """All bytes of `url` (a small file: a manifest, a JSON)."""
    if is_object_url(url):
        fs, path = _fsspec_fs(url)
        with _as_os_error():
            return fs.cat_file(path)
    with open_binary(url) as stream:
        return stream.read()


def join(directory: str, name: str) -> str:
    """`name` relative to the directory URL `directory` (`s3://b/shards` + `a.tar`)."""
    return f"{directory.rstrip('/')}/{name}"


def parent(url: str) -> str:
    """The directory URL of `url` (`s3://b/shards/manifest.json` -> `s3://b/shards`)."""
    return url.rstrip("/").rsplit("/", 1)[0]
