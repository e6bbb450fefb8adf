"""--drop-ids / --relabel: parsing the files tagmill doctor writes, and applying them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagmill.dataset.edits import (
    apply_edits,
    describe_edits,
    parse_drop_ids,
    parse_relabel,
    read_drop_ids,
    read_relabel,
)
from tagmill.errors import InputError, StorageError
from tagmill.formats.base import FileImage, SourceRecord


def rec(id: str, *labels: str, split: str | None = None) -> SourceRecord:
    return SourceRecord(id=id, labels=tuple(labels), image=FileImage(f"/img/{id}.jpg"), split=split)


SINGLE = [rec("cat/1.jpg", "cat"), rec("cat/2.jpg", "cat"), rec("dog/1.jpg", "dog"), rec("val/dog/2.jpg", "dog", split="val")]
MULTI = [rec("a", "sky", "sea"), rec("b", "sea"), rec("c"), rec("d", "Science Fiction")]


# ------------------------------------------------------------------ drop file


def test_plain_text_ids_ignore_blank_lines_comments_and_outer_spaces() -> None:
    text = "# from tagmill doctor\ncat/1.jpg\n\n  dog/1.jpg  \r\n#dog/9.jpg\nval/dog/2.jpg\ncat/1.jpg\n"
    assert parse_drop_ids(text, "drop.txt") == {"cat/1.jpg", "dog/1.jpg", "val/dog/2.jpg"}


def test_a_text_line_with_a_comma_is_an_id_when_no_id_column_is_named() -> None:
    assert parse_drop_ids("a,b.jpg\nc.jpg\n", "drop.txt") == {"a,b.jpg", "c.jpg"}


def test_doctor_label_issues_csv_uses_its_id_column() -> None:
    text = (
        "id,split,given,suggested,confidence\n"
        'cat/1.jpg,train,cat,dog,0.91\n'
        '"val/dog/2.jpg",val,dog,cat,0.80\n'
        "\n"
        ",train,cat,dog,0.5\n"  # an empty id is ignored, not an id ""
    )
    assert parse_drop_ids(text, "label_issues.csv") == {"cat/1.jpg", "val/dog/2.jpg"}


def test_id_column_need_not_be_first_and_ids_may_hold_commas() -> None:
    text = 'score,ID\n0.9,"odd, name.jpg"\n0.8,dog/1.jpg\n'
    assert parse_drop_ids(text, "outliers.csv") == {"odd, name.jpg", "dog/1.jpg"}


def test_doctor_duplicates_csv_drops_the_second_of_each_pair() -> None:
    text = (
        "id_a,split_a,id_b,split_b,kind,similarity\n"
        "cat/1.jpg,train,cat/2.jpg,train,duplicate,0.998\n"
        "dog/1.jpg,train,val/dog/2.jpg,val,leak,0.991\n"
    )
    assert parse_drop_ids(text, "duplicates.csv") == {"cat/2.jpg", "val/dog/2.jpg"}


def test_a_drop_csv_row_too_short_for_its_id_column_names_the_line() -> None:
    text = "split,kind,id\ntrain,dup,cat/1.jpg\ntrain,dup\n"
    with pytest.raises(InputError) as info:
        parse_drop_ids(text, "drop.csv")
    assert "drop.csv: line 3" in info.value.message and info.value.hint


def test_drop_file_is_read_through_storage_and_must_be_text(tmp_path: Path) -> None:
    path = tmp_path / "drop.txt"
    path.write_bytes("\ufeffcat/1.jpg\ndog/1.jpg\n".encode())  # a byte-order mark is not part of the first id
    assert read_drop_ids(str(path)) == {"cat/1.jpg", "dog/1.jpg"}
    binary = tmp_path / "drop.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(InputError, match="drop.bin is not UTF-8 text"):
        read_drop_ids(str(binary))
    with pytest.raises(StorageError, match="not found"):
        read_drop_ids(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------- relabel file


def test_single_label_relabel_takes_one_class_per_id() -> None:
    text = 'labels,id\ndog,cat/1.jpg\n"Washington, D.C.",dog/1.jpg\n'
    assert parse_relabel(text, "fix.csv", "single") == {"cat/1.jpg": ("dog",), "dog/1.jpg": ("Washington, D.C.",)}


def test_single_label_relabel_refuses_an_empty_class_naming_the_line() -> None:
    with pytest.raises(InputError) as info:
        parse_relabel("id,labels\ncat/1.jpg,dog\ncat/2.jpg,  \n", "fix.csv", "single")
    assert "fix.csv: line 3" in info.value.message and "'cat/2.jpg'" in info.value.message


def test_multi_label_cells_split_like_a_tags_csv_and_empty_means_no_tag() -> None:
    text = 'id,labels\na,"sky, Science Fiction"\nb,\nc,sea\nd,"[\'sky\', \'sea\']"\n'
    assert parse_relabel(text, "fix.csv", "multi") == {
        "a": ("sky", "Science Fiction"),
        "b": (),
        "c": ("sea",),
        "d": ("sky", "sea"),
    }
    assert parse_relabel("id,labels\na,sky|sea\nb,sea\n", "fix.csv", "multi") == {"a": ("sky", "sea"), "b": ("sea",)}


def test_multi_label_tags_of_several_words_are_never_split_on_spaces() -> None:
    # the doctor's relabel_suggested.csv: one tag per cell here, joined by | when several
    text = "id,labels\na,Science Fiction\nb,Drama\n"
    assert parse_relabel(text, "fix.csv", "multi") == {"a": ("Science Fiction",), "b": ("Drama",)}
    text = "id,labels\na,Science Fiction|Drama\nb,Drama\n"
    assert parse_relabel(text, "fix.csv", "multi") == {"a": ("Science Fiction", "Drama"), "b": ("Drama",)}


def test_relabel_without_its_columns_says_what_it_found() -> None:
    with pytest.raises(InputError) as info:
        parse_relabel("id,given,suggested\ncat/1.jpg,cat,dog\n", "label_issues.csv", "single")
    assert "label_issues.csv: line 1: no 'labels' column" in info.value.message
    assert "'suggested'" in info.value.message and "'labels'" in (info.value.hint or "")
    with pytest.raises(InputError, match="no 'id' or 'labels' column"):
        parse_relabel("", "empty.csv", "multi")


def test_relabel_rows_short_empty_ids_and_contradictions_name_their_line() -> None:
    with pytest.raises(InputError, match="fix.csv: line 2: 1 field"):
        parse_relabel("id,labels\ncat/1.jpg\n", "fix.csv", "single")
    with pytest.raises(InputError, match="fix.csv: line 3: empty id"):
        parse_relabel("id,labels\ncat/1.jpg,dog\n,cat\n", "fix.csv", "single")
    with pytest.raises(InputError, match="line 3: 'a' is relabelled differently on line 2"):
        parse_relabel("id,labels\na,sky\na,sea\n", "fix.csv", "multi")
    # the same labels twice is no contradiction
    assert parse_relabel("id,labels\na,sky\na,sky\n", "fix.csv", "multi") == {"a": ("sky",)}


def test_relabel_file_with_a_broken_quote_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "fix.csv"
    path.write_text('id,labels\na,"sky\n', encoding="utf-8")
    with pytest.raises(InputError, match="fix.csv: line 2: not a readable CSV"):
        read_relabel(str(path), "multi")


# -------------------------------------------------------------------- applying


def test_drop_removes_listed_records_keeps_order_and_reports_unknown_ids() -> None:
    edited = apply_edits(SINGLE, ["cat", "dog"], drop_ids={"cat/2.jpg", "val/dog/2.jpg", "gone.jpg", "dog/2.jpg"},
                         drop_file="drop.txt")
    assert [r.id for r in edited.records] == ["cat/1.jpg", "dog/1.jpg"]
    assert edited.report == {"drop_ids": {"file": "drop.txt", "listed": 4, "dropped": 2, "unknown": 2}}
    assert len(edited.skipped) == 1
    skip = edited.skipped[0]
    assert (skip.source, skip.reason) == ("drop.txt", "unknown-id")
    assert skip.detail == "2 ids not in the source, e.g. dog/2.jpg, gone.jpg"  # the unprefixed id is not the val one
    assert edited.classes == ["cat", "dog"]


def test_a_drop_file_matching_no_record_is_an_error() -> None:
    with pytest.raises(InputError) as info:
        apply_edits(SINGLE, ["cat", "dog"], drop_ids={"1.jpg", "2.jpg"}, drop_file="other.txt")
    assert "--drop-ids other.txt lists 2 id(s), none of them in the source" in info.value.message
    assert "cat/1.jpg" in (info.value.hint or "")
    with pytest.raises(InputError, match="--drop-ids empty.txt lists no id"):
        apply_edits(SINGLE, ["cat", "dog"], drop_ids=set(), drop_file="empty.txt")


def test_a_relabel_file_matching_no_record_is_an_error() -> None:
    with pytest.raises(InputError, match="--relabel fix.csv lists 1 id"):
        apply_edits(SINGLE, ["cat", "dog"], relabel={"dog/2.jpg": ("cat",)}, relabel_file="fix.csv")


def test_relabel_replaces_labels_and_counts_unchanged_and_unknown() -> None:
    edited = apply_edits(
        SINGLE, ["cat", "dog"],
        relabel={"cat/2.jpg": ("dog",), "dog/1.jpg": ("dog",), "val/dog/2.jpg": ("cat",), "x.jpg": ("cat",)},
        relabel_file="fix.csv",
    )
    assert [(r.id, r.labels, r.split) for r in edited.records] == [
        ("cat/1.jpg", ("cat",), None),
        ("cat/2.jpg", ("dog",), None),
        ("dog/1.jpg", ("dog",), None),
        ("val/dog/2.jpg", ("cat",), "val"),  # the split survives a relabel
    ]
    assert edited.report == {"relabel": {
        "file": "fix.csv", "listed": 4, "relabelled": 2, "unchanged": 1, "unknown": 1, "dropped_instead": 0,
    }}
    assert [s.detail for s in edited.skipped] == ["1 ids not in the source, e.g. x.jpg"]


def test_an_id_in_both_files_is_dropped_and_the_report_says_so() -> None:
    edited = apply_edits(
        SINGLE, ["cat", "dog"],
        drop_ids={"cat/1.jpg"}, drop_file="drop.txt",
        relabel={"cat/1.jpg": ("dog",), "cat/2.jpg": ("dog",)}, relabel_file="fix.csv",
    )
    assert [(r.id, r.labels) for r in edited.records] == [
        ("cat/2.jpg", ("dog",)), ("dog/1.jpg", ("dog",)), ("val/dog/2.jpg", ("dog",)),
    ]
    assert edited.report["drop_ids"]["dropped"] == 1
    assert edited.report["relabel"] == {
        "file": "fix.csv", "listed": 2, "relabelled": 1, "unchanged": 0, "unknown": 0, "dropped_instead": 1,
    }
    assert edited.skipped == []
    lines = describe_edits(edited.report)
    assert lines == [
        "dropped 1 image listed in drop.txt",
        "relabelled 1 image from fix.csv (1 dropped instead (listed in both files))",
    ]


def test_multi_label_relabel_can_untag_and_ignores_tag_order() -> None:
    edited = apply_edits(
        MULTI, ["Science Fiction", "sea", "sky"],
        relabel={"a": ("sea", "sky"), "b": (), "c": ("sky",)}, relabel_file="fix.csv",
    )
    assert [r.labels for r in edited.records] == [("sky", "sea"), (), ("sky",), ("Science Fiction",)]
    assert edited.report["relabel"]["relabelled"] == 2 and edited.report["relabel"]["unchanged"] == 1


def test_a_new_class_is_sorted_into_a_sorted_class_list() -> None:
    edited = apply_edits(SINGLE, ["cat", "dog"], relabel={"cat/1.jpg": ("bird",), "dog/1.jpg": ("eel",)},
                         relabel_file="fix.csv")
    assert edited.classes == ["bird", "cat", "dog", "eel"]


def test_a_new_class_goes_last_when_the_order_means_something() -> None:
    derived = [rec("1", "other"), rec("2", "thriller")]
    # the importer asks for this after --derive: "other" stays class 0, "thriller" class 1
    edited = apply_edits(derived, ["other", "thriller"], relabel={"1": ("maybe",)}, relabel_file="f.csv", sort_classes=False)
    assert edited.classes == ["other", "thriller", "maybe"]
    # a source order that is not sorted (class indices of a .lst) is kept too
    lst = [rec("1", "zebra"), rec("2", "ant")]
    assert apply_edits(lst, ["zebra", "ant"], relabel={"2": ("bee",)}, relabel_file="f.csv").classes == ["zebra", "ant", "bee"]


def test_describe_edits_mentions_unknown_and_unchanged() -> None:
    report = {
        "drop_ids": {"file": "d.csv", "listed": 5, "dropped": 3, "unknown": 2},
        "relabel": {"file": "r.csv", "listed": 4, "relabelled": 2, "unchanged": 1, "unknown": 1, "dropped_instead": 0},
    }
    assert describe_edits(report) == [
        "dropped 3 images listed in d.csv (2 listed ids not in the source)",
        "relabelled 2 images from r.csv (1 already so labelled; 1 listed ids not in the source)",
    ]
    assert describe_edits({}) == []
