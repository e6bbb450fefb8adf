"""OneHotCsvReader and looks_one_hot, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagmill.errors import SourceError
from tagmill.formats import detect_format, open_reader
from tagmill.formats.base import FileImage, SourceOptions
from tagmill.formats.csv_labels import CsvReader
from tagmill.formats.onehot import OneHotCsvReader, looks_one_hot
from tests import images
from tests.formats.csv_files import add_images, write_csv

GENRES = ["Action", "Adventure", "Animation", "Drama", "Romance"]




def read(path: Path, **options):
    return OneHotCsvReader(str(path), SourceOptions(**options)).read()


def movie_posters(tmp_path: Path) -> Path:
    """Seed-004 style: Id, a Genre text column, then one 0/1 column per genre."""
    add_images(tmp_path / "Images", "tt01.jpg", "tt02.jpg", "tt03.jpg", "tt04.jpg")
    return write_csv(
        tmp_path / "train.csv",
        "Id,Genre," + ",".join(GENRES) + "\n"
        "tt01,\"['Drama', 'Romance']\",0,0,0,1,1\n"
        "tt02,\"['Action']\",1,0,0,0,0\n"
        "tt03,\"['Animation', 'Adventure']\",0,1,1,0,0\n"
        "tt04,[],0,0,0,0,0\n",
    )


def test_one_hot_csv_excludes_the_text_column(tmp_path: Path) -> None:
    csv_path = movie_posters(tmp_path)
    result = read(csv_path, images=str(tmp_path / "Images"))
    assert result.classes == GENRES  # file order, Genre left out
    assert result.task == "multi"
    assert result.description == "one-hot CSV (5 class columns)"
    assert [(r.id, r.labels) for r in result.records] == [
        ("tt01", ("Drama", "Romance")),
        ("tt02", ("Action",)),
        ("tt03", ("Adventure", "Animation")),
        ("tt04", ()),  # all zeros: kept, untagged
    ]
    assert result.records[0].image == FileImage(str(tmp_path / "Images" / "tt01.jpg"))
    assert result.skipped == []


def test_open_reader_chooses_onehot_or_csv(tmp_path: Path) -> None:
    one_hot = movie_posters(tmp_path)
    assert detect_format(str(one_hot)) == "onehot"
    reader = open_reader(str(one_hot), SourceOptions(images=str(tmp_path / "Images")))
    assert isinstance(reader, OneHotCsvReader)
    assert len(reader.read().records) == 4

    tags = write_csv(tmp_path / "tags.csv", 'id,tags\ntt01,"Drama, Romance"\n')
    assert detect_format(str(tags)) == "csv"
    assert isinstance(open_reader(str(tags)), CsvReader)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id,a,b\nx,0,1\ny,1,1\n", True),
        ("id,a,b\nx,0.0,1.0\ny,1.0,0.0\n", True),
        ("id\ta\tb\tnote\nx\t0\t1\thello\n", True),
        ("id,label\nx,0\ny,1\n", False),  # binary single-label: one 0/1 column
        ("id,a,b\nx,0,2\ny,1,1\n", False),
        ("id,tags\nx,\"a, b\"\n", False),
        ("id,a,b\n", False),  # no rows to judge by
        ("", False),
    ],
)
def test_looks_one_hot(tmp_path: Path, text: str, expected: bool) -> None:
    assert looks_one_hot(str(write_csv(tmp_path / "x.csv", text))) is expected


def test_looks_one_hot_judges_only_the_first_rows(tmp_path: Path) -> None:
    rows = "".join(f"r{i},0,1\n" for i in range(300)) + "late,7,1\n"
    assert looks_one_hot(str(write_csv(tmp_path / "x.csv", "id,a,b\n" + rows)))


def test_looks_one_hot_is_false_for_unreadable_files(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,caf\u00e9,b\nx,0,1\n".encode("latin-1"))
    assert not looks_one_hot(str(latin))
    assert not looks_one_hot(str(tmp_path / "absent.csv"))


def test_named_class_columns(tmp_path: Path) -> None:
    csv_path = movie_posters(tmp_path)
    result = read(csv_path, images=str(tmp_path / "Images"), class_columns=("drama", "Action"))
    assert result.classes == ["Drama", "Action"]
    assert [r.labels for r in result.records] == [("Drama",), ("Action",), (), ()]


def test_named_class_column_with_another_value_is_refused(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "id,a,b,c\nx,0,1,0\ny,1,yes,0\n")
    add_images(tmp_path, "x.jpg", "y.jpg")
    with pytest.raises(SourceError) as caught:
        read(csv_path, class_columns=("a", "b"))
    assert "x.csv:3" in str(caught.value) and "'b'" in str(caught.value) and "'yes'" in str(caught.value)
    with pytest.raises(SourceError, match="'nope'"):
        read(csv_path, class_columns=("a", "nope"))
    # Without the named list, "b" is simply not a class column.
    assert read(csv_path).classes == ["a", "c"]


def test_single_label_one_hot(tmp_path: Path) -> None:
    add_images(tmp_path, "x.jpg", "y.jpg", "z.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "image,cat,dog\nx,1,0\ny,0,1\nz,0,0\n")
    result = read(csv_path, task="single")
    assert [(r.id, r.labels) for r in result.records] == [("x", ("cat",)), ("y", ("dog",))]
    assert [(s.source, s.reason) for s in result.skipped] == [("x.csv:4", "empty-label")]
    inferred = write_csv(tmp_path / "y.csv", "image,cat,dog\nx,1,0\ny,0,1\n")
    assert read(inferred).task == "single"


def test_split_column_is_not_a_class(tmp_path: Path) -> None:
    add_images(tmp_path, "x.jpg", "y.jpg")
    csv_path = write_csv(tmp_path / "x.csv", "id,a,b,is_valid\nx,1,1,0\ny,0,1,1\n")
    result = read(csv_path, split_column="is_valid")
    assert result.classes == ["a", "b"]
    assert [(r.id, r.split) for r in result.records] == [("x", "train"), ("y", "val")]


def test_bad_rows_are_skipped(tmp_path: Path) -> None:
    add_images(tmp_path, "x.jpg", "y.jpg", "w.jpg")
    csv_path = write_csv(
        tmp_path / "x.csv",
        "id,a,b\nx,1,0\nx,0,1\ny,1\nw,,1\nz,0,1\n../x,1,1\n",
    )
    result = read(csv_path)
    assert [r.id for r in result.records] == ["x"]
    assert [(s.source, s.reason) for s in result.skipped] == [
        ("x.csv:3", "duplicate-id"),
        ("x.csv:4", "malformed-row"),
        ("x.csv:5", "malformed-row"),
        ("x.csv:6", "missing"),
        ("x.csv:7", "unsafe-path"),
    ]
    assert "'a'" in result.skipped[2].detail


def test_no_zero_one_columns_is_a_source_error(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "x.csv", "id,label\nx,cat\n")
    add_images(tmp_path, "x.jpg")
    with pytest.raises(SourceError, match="0/1"):
        read(csv_path)


def test_binary_label_with_is_valid_column_is_not_one_hot(tmp_path):
    """fastai-style `name,label,is_valid` (both 0/1) is a label CSV with a split column."""
    for i in range(4):
        images.write(tmp_path / f"{i}.jpg", images.jpeg_bytes(seed=i))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("name,label,is_valid\n0.jpg,0,0\n1.jpg,1,0\n2.jpg,0,1\n3.jpg,1,1\n")
    assert not looks_one_hot(str(csv_path))
    result = open_reader(str(csv_path), SourceOptions(split_column="is_valid")).read()
    assert result.task == "single"
    assert sorted((r.id, r.labels, r.split) for r in result.records)[2] == ("2.jpg", ("0",), "val")
