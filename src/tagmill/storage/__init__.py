"""Paths and URLs: every file tagmill reads or writes goes through here.

A location is a local path or any fsspec URL (``s3://bucket/prefix``, ``file://...``).
Writes are atomic: a reader never sees a half-written file under its final name.

S3 (and S3-compatible stores: MinIO, Ceph, R2...) takes credentials and the endpoint
from the standard places — ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws/config``, an instance role, ``AWS_ENDPOINT_URL(_S3)`` —
plus ``--storage-option KEY=VALUE`` (``endpoint_url``, ``key``, ``secret``, ``profile``,
``anon=true``, ``region_name``, ``config_kwargs={"connect_timeout": 2}``...).

This module is the path API. ``s3_options.py`` turns the user's options into s3fs's
(with tagmill's timeouts and retries); ``diagnosis.py`` turns the ways I/O fails into a
``StorageError`` that says what to fix.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from tagmill.errors import StorageError
from tagmill.storage.diagnosis import S3_SCHEMES, http_status, storage_error, storage_errors
from tagmill.storage.s3_options import s3_options

# Options passed to every fsspec filesystem (endpoint URLs, profiles...). The CLI
# fills this from --storage-option; the library reads it in one place.
_storage_options: dict[str, Any] = {}


def set_storage_options(options: dict[str, Any]) -> None:
    _storage_options.clear()
    _storage_options.update(options)


def current_storage_options() -> dict[str, Any]:
    return dict(_storage_options)


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``location`` and the path inside it."""
    options = s3_options(_storage_options) if is_s3(location) else _storage_options
    try:
        return url_to_fs(location, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {location}: {exc}") from exc


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEMES)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, with '/' separators for URLs."""
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/"))


def exists(location: str) -> bool:
    """Whether ``location`` exists. On S3 a missing bucket is an error, not ``False``:
    nothing can exist there, and "no dataset.json" would hide the real mistake."""
    return _ask(location, "exists")


def isdir(location: str) -> bool:
    """Whether ``location`` is a directory (a prefix on S3); a missing bucket is an error."""
    return _ask(location, "isdir")


def _ask(location: str, question: str) -> bool:
    """``fs.exists`` or ``fs.isdir``; a False on S3 is checked against a missing bucket."""
    fs, path = filesystem(location)
    with storage_errors(location):
        found = getattr(fs, question)(path)
        if not found and is_s3(location):
            _require_bucket(fs, location, path)
        return found


#: (endpoint, bucket) pairs seen to exist: a bucket is checked once per process.
_known_buckets: set[tuple[str, str]] = set()


def _require_bucket(fs: fsspec.AbstractFileSystem, location: str, path: str) -> None:
    """Raise StorageError if the bucket of an s3:// location does not exist."""
    bucket = path.split("/", 1)[0]
    key = (str(getattr(fs, "endpoint_url", None)), bucket)
    if not bucket or key in _known_buckets:
        return
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except (FileNotFoundError, PermissionError, OSError) as exc:
        # HEAD answers carry only a status: 404 is a missing bucket; a 403 bucket may
        # still hold readable keys, so only a 404 is reported here.
        if http_status(exc) == 404 or isinstance(exc, FileNotFoundError):
            raise StorageError(f"{location}: bucket does not exist", hint="create the bucket first, or check its name") from exc
        if http_status(exc) != 403:
            raise
        return
    _known_buckets.add(key)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.cat_file(path)


def read_text(location: str, encoding: str = "utf-8-sig") -> str:
    """Read a text file; the default encoding drops a UTF-8 byte-order mark."""
    data = read_bytes(location)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise StorageError(f"{location} is not {encoding} text: {exc}") from exc


def list_files(root: str) -> list[str]:
    """Every file under ``root``, as sorted '/'-separated paths relative to it."""
    fs, path = filesystem(root)
    with storage_errors(root):
        if not fs.isdir(path):
            if is_s3(root):
                _require_bucket(fs, root, path)
            raise StorageError(f"not a directory: {root}")
        if is_local(root):
            # os.walk is ~2x faster than fsspec's find (no per-file stat) on 250k files
            return sorted(_walk_local(path))
        found = fs.find(path)
    prefix = path.rstrip("/") + "/"
    return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)


def _walk_local(path: str) -> Iterator[str]:
    for directory, _, names in os.walk(path, onerror=_raise):
        relative = os.path.relpath(directory, path)
        for name in names:
            yield name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")


def _raise(error: OSError) -> None:
    raise error


def open_read(location: str) -> IO[bytes]:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.open(path, "rb")


def remove(location: str) -> None:
    fs, path = filesystem(location)
    with storage_errors(location):
        if fs.exists(path):
            fs.rm(path)


def makedirs(location: str) -> None:
    """Create a folder. S3 has no folders: only check the bucket exists (s3fs would
    create a missing bucket, in whatever region and with whatever policy — never wanted)."""
    fs, path = filesystem(location)
    with storage_errors(location):
        if is_s3(location):
            _require_bucket(fs, location, path)
        else:
            fs.makedirs(path, exist_ok=True)


class AtomicFile:
    """A binary file that appears under its name only when committed.

    Local files are written beside the target and renamed over it (atomic on POSIX).
    Remote files are written to a local temporary file and uploaded in one put, so an
    interrupted write never leaves a partial object behind. As a context manager it
    commits on success and discards on error.

    ``durable=False`` skips the fsync before the rename: the file is still whole or absent
    after a crashed process, but a power cut may lose it (or leave it empty). That is for
    files whose loss costs little and whose writes must be cheap: an fsync blocks ~4 ms
    on a typical disk (serve --capture's images).
    """

    def __init__(self, location: str, *, durable: bool = True) -> None:
        self.location = location
        self._durable = durable
        self._fs, self._path = filesystem(location)
        self._local = is_local(location)
        directory = os.path.dirname(self._path) if self._local else None
        with storage_errors(location):
            if directory:
                os.makedirs(directory, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + posixpath.basename(self._path), dir=directory)
        self.handle: IO[bytes] = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> int:
        return self.handle.write(data)

    def commit(self) -> None:
        try:
            self.handle.flush()
            if self._durable:
                os.fsync(self.handle.fileno())
            self.handle.close()
            with storage_errors(self.location):
                if self._local:
                    # mkstemp creates 0600 files; give the result the usual permissions.
                    os.chmod(self._tmp, 0o666 & ~_umask())
                    os.replace(self._tmp, self._path)
                else:
                    self._fs.put_file(self._tmp, self._path)
        finally:
            self.discard()

    def discard(self) -> None:
        try:
            self.handle.close()  # flushes what is buffered: on a full disk that fails again
        except OSError:
            pass
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __enter__(self) -> IO[bytes]:
        return self.handle

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(location: str, *, durable: bool = True) -> AtomicFile:
    """``with atomic_write(url) as f: f.write(...)`` — see :class:`AtomicFile`."""
    return AtomicFile(location, durable=durable)


def write_bytes(location: str, data: bytes, *, durable: bool = True) -> None:
    with atomic_write(location, durable=durable) as handle:
        handle.write(data)


__all__ = [
    "AtomicFile",
    "atomic_write",
    "basename",
    "current_storage_options",
    "exists",
    "filesystem",
    "is_local",
    "is_s3",
    "isdir",
    "join",
    "list_files",
    "makedirs",
    "open_read",
    "read_bytes",
    "read_text",
    "remove",
    "s3_options",
    "set_storage_options",
    "storage_error",
    "storage_errors",
    "write_bytes",
]
