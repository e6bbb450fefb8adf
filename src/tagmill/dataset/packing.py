"""Decode and resize every image of an import in parallel, into a local staging file.

Images are processed by a pool of worker processes (one per core: decoding is CPU
bound and the GIL would serialise threads). Results come back in record order, so the
staging file — and every shard cut from it — is the same on every run. Staging keeps
memory flat: a 250k-image import holds offsets, not pixels.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO

from tagmill import storage
from tagmill.dataset.images import pack_image
from tagmill.errors import StorageError, TagmillError, UnreadableImageError
from tagmill.formats.base import SourceRecord, Skip
from tagmill.progress import SILENT, Progress

#: Below this many images, a process pool costs more than it saves.
MIN_PARALLEL = 64


@dataclass(frozen=True)
class StagedImage:
    record: SourceRecord
    offset: int
    length: int
    ext: str
    width: int
    height: int


@dataclass(frozen=True)
class _Packed:
    data: bytes
    ext: str
    width: int
    height: int


def _pack_one(job: tuple[SourceRecord, int | None]) -> _Packed | Skip:
    """Runs in a worker: read the bytes, normalise the image, or say why not."""
    record, max_side = job
    where = record.image.describe()
    try:
        packed = pack_image(record.image.read(), max_side)
    except UnreadableImageError as exc:
        return Skip(where, exc.reason, str(exc))
    except StorageError as exc:
        reason = "missing" if "not found" in str(exc) else "unreadable"
        return Skip(where, reason, str(exc))
    except TagmillError as exc:  # e.g. a corrupt RecordIO record
        return Skip(where, "unreadable", str(exc))
    return _Packed(packed.data, packed.ext, packed.width, packed.height)


class Staging:
    """Processed images, appended to one temporary file and read back by offset."""

    def __init__(self, directory: str | None = None) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="tagmill-staging-", dir=directory)
        self.images: list[StagedImage] = []
        self.skipped: list[Skip] = []

    def add(self, record: SourceRecord, packed: _Packed) -> None:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(packed.data)
        self.images.append(StagedImage(record, offset, len(packed.data), packed.ext, packed.width, packed.height))

    def read(self, image: StagedImage) -> bytes:
        self._file.seek(image.offset)
        return self._file.read(image.length)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_images(
    records: list[SourceRecord],
    max_side: int | None,
    *,
    workers: int | None = None,
    progress: Progress = SILENT,
    staging_dir: str | None = None,
) -> Staging:
    """Process ``records`` in order; failures become skips, never exceptions."""
    staging = Staging(staging_dir)
    jobs = [(record, max_side) for record in records]
    with progress.task("processing images", len(jobs)) as advance:
        for record, result in zip(records, _run(jobs, workers)):
            if isinstance(result, Skip):
                staging.skipped.append(result)
            else:
                staging.add(record, result)
            advance(1)
    return staging


def _run(jobs: list[tuple[SourceRecord, int | None]], workers: int | None) -> Iterator[_Packed | Skip]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < MIN_PARALLEL:
        yield from map(_pack_one, jobs)
        return
    # spawn, not fork: the parent may hold threads (s3fs's event loop, rich's refresh)
    # that a forked child would inherit in a broken state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=storage.set_storage_options,
        initargs=(storage.current_storage_options(),),
    ) as pool:
        yield from pool.map(_pack_one, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8))))
