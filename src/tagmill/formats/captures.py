"""The folder ``tagmill serve --capture`` fills, defined once: written by
``serve/capture_writer.py``, read by ``tagmill predict`` and ``tagmill suggest``
(``bundle/``). It is an input format of those commands, and it lives in formats/, the
bottom of the data flow, so that both sides take it from below and the capture writer's
own process loads it without the model stack (no torch: ``tagmill.bundle`` imports it).

Layout 3 (the same on a disk and on S3)::

    DIR/capture.json                                        marks the layout
    DIR/2026-11-29/part-20261129T171221.123456Z-<token>-000017-n64.tar
        20261129T171221.123456Z-<token>-000017.jpg          the request's bytes, one member each
        ...
        predictions.jsonl                                   one line per image: what was served

A part holds the images one writer captured within a second (or 64 of them), and their
predictions after them: one write per part instead of one per image (on S3 a PUT costs
~2 ms of client CPU; a 64-image part, ~0.2 ms an image). ``-n64`` says how many images
it holds, so a reader can count its work without opening every part. Parts are plain
(ustar) tar files: ``tar xf`` shows a person what was captured.

Read too: layout 2 (each image a file, the predictions in ``predictions-*.jsonl`` parts
beside them) and layout 1 (a JSON sidecar beside each image). Files whose names start
with a dot are temporary files of interrupted atomic writes, never inputs.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tagmill import storage
from tagmill.errors import StorageError
from tagmill.formats.base import has_image_extension

#: the marker file at a capture folder's root: {"layout": LAYOUT, "version": ...}
MARKER = "capture.json"
LAYOUT = "tagmill-capture"
LAYOUT_VERSION = 3
#: a part's name: PART_PREFIX + its first image's stem + "-n<images>" + PART_SUFFIX
PART_PREFIX, PART_SUFFIX = "part-", ".tar"
#: the part's last member: one JSON line per image, naming it ("image")
PREDICTIONS = "predictions.jsonl"
#: layout 2: predictions parts beside loose images
MANIFEST_PREFIX, MANIFEST_SUFFIX = "predictions-", ".jsonl"
#: layout 1: beside each image under the image's name with this suffix
SIDECAR_SUFFIX = ".json"

_PART_NAME = re.compile(re.escape(PART_PREFIX) + r".+-n(\d+)" + re.escape(PART_SUFFIX) + "$")
_BLOCK = tarfile.BLOCKSIZE  # 512: a tar member is a header block and its data in whole blocks


def part_name(first_stem: str, count: int) -> str:
    return f"{PART_PREFIX}{first_stem}-n{count}{PART_SUFFIX}"


#: what ends a part: the two zero blocks that close a tar
END_BYTES = 2 * _BLOCK


def member_size(size: int) -> int:
    """The bytes a member of ``size`` bytes takes in a part: its header, its data padded."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def part_size(sizes: Sequence[int]) -> int:
    """The bytes :func:`pack_part` writes for members of these sizes (the cap counts them
    before the part exists)."""
    return sum(map(member_size, sizes)) + END_BYTES


def pack_part(images: Sequence[tuple[str, bytes]], predictions: bytes, mtime: float) -> bytes:
    """A part: the images (name, bytes) in order, then the predictions member, as one
    bytes object (each image copied once: a part of 64 photos is ~10 MB). It ends after
    the two zero blocks that close a tar, without tarfile's padding to 10 kB records (a
    quiet server's part of one photo would be mostly padding); every tar reader takes it."""
    chunks: list[bytes] = []
    for name, data in [*images, (PREDICTIONS, predictions)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
        chunks += [info.tobuf(format=tarfile.USTAR_FORMAT), data, bytes(-len(data) % _BLOCK)]
    chunks.append(bytes(END_BYTES))
    return b"".join(chunks)


@dataclass
class CaptureFolder:
    """What a capture folder holds, listed (one listing; nothing but layout 2's small
    predictions parts is read)."""

    files: list[str] = field(default_factory=list)  #: loose images (layouts 1 and 2)
    parts: list[tuple[str, int]] = field(default_factory=list)  #: (location, images) of layout-3 parts
    records: dict[str, dict] = field(default_factory=dict)  #: by loose image: what was served (layout 2)
    sidecars: dict[str, str] = field(default_factory=dict)  #: by loose image: its sidecar's location (layout 1)


def is_capture_folder(path: str) -> bool:
    return storage.isdir(path) and storage.exists(storage.join(path, MARKER))


def list_folder(path: str) -> CaptureFolder:
    found = CaptureFolder()
    files = storage.list_files(path)
    present = set(files)
    for rel in files:
        folder, _, base = rel.rpartition("/")
        location = storage.join(path, *rel.split("/"))
        if base.startswith(".") or rel == MARKER:
            continue  # temporary files of interrupted atomic writes (storage.AtomicFile)
        if (match := _PART_NAME.match(base)) is not None:
            found.parts.append((location, int(match.group(1))))
        elif base.startswith(MANIFEST_PREFIX) and base.endswith(MANIFEST_SUFFIX):
            for record in _records(_read(location)):
                found.records[storage.join(path, *folder.split("/"), record["image"])] = record
        elif has_image_extension(rel):
            found.files.append(location)
            sidecar = rel.rsplit(".", 1)[0] + SIDECAR_SUFFIX
            if sidecar in present:
                found.sidecars[location] = storage.join(path, *sidecar.split("/"))
    return found


def part_inputs(location: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, bytes, None) for every image of a part, named ``<part location>/<member>``;
    one (location, None, why) when the part cannot be read at all."""
    try:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(location)), mode="r:") as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name != PREDICTIONS]
    except (StorageError, tarfile.TarError, OSError) as exc:
        yield location, None, f"unreadable capture part: {exc}"
        return
    for name, data in members:
        yield f"{location}/{name}", data, None


def part_records(location: str) -> dict[str, dict]:
    """What was served for each image of a part, by the image's name (as
    :func:`part_inputs` gives it); empty when the part or its predictions cannot be read."""
    try:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(location)), mode="r:") as tar:
            member = tar.extractfile(PREDICTIONS)
            text = member.read() if member is not None else b""
    except (StorageError, tarfile.TarError, OSError, KeyError):
        return {}
    return {f"{location}/{record['image']}": record for record in _records(text)}


def read_sidecar(location: str) -> dict | None:
    """A layout-1 sidecar; None when it cannot be read (its image is still an input)."""
    try:
        data = json.loads(_read(location) or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _read(location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except StorageError:
        return b""


def _records(data: bytes) -> list[dict]:
    """The records of JSON lines; an unreadable line is passed over (its image is still
    worth labelling, with nothing served beside it)."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            records.append(record)
    return records


__all__ = ["CaptureFolder", "LAYOUT", "LAYOUT_VERSION", "MARKER", "PART_PREFIX", "PART_SUFFIX", "PREDICTIONS",
           "SIDECAR_SUFFIX", "is_capture_folder", "list_folder", "pack_part", "part_inputs", "part_name",
           "END_BYTES", "member_size", "part_records", "part_size", "read_sidecar"]
