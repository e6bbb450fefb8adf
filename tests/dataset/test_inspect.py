"""tagmill inspect: summary numbers, the rendered view, and contact sheets."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from tagmill.dataset.contact_sheet import caption_height, contact_sheet, fit_text, parse_grid, reservoir
from tagmill.dataset.summary import cooccurrence, summarize
from tagmill.dataset.summary_console import render_summary
from tagmill.dataset.manifest import Manifest, SplitInfo, write_manifest
from tagmill.dataset.shards import Sample, ShardWriter
from tests import images

# ----------------------------------------------------------------- building datasets


def build_dataset(
    root: Path,
    task: str,
    classes: list[str],
    splits: dict[str, list[list[str]]],
    *,
    report: dict | None = None,
    max_bytes: int = 1 << 30,
) -> str:
    """Write real shards + manifest; ``splits`` maps split -> one label list per sample."""
    infos = {}
    for split, label_lists in splits.items():
        writer = ShardWriter(str(root), split, max_bytes)
        counts: Counter[str] = Counter()
        for index, labels in enumerate(label_lists):
            # varied shapes and both formats, so tiles exercise letterboxing both ways
            width, height = (48, 32) if index % 2 else (30, 60)
            data = images.jpeg_bytes(width, height, seed=index) if index % 3 else images.png_bytes(width, height, seed=index)
            ext = "jpg" if index % 3 else "png"
            meta = {"id": f"{split}{index}", "labels": labels, "source": f"img{index}.{ext}"}
            writer.write(Sample(f"{split}-{index:07d}", data, ext, meta))
            counts.update(labels)
        untagged = sum(1 for labels in label_lists if not labels) if task == "multi" else 0
        infos[split] = SplitInfo(len(label_lists), {c: counts.get(c, 0) for c in classes}, writer.close(), untagged)
    manifest = Manifest(
        task=task,
        classes=classes,
        splits=infos,
        image={"max_side": 320, "resize": "shorter-side"},
        source={"location": "/data/pets", "format": "folder", "val_source": None},
        report=report if report is not None else {},
    )
    write_manifest(str(root), manifest)
    return str(root)


SKIP_REPORT = {
    "inputs": 2210,
    "skipped_count": 12,
    "skipped_by_reason": {"unreadable": 9, "missing": 3},
    "skipped": [],
}


@pytest.fixture
def single(tmp_path: Path) -> str:
    train = [["cat"]] * 6 + [["dog"]] * 3 + [["bird"]] * 2
    val = [["cat"], ["cat"], ["dog"], ["bird"]]
    return build_dataset(tmp_path / "single", "single", ["bird", "cat", "dog"], {"train": train, "val": val}, report=SKIP_REPORT)


# hand-made so the pairs are known: (a,b) 3, (b,c) 2, (a,c) 1; a=4, b=4, c=2 positives
MULTI_TRAIN = [["a", "b"], ["b", "a"], ["a", "b", "c"], ["c", "b"], ["a"], [], []]


@pytest.fixture
def multi(tmp_path: Path) -> str:
    val = [["a"], [], ["b", "c"]]
    # tiny shards: co-occurrence must be counted across shard boundaries
    return build_dataset(tmp_path / "multi", "multi", ["a", "b", "c"], {"train": MULTI_TRAIN, "val": val}, max_bytes=2000)


# ----------------------------------------------------------------------- summarize


def test_summarize_single_label_counts_and_imbalance(single: str) -> None:
    summary = summarize(single)
    assert summary.task == "single"
    assert summary.classes == ["bird", "cat", "dog"]
    assert summary.split_counts == {"train": 11, "val": 4}
    assert summary.class_counts["train"] == {"bird": 2, "cat": 6, "dog": 3}
    assert summary.class_counts["val"] == {"bird": 1, "cat": 2, "dog": 1}
    assert summary.imbalance == pytest.approx(3.0)
    assert summary.largest_class == ("cat", 6) and summary.smallest_class == ("bird", 2)
    assert summary.cooccurrence == []
    assert (summary.inputs, summary.skipped_count) == (2210, 12)
    assert summary.skipped_by_reason == {"unreadable": 9, "missing": 3}
    assert summary.image["max_side"] == 320 and summary.source["format"] == "folder"


def test_summarize_multi_label_cooccurrence_across_shards(multi: str) -> None:
    summary = summarize(multi)
    assert summary.class_counts["train"] == {"a": 4, "b": 4, "c": 2}
    assert summary.untagged == {"train": 2, "val": 1}
    assert summary.imbalance == pytest.approx(2.0)
    assert summary.cooccurrence == [("a", "b", 3), ("b", "c", 2), ("a", "c", 1)]
    assert summary.inputs is None  # no import report in this manifest
    assert summarize(multi, top_pairs=1).cooccurrence == [("a", "b", 3)]


def test_imbalance_is_infinite_when_a_training_class_is_empty(tmp_path: Path) -> None:
    ds = build_dataset(tmp_path, "multi", ["a", "b"], {"train": [["a"], ["a"]], "val": [["b"]]})
    summary = summarize(ds)
    assert math.isinf(summary.imbalance)
    assert summary.smallest_class == ("b", 0)
    console = Console(record=True, width=300)
    render_summary(summary, console)
    assert "∞" in console.export_text()


def test_cooccurrence_orders_pairs_by_class_and_ignores_duplicates() -> None:
    labels = [["z", "y", "y"], ["y", "z"], ["x", "z"]]
    assert cooccurrence(labels, ["x", "y", "z"]) == [("y", "z", 2), ("x", "z", 1)]


def test_missing_manifest_is_a_dataset_error(tmp_path: Path) -> None:
    from tagmill.errors import DatasetError

    with pytest.raises(DatasetError, match="dataset.json"):
        summarize(str(tmp_path))
    with pytest.raises(DatasetError, match="dataset.json"):
        contact_sheet(str(tmp_path), str(tmp_path / "sheet.png"))


# -------------------------------------------------------------------------- render


def rendered(summary) -> str:
    console = Console(record=True, width=300)
    render_summary(summary, console)
    return console.export_text()


def test_render_single_label(single: str) -> None:
    text = rendered(summarize(single))
    assert "single-label, 3 classes, 15 images (train 11, val 4)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()}
    assert rows["cat"] == ["6", "2", "8"]
    assert rows["bird"] == ["2", "1", "3"]
    assert "3.0×" in text
    assert "skipped 12 of 2,210 inputs: 9 unreadable, 3 missing — see dataset.json report" in text
    assert "320 px" in text and "/data/pets (folder)" in text


def test_render_multi_label_shows_untagged_and_pairs(multi: str) -> None:
    text = rendered(summarize(multi))
    assert "multi-label, 3 tags" in text
    assert "(no tags)" in text
    pair_lines = [line.split() for line in text.splitlines() if line.split()[:2] in (["a", "b"], ["b", "c"])]
    assert ["a", "b", "3"] in pair_lines and ["b", "c", "2"] in pair_lines
    assert "import report: none" in text


def test_render_hides_classes_beyond_forty(tmp_path: Path) -> None:
    classes = [f"c{i:02d}" for i in range(45)]
    # c44 gets the most images, c00..c04 one each: those five are the hidden ones
    train = [[c] for i, c in enumerate(classes) for _ in range(1 if i < 5 else 2 + (i == 44) * 3)]
    ds = build_dataset(tmp_path, "single", classes, {"train": train})
    text = rendered(summarize(ds))
    names = {line.split()[0] for line in text.splitlines() if line.split()}
    assert "c44" in names and "c05" in names and "c00" not in names
    assert "and 5 classes with fewer images, not shown" in text


# ------------------------------------------------------------------- contact sheet


def test_parse_grid() -> None:
    from tagmill.errors import InputError

    assert parse_grid("4x3") == (4, 3)
    assert parse_grid(" 2 X 5 ") == (2, 5)
    for bad in ("4x", "0x3", "axb", "", "4x3x2", "-1x2", "100x100"):
        with pytest.raises(InputError):
            parse_grid(bad)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_contact_sheet_size_and_determinism(multi: str, tmp_path: Path) -> None:
    out = tmp_path / "out" / "sheet.png"
    assert contact_sheet(multi, str(out), grid=(3, 2), seed=1, tile=64) == 6
    assert png_size(out) == (3 * 64, 2 * (64 + caption_height(64)))
    first = out.read_bytes()
    contact_sheet(multi, str(out), grid=(3, 2), seed=1, tile=64)
    assert out.read_bytes() == first
    contact_sheet(multi, str(out), grid=(3, 2), seed=2, tile=64)
    assert out.read_bytes() != first
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]  # atomic: no temp file left


def test_contact_sheet_with_fewer_samples_than_tiles(single: str, tmp_path: Path) -> None:
    out = tmp_path / "val.png"
    assert contact_sheet(single, str(out), grid=(3, 3), split="val", tile=64) == 4
    assert png_size(out) == (3 * 64, 2 * (64 + caption_height(64)))  # only the rows in use


def test_contact_sheet_errors(single: str, tmp_path: Path) -> None:
    from tagmill.errors import DatasetError, InputError

    with pytest.raises(DatasetError, match="test"):
        contact_sheet(single, str(tmp_path / "x.png"), split="test")
    with pytest.raises(InputError):
        contact_sheet(single, str(tmp_path / "x.png"), grid=(0, 2))
    with pytest.raises(InputError):
        contact_sheet(single, str(tmp_path / "x.png"), tile=4)
    assert not (tmp_path / "x.png").exists()


def test_reservoir_is_uniform_enough_and_keeps_stream_order() -> None:
    hits: Counter[int] = Counter()
    for seed in range(400):
        picked = reservoir(range(20), 5, seed)  # type: ignore[arg-type]
        assert picked == sorted(picked) and len(set(picked)) == 5
        hits.update(picked)
    # each of 20 items is expected 100 times out of 400 draws of 5
    assert min(hits.values()) > 60 and max(hits.values()) < 140
    assert reservoir(range(3), 5, 0) == [0, 1, 2]  # type: ignore[arg-type]


def test_fit_text_truncates_with_ellipsis() -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=14)
    assert fit_text("cat", font, 100) == "cat"
    cut = fit_text("outdoor, sunny, beach, people, dog, umbrella", font, 100)
    assert cut.endswith("…") and not cut.endswith(", …") and font.getlength(cut) <= 100


def test_caption_text(multi: str) -> None:
    from tagmill.dataset.contact_sheet import caption

    assert caption([], "multi") == "(no tags)"
    assert caption(["a", "b"], "multi") == "a, b"
    assert caption(["cat"], "single") == "cat"
