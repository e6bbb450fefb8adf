"""Paths and URLs: every file tagmill reads or writes goes through here.

A location is a local path or any fsspec URL (``s3://bucket/prefix``, ``file://...``).
Writes are atomic: a reader never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from tagmill.errors import StorageError

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
    try:
        return url_to_fs(location, **_storage_options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {location}: {exc}") from exc


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, with '/' separators for URLs."""
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/"))


@contextlib.contextmanager
def storage_errors(location: str) -> Iterator[None]:
    """Turn the many ways I/O fails (OSError, botocore errors...) into StorageError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {location}") from exc
    except PermissionError as exc:
        raise StorageError(f"permission denied: {location} ({exc})") from exc
    except OSError as exc:
        raise StorageError(f"cannot access {location}: {exc}") from exc
    except Exception as exc:  # botocore/aiohttp errors have no common base we can import lazily
        if type(exc).__module__.split(".")[0] in {"botocore", "aiobotocore", "aiohttp", "s3fs"}:
            raise StorageError(f"cannot access {location}: {exc}") from exc
        raise


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.exists(path)


def isdir(location: str) -> bool:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.isdir(path)


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
    fs, path = filesystem(location)
    with storage_errors(location):
        fs.makedirs(path, exist_ok=True)


class AtomicFile:
    """A binary file that appears under its name only when committed.

    Local files are written beside the target and renamed over it (atomic on POSIX).
    Remote files are written to a local temporary file and uploaded in one put, so an
    interrupted write never leaves a partial object behind. As a context manager it
    commits on success and discards on error.
    """

    def __init__(self, location: str) -> None:
        self.location = location
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
        self.handle.close()
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


def atomic_write(location: str) -> AtomicFile:
    """``with atomic_write(url) as f: f.write(...)`` — see :class:`AtomicFile`."""
    return AtomicFile(location)


def write_bytes(location: str, data: bytes) -> None:
    with atomic_write(location) as handle:
        handle.write(data)
