"""Train/val/test assignment: stratification, minimums, explicit splits, multi-label."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from tagmill.dataset.splits import assign_splits, split_sizes
from tagmill.errors import InputError
from tagmill.formats.base import FileImage, SourceRecord


def rec(id: str, *labels: str, split: str | None = None) -> SourceRecord:
    return SourceRecord(id=id, labels=tuple(labels), image=FileImage(f"{id}.jpg"), split=split)


def single(counts: dict[str, int]) -> list[SourceRecord]:
    return [rec(f"{name}-{i}", name) for name, n in counts.items() for i in range(n)]


def per_class(records: list[SourceRecord]) -> Counter[str]:
    return Counter(label for r in records for label in r.labels)


def ids(split: dict[str, list[SourceRecord]]) -> dict[str, list[str]]:
    return {name: [r.id for r in records] for name, records in split.items()}


def in_input_order(part: list[SourceRecord], whole: list[SourceRecord]) -> bool:
    position = {id(r): i for i, r in enumerate(whole)}
    places = [position[id(r)] for r in part]
    return places == sorted(places)


def check_partition(out: dict[str, list[SourceRecord]], data: list[SourceRecord]) -> None:
    assert set(out) == {"train", "val", "test"}
    assert sorted(r.id for part in out.values() for r in part) == sorted(r.id for r in data)
    for part in out.values():
        assert in_input_order(part, data)


# -------------------------------------------------------------- single-label


def test_single_label_is_stratified_per_class():
    counts = {"a": 100, "b": 40, "c": 10}
    data = single(counts)
    random.Random(0).shuffle(data)
    out = assign_splits(data, "single", list(counts), val_fraction=0.2, test_fraction=0.1, seed=1)
    check_partition(out, data)
    for name, n in counts.items():
        assert per_class(out["val"])[name] == math.floor(n * 0.2 + 0.5)
        assert per_class(out["test"])[name] == math.floor(n * 0.1 + 0.5)


def test_every_class_with_two_images_gets_one_val_image_and_keeps_one_train():
    counts = {"big": 50, "two": 2, "three": 3, "one": 1}
    out = assign_splits(single(counts), "single", list(counts), val_fraction=0.05)
    val, train = per_class(out["val"]), per_class(out["train"])
    assert val["two"] == 1 and train["two"] == 1
    assert val["three"] == 1 and train["three"] == 2
    assert val["big"] == 3  # round(2.5) is 3, not banker's 2
    assert val["one"] == 0 and train["one"] == 1
    assert out["test"] == []


def test_tiny_classes_keep_a_training_image_before_val_and_test():
    assert split_sizes(1, 0.5, 0.4) == (0, 0)
    assert split_sizes(2, 0.5, 0.4) == (1, 0)
    assert split_sizes(3, 0.5, 0.4) == (1, 1)
    assert split_sizes(2, 0.0, 0.3) == (0, 1)
    assert split_sizes(100, 0.1, 0.2) == (10, 20)


def test_val_fraction_zero_gives_empty_val():
    out = assign_splits(single({"a": 10, "b": 10}), "single", ["a", "b"], val_fraction=0.0)
    assert out["val"] == [] and out["test"] == [] and len(out["train"]) == 20


def test_explicit_splits_are_honoured_and_excluded():
    data = single({"a": 10}) + [
        rec("fixed-val", "a", split="val"),
        rec("fixed-test", "b", split="test"),
        rec("fixed-train", "b", split="train"),
    ]
    out = assign_splits(data, "single", ["a", "b"], val_fraction=0.2, seed=3)
    check_partition(out, data)
    assert "fixed-val" in ids(out)["val"]
    assert ids(out)["test"] == ["fixed-test"]
    assert "fixed-train" in ids(out)["train"]
    # the fraction applies to the 10 records without an explicit split
    assert len(out["val"]) == 1 + 2


def test_only_explicit_splits():
    data = [rec("t", "a", split="train"), rec("v", "a", split="val")]
    assert ids(assign_splits(data, "single", ["a"], val_fraction=0.5)) == {
        "train": ["t"], "val": ["v"], "test": []
    }


def test_unknown_explicit_split_is_an_error():
    with pytest.raises(InputError, match="'holdout'"):
        assign_splits([rec("x", "a", split="holdout")], "single", ["a"], val_fraction=0.1)


def test_same_seed_same_split_other_seed_differs():
    data = single({"a": 60, "b": 60})
    first = ids(assign_splits(data, "single", ["a", "b"], 0.2, 0.1, seed=11))
    again = ids(assign_splits(list(data), "single", ["a", "b"], 0.2, 0.1, seed=11))
    other = ids(assign_splits(data, "single", ["a", "b"], 0.2, 0.1, seed=12))
    assert first == again
    assert first["val"] != other["val"]


@pytest.mark.parametrize(
    "val, test",
    [(-0.1, 0.0), (0.0, -0.1), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.7, 0.4), (float("nan"), 0.0)],
)
def test_bad_fractions(val: float, test: float):
    with pytest.raises(InputError, match="fractions"):
        assign_splits(single({"a": 5}), "single", ["a"], val_fraction=val, test_fraction=test)


def test_empty_input():
    assert assign_splits([], "multi", [], 0.2, 0.1) == {"train": [], "val": [], "test": []}


# --------------------------------------------------------------- multi-label

TAGS = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"]
PROBABILITY = [0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.015, 0.0]  # t7 is forced onto 2 records


def multi_dataset(n: int = 200, seed: int = 0) -> list[SourceRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        labels = [t for t, p in zip(TAGS, PROBABILITY) if rng.random() < p]
        if i in (17, 140):
            labels.append("t7")
        out.append(rec(f"r{i}", *labels))
    return out


@pytest.fixture(scope="module")
def multi() -> list[SourceRecord]:
    return multi_dataset()


@pytest.fixture(scope="module")
def multi_split(multi) -> dict[str, list[SourceRecord]]:
    return assign_splits(multi, "multi", TAGS, val_fraction=0.2, seed=0)


def test_multi_label_dataset_shape(multi):
    counts = per_class(multi)
    assert counts["t7"] == 2
    assert min(counts.values()) == 2 and max(counts.values()) > 80
    assert any(not r.labels for r in multi)  # untagged rows take part


def test_multi_label_every_tag_with_two_images_in_train_and_val(multi, multi_split):
    check_partition(multi_split, multi)
    train, val = per_class(multi_split["train"]), per_class(multi_split["val"])
    for tag, n in per_class(multi).items():
        if n >= 2:
            assert train[tag] >= 1 and val[tag] >= 1, (tag, n, train[tag], val[tag])


def test_multi_label_sizes_and_proportions(multi, multi_split):
    assert abs(len(multi_split["val"]) - 40) <= 2
    assert multi_split["test"] == []
    total, val = per_class(multi), per_class(multi_split["val"])
    for tag in ("t0", "t1", "t2"):
        assert abs(val[tag] / total[tag] - 0.2) < 0.06


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_multi_label_rare_tags_across_seeds_with_test(seed: int):
    data = multi_dataset(seed=seed)
    out = assign_splits(data, "multi", TAGS, val_fraction=0.15, test_fraction=0.15, seed=seed)
    check_partition(out, data)
    train, held = per_class(out["train"]), per_class(out["val"] + out["test"])
    for tag, n in per_class(data).items():
        assert train[tag] >= 1
        if n >= 2:
            assert held[tag] >= 1
        if n >= 3:
            assert per_class(out["val"])[tag] + per_class(out["test"])[tag] >= 1
    assert abs(len(out["test"]) - 30) <= 3
    assert abs(len(out["val"]) - 30) <= 3  # a fraction of the whole, not of the rest


def test_multi_label_reproducible(multi, multi_split):
    again = assign_splits(list(multi), "multi", TAGS, val_fraction=0.2, seed=0)
    other = assign_splits(multi, "multi", TAGS, val_fraction=0.2, seed=5)
    assert ids(again) == ids(multi_split)
    assert ids(other)["val"] != ids(multi_split)["val"]


def test_multi_label_all_untagged_and_single_tag():
    untagged = [rec(f"u{i}") for i in range(20)]
    out = assign_splits(untagged, "multi", [], val_fraction=0.25)
    assert len(out["val"]) == 5 and len(out["train"]) == 15
    one_tag = [rec(f"x{i}", *(["a"] if i % 3 == 0 else [])) for i in range(30)]
    out = assign_splits(one_tag, "multi", ["a"], val_fraction=0.2)
    assert per_class(out["val"])["a"] >= 1 and per_class(out["train"])["a"] >= 1


def test_multi_label_explicit_splits(multi):
    data = [rec("fixed", "t0", split="val")] + multi[:50]
    out = assign_splits(data, "multi", TAGS, val_fraction=0.2, seed=0)
    check_partition(out, data)
    assert ids(out)["val"][0] == "fixed"


def test_multi_label_tiny_pool():
    assert ids(assign_splits([rec("a", "x")], "multi", ["x"], 0.5)) == {"train": ["a"], "val": [], "test": []}
    out = assign_splits([rec("a", "x"), rec("b", "x")], "multi", ["x"], 0.1)
    assert len(out["val"]) == 1 and len(out["train"]) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_label_one_image_tags_stay_in_train(seed: int):
    """A tag with a single image cannot be in both splits; training wins."""
    data = [rec(f"s{i}", "common", f"solo{i}") for i in range(10)]
    data += [rec(f"c{i}", *(["common"] if i % 2 else [])) for i in range(30)]
    # a held-out share above 1/2 makes the stratifier itself hold single images out
    out = assign_splits(data, "multi", [], val_fraction=0.6, test_fraction=0.1, seed=seed)
    check_partition(out, data)
    train = per_class(out["train"])
    assert all(train[f"solo{i}"] == 1 for i in range(10))
    assert per_class(out["val"])["common"] >= 1 and per_class(out["test"])["common"] >= 1
    assert len(out["val"]) == 24 and len(out["test"]) == 4  # swaps keep the sizes
