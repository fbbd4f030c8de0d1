"""One shard as a raw tar stream: `(key, {member: bytes})` samples, read once, checked at its end.

`iter_shard_samples` opens a shard (`vitlens.data.urls.open_binary`: local paths, `file:`,
object stores through fsspec, any URL webdataset accepts), groups its contiguous members
into samples, and after the last sample it could read raises `ShardReadError` when the tar
broke off (no end-of-archive marker, a truncated member or header, bytes that are no tar),
holds another number of samples than `expected_samples`, or its bytes' sha256 (computed
while streaming the one read; the bytes after the end-of-archive marker are drained into
it) differs from `expected_sha256`. Decoding the samples is `vitlens.data.reader`'s job.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import IO, Iterator

from vitlens.data import urls
from vitlens.data.sample_format import META_MEMBER, split_member_name
from vitlens.errors import UserError, one_line_reason

__all__ = ["ShardReadError", "iter_shard_samples"]

_DRAIN_CHUNK: int = 1 << 20
# Errors that mean the tar stream itself is damaged (not one sample's content).
_STREAM_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, ValueError)


class ShardReadError(Exception):
    """A shard that does not read to its end as the manifest describes it.

    `reason` is one deterministic line (no object addresses, ANSI codes or tracebacks),
    e.g. "shard truncated after 7 samples: ReadError: unexpected end of data",
    "shard has 9 samples, manifest says 10" or
    "sha256 mismatch: file 0123456789ab…, manifest fedcba987654…".
    """

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = one_line_reason(reason)
        super().__init__(self.reason)


class _HashingReader:
    """A read-only file object over a stream that feeds every byte it returns into sha256
    (when `hashing`; else `digest` stays None)."""

    def __init__(self, stream: IO[bytes], hashing: bool = True) -> None:
        self._stream = stream
        self.digest = hashlib.sha256() if hashing else None
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream; the bytes also go into the hash."""
        data = self._stream.read(size)
        if self.digest is not None:
            self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> None:
        """Read the rest of the stream to EOF (into the hash)."""
        while self.read(_DRAIN_CHUNK):
            pass


class _EndOfArchive:
    """Tells a tar that ended with its end-of-archive marker from one that broke off.

    `tarfile` in stream mode ends iteration silently when, after the first member, a
    header is missing, short or invalid; only a zero block is the real end. A TarInfo
    subclass sees which header error ended the archive.
    """

    def __init__(self) -> None:
        self.clean = False
        self.damage: str | None = None
        end = self

        class _TarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
                try:
                    return super().fromtarfile(tar)
                except tarfile.EOFHeaderError:
                    end.clean = True
                    raise
                except tarfile.HeaderError as err:
                    end.damage = _header_damage(err)
                    raise

        self.tarinfo = _TarInfo


def _header_damage(err: tarfile.HeaderError) -> str:
    """A one-line reason for a header that ended a tar stream early."""
    if isinstance(err, tarfile.EmptyHeaderError):
        return "stream ends without the tar end-of-archive marker"
    if isinstance(err, tarfile.TruncatedHeaderError):
        return "stream ends inside a tar header"
    return f"invalid tar header ({one_line_reason(err)})"


def _tar_samples(tar: tarfile.TarFile, end: _EndOfArchive) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's file members into `(key, {member: bytes})` samples. When the
    stream broke off (no end-of-archive marker), the last sample only if it holds meta.json,
    the last member every shard writer writes (else it may be partial)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    for info in tar:
        if not info.isfile():
            continue
        member_key, member = split_member_name(info.name)
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        extracted = tar.extractfile(info)
        assert extracted is not None
        members[member] = extracted.read()
    if key is not None and (end.clean or META_MEMBER in members):
        yield key, members


def _check_problems(
    count: int, digest: str | None, expected_samples: int | None, expected_sha256: str | None
) -> list[str]:
    """Differences of a completely read shard from what its manifest says."""
    problems = []
    if expected_samples is not None and count != expected_samples:
        problems.append(f"shard has {count} samples, manifest says {expected_samples}")
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        problems.append(f"sha256 mismatch: file {digest[:12]}…, manifest {expected_sha256.strip()[:12]}…")
    return problems


def iter_shard_samples(
    url: str,
    expected_samples: int | None = None,
    expected_sha256: str | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the raw samples of one shard: `(key, {member: bytes})`, in tar order.

    Members of a sample must be contiguous (as every vitlens shard writes them). Raises
    UserError when the shard cannot be opened. After the last sample it could read, raises
    `ShardReadError` when the tar broke off (a partly read sample is not yielded), when
    the number of samples differs from `expected_samples`, or when the sha256 of the
    file's bytes (hashed while streaming; the rest after the end-of-archive marker is
    drained into the hash) differs from `expected_sha256`. The file is read once.
    """
    try:
        raw = urls.open_binary(url)
    except UserError:
        raise
    except Exception as err:  # gopen / fsspec raise various types for missing files / bad URLs
        raise UserError(f"cannot open shard {url}: {err}") from err
    stream = _HashingReader(raw, hashing=expected_sha256 is not None)  # no sha256 to check: no hashing
    end = _EndOfArchive()
    count = 0
    damage: str | None = None
    finished = False
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=end.tarinfo)  # type: ignore[call-overload]
        except _STREAM_ERRORS as err:
            damage = one_line_reason(err)
        else:
            with tar:
                samples = _tar_samples(tar, end)
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except _STREAM_ERRORS as err:
                        damage = one_line_reason(err)
                        break
                    count += 1
                    yield sample
            if damage is None and not end.clean:
                damage = end.damage or "stream ends without the tar end-of-archive marker"
        if damage is None:
            try:
                stream.drain()
            except _STREAM_ERRORS as err:
                damage = f"reading after the end-of-archive marker failed: {one_line_reason(err)}"
        finished = True
    finally:
        try:
            raw.close()  # a `pipe:` stream reports its command's failure here
        except _STREAM_ERRORS as err:
            if finished and damage is None:
                damage = f"stream failed: {one_line_reason(err)}"
    if damage is not None:
        raise ShardReadError(f"shard truncated after {count} samples: {damage}")
    digest = stream.digest.hexdigest() if stream.digest is not None else None
    problems = _check_problems(count, digest, expected_samples, expected_sha256)
    if problems:
        raise ShardReadError("; ".join(problems))
