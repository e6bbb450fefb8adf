"""CsvReader: CSV/TSV of id + label, or id + delimited tags, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tagmill.errors import SourceError, StorageError
from tagmill.formats import open_reader
from tagmill.formats.base import FileImage, SourceOptions
from tagmill.formats.csv_labels import CsvReader
from tests import images
from tests.formats.csv_files import add_images, write_csv




def read(path: Path, **options) -> object:
    return CsvReader(str(path), SourceOptions(**options)).read()


def by_id(result) -> dict:
    return {r.id: r for r in result.records}


def reasons(result) -> dict[str, str]:
    """Skip.source -> reason."""
    return {s.source: s.reason for s in result.skipped}


# --- the jobs users bring ---------------------------------------------------------


def test_tags_csv_with_chosen_id_column_and_suffix(tmp_path: Path) -> None:
    """Seed-001: movie stills, image named by shot_image_id + .jpg, comma-separated tags."""
    csv_path = write_csv(
        tmp_path / "stills.csv",
        'id,shot_image_id,tags\n2,81091,"bed, legs, text"\n3,81092,"text"\n4,81093,"legs,  bed ,bed"\n',
    )
    add_images(tmp_path / "stills", "81091.jpg", "81092.jpg", "81093.jpg")
    result = read(
        csv_path, images=str(tmp_path / "stills"), id_column="shot_image_id", label_column="tags", suffix=".jpg"
    )
    records = by_id(result)
    assert list(records) == ["81091", "81092", "81093"]
    assert records["81091"].labels == ("bed", "legs", "text")
    assert records["81093"].labels == ("legs", "bed")  # whitespace stripped, duplicate collapsed
    assert records["81091"].image == FileImage(str(tmp_path / "stills" / "81091.jpg"))
    assert records["81091"].split is None
    assert result.task == "multi"
    assert result.classes == ["bed", "legs", "text"]
    assert result.description == "CSV of delimited tags (3 classes)"
    assert result.skipped == []


def test_single_label_csv_with_images_beside_it(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "labels.csv", "filename,label\na.jpg,cat\nb.jpg,dog\nc.png,New York\n")
    add_images(tmp_path, "a.jpg", "b.jpg", "c.png")
    result = read(csv_path)
    assert {r.id: r.labels for r in result.records} == {
        "a.jpg": ("cat",), "b.jpg": ("dog",), "c.png": ("New York",)
    }
    assert result.task == "single"
    assert result.classes == ["New York", "cat", "dog"]
    assert result.description == "CSV of labels (3 classes)"


def test_default_columns_are_found_by_name_case_insensitively(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "notes, Image_ID ,width, Category\nhi,a,3,cat\n")
    add_images(tmp_path, "a.jpg")
    (record,) = read(csv_path).records
    assert (record.id, record.labels) == ("a", ("cat",))


def test_without_known_names_the_first_columns_are_id_and_label(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "pic,kind\na,cat\n")
    add_images(tmp_path, "a.jpg")
    (record,) = read(csv_path).records
    assert (record.id, record.labels) == ("a", ("cat",))


def test_tsv(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "labels.tsv", "id\tlabels\na\tcat, dog\nb\tdog\n")
    add_images(tmp_path / "imgs", "a.jpg", "b.jpg")
    result = read(csv_path, images=str(tmp_path / "imgs"))
    assert {r.id: r.labels for r in result.records} == {"a": ("cat", "dog"), "b": ("dog",)}
    assert result.task == "multi"


def test_semicolon_csv_and_explicit_delimiter(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "id;label\na;cat\nb;dog\n")
    add_images(tmp_path, "a.jpg", "b.jpg")
    assert [r.labels for r in read(csv_path).records] == [("cat",), ("dog",)]
    pipe = write_csv(tmp_path / "p.txt", "id|label\na|cat\n")
    assert [r.labels for r in read(pipe, delimiter="pipe").records] == [("cat",)]


def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfid,label\r\na,cat\r\n")
    add_images(tmp_path, "a.jpg")
    result = read(csv_path, id_column="ID")
    assert [(r.id, r.labels) for r in result.records] == [("a", ("cat",))]


def test_ids_with_and_without_suffix(tmp_path: Path) -> None:
    add_images(tmp_path / "imgs", "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,cat\nb.jpg,dog\n")
    result = read(csv_path, images=str(tmp_path / "imgs"), suffix=".jpg")
    # "b.jpg" already carries the suffix: it names the file as it is.
    assert [r.image.location for r in result.records] == [
        str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "b.jpg")
    ]
    named = write_csv(tmp_path / "y.csv", "id,label\na.jpg,cat\n")
    (record,) = read(named, images=str(tmp_path / "imgs")).records
    assert record.image.location == str(tmp_path / "imgs" / "a.jpg")


def test_suffix_is_detected_per_id_when_not_given(tmp_path: Path) -> None:
    add_images(tmp_path / "imgs", "a.jpg", "b.PNG", "c.webp", "d.png", "d.jpg", "sub/e.jpeg", "notes.txt")
    (tmp_path / "imgs" / "f.txt").write_text("not an image")
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,x\nb,x\nc,x\nd,x\nsub/e,x\nf,x\n")
    result = read(csv_path, images=str(tmp_path / "imgs"))
    found = {r.id: os.path.relpath(r.image.location, tmp_path / "imgs") for r in result.records}
    assert found == {"a": "a.jpg", "b": "b.PNG", "c": "c.webp", "d": "d.jpg", "sub/e": os.path.join("sub", "e.jpeg")}
    assert reasons(result) == {"x.csv:7": "missing"}


def test_images_folder_relative_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_images(tmp_path / "imgs", "a.jpg")
    csv_path = write_csv(tmp_path / "lists" / "x.csv", "id,label\na,cat\n")
    monkeypatch.chdir(tmp_path)
    (record,) = read(csv_path, images="imgs").records
    assert Path(record.image.location).resolve() == (tmp_path / "imgs" / "a.jpg").resolve()


def test_open_reader_picks_the_csv_reader(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "stills.csv", 'id,tags\n81091,"bed, legs"\n')
    add_images(tmp_path, "81091.jpg")
    reader = open_reader(str(csv_path))
    assert isinstance(reader, CsvReader)
    assert reader.read().records[0].labels == ("bed", "legs")


# --- tags -----------------------------------------------------------------------------


def test_tag_separators_are_detected(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    pipes = write_csv(tmp_path / "p.csv", "id,tags\na,sky|sea\nb,sea\n")
    assert [r.labels for r in read(pipes).records] == [("sky", "sea"), ("sea",)]
    semis = write_csv(tmp_path / "s.tsv", "id\ttags\na\tsky; sea\nb\tsea\n")
    assert [r.labels for r in read(semis).records] == [("sky", "sea"), ("sea",)]


def test_spaces_separate_tags_only_when_multi_label_is_asked(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,tags\na,sky  sea\nb,sea\n")
    assert [r.labels for r in read(csv_path).records] == [("sky  sea",), ("sea",)]
    result = read(csv_path, task="multi")
    assert [r.labels for r in result.records] == [("sky", "sea"), ("sea",)]
    assert result.task == "multi"


def test_explicit_tag_separator_and_list_literals(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,tags\na,sky/sea\nb,sea\n")
    assert [r.labels for r in read(csv_path, tag_separator="/").records] == [("sky", "sea"), ("sea",)]
    spaced = write_csv(tmp_path / "s.csv", "id,tags\na,sky | sea\nb,sea\n")
    assert [r.labels for r in read(spaced, tag_separator=" | ").records] == [("sky", "sea"), ("sea",)]
    listed = write_csv(tmp_path / "l.csv", "id,genre\na,\"['Drama', 'Romance']\"\nb,[]\n")
    assert [r.labels for r in read(listed).records] == [("Drama", "Romance"), ()]


def test_forced_single_label_keeps_commas_inside_a_label(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg")
    csv_path = write_csv(tmp_path / "x.csv", 'id,label\na,"Washington, D.C."\n')
    result = read(csv_path, task="single")
    assert result.records[0].labels == ("Washington, D.C.",)
    assert result.task == "single"


def test_multi_label_empty_cell_is_an_untagged_example(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    csv_path = write_csv(tmp_path / "x.csv", 'id,tags\na,"sky, sea"\nb,\nc," , "\n')
    result = read(csv_path)
    assert [(r.id, r.labels) for r in result.records] == [("a", ("sky", "sea")), ("b", ()), ("c", ())]
    assert result.skipped == []


# --- splits ---------------------------------------------------------------------------


def test_split_column(tmp_path: Path) -> None:
    add_images(tmp_path, *(f"{n}.jpg" for n in "abcdefgh"))
    csv_path = write_csv(
        tmp_path / "x.csv",
        "id,label,split\na,x,train\nb,x,VAL\nc,x,valid\nd,x,Validation\ne,x,test\nf,x,1\ng,x,no\nh,x,holdout\n",
    )
    result = read(csv_path, split_column="Split")
    assert {r.id: r.split for r in result.records} == {
        "a": "train", "b": "val", "c": "val", "d": "val", "e": "test", "f": "val", "g": "train"
    }
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == ("x.csv:9", "malformed-row")
    assert "'holdout'" in skip.detail


def test_boolean_split_column(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "fname,labels,is_valid\na,x y,True\nb,y,False\n")
    result = read(csv_path, split_column="is_valid")
    assert [(r.id, r.split) for r in result.records] == [("a", "val"), ("b", "train")]


# --- bad input ------------------------------------------------------------------------


def test_empty_label_in_single_label_csv_is_skipped(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,cat\nb,  \n")
    result = read(csv_path)
    assert [r.id for r in result.records] == ["a"]
    assert reasons(result) == {"x.csv:3": "empty-label"}
    assert result.task == "single"


def test_unknown_columns_are_refused_with_the_available_ones(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "id,shot_image_id,tags\n2,81091,bed\n")
    add_images(tmp_path, "81091.jpg")
    for option in ("id_column", "label_column", "split_column"):
        with pytest.raises(SourceError) as caught:
            read(csv_path, **{option: "shot_id"})
        message = str(caught.value)
        assert "'shot_id'" in message and "'id', 'shot_image_id', 'tags'" in message
        assert caught.value.exit_code == 3


def test_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,cat\nb,dog\na,dog\n")
    result = read(csv_path)
    assert [(r.id, r.labels) for r in result.records] == [("a", ("cat",)), ("b", ("dog",))]
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == ("x.csv:4", "duplicate-id")
    assert "line 2" in skip.detail


def test_rows_of_the_wrong_width_are_skipped_with_their_line(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    csv_path = write_csv(
        tmp_path / "x.csv",
        'id,label,note\na,cat,ok\nb;dog;mixed\n\nc,dog,"two\nlines"\nd,cat,too,many\nd,cat,fine\n',
    )
    result = read(csv_path)
    assert [r.id for r in result.records] == ["a", "c", "d"]
    assert reasons(result) == {"x.csv:3": "malformed-row", "x.csv:7": "malformed-row"}
    mixed = result.skipped[0]
    assert mixed.detail == "line 3: expected 3 fields, found 1 (mixed delimiters?)"
    assert "found 4" in result.skipped[1].detail


def test_stray_quote_skips_the_row_and_an_unclosed_quote_stops(tmp_path: Path) -> None:
    add_images(tmp_path, "a.jpg", "b.jpg")
    csv_path = write_csv(tmp_path / "x.csv", 'id,label\na,"cat"x\nb,dog\n')
    result = read(csv_path)
    assert [r.id for r in result.records] == ["b"]
    assert reasons(result) == {"x.csv:2": "malformed-row"}
    unclosed = write_csv(tmp_path / "u.csv", 'id,label\na,"cat\nb,dog\n')
    with pytest.raises(SourceError, match=r"u\.csv:2"):
        read(unclosed)


def test_unsafe_ids_are_refused(tmp_path: Path) -> None:
    add_images(tmp_path / "imgs", "a.jpg")
    add_images(tmp_path, "outside.jpg")
    csv_path = write_csv(
        tmp_path / "x.csv",
        "id,label\n../../etc/passwd,x\n/etc/passwd,x\nsub/../../outside.jpg,x\n..\\outside.jpg,x\na,x\n",
    )
    result = read(csv_path, images=str(tmp_path / "imgs"))
    assert [r.id for r in result.records] == ["a"]
    assert set(reasons(result).values()) == {"unsafe-path"}
    assert len(result.skipped) == 4


def test_missing_images_name_the_expected_path(tmp_path: Path) -> None:
    add_images(tmp_path / "imgs", "a.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,cat\nb,dog\n")
    result = read(csv_path, images=str(tmp_path / "imgs"), suffix=".jpg")
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == ("x.csv:3", "missing")
    assert str(tmp_path / "imgs" / "b.jpg") in skip.detail


def test_missing_image_folder_is_a_source_error(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "id,label\na,cat\n")
    with pytest.raises(SourceError, match="image folder"):
        read(csv_path, images=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "id,label\n", "id,label\n\n,,\n", "a.jpg,cat\nb.jpg,dog\n", "id\na\n", "id,label\na;cat\n"],
    ids=["empty", "blank", "header-only", "header-and-blank-rows", "no-header", "one-column", "no-readable-row"],
)
def test_files_without_header_or_rows_are_refused(tmp_path: Path, text: str) -> None:
    csv_path = write_csv(tmp_path / "x.csv", text)
    add_images(tmp_path, "a.jpg")
    with pytest.raises(SourceError):
        read(csv_path)


def test_non_utf8_text_is_a_storage_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "x.csv"
    csv_path.write_bytes("id,label\na,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(StorageError):
        read(csv_path)


def test_many_rows_read_from_one_listing(tmp_path: Path) -> None:
    """1k rows: every id found, the few bad ones reported, in file order."""
    names = [f"{i:05d}" for i in range(1000)]
    jpeg = images.jpeg_bytes(8, 8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in names[:-1]:
        (folder / f"{name}.jpg").write_bytes(jpeg)
    rows = "".join(f"{name},t{int(name) % 7}|t{int(name) % 3}\n" for name in names)
    csv_path = write_csv(tmp_path / "big.csv", "id,tags\n" + rows + "00001,t1\n")
    result = read(csv_path, images=str(folder))
    assert len(result.records) == 999
    assert [(s.source, s.reason) for s in result.skipped] == [
        ("big.csv:1001", "missing"), ("big.csv:1002", "duplicate-id")
    ]
    assert result.classes == sorted({f"t{i}" for i in range(7)})


def test_csv_and_images_behind_a_url() -> None:
    """fsspec's in-memory filesystem stands in for S3: same URL code path, no network."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/tagmill-test/data/x.csv", b"id,label\na,cat\nb,dog\n")
    fs.pipe("/tagmill-test/data/a.jpg", images.jpeg_bytes())
    try:
        result = CsvReader("memory://tagmill-test/data/x.csv", SourceOptions()).read()
        assert [r.image.location for r in result.records] == ["memory://tagmill-test/data/a.jpg"]
        assert result.records[0].image.read() == images.jpeg_bytes()
        assert [(s.source, s.reason) for s in result.skipped] == [("x.csv:3", "missing")]
        assert "memory://tagmill-test/data/b.*" in result.skipped[0].detail
    finally:
        fs.rm("/tagmill-test", recursive=True)
