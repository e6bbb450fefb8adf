"""MXNet RecordIO packs (``.rec`` + ``.idx``), as written by ``im2rec`` / dmlc-core.

Layout of the ``.rec`` file, one record after another::

    uint32 magic 0xced7230a | uint32 lrecord | data (lrecord & (2**29 - 1) bytes) | 0-3 zero bytes

``lrecord >> 29`` is the part flag: 0 = a whole record. When the writer finds the magic
number at a 4-byte-aligned position inside the data it cuts the record there, drops
those 4 bytes and writes the pieces as parts 1 (first), 2 (middle), 3 (last); readers
put the magic back between the pieces. The ``.idx`` file is text, ``key TAB offset``
per line, offset of each record's first part.

Each record's data starts with MXNet's IRHeader ``<IfQQ`` (flag, label, id, id2). With
``flag > 0``, ``flag`` float32 labels follow (``im2rec --pack-label``); the rest is the
encoded image file. Listing reads only headers and labels, never the images.
"""

from __future__ import annotations

import os
import posixpath
import struct
from dataclasses import dataclass
from typing import IO

from tagmill import storage
from tagmill.errors import SourceError, StorageError
from tagmill.formats.base import ReadResult, RecordIOImage, SourceOptions, SourceRecord, Skip
from tagmill.formats.mxnet_labels import RawLabels, integral_label, label_rows

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
#: magic + lrecord in front of every part
PART_HEADER = struct.Struct("<II")
#: MXNet's IRHeader: flag (label count when > 0), label, id, id2
IR_HEADER = struct.Struct("<IfQQ")
#: cflag values: a whole record, then the first, middle and last parts of a split one
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3
#: bytes read at a time when looking for the next record after a corrupt one
_SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    """Where a record should start; ``key`` is its .idx key (None when scanned)."""

    offset: int
    key: str | None = None


@dataclass(frozen=True)
class _Head:
    """What listing learns about one record without reading its image."""

    offset: int
    id: str
    values: tuple[float, ...]


# -- reading records ---------------------------------------------------------------


def read_record(stream: IO[bytes], offset: int, size: int | None = None) -> bytes:
    """The data of the record starting at ``offset``, its parts joined back together.

    ``size`` is the file's length (measured when not given). Raises SourceError saying
    what is wrong when there is no well-formed record there.
    """
    size = _stream_size(stream) if size is None else size
    pieces: list[bytes] = []
    pos = offset
    while True:
        cflag, length = _part_header(stream, pos, size, first=not pieces)
        pieces.append(stream.read(length))
        pos += PART_HEADER.size + _align4(length)
        if cflag in (WHOLE, LAST):
            # The writer dropped the magic number at each cut: put it back.
            return MAGIC_BYTES.join(pieces)


def read_image_at(rec_location: str, offset: int) -> bytes:
    """The image file bytes of the record at ``offset`` in ``rec_location``."""
    with storage.storage_errors(rec_location), storage.open_read(rec_location) as stream:
        try:
            payload = read_record(stream, offset)
            _, _, image_start = _parse_header(payload)
        except SourceError as exc:
            raise SourceError(f"corrupt record in {rec_location} at offset {offset}: {exc.message}") from exc
    return payload[image_start:]


def _part_header(stream: IO[bytes], pos: int, size: int, first: bool) -> tuple[int, int]:
    """(cflag, length) of the part at ``pos``, checked to lie wholly inside the file."""
    if pos < 0 or pos >= size:
        raise SourceError(f"offset {pos} is beyond the end of the file ({size} bytes)")
    if pos % 4:
        raise SourceError(f"offset {pos} is not a multiple of 4, so no record can start there")
    stream.seek(pos)
    raw = stream.read(PART_HEADER.size)
    if len(raw) < PART_HEADER.size:
        raise SourceError(f"file ends {len(raw)} bytes after offset {pos}, inside a record header")
    magic, lrecord = PART_HEADER.unpack(raw)
    if magic != MAGIC:
        raise SourceError(f"found 0x{magic:08x} at offset {pos}, not the RecordIO magic 0x{MAGIC:08x}")
    cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
    expected = (WHOLE, FIRST) if first else (MIDDLE, LAST)
    if cflag not in expected:
        where = "a record start" if first else "a continuation part"
        raise SourceError(f"part at offset {pos} has flag {cflag}, which cannot be {where}")
    remaining = size - pos - PART_HEADER.size
    if length > remaining:
        raise SourceError(f"part at offset {pos} needs {length} bytes but the file has only {remaining} left (truncated?)")
    return cflag, length


