"""Write MXNet RecordIO packs byte for byte as MXNet does, so readers meet the real layout.

Mirrors three pieces of MXNet/dmlc-core:

* ``dmlc::RecordIOWriter::WriteRecord`` (dmlc-core/src/recordio.cc): magic, lrecord,
  data, zero padding to 4 bytes, and the split into parts 1/2/3 wherever the magic
  number sits at an aligned position inside the data (those 4 bytes are dropped).
* ``mxnet.recordio.pack``: the ``IfQQ`` IRHeader, with ``flag`` = number of float32
  labels placed before the image when the label is a list (``im2rec --pack-label``).
* ``mxnet.recordio.MXIndexedRecordIO.write_idx``: ``key\\tposition\\n`` per record in
  the ``.idx``, position taken before the record is written.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"  # MXNet uses native "IfQQ": same bytes on little-endian machines

Label = float | Sequence[float]


def encode_lrec(cflag: int, length: int) -> int:
    return (cflag << 29) | length


def write_record(out: BinaryIO, data: bytes) -> None:
    """dmlc-core RecordIOWriter::WriteRecord, line for line."""
    length = len(data)
    lower_align = (length >> 2) << 2
    upper_align = ((length + 3) >> 2) << 2
    dptr = 0
    for i in range(0, lower_align, 4):
        if data[i:i + 4] == MAGIC_BYTES:
            out.write(MAGIC_BYTES)
            out.write(struct.pack("<I", encode_lrec(1 if dptr == 0 else 2, i - dptr)))
            out.write(data[dptr:i])
            dptr = i + 4
    out.write(MAGIC_BYTES)
    out.write(struct.pack("<I", encode_lrec(3 if dptr != 0 else 0, length - dptr)))
    out.write(data[dptr:length])
    out.write(b"\x00" * (upper_align - length))


def pack(label: Label, image: bytes, record_id: int = 0, id2: int = 0) -> bytes:
    """mxnet.recordio.pack(IRHeader(0, label, id, id2), image)."""
    if isinstance(label, numbers.Number):
        header = struct.pack(IR_FORMAT, 0, float(label), record_id, id2)
        return header + image
    labels = np.asarray(label, dtype=np.float32)
    header = struct.pack(IR_FORMAT, labels.size, 0.0, record_id, id2)
    return header + labels.tobytes() + image


def write_pack(
    rec_path: Path,
    items: Iterable[tuple[int, Label, bytes]],
    with_idx: bool = True,
) -> dict[int, int]:
    """Write ``(key, label, image)`` items the way im2rec does (header id = key).

    Returns key -> offset; the ``.idx`` beside ``rec_path`` is written unless told not to.
    """
    offsets: dict[int, int] = {}
    with open(rec_path, "wb") as rec:
        for key, label, image in items:
            offsets[key] = rec.tell()
            write_record(rec, pack(label, image, record_id=key))
    if with_idx:
        lines = "".join(f"{key}\t{pos}\n" for key, pos in offsets.items())
        rec_path.with_suffix(".idx").write_text(lines)
    return offsets


def part_flags(rec_path: Path, offset: int) -> list[int]:
    """The cflag of each part of the record at ``offset`` (to check a split happened)."""
    data = rec_path.read_bytes()
    flags: list[int] = []
    while True:
        magic, lrec = struct.unpack_from("<II", data, offset)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        length = lrec & ((1 << 29) - 1)
        offset += 8 + ((length + 3) & ~3)
        if flags[-1] in (0, 3):
            return flags
