"""Metadata filters: class selection, min/max per class, balance, determinism, reports."""

from __future__ import annotations

from collections import Counter

import pytest

from tagmill.dataset.sampling import (
    SamplingReport,
    balance,
    drop_classes,
    drop_untagged,
    keep_classes,
    max_per_class,
    min_per_class,
)
from tagmill.errors import InputError
from tagmill.formats.base import FileImage, SourceRecord


def rec(id: str, *labels: str) -> SourceRecord:
    return SourceRecord(id=id, labels=tuple(labels), image=FileImage(f"{id}.jpg"))


def single(counts: dict[str, int]) -> list[SourceRecord]:
    """Single-label records, classes interleaved so order preservation is visible."""
    out, left = [], dict(counts)
    while any(left.values()):
        for name in counts:
            if left[name]:
                out.append(rec(f"{name}{left[name]}", name))
                left[name] -= 1
    return out


MULTI = [
    rec("m1", "cat", "dog"),
    rec("m2", "cat"),
    rec("m3"),
    rec("m4", "dog", "bird"),
    rec("m5", "fish"),
]


def ids(records: list[SourceRecord]) -> list[str]:
    return [r.id for r in records]


def per_class(records: list[SourceRecord]) -> Counter[str]:
    return Counter(label for r in records for label in r.labels)


def is_subsequence(part: list[SourceRecord], whole: list[SourceRecord]) -> bool:
    it = iter(whole)
    return all(any(p is w for w in it) for p in part)


# ---------------------------------------------------------- keep / drop classes


def test_keep_classes_single_label_drops_other_images():
    data = single({"a": 3, "b": 2, "c": 1})
    out, step = keep_classes(data, ["a", "c"], "single")
    assert per_class(out) == {"a": 3, "c": 1}
    assert is_subsequence(out, data)
    assert step.images_dropped == 2
    assert step.lost_per_class == {"b": 2}
    assert step.classes_removed == ("b",)
    assert step.describe() == "keep-classes: dropped 2 images of 1 class; removed class b"


def test_keep_classes_multi_label_strips_tags_keeps_images():
    out, step = keep_classes(MULTI, ["cat"], "multi")
    assert ids(out) == ids(MULTI)
    assert [r.labels for r in out] == [("cat",), ("cat",), (), (), ()]
    assert step.images_dropped == 0
    assert step.tags_removed == 4
    assert step.classes_removed == ("bird", "dog", "fish")


def test_drop_classes_single_and_multi():
    out, step = drop_classes(single({"a": 3, "b": 2}), ["a"], "single")
    assert per_class(out) == {"b": 2} and step.images_dropped == 3
    out, step = drop_classes(MULTI, ["dog"], "multi")
    assert [r.labels for r in out] == [("cat",), ("cat",), (), ("bird",), ("fish",)]
    assert step.lost_per_class == {"dog": 2} and step.classes_removed == ("dog",)


@pytest.mark.parametrize("fn", [keep_classes, drop_classes])
def test_unknown_class_names_suggest_close_matches(fn):
    with pytest.raises(InputError) as info:
        fn(MULTI, ["Cat", "dgo", "zebra"], "multi")
    msg = info.value.message
    assert "'Cat' (did you mean 'cat'?)" in msg
    assert "'dgo' (did you mean 'dog'?)" in msg
    assert "'zebra'" in msg


def test_classes_without_images_are_known():
    out, step = keep_classes(single({"a": 2}), ["a", "empty"], "single", classes=["a", "empty"])
    assert len(out) == 2 and step.images_dropped == 0


def test_keep_nothing_is_an_error():
    with pytest.raises(InputError):
        keep_classes(MULTI, [], "multi")


def test_drop_untagged():
    out, step = drop_untagged(MULTI)
    assert ids(out) == ["m1", "m2", "m4", "m5"]
    assert step.images_dropped == 1 and step.lost_per_class == {}


# ---------------------------------------------------------------- min / max


def test_min_per_class_single_label():
    data = single({"a": 10, "b": 3, "c": 2, "d": 1})
    out, step = min_per_class(data, 3, "single")
    assert per_class(out) == {"a": 10, "b": 3}
    assert is_subsequence(out, data)
    assert step.images_dropped == 3
    assert step.classes_removed == ("c", "d")
    assert step.describe() == "min-per-class 3: dropped 3 images of 2 classes; removed classes c, d"


def test_min_per_class_multi_label_removes_tags():
    out, step = min_per_class(MULTI, 2, "multi")
    assert ids(out) == ids(MULTI)
    assert per_class(out) == {"cat": 2, "dog": 2}
    assert step.tags_removed == 2 and step.classes_removed == ("bird", "fish")


