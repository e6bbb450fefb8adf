"""RecordIOReader and read_image_at against packs written like MXNet's im2rec."""

from __future__ import annotations

import io
import struct
import uuid
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tagmill import storage
from tagmill.errors import SourceError
from tagmill.formats import ReadResult, RecordIOImage, SourceOptions, open_reader
from tagmill.formats.recordio import RecordIOReader, pack_paths, read_image_at, read_record
from tests import images
from tests.mxnet_pack import MAGIC, MAGIC_BYTES, pack, part_flags, write_pack, write_record


def read(path: Path | str, **options) -> ReadResult:
    return RecordIOReader(str(path), SourceOptions(**options)).read()


def by_id(result: ReadResult) -> dict[str, tuple[str, ...]]:
    return {r.id: r.labels for r in result.records}


def image_with_magic() -> bytes:
    """A real PNG whose bytes hold the RecordIO magic at two 4-byte-aligned places.

    The magic sits in a private ancillary chunk (ignored by decoders) four times, each
    one byte further along, so one copy is aligned wherever the chunk lands; the
    pattern is repeated so the record splits into a first, a middle and a last part.
    """
    info = PngImagePlugin.PngInfo()
    info.add(b"mgIc", (MAGIC_BYTES + b"\x00") * 4 * 2)
    buf = io.BytesIO()
    Image.fromarray(images.pattern(24, 16, seed=3)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture
def simple_pack(tmp_path: Path) -> tuple[Path, dict[int, int], dict[int, bytes]]:
    """Three records, im2rec style: a JPEG, a PNG, a JPEG, labels 0/1/0."""
    data = {0: images.jpeg_bytes(seed=1), 1: images.png_bytes(seed=2), 2: images.jpeg_bytes(30, 20, seed=3)}
    rec = tmp_path / "train.rec"
    offsets = write_pack(rec, [(0, 0.0, data[0]), (1, 1.0, data[1]), (2, 0.0, data[2])])
    return rec, offsets, data


# -- the writer helper is faithful to dmlc-core -------------------------------------------


def test_writer_byte_layout() -> None:
    out = io.BytesIO()
    write_record(out, b"abcde")
    assert out.getvalue() == MAGIC_BYTES + struct.pack("<I", 5) + b"abcde" + b"\x00" * 3
    out = io.BytesIO()
    write_record(out, b"1234" + MAGIC_BYTES + b"5678" + MAGIC_BYTES + b"9a")
    assert out.getvalue() == (
        MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"1234"
        + MAGIC_BYTES + struct.pack("<I", (2 << 29) | 4) + b"5678"
        + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 2) + b"9a" + b"\x00\x00"
    )
    assert pack([1, 2], b"img", record_id=7) == struct.pack("<IfQQ2f", 2, 0.0, 7, 0, 1.0, 2.0) + b"img"


# -- listing ----------------------------------------------------------------------------------


def test_single_label_pack(simple_pack) -> None:
    rec, offsets, _ = simple_pack
    result = read(rec)
    assert result.task == "single"
    assert result.classes == ["0", "1"]
    assert by_id(result) == {"0": ("0",), "1": ("1",), "2": ("0",)}
    assert [r.image for r in result.records] == [RecordIOImage(str(rec), offsets[k]) for k in range(3)]
    assert result.skipped == []
    assert "train.idx" in result.description
    named = read(rec, class_names=("cat", "dog"))
    assert named.classes == ["cat", "dog"]
    assert by_id(named)["1"] == ("dog",)


def test_idx_path_names_the_same_pack(simple_pack) -> None:
    rec, _, _ = simple_pack
    assert pack_paths(str(rec.with_suffix(".idx"))) == (str(rec), str(rec.with_suffix(".idx")))
    assert by_id(read(rec.with_suffix(".idx"))) == by_id(read(rec))


def test_packed_multi_labels(tmp_path: Path) -> None:
    rec = tmp_path / "multi.rec"
    write_pack(rec, [(5, [0.0, 2.0], images.jpeg_bytes()), (6, [1.0], images.png_bytes()),
                     (7, [2.0, 2.0, 3.0], images.jpeg_bytes(seed=4))])
    result = read(rec)
    assert result.task == "multi"
    assert result.classes == ["0", "1", "2", "3"]
    assert by_id(result) == {"5": ("0", "2"), "6": ("1",), "7": ("2", "3")}


def test_packed_onehot_labels(tmp_path: Path) -> None:
    rec = tmp_path / "onehot.rec"
    write_pack(rec, [(0, [1, 0, 1], images.jpeg_bytes()), (1, [0, 1, 0], images.png_bytes())])
    result = read(rec, class_names=("a", "b", "c"))
    assert result.task == "multi"
    assert by_id(result) == {"0": ("a", "c"), "1": ("b",)}
    assert by_id(read(rec, label_format="index")) == {"0": ("1", "0"), "1": ("0", "1")}