def _parse_header(data: bytes) -> tuple[int, tuple[float, ...], int]:
    """(IRHeader id, label values, where the image starts) of a record's data."""
    if len(data) < IR_HEADER.size:
        raise SourceError(f"record has {len(data)} bytes, too few for the {IR_HEADER.size}-byte IRHeader")
    flag, label, record_id, _ = IR_HEADER.unpack_from(data)
    end = IR_HEADER.size + 4 * flag
    if len(data) < end:
        raise SourceError(f"IRHeader announces {flag} labels but the record has only {len(data)} bytes")
    values = struct.unpack_from(f"<{flag}f", data, IR_HEADER.size) if flag else (label,)
    return record_id, tuple(values), end


def _head_at(stream: IO[bytes], offset: int, size: int) -> tuple[int, tuple[float, ...]]:
    """IRHeader id and labels of the record at ``offset``, reading as little as possible."""
    cflag, length = _part_header(stream, offset, size, first=True)
    head = stream.read(min(length, IR_HEADER.size))
    if len(head) == IR_HEADER.size:
        flag = IR_HEADER.unpack(head)[0]
        head += stream.read(min(length - IR_HEADER.size, 4 * flag))
    if cflag == FIRST and not _header_complete(head):
        # A magic number inside the header or labels cut the record early: rare, so
        # reading the whole record costs nothing overall.
        head = read_record(stream, offset, size)
    record_id, values, _ = _parse_header(head)
    return record_id, values


def _header_complete(head: bytes) -> bool:
    return len(head) >= IR_HEADER.size and len(head) >= IR_HEADER.size + 4 * IR_HEADER.unpack_from(head)[0]


def _align4(length: int) -> int:
    return (length + 3) & ~3


def _stream_size(stream: IO[bytes]) -> int:
    return stream.seek(0, os.SEEK_END)


# -- finding records -----------------------------------------------------------------


def _scan(stream: IO[bytes], size: int) -> tuple[list[_Entry], list[tuple[int, str]]]:
    """Record offsets found by walking the file, and (offset, problem) where it is corrupt.

    After a corrupt record the walk resumes at the next aligned magic number that
    starts a record: the writer never leaves the magic at an aligned position inside
    data, so that is a real record boundary.
    """
    entries: list[_Entry] = []
    problems: list[tuple[int, str]] = []
    pos: int | None = 0
    while pos is not None and pos < size:
        try:
            end = _record_end(stream, pos, size)
        except SourceError as exc:
            problems.append((pos, exc.message))
            pos = _resync(stream, pos + 4, size)
            continue
        entries.append(_Entry(pos))
        pos = end
    return entries, problems


def _record_end(stream: IO[bytes], offset: int, size: int) -> int:
    """Where the record at ``offset`` ends (padding included), reading part headers only."""
    pos, first = offset, True
    while True:
        cflag, length = _part_header(stream, pos, size, first)
        pos += PART_HEADER.size + _align4(length)
        if cflag in (WHOLE, LAST):
            return pos
        first = False


def _resync(stream: IO[bytes], pos: int, size: int) -> int | None:
    """The next aligned offset at or after ``pos`` where a record starts, or None."""
    pos = _align4(pos)
    while pos + PART_HEADER.size <= size:
        stream.seek(pos)
        chunk = stream.read(min(_SCAN_CHUNK, size - pos))
        hit = chunk.find(MAGIC_BYTES)
        while hit != -1 and hit + PART_HEADER.size <= len(chunk):
            lrecord = PART_HEADER.unpack_from(chunk, hit)[1]
            if hit % 4 == 0 and lrecord >> 29 in (WHOLE, FIRST):
                return pos + hit
            hit = chunk.find(MAGIC_BYTES, hit + 1)
        if pos + len(chunk) >= size:
            return None
        # Overlap the next chunk so a header cut by the chunk boundary is still seen;
        # full chunks are multiples of 4, so positions stay aligned.
        pos += len(chunk) - PART_HEADER.size
    return None


def _parse_idx(text: str, idx_location: str) -> tuple[list[_Entry], list[Skip]]:
    entries: list[_Entry] = []
    skipped: list[Skip] = []
    seen: set[str] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{idx_location}:{number}"
        fields = [f.strip() for f in line.strip().split("\t")]
        offset = _parse_offset(fields[1]) if len(fields) == 2 else None
        if offset is None or not fields[0]:
            detail = f"line {number}: expected key TAB byte offset, found {line.strip()!r}"
            skipped.append(Skip(source, "malformed-row", detail))
        elif fields[0] in seen:
            detail = f"line {number}: key {fields[0]} already used by an earlier line"
            skipped.append(Skip(source, "duplicate-id", detail))
        else:
            seen.add(fields[0])
            entries.append(_Entry(offset, fields[0]))
    return entries, skipped


def _parse_offset(text: str) -> int | None:
    try:
        offset = int(text)
    except ValueError:
        return None
    return offset if offset >= 0 else None


# -- the reader ------------------------------------------------------------------------