@pytest.mark.parametrize("n", [0, -1, 2.5, True, "3"])
def test_counts_must_be_positive_integers(n):
    with pytest.raises(InputError):
        min_per_class(MULTI, n, "multi")
    with pytest.raises(InputError):
        max_per_class(MULTI, n, "multi")


def test_max_per_class_single_label():
    data = single({"a": 50, "b": 20, "c": 5})
    out, step = max_per_class(data, 10, "single", seed=1)
    assert per_class(out) == {"a": 10, "b": 10, "c": 5}
    assert is_subsequence(out, data)
    assert step.images_dropped == 50
    assert step.lost_per_class == {"a": 40, "b": 10}
    assert step.classes_removed == ()


def test_max_per_class_is_deterministic_and_seed_dependent():
    data = single({"a": 100, "b": 100})
    first, _ = max_per_class(data, 10, "single", seed=7)
    again, _ = max_per_class(list(data), 10, "single", seed=7)
    other, _ = max_per_class(data, 10, "single", seed=8)
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_max_per_class_sample_of_a_class_ignores_other_classes():
    """Adding a class must not reshuffle the sample of the others."""
    with_b = single({"a": 40, "b": 40})
    without_b = [r for r in with_b if r.labels == ("a",)]
    a1 = ids(max_per_class(with_b, 5, "single", seed=3)[0])
    a2 = ids(max_per_class(without_b, 5, "single", seed=3)[0])
    assert [i for i in a1 if i.startswith("a")] == a2


def test_max_per_class_multi_label_greedy():
    tags = ["common", "mid", "rare"]
    data = []
    for i in range(120):
        labels = ["common"] + (["mid"] if i % 4 == 0 else []) + (["rare"] if i % 20 == 0 else [])
        data.append(rec(f"r{i}", *labels))
    data += [rec(f"u{i}") for i in range(5)]
    out, step = max_per_class(data, 10, "multi", seed=0)
    counts = per_class(out)
    assert counts["rare"] == 6  # every image of a tag under the cap is kept
    assert counts["mid"] >= 10  # at least the cap when the tag has enough
    assert counts["common"] < 120
    assert sum(1 for r in out if not r.labels) == 5  # untagged images count toward no tag
    assert is_subsequence(out, data)
    assert step.images_dropped == len(data) - len(out)
    again, _ = max_per_class(data, 10, "multi", seed=0)
    other, _ = max_per_class(data, 10, "multi", seed=1)
    assert ids(again) == ids(out) and ids(other) != ids(out)
    assert set(tags) == set(counts)


# ------------------------------------------------------------------- balance


def test_balance_undersamples_to_rarest_class():
    data = single({"a": 30, "b": 12, "c": 7})
    out, step = balance(data, "single", seed=0)
    assert per_class(out) == {"a": 7, "b": 7, "c": 7}
    assert is_subsequence(out, data)
    assert step.step == "balance" and step.images_dropped == 28
    assert ids(balance(data, "single", seed=0)[0]) == ids(out)
    assert ids(balance(data, "single", seed=5)[0]) != ids(out)


def test_balance_empty_dataset():
    out, step = balance([], "single")
    assert out == [] and step.images_dropped == 0


def test_balance_refuses_multi_label():
    with pytest.raises(InputError, match="--balance applies to single-label datasets; use --max-per-class"):
        balance(MULTI, "multi")


def test_unknown_task():
    with pytest.raises(InputError):
        min_per_class(MULTI, 1, "both")  # type: ignore[arg-type]


# -------------------------------------------------------------------- report


def test_report_accumulates_steps():
    report = SamplingReport()
    data = single({"a": 20, "b": 5, "c": 1})
    data = report.add(min_per_class(data, 2, "single"))
    data = report.add(max_per_class(data, 10, "single", seed=0))
    assert per_class(data) == {"a": 10, "b": 5}
    assert report.images_dropped == 11
    assert report.describe() == [
        "min-per-class 2: dropped 1 image of 1 class; removed class c",
        "max-per-class 10: dropped 10 images of 1 class",
    ]
    as_dict = report.as_dict()
    assert as_dict["images_dropped"] == 11
    assert as_dict["steps"][1] == {
        "step": "max-per-class 10",
        "images_dropped": 10,
        "lost_per_class": {"a": 10},
        "classes_removed": [],
        "tags_removed": 0,
    }


def test_nothing_dropped_description():
    _, step = min_per_class(single({"a": 3}), 1, "single")
    assert step.describe() == "min-per-class 1: nothing dropped"
