"""WebDataset-style tar shards: ``<key>.jpg|png`` + ``<key>.json`` per sample.

Shards are plain POSIX tar files (``tar tf`` lists them, the ``webdataset`` package
reads them). They are written deterministically (fixed mtime/owner/mode, members in
sample order) so the same import gives byte-identical shards, and atomically, so a
killed import never leaves a shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tagmill import storage
from tagmill.errors import DatasetError

#: A fixed member timestamp (2000-01-01) keeps shards byte-identical across imports.
MEMBER_MTIME = 946684800
#: Shards are cut at this size at most: a reader's unit of work (and of a retried download).
MAX_SHARD_BYTES = DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
#: ... and, when the data allows, no smaller than this: below it, per-file costs (an S3
#: request, a tar header walk, a cache entry) start to show beside the bytes.
MIN_SHARD_BYTES = 16 * 1024 * 1024
#: the readers a dataset is likely to meet (8 machines x 4 data-loader workers): with at
#: least this many shards, a reader's range starting inside a shard costs it at most
#: ~1/32 of the data in bytes it streams past without using
READERS_PLANNED = 32


def shard_size(total_bytes: int, readers: int = READERS_PLANNED) -> int:
    """Bytes per shard for a split of ``total_bytes``: ``readers`` shards, within
    [MIN_SHARD_BYTES, MAX_SHARD_BYTES] (``tagmill import --shard-size-mb`` overrides)."""
    return min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, -(-total_bytes // readers)))


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str  #: "jpg" or "png"
    meta: dict[str, Any]  #: {"labels": [...], "id": "...", "source": "..."}


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class ShardWriter:
    """Writes one split's samples into ``<split>-000000.tar``, ``<split>-000001.tar``...

    A new shard starts once the current one passes ``max_bytes``.
    """

    directory: str
    split: str
    max_bytes: int = DEFAULT_SHARD_BYTES
    shards: list[ShardInfo] = field(default_factory=list)
    _file: storage.AtomicFile | None = None
    _hasher: _HashingWriter | None = None
    _tar: tarfile.TarFile | None = None
    _count: int = 0

    def write(self, sample: Sample) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._tar.addfile(_member(f"{sample.key}.{sample.ext}", len(sample.image)), io.BytesIO(sample.image))
        self._tar.addfile(_member(f"{sample.key}.json", len(meta)), io.BytesIO(meta))
        self._count += 1
        if self._hasher is not None and self._hasher.size >= self.max_bytes:
            self._close_shard()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed), whatever the
        disk says: on a full disk, finishing the tar stream fails again."""
        if self._file is not None:
            try:
                if self._tar is not None:
                    self._tar.close()  # finish the stream before its file goes away
            except OSError:
                pass  # the file is discarded anyway; the error that got us here is reported
            finally:
                self._file.discard()
                self._file = self._tar = self._hasher = None

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._file = storage.atomic_write(storage.join(self.directory, self._name()))
        self._hasher = _HashingWriter(self._file.handle)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w|", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        assert self._tar is not None and self._hasher is not None and self._file is not None
        self._tar.close()
        info = ShardInfo(self._name(), self._count, self._hasher.size, self._hasher.sha256.hexdigest())
        self._file.commit()  # renames / uploads under the final name
        self.shards.append(info)
        self._file = self._tar = self._hasher = None


def iter_shard(location: str, opener: Callable[[str], IO[bytes]] | None = None, *, skip: int = 0) -> Iterator[Sample]:
    """Samples of one shard, in order, streamed (the shard is never loaded whole).

    ``opener`` replaces how the shard is opened (e.g. through a local shard cache).
    ``skip`` leaves out the first samples: on a seekable file (local disk, the shard
    cache) only their 512-byte tar headers are read and their bytes are seeked over; a
    pure stream reads through them.
    """
    with storage.storage_errors(location), (opener or storage.open_read)(location) as handle:
        seekable = is_seekable(handle)
        try:
            with tarfile.open(fileobj=handle, mode="r:" if seekable else "r|") as tar:
                yield from _group_members(tar, location, skip)
        except tarfile.TarError as exc:
            raise DatasetError(f"corrupt shard {location}: {exc}") from exc


def is_seekable(handle: IO[bytes]) -> bool:
    """Whether ``handle`` can seek (local files and the shard cache can; some streams cannot)."""
    try:
        return bool(handle.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _group_members(tar: tarfile.TarFile, location: str, skip: int = 0) -> Iterator[Sample]:
    key: str | None = None
    parts: dict[str, bytes] = {}
    index = -1  # of the sample being gathered
    for member in tar:
        if not member.isfile():
            continue
        stem, _, ext = member.name.partition(".")
        if stem != key:
            if key is not None and index >= skip:
                yield _sample(key, parts, location)
            parts = {}
            key, index = stem, index + 1
        if index < skip:
            continue  # never extracted: a seekable tar seeks over the bytes
        extracted = tar.extractfile(member)
        parts[ext] = extracted.read() if extracted is not None else b""
    if key is not None and index >= skip:
        yield _sample(key, parts, location)


def _sample(key: str, parts: dict[str, bytes], location: str) -> Sample:
    image_ext = next((ext for ext in ("jpg", "png") if ext in parts), None)
    if image_ext is None or "json" not in parts:
        raise DatasetError(f"corrupt shard {location}: sample {key!r} lacks an image or its labels")
    return Sample(key, parts[image_ext], image_ext, json.loads(parts["json"]))


def sha256_of(location: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with storage.storage_errors(location), storage.open_read(location) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
