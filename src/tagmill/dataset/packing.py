"""Decode and resize every image of an import in parallel, into a local staging file.

Images are processed by a pool of worker processes (one per core: decoding is CPU
bound and the GIL would serialise threads). Results come back in record order, so the
staging file — and every shard cut from it — is the same on every run. Staging keeps
memory flat: a 250k-image import holds offsets, not pixels.

With a journal directory the staging survives a kill: the processed bytes go to
``staged.bin`` and one line per record (in record order: where its bytes are, or why it
was skipped) to ``staged.jsonl``, each flushed as it is written. A later run over the
same records reads the journal back, drops whatever was written after its last whole
line, and continues from the next record: the result is the one an uninterrupted run
gives. (Whether the records are the same is the caller's to decide: ``importer``
fingerprints the sources and options.)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator
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


#: the journal's files (see the module docstring)
STAGED_DATA, STAGED_JOURNAL = "staged.bin", "staged.jsonl"


class Staging:
    """Processed images, appended to one file and read back by offset: a temporary file,
    or, with ``journal_dir``, files kept there with a journal (see the module docstring)."""

    def __init__(self, directory: str | None = None, *, journal_dir: str | None = None) -> None:
        self.images: list[StagedImage] = []
        self.skipped: list[Skip] = []
        self.resumed = 0  #: records whose results came from an earlier, interrupted run
        self._journal: IO[str] | None = None
        self._journal_path: str | None = None
        if journal_dir is None:
            self._file: IO[bytes] = tempfile.TemporaryFile(prefix="tagmill-staging-", dir=directory)
            return
        os.makedirs(journal_dir, exist_ok=True)
        data = os.path.join(journal_dir, STAGED_DATA)
        self._file = open(data, "r+b" if os.path.exists(data) else "w+b")  # noqa: SIM115 - closed in close()
        self._journal_path = os.path.join(journal_dir, STAGED_JOURNAL)

    def resume(self, records: list[SourceRecord]) -> int:
        """Take the journal's results for the first records; returns how many (0 for a new journal)."""
        if self._journal_path is None:
            return 0
        lines: list[dict] = []
        if os.path.exists(self._journal_path):
            with open(self._journal_path, encoding="utf-8") as journal:
                for text in journal:
                    if not text.endswith("\n"):
                        break  # the line a kill cut short: its record is processed again
                    try:
                        entry = json.loads(text)
                        same = len(lines) < len(records) and entry["id"] == records[len(lines)].id
                    except (json.JSONDecodeError, KeyError, TypeError):
                        same = False
                    if not same:
                        raise StorageError(f"the import journal {self._journal_path} does not match the records "
                                           "being imported", hint="start over: import with --overwrite")
                    lines.append(entry)
        end = 0
        for entry, record in zip(lines, records):
            if "skip" in entry:
                self.skipped.append(Skip(*entry["skip"]))
            else:
                self.images.append(StagedImage(record, entry["offset"], entry["length"], entry["ext"],
                                               entry["width"], entry["height"]))
                end = entry["offset"] + entry["length"]
        self._file.truncate(end)  # bytes written after the last whole journal line
        with open(self._journal_path, "w", encoding="utf-8") as journal:  # rewritten without a torn last line
            journal.writelines(json.dumps(entry) + "\n" for entry in lines)
        self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.resumed = len(lines)
        return self.resumed

    def add(self, record: SourceRecord, packed: _Packed) -> None:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(packed.data)
        image = StagedImage(record, offset, len(packed.data), packed.ext, packed.width, packed.height)
        self.images.append(image)
        if self._journal is not None:
            self._file.flush()  # the bytes reach the OS before the line that vouches for them
            self._write_journal({"id": record.id, "offset": offset, "length": image.length, "ext": image.ext,
                                 "width": image.width, "height": image.height})

    def skip(self, record: SourceRecord, skip: Skip) -> None:
        self.skipped.append(skip)
        if self._journal is not None:
            self._write_journal({"id": record.id, "skip": [skip.source, skip.reason, skip.detail]})

    def _write_journal(self, entry: dict) -> None:
        assert self._journal is not None
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()  # a killed process loses nothing the OS has (SIGKILL is not a power cut)

    def read(self, image: StagedImage) -> bytes:
        self._file.seek(image.offset)
        return self._file.read(image.length)

    def close(self) -> None:
        self._file.close()
        if self._journal is not None:
            self._journal.close()

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
    journal_dir: str | None = None,
    on_resume: Callable[[int], None] = lambda done: None,
) -> Staging:
    """Process ``records`` in order; failures become skips, never exceptions. With
    ``journal_dir``, continue what an interrupted run over the same records staged there
    (``on_resume`` hears how many records it had done, when any)."""
    staging = Staging(staging_dir, journal_dir=journal_dir)
    try:
        done = staging.resume(records)
        if done:
            on_resume(done)
        todo = records[done:]
        jobs = [(record, max_side) for record in todo]
        with progress.task("processing images", len(records)) as advance:
            advance(done)
            for record, result in zip(todo, _run(jobs, workers)):
                if isinstance(result, Skip):
                    staging.skip(record, result)
                else:
                    staging.add(record, result)
                advance(1)
    except BaseException:
        staging.close()
        raise
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
