"""A local, size-bounded, read-through cache of shards read from URLs.

Training from ``s3://...`` reads every shard once per epoch; with a cache, epoch 2
reads the local disk instead of the network. Entries are named by the shard's sha256
from ``dataset.json``, so a re-imported (changed) shard is a new entry and a stale one
is never served.

Several processes (torchrun ranks, data-loader workers) may share one cache folder
and ask for the same shard at once: a per-entry ``flock`` lets one of them download
while the others wait and then read its file. Downloads go to a temporary file that
is verified against the sha256 and renamed into place, so a half-written or damaged
file never appears under an entry's name.

Layout of the cache folder::

    <sha256>.tar        a verified shard; its mtime records its last use (LRU)
    .tmp-<sha256>-*     a download in progress (or left by a killed process)
    locks/<sha256>      per-entry lock files (empty; kept, so a lock never
                        moves to a new inode while someone waits on it)
    locks/.evict        one evicting process at a time
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from tagmill import storage
from tagmill.dataset.manifest import Manifest, shard_locations
from tagmill.errors import DatasetError, InputError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY = re.compile(r"^([0-9a-f]{64})(\.[A-Za-z0-9]+)?$")
_CHUNK = 1 << 20
#: A temporary file untouched this long belongs to a download that died.
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class _Entry:
    path: str
    size: int
    used: int  #: last use (mtime in ns), for least-recently-used eviction
    sha256: str


class ShardCache:
    """Read-through cache of remote shards in ``directory``, at most ``max_bytes`` big.

    ``downloads``/``hits``/``evictions`` count what this instance did (for logs and tests).
    """

    def __init__(self, directory: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise InputError(f"shard cache size must be positive, got {max_bytes} bytes")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.downloads = 0
        self.hits = 0
        self.evictions = 0
        self._locks = os.path.join(self.directory, "locks")
        with storage.storage_errors(self.directory):
            os.makedirs(self._locks, exist_ok=True)

    def local_path(self, url: str, sha256: str) -> str:
        """A local file with the shard's bytes: ``url`` itself if local, else a cache entry.

        Downloads on a miss (one process at a time per shard), then evicts least
        recently used entries — never this one — until the cache fits ``max_bytes``.
        """
        if storage.is_local(url):
            return _local_file(url)
        path = self._fetch(url, sha256)
        self.evict(keep=path)
        return path

    def open(self, url: str, sha256: str) -> IO[bytes]:
        """The shard opened for reading. Safer than :meth:`local_path` when other
        processes share the cache: the file is opened under its lock, and an open file
        survives its eviction (POSIX keeps its bytes until it is closed)."""
        if storage.is_local(url):
            return storage.open_read(url)
        with self._entry_lock(_checked_sha(url, sha256)):
            path = self._fetch_locked(url, sha256)
            handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
        self.evict(keep=path)
        return handle

    # --- fetching ---------------------------------------------------------------

    def _fetch(self, url: str, sha256: str) -> str:
        with self._entry_lock(_checked_sha(url, sha256)):
            return self._fetch_locked(url, sha256)

    def _fetch_locked(self, url: str, sha256: str) -> str:
        path = self._entry_path(url, sha256)
        if os.path.exists(path):
            _record_use(path)
            self.hits += 1
            return path
        self._download(url, sha256, path)
        _record_use(path)
        self.downloads += 1
        return path

    def _entry_path(self, url: str, sha256: str) -> str:
        ext = posixpath.splitext(posixpath.basename(url.rstrip("/")))[1]
        return os.path.join(self.directory, sha256 + (ext if re.fullmatch(r"\.[A-Za-z0-9]+", ext) else ""))

    def _download(self, url: str, sha256: str, path: str) -> None:
        """Copy ``url`` to ``path`` through a temporary file, verified, then renamed."""
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{sha256}-", dir=self.directory)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, storage.storage_errors(url), storage.open_read(url) as source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())  # the bytes are on disk before the name is
            if digest.hexdigest() != sha256:
                raise DatasetError(
                    f"shard {url} does not match its sha256 in dataset.json "
                    f"(expected {sha256[:12]}…, downloaded {digest.hexdigest()[:12]}…)",
                    hint="the file was changed or damaged after import; re-import the data",
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _entry_lock(self, sha256: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the entry's exclusive lock; with ``blocking=False`` yield False if busy."""
        with _flock(os.path.join(self._locks, sha256), blocking=blocking) as held:
            yield held

    # --- eviction ---------------------------------------------------------------

    def entries(self) -> list[_Entry]:
        """The cached shards, least recently used first."""
        found = []
        with os.scandir(self.directory) as listing:
            for item in listing:
                match = _ENTRY.match(item.name)
                if match and item.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                        stat = item.stat(follow_symlinks=False)
                        found.append(_Entry(item.path, stat.st_size, stat.st_mtime_ns, match.group(1)))
        return sorted(found, key=lambda e: (e.used, e.path))

    def size(self) -> int:
        return sum(entry.size for entry in self.entries())

    def evict(self, keep: str | None = None) -> None:
        """Delete least recently used entries until the cache fits, sparing ``keep``
        and any entry another process holds locked (it is downloading or opening it)."""
        with _flock(os.path.join(self._locks, ".evict"), blocking=False) as held:
            if not held:
                return  # another process is evicting right now; it will get the cache under
            self._remove_stale_temporaries()
            entries = self.entries()
            total = sum(entry.size for entry in entries)
            for entry in entries:
                if total <= self.max_bytes:
                    break
                if entry.path == keep:
                    continue
                with self._entry_lock(entry.sha256, blocking=False) as free:
                    if free and _unlink(entry.path):
                        total -= entry.size
                        self.evictions += 1

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        with os.scandir(self.directory) as listing:
            for item in listing:
                if item.name.startswith(".tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        if item.stat().st_mtime < cutoff:
                            os.unlink(item.path)


def cached_shard_locations(dataset: str, manifest: Manifest, split: str, cache: ShardCache | None) -> list[str]:
    """Where to read each shard of ``split``: local cache files for a remote dataset.

    Without a cache, or for a local dataset, the shards' own locations. Shards are
    fetched in order while the split fits in the cache; the ones past ``max_bytes``
    stay URLs (read from the network each epoch) rather than evicting the shards
    fetched before them.
    """
    locations = shard_locations(dataset, manifest, split)
    if cache is None or storage.is_local(dataset):
        return locations
    result: list[str] = []
    used = 0
    for location, shard in zip(locations, manifest.split(split).shards):
        if used + shard.bytes <= cache.max_bytes:
            result.append(cache.local_path(location, shard.sha256))
            used += shard.bytes
        else:
            result.append(location)
    return result


@contextlib.contextmanager
def _flock(path: str, *, blocking: bool) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _record_use(path: str) -> None:
    """Stamp the entry's mtime with the time of this use: eviction goes by least recent
    use. Explicit nanoseconds, because the kernel's own stamps are coarse (jiffies) and
    two uses milliseconds apart could otherwise tie."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _checked_sha(url: str, sha256: str) -> str:
    # It names files in the cache: anything but 64 hex digits is a damaged manifest.
    if not _SHA256.match(sha256):
        raise DatasetError(f"shard {url} has no valid sha256 in dataset.json (got {sha256!r})")
    return sha256


def _local_file(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


__all__ = ["ShardCache", "cached_shard_locations"]
