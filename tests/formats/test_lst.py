"""LstReader against real .lst files and real images written to tmp_path."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tagmill import storage
from tagmill.errors import SourceError
from tagmill.formats import FileImage, ReadResult, SourceOptions, open_reader
from tagmill.formats.lst import LstReader
from tests import images


def make_images(root: Path, *relatives: str) -> None:
    for n, relative in enumerate(relatives):
        images.write(root / relative, images.jpeg_bytes(16, 12, seed=n))


def write_lst(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path | str, **options) -> ReadResult:
    return LstReader(str(path), SourceOptions(**options)).read()


def by_id(result: ReadResult) -> dict[str, tuple[str, ...]]:
    return {r.id: r.labels for r in result.records}


def reasons(result: ReadResult) -> list[tuple[str, str]]:
    return [(s.source.rsplit(":", 1)[-1], s.reason) for s in result.skipped]


# -- single-label, class names ---------------------------------------------------------


def test_caltech_layout_names_classes_after_folders(tmp_path: Path) -> None:
    paths = ["001.ak47/001_0001.jpg", "001.ak47/001_0002.jpg", "002.american-flag/002_0001.jpg",
             "003.backpack/003_0001.jpg"]
    make_images(tmp_path, *paths)
    lst = write_lst(tmp_path / "caltech.lst",
                    f"0\t0.000000\t{paths[0]}", f"1\t0.000000\t{paths[1]}",
                    f"2\t1.000000\t{paths[2]}", f"3\t2.000000\t{paths[3]}")
    result = read(lst)
    assert result.task == "single"
    assert result.classes == ["001.ak47", "002.american-flag", "003.backpack"]
    assert by_id(result) == {"0": ("001.ak47",), "1": ("001.ak47",), "2": ("002.american-flag",),
                             "3": ("003.backpack",)}
    assert result.records[2].image == FileImage(str(tmp_path / "002.american-flag" / "002_0001.jpg"))
    assert result.records[2].image.read() == (tmp_path / paths[2]).read_bytes()
    assert result.skipped == []
    assert "folder names" in result.description


def test_list_made_one_level_up_names_classes_after_the_image_folder(tmp_path: Path) -> None:
    make_images(tmp_path, "all/cat/a.jpg", "all/dog/b.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t1\tall/cat/a.jpg", "1\t0\tall/dog/b.jpg")
    result = read(lst)
    assert result.classes == ["dog", "cat"]  # index order: dog is 0
    assert by_id(result) == {"0": ("cat",), "1": ("dog",)}


def test_folders_that_do_not_match_labels_give_index_names(tmp_path: Path) -> None:
    make_images(tmp_path, "a/1.jpg", "a/2.jpg", "b/3.jpg", "top.jpg")
    mixed = write_lst(tmp_path / "mixed.lst", "0\t0\ta/1.jpg", "1\t1\ta/2.jpg", "2\t2\tb/3.jpg")
    assert read(mixed).classes == ["0", "1", "2"]
    assert by_id(read(mixed))["1"] == ("1",)
    no_folder = write_lst(tmp_path / "flat.lst", "0\t0\ta/1.jpg", "1\t3\ttop.jpg")
    assert read(no_folder).classes == ["0", "3"]  # only the indices that occur


def test_class_names_option_names_by_index(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t2.0\ta.jpg", "1\t0.0\tb.jpg", "2\t5.0\tc.jpg")
    result = read(lst, class_names=("zero", "one", "two"))
    assert result.classes == ["zero", "one", "two"]
    assert by_id(result) == {"0": ("two",), "1": ("zero",)}
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == (f"{lst}:3", "malformed-row")
    assert skip.detail == "line 3: label 5 but only 3 class names were given"


# -- multi-label -------------------------------------------------------------------------


def test_several_index_columns_are_multi_label(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    lst = write_lst(tmp_path / "x.lst", "10\t1.0\t3.0\ta.jpg", "11\t2.0\tb.jpg", "12\t3.0\t3.0\tc.jpg")
    result = read(lst)
    assert result.task == "multi"
    assert result.classes == ["1", "2", "3"]
    assert by_id(result) == {"10": ("1", "3"), "11": ("2",), "12": ("3",)}  # 3,3 collapses


def test_onehot_columns_detected(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t1\t0\t1\t0\ta.jpg", "1\t0\t0\t0\t0\tb.jpg",
                    "2\t0.0\t1.0\t0.0\t0.0\tc.jpg")
    result = read(lst, class_names=("cat", "dog", "car", "tree"))
    assert result.task == "multi"
    assert result.classes == ["cat", "dog", "car", "tree"]
    assert by_id(result) == {"0": ("cat", "car"), "1": (), "2": ("dog",)}
    assert "one-hot" in result.description
    # Without names every column is a class, even one never set.
    assert read(lst).classes == ["0", "1", "2", "3"]
    # The same numbers read as class indices.
    as_index = read(lst, label_format="index")
    assert by_id(as_index)["0"] == ("1", "0")
    assert as_index.classes == ["0", "1"]


def test_two_binary_columns_are_indices_not_onehot(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\t1\ta.jpg", "1\t1\t1\tb.jpg")
    assert by_id(read(lst)) == {"0": ("0", "1"), "1": ("1",)}


def test_onehot_forced_refuses_other_values(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\t1\ta.jpg", "1\t2\t0\tb.jpg")
    result = read(lst, label_format="onehot")
    assert by_id(result) == {"0": ("1",)}
    assert result.skipped[0].detail == "line 2: one-hot label columns must be 0 or 1, found 2"


def test_task_option_forces_the_task(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t1\ta.jpg", "1\t0\t2\tb.jpg")
    single = read(lst, task="single")
    assert single.task == "single"
    assert by_id(single) == {"0": ("1",)}
    assert reasons(single) == [("2", "malformed-row")]
    assert "2 labels but the task is single-label" in single.skipped[0].detail
    single_columns = write_lst(tmp_path / "y.lst", "0\t1\ta.jpg")
    assert read(single_columns, task="multi").task == "multi"


# -- bad input ---------------------------------------------------------------------------


def test_blank_lines_and_crlf_are_ignored_and_line_numbers_kept(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg")
    lst = tmp_path / "x.lst"
    lst.write_bytes(b"\r\n0\t1.0\ta.jpg\r\n   \r\n\r\n1\t0.000000\tb.jpg\r\n2\t1\r\n")
    result = read(lst)
    assert by_id(result) == {"0": ("1",), "1": ("0",)}
    assert result.records[1].image == FileImage(str(tmp_path / "b.jpg"))
    assert [(s.source, s.detail) for s in result.skipped] == [
        (f"{lst}:6", "line 6: expected index TAB label TAB path, found 2 fields")
    ]


def test_malformed_rows(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg")
    lst = write_lst(
        tmp_path / "x.lst",
        "0\t1\ta.jpg",
        "a.jpg",
        "1 2 b.jpg",
        "x\t1\ta.jpg",
        "2\t2.5\ta.jpg",
        "3\tcat\ta.jpg",
        "4\t-1\ta.jpg",
        "5\tnan\ta.jpg",
        "6.5\t1\ta.jpg",
    )
    result = read(lst)
    assert by_id(result) == {"0": ("1",)}
    assert all(s.reason == "malformed-row" for s in result.skipped)
    details = [s.detail for s in result.skipped]
    assert details == [
        "line 2: expected index TAB label TAB path, found 1 field",
        "line 3: expected index TAB label TAB path, found 1 field (fields must be separated by TABs, not spaces)",
        "line 4: index 'x' is not a whole number",
        "line 5: label '2.5' is not a class index (a whole number >= 0)",
        "line 6: label 'cat' is not a class index (a whole number >= 0)",
        "line 7: label '-1' is not a class index (a whole number >= 0)",
        "line 8: label 'nan' is not a class index (a whole number >= 0)",
        "line 9: index '6.5' is not a whole number",
    ]


def test_duplicate_index_skips_the_later_line(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg", "b.jpg")
    lst = write_lst(tmp_path / "x.lst", "7\t0\ta.jpg", "7\t1\tb.jpg", "7.0\t1\tb.jpg")
    result = read(lst)
    assert [(r.id, r.image.location) for r in result.records] == [("7", str(tmp_path / "a.jpg"))]
    assert reasons(result) == [("2", "duplicate-id"), ("3", "duplicate-id")]
    assert "index 7 already used" in result.skipped[0].detail


@pytest.mark.parametrize(
    "path",
    ["../../etc/passwd", "/etc/passwd", "sub/../../outside.jpg", "s3://bucket/a.jpg", "C:\\Windows\\x.jpg", ".."],
)
def test_paths_outside_the_images_folder_are_refused(tmp_path: Path, path: str) -> None:
    root = tmp_path / "data"
    make_images(root, "a.jpg")
    images.write(tmp_path / "outside.jpg", images.jpeg_bytes())
    lst = write_lst(root / "x.lst", "0\t0\ta.jpg", f"1\t0\t{path}")
    result = read(lst)
    assert [r.id for r in result.records] == ["0"]
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == (f"{lst}:2", "unsafe-path")
    assert skip.detail.startswith(f"line 2: path {path!r} is outside the images folder")


def test_backslash_paths_are_read_as_folders(tmp_path: Path) -> None:
    make_images(tmp_path, "cat/a.jpg", "dog/b.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\tcat\\a.jpg", "1\t1\tdog\\b.jpg")
    result = read(lst)
    assert result.classes == ["cat", "dog"]
    assert result.records[0].image.location == str(tmp_path / "cat" / "a.jpg")


def test_inner_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    make_images(tmp_path, "a/x.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\ta/b/../x.jpg")
    assert [r.image.location for r in read(lst).records] == [str(tmp_path / "a" / "x.jpg")]


def test_missing_images_are_skipped(tmp_path: Path) -> None:
    make_images(tmp_path, "cat/a.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\tcat/a.jpg", "1\t1\tdog/gone.jpg")
    result = read(lst)
    assert [r.id for r in result.records] == ["0"]
    (skip,) = result.skipped
    assert (skip.source, skip.reason) == (f"{lst}:2", "missing")
    assert str(tmp_path / "dog" / "gone.jpg") in skip.detail


def test_images_option_sets_the_root(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", "cat/a.jpg", "dog/b.jpg")
    lst = write_lst(tmp_path / "lists" / "train.lst", "0\t0\tcat/a.jpg", "1\t1\tdog/b.jpg")
    result = read(lst, images=str(tmp_path / "pics"))
    assert result.classes == ["cat", "dog"]
    assert result.records[1].image.location == str(tmp_path / "pics" / "dog" / "b.jpg")
    # Without the option the images are looked for beside the list, and are missing.
    assert reasons(read(lst)) == [("1", "missing"), ("2", "missing")]


def test_images_root_that_cannot_be_listed_falls_back_to_each_file(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\ta.jpg")
    result = read(lst, images=str(tmp_path / "nowhere"))
    assert reasons(result) == [("1", "missing")]


def test_remote_list_and_images(tmp_path: Path) -> None:
    """A non-local filesystem (fsspec memory://): one listing decides what exists."""
    base = f"memory://lst-{uuid.uuid4().hex}"
    storage.write_bytes(f"{base}/cat/a.jpg", images.jpeg_bytes())
    storage.write_bytes(f"{base}/dog/b.jpg", images.png_bytes())
    storage.write_bytes(f"{base}/train.lst", b"0\t0\tcat/a.jpg\n1\t1\tdog/b.jpg\n2\t1\tdog/c.jpg\n")
    try:
        result = LstReader(f"{base}/train.lst", SourceOptions()).read()
    finally:
        storage.filesystem(base)[0].rm(storage.filesystem(base)[1], recursive=True)
    assert result.classes == ["cat", "dog"]
    assert [r.image.location for r in result.records] == [f"{base}/cat/a.jpg", f"{base}/dog/b.jpg"]
    assert [(s.source, s.reason) for s in result.skipped] == [(f"{base}/train.lst:3", "missing")]


def test_missing_lst_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope.lst"):
        read(tmp_path / "nope.lst")
    with pytest.raises(SourceError, match="is a folder"):
        LstReader(str(tmp_path), SourceOptions()).read()


def test_not_utf8_is_a_source_error(tmp_path: Path) -> None:
    lst = tmp_path / "x.lst"
    lst.write_bytes(b"0\t0\t\xff\xfe.jpg\n")
    with pytest.raises(SourceError, match="x.lst"):
        read(lst)


def test_no_valid_line_is_not_an_error(tmp_path: Path) -> None:
    lst = write_lst(tmp_path / "x.lst", "garbage", "")
    result = read(lst)
    assert result.records == []
    assert reasons(result) == [("1", "malformed-row")]


def test_open_reader_picks_lst_by_extension(tmp_path: Path) -> None:
    make_images(tmp_path, "a.jpg")
    lst = write_lst(tmp_path / "x.lst", "0\t0\ta.jpg")
    reader = open_reader(str(lst))
    assert isinstance(reader, LstReader)
    assert [r.id for r in reader.read().records] == ["0"]