def test_single_packed_label_is_single_label(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    write_pack(rec, [(0, [3.0], images.jpeg_bytes())])
    result = read(rec)
    assert (result.task, by_id(result)) == ("single", {"0": ("3",)})


def test_non_integer_labels_are_malformed(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    offsets = write_pack(rec, [(0, 1.0, images.jpeg_bytes()), (1, 2.5, images.jpeg_bytes()),
                               (2, [0.0, -1.0], images.jpeg_bytes())])
    result = read(rec)
    assert list(by_id(result)) == ["0"]
    assert [(s.source, s.reason, s.detail) for s in result.skipped] == [
        (f"{rec}@{offsets[1]}", "malformed-row", "record 1: label 2.5 is not a class index (a whole number >= 0)"),
        (f"{rec}@{offsets[2]}", "malformed-row", "record 2: label -1 is not a class index (a whole number >= 0)"),
    ]


# -- records split around the magic number ------------------------------------------------------


def test_image_holding_the_magic_is_split_and_joined_back(tmp_path: Path) -> None:
    tricky = image_with_magic()
    rec = tmp_path / "split.rec"
    offsets = write_pack(rec, [(0, 0.0, images.jpeg_bytes()), (1, 1.0, tricky), (2, 1.0, images.png_bytes())])
    assert part_flags(rec, offsets[1]) == [1, 2, 3]
    result = read(rec)
    assert by_id(result) == {"0": ("0",), "1": ("1",), "2": ("1",)}
    assert read_image_at(str(rec), offsets[1]) == tricky
    assert RecordIOImage(str(rec), offsets[1]).read() == tricky
    assert Image.open(io.BytesIO(tricky)).size == (24, 16)
    # The scan walks over the parts too.
    rec.with_suffix(".idx").unlink()
    assert by_id(read(rec)) == by_id(result)


def test_magic_inside_the_header_reads_the_whole_record(tmp_path: Path) -> None:
    """An IRHeader id equal to the magic splits the record 8 bytes in, before the label."""
    rec = tmp_path / "x.rec"
    jpeg = images.jpeg_bytes()
    with open(rec, "wb") as out:
        write_record(out, pack(2.0, jpeg, record_id=MAGIC))
    assert part_flags(rec, 0) == [1, 3]
    result = read(rec)  # no .idx: header ids are the record ids
    assert by_id(result) == {str(MAGIC): ("2",)}
    assert read_image_at(str(rec), 0) == jpeg
    with open(rec, "rb") as stream:
        assert read_record(stream, 0) == pack(2.0, jpeg, record_id=MAGIC)


# -- round trip ----------------------------------------------------------------------------------


def test_images_read_back_identical_and_decode(simple_pack) -> None:
    rec, offsets, data = simple_pack
    for record in read(rec).records:
        key = int(record.id)
        assert read_image_at(str(rec), offsets[key]) == data[key]
        assert record.image.read() == data[key]
        Image.open(io.BytesIO(record.image.read())).load()


def test_remote_pack(tmp_path: Path, simple_pack) -> None:
    """A non-local filesystem (fsspec memory://) through storage.open_read."""
    rec, offsets, data = simple_pack
    base = f"memory://rec-{uuid.uuid4().hex}"
    storage.write_bytes(f"{base}/train.rec", rec.read_bytes())
    storage.write_bytes(f"{base}/train.idx", rec.with_suffix(".idx").read_bytes())
    try:
        result = read(f"{base}/train.idx")
        assert by_id(result) == {"0": ("0",), "1": ("1",), "2": ("0",)}
        assert result.records[1].image == RecordIOImage(f"{base}/train.rec", offsets[1])
        assert result.records[1].image.read() == data[1]
    finally:
        storage.filesystem(base)[0].rm(storage.filesystem(base)[1], recursive=True)


# -- without an index ----------------------------------------------------------------------------


def test_pack_without_idx_is_scanned(tmp_path: Path) -> None:
    rec = tmp_path / "noidx.rec"
    offsets = write_pack(rec, [(10, 0.0, images.jpeg_bytes()), (11, 1.0, images.png_bytes(7, 5))],
                         with_idx=False)
    result = read(rec)
    assert by_id(result) == {"10": ("0",), "11": ("1",)}
    assert [r.image.offset for r in result.records] == [offsets[10], offsets[11]]
    assert "scanning" in result.description


def test_scan_numbers_records_when_header_ids_repeat(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    with open(rec, "wb") as out:
        for label in (0.0, 1.0, 1.0):
            write_record(out, pack(label, images.jpeg_bytes(), record_id=0))
    result = read(rec)
    assert by_id(result) == {"0": ("0",), "1": ("1",), "2": ("1",)}
    assert "numbered" in result.description


def test_scan_skips_a_corrupt_record_and_finds_the_next(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    offsets = write_pack(rec, [(0, 0.0, images.jpeg_bytes()), (1, 1.0, images.jpeg_bytes(seed=1)),
                               (2, 1.0, images.png_bytes())], with_idx=False)
    raw = bytearray(rec.read_bytes())
    raw[offsets[1]:offsets[1] + 4] = b"JUNK"
    rec.write_bytes(bytes(raw))
    result = read(rec)
    assert by_id(result) == {"0": ("0",), "2": ("1",)}
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == (f"{rec}@{offsets[1]}", "corrupt-record")
    assert "not the RecordIO magic" in skip.detail


def test_scan_resync_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny read chunks: the next record's header straddles many chunk boundaries."""
    from tagmill.formats import recordio

    monkeypatch.setattr(recordio, "_SCAN_CHUNK", 16)
    rec = tmp_path / "x.rec"
    offsets = write_pack(rec, [(0, 0.0, images.jpeg_bytes()), (1, 1.0, image_with_magic()),
                               (2, 1.0, images.png_bytes())], with_idx=False)
    assert part_flags(rec, offsets[1]) == [1, 2, 3]
    raw = bytearray(rec.read_bytes())
    raw[offsets[1]:offsets[1] + 4] = b"\x00" * 4  # the split record's first part
    rec.write_bytes(bytes(raw))
    result = read(rec)
    # Its middle and last parts start with the magic too, but cannot start a record.
    assert by_id(result) == {"0": ("0",), "2": ("1",)}
    assert [s.source for s in result.skipped] == [f"{rec}@{offsets[1]}"]


def test_truncated_rec_without_idx(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    offsets = write_pack(rec, [(0, 0.0, images.jpeg_bytes()), (1, 1.0, images.jpeg_bytes(64, 64))],
                         with_idx=False)
    rec.write_bytes(rec.read_bytes()[: offsets[1] + 100])
    result = read(rec)
    assert list(by_id(result)) == ["0"]
    assert [(s.source, s.reason) for s in result.skipped] == [(f"{rec}@{offsets[1]}", "corrupt-record")]
    assert "truncated" in result.skipped[0].detail


# -- a damaged index or pack ----------------------------------------------------------------------


def test_bad_idx_entries(simple_pack) -> None:
    rec, offsets, _ = simple_pack
    idx = rec.with_suffix(".idx")
    size = rec.stat().st_size
    idx.write_text(
        f"0\t{offsets[0]}\n"
        f"1\t{offsets[1] + 40}\n"  # aligned, inside record 1's image
        f"2\t{size + 64}\n"  # past the end
        "3\tnot-a-number\n"
        "\n"
        f"4\t{offsets[2]}\n"
        f"4\t{offsets[0]}\n"
        f"5\t{offsets[1] + 2}\n"  # not aligned
    )
    result = read(rec)
    assert by_id(result) == {"0": ("0",), "4": ("0",)}
    got = [(s.source, s.reason) for s in result.skipped]
    assert got == [
        (f"{idx}:4", "malformed-row"),
        (f"{idx}:7", "duplicate-id"),
        (f"{rec}@{offsets[1] + 40}", "corrupt-record"),
        (f"{rec}@{size + 64}", "corrupt-record"),
        (f"{rec}@{offsets[1] + 2}", "corrupt-record"),
    ]
    assert result.skipped[3].detail == f"offset {size + 64} is beyond the end of the file ({size} bytes)"
    with pytest.raises(SourceError, match=rf"corrupt record in .*train\.rec at offset {offsets[1] + 40}: found 0x"):
        read_image_at(str(rec), offsets[1] + 40)
    with pytest.raises(SourceError, match="beyond the end"):
        RecordIOImage(str(rec), size + 64).read()


def test_truncated_rec_with_idx(simple_pack) -> None:
    rec, offsets, _ = simple_pack
    rec.write_bytes(rec.read_bytes()[: offsets[2] + 30])
    result = read(rec)
    assert list(by_id(result)) == ["0", "1"]
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == (f"{rec}@{offsets[2]}", "corrupt-record")
    with pytest.raises(SourceError, match="truncated"):
        read_image_at(str(rec), offsets[2])


def test_record_too_short_for_its_header(tmp_path: Path) -> None:
    rec = tmp_path / "x.rec"
    with open(rec, "wb") as out:
        write_record(out, b"tiny")
        write_record(out, struct.pack("<IfQQ", 1000, 0.0, 1, 0) + b"xx")
    result = read(rec)
    assert result.records == []
    assert [s.detail for s in result.skipped] == [
        "record has 4 bytes, too few for the 24-byte IRHeader",
        "IRHeader announces 1000 labels but the record has only 26 bytes",
    ]


def test_missing_rec_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope.rec"):
        read(tmp_path / "nope.rec")
    (tmp_path / "lonely.idx").write_text("0\t0\n")
    with pytest.raises(SourceError, match=r"lonely\.rec"):
        read(tmp_path / "lonely.idx")


def test_empty_rec_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.rec").write_bytes(b"")
    result = read(tmp_path / "empty.rec")
    assert result.records == [] and result.skipped == []


def test_open_reader_picks_recordio_by_extension(simple_pack) -> None:
    rec, _, _ = simple_pack
    for path in (rec, rec.with_suffix(".idx")):
        reader = open_reader(str(path))
        assert isinstance(reader, RecordIOReader)
        assert len(reader.read().records) == 3