class RecordIOReader:
    """Lists the records of a pack; takes the ``.rec`` or the ``.idx`` path."""

    def __init__(self, location: str, options: SourceOptions) -> None:
        self.options = options
        self.rec, self.idx = pack_paths(location)
        self.given = location

    def read(self) -> ReadResult:
        self._check_rec()
        try:
            with storage.storage_errors(self.rec), storage.open_read(self.rec) as stream:
                size = _stream_size(stream)
                entries, skipped, scanned = self._entries(stream, size)
                heads, corrupt = self._heads(stream, size, entries)
        except StorageError as exc:
            raise SourceError(f"cannot read RecordIO pack {self.rec}: {exc.message}") from exc
        skipped += corrupt
        heads, ids_note = _unique_ids(heads, scanned)
        rows, kept, bad_labels = self._raw_labels(heads)
        skipped += bad_labels
        labelling = label_rows(rows, self.options)
        skipped += labelling.skipped
        records = [
            SourceRecord(head.id, labels, RecordIOImage(self.rec, head.offset))
            for head, labels in zip(kept, labelling.labels)
            if labels is not None
        ]
        idx_name = storage.basename(self.idx)
        found = f"no {idx_name}: records found by scanning the .rec" if scanned else f"offsets from {idx_name}"
        description = f"MXNet RecordIO ({labelling.summary}; {found}{ids_note})"
        return ReadResult(records, skipped, labelling.task, labelling.classes, description)

    def _check_rec(self) -> None:
        try:
            if not storage.exists(self.rec):
                beside = f" (the data file for {self.given})" if self.given != self.rec else ""
                raise SourceError(f"RecordIO file not found: {self.rec}{beside}")
        except StorageError as exc:
            raise SourceError(f"cannot read RecordIO pack {self.rec}: {exc.message}") from exc

    def _entries(self, stream: IO[bytes], size: int) -> tuple[list[_Entry], list[Skip], bool]:
        """Record offsets from the .idx, or from a scan of the .rec when there is none (True)."""
        if storage.exists(self.idx):
            try:
                text = storage.read_text(self.idx)
            except StorageError as exc:
                raise SourceError(f"cannot read RecordIO index {self.idx}: {exc.message}") from exc
            entries, skipped = _parse_idx(text, self.idx)
            return entries, skipped, False
        entries, problems = _scan(stream, size)
        skipped = [Skip(f"{self.rec}@{pos}", "corrupt-record", problem) for pos, problem in problems]
        return entries, skipped, True

    def _heads(self, stream: IO[bytes], size: int, entries: list[_Entry]) -> tuple[list[_Head], list[Skip]]:
        heads: list[_Head] = []
        skipped: list[Skip] = []
        for entry in entries:
            try:
                record_id, values = _head_at(stream, entry.offset, size)
            except SourceError as exc:
                skipped.append(Skip(f"{self.rec}@{entry.offset}", "corrupt-record", exc.message))
                continue
            heads.append(_Head(entry.offset, entry.key if entry.key is not None else str(record_id), values))
        return heads, skipped

    def _raw_labels(self, heads: list[_Head]) -> tuple[list[RawLabels], list[_Head], list[Skip]]:
        """Label numbers of the records whose labels are class indices; Skips for the rest."""
        rows: list[RawLabels] = []
        kept: list[_Head] = []
        skipped: list[Skip] = []
        for head in heads:
            source, where = f"{self.rec}@{head.offset}", f"record {head.id}"
            values = [integral_label(v) for v in head.values]
            if None in values:
                bad = head.values[values.index(None)]
                detail = f"{where}: label {bad:g} is not a class index (a whole number >= 0)"
                skipped.append(Skip(source, "malformed-row", detail))
                continue
            rows.append(RawLabels(source, where, tuple(v for v in values if v is not None)))
            kept.append(head)
        return rows, kept, skipped


def pack_paths(location: str) -> tuple[str, str]:
    """(.rec, .idx) locations of a pack named by either file."""
    split = posixpath.splitext if "://" in location else os.path.splitext
    base, ext = split(location)
    if ext.lower() == ".idx":
        return base + (".REC" if ext.isupper() else ".rec"), location
    if ext.lower() == ".rec":
        return location, base + (".IDX" if ext.isupper() else ".idx")
    return location, base + ".idx"


def _unique_ids(heads: list[_Head], scanned: bool) -> tuple[list[_Head], str]:
    """Record ids, made unique: IRHeader ids can repeat in packs made by other tools.

    .idx keys are unique already. Scanned packs use the header ids when they are
    distinct, else each record's position in the file.
    """
    if not scanned or len({h.id for h in heads}) == len(heads):
        return heads, ""
    numbered = [_Head(h.offset, str(n), h.values) for n, h in enumerate(heads)]
    return numbered, "; header ids repeat, so records are numbered in file order"
