"""``tagmill predict --explain`` and ``tagmill suggest`` through the CLI: heatmap files per
image and class, a labelling CSV that ``tagmill import`` reads back, and unreadable
inputs reported while the rest go on."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests import images
from tests.bundle import multilabel_onnx_bundle
from tests.cli import TINY, run
from tests.conftest import make_colour_classes


@pytest.fixture(scope="module")
def colour_bundle(colour_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real (tiny) single-label model of the three colour classes."""
    root = tmp_path_factory.mktemp("colour-bundle")
    run("train", colour_dataset, "--out", str(root / "run"), *TINY)
    run("export", str(root / "run"), "--out", str(root / "bundle"))
    return str(root / "bundle")


def _unlabelled(root: Path) -> Path:
    """12 unlabelled colour pictures in one flat folder, and two files that are no images."""
    make_colour_classes(root / "classes", 4)
    flat = root / "pool"
    flat.mkdir()
    for path in sorted((root / "classes").rglob("*.png")):
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    images.write(flat / "broken.jpg", images.truncated_jpeg_bytes())
    images.write(flat / "fake.png", b"<html>not a png</html>")
    return flat


def test_predict_explain_writes_an_overlay_per_image_and_reports_the_unreadable(tmp_path: Path) -> None:
    bundle = multilabel_onnx_bundle()  # tags dog and owl on every image
    photos = tmp_path / "photos"
    images.write(photos / "a.jpg", images.jpeg_bytes(80, 50, seed=1))
    images.write(photos / "b.png", images.png_bytes(30, 60, seed=2))
    images.write(photos / "broken.jpg", images.truncated_jpeg_bytes())
    result = run("predict", bundle, str(photos), "--explain", str(tmp_path / "why"), "--backend", "onnx",
                 "--json", str(tmp_path / "p.json"))
    written = sorted(p.name for p in (tmp_path / "why").iterdir())
    assert written == ["00000_a_dog.png", "00000_a_owl.png", "00001_b_dog.png", "00001_b_owl.png"]
    assert Image.open(tmp_path / "why" / "00000_a_dog.png").size == (80, 50)  # over the picture itself
    assert Image.open(tmp_path / "why" / "00001_b_owl.png").size == (30, 60)
    assert "4 heatmaps" in result.output
    assert "not explained:" in result.output and "broken.jpg" in result.output
    assert len(json.loads((tmp_path / "p.json").read_text())) == 3  # predictions as before


def test_suggest_writes_a_csv_that_import_reads_back_with_the_guesses(colour_bundle: str, tmp_path: Path) -> None:
    pool = _unlabelled(tmp_path)
    out = tmp_path / "job" / "to_label.csv"
    result = run("suggest", colour_bundle, str(pool), "--count", "6", "--out", str(out))
    assert "6 of 12 images suggested" in result.output
    assert "skipped:" in result.output and "broken.jpg" in result.output and "fake.png" in result.output
    assert "--single-label" in result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and list(rows[0]) == ["id", "labels", "confidence", "priority", "source"]
    priorities = [float(r["priority"]) for r in rows]
    assert priorities == sorted(priorities, reverse=True)
    for row in rows:
        assert row["id"].startswith("to_label_images/") and (out.parent / row["id"]).is_file()
        assert row["labels"] in {"red", "green", "blue"}
        assert Path(row["source"]).parent == pool
        # the copy is the very file that was ranked
        assert (out.parent / row["id"]).read_bytes() == Path(row["source"]).read_bytes()
    # a person corrects the labels column; here the file names know the truth
    for row in rows:
        row["labels"] = Path(row["source"]).name.split("-")[0]
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run("import", str(out), "--single-label", "--val-fraction", "0", "--out", str(tmp_path / "labelled"))
    manifest = json.loads((tmp_path / "labelled" / "dataset.json").read_text())
    assert sum(split["count"] for split in manifest["splits"].values()) == 6
    assert set(manifest["classes"]) == {row["labels"] for row in rows}


def test_suggest_multi_label_guesses_are_tags_import_reads_back(tmp_path: Path) -> None:
    pool = _unlabelled(tmp_path)
    out = tmp_path / "tags.csv"
    result = run("suggest", multilabel_onnx_bundle(), str(pool), "--count", "3", "--out", str(out))
    assert "--multi-label --tag-sep '|'" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["labels"] for r in rows] == ["dog|owl"] * 3  # the bundle's tags at its thresholds
    run("import", str(out), "--multi-label", "--tag-sep", "|", "--val-fraction", "0", "--out", str(tmp_path / "ds"))
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["task"] == "multi" and manifest["classes"] == ["dog", "owl"]
