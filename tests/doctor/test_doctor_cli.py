"""`tagmill doctor` end to end on real photos with planted faults: it finds them, the
files it writes say so, and `tagmill import --drop-ids/--relabel` can act on them."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tagmill.cli import app
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.dataset.manifest import load_manifest, write_manifest
from tagmill.dataset.shards import iter_shard
from tagmill.errors import DatasetError, EmptyDatasetError

runner = CliRunner()
PHOTOS = ("coffee", "rocket", "astronaut")  # three real photos: each class is crops of one


def crops(photo: np.ndarray, count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for _ in range(count):
        side = int(min(h, w) * rng.uniform(0.45, 0.8))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        img = Image.fromarray(photo[top : top + side, left : left + side]).resize((96, 96), Image.Resampling.BILINEAR)
        out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img)
    return out


def save(img: Image.Image, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=quality)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train/ and val/ folders of photo crops, with one wrong label, an exact and a near
    copy of training images in val, and a blank image."""
    import skimage.data

    root = tmp_path_factory.mktemp("doctor")
    src = root / "src"
    kept: dict[str, list[Image.Image]] = {}
    for c, name in enumerate(PHOTOS):
        images = crops(getattr(skimage.data, name)(), 22, seed=c)
        kept[name] = images
        for i, img in enumerate(images[:16]):
            save(img, src / "train" / name / f"{name}{i:02d}.jpg")
        for i, img in enumerate(images[16:]):
            save(img, src / "val" / name / f"{name}v{i:02d}.jpg")
    # planted: a rocket crop filed under coffee (train)
    save(crops(skimage.data.rocket(), 1, seed=99)[0], src / "train" / "coffee" / "flipped.jpg")
    # planted: the same file in val (exact), and a resized, recompressed copy in val (near)
    shutil.copy(src / "train" / "rocket" / "rocket03.jpg", src / "val" / "rocket" / "exactcopy.jpg")
    save(kept["astronaut"][5].resize((80, 80), Image.Resampling.LANCZOS), src / "val" / "astronaut" / "nearcopy.jpg", quality=60)
    # planted: a blank image
    save(Image.new("RGB", (96, 96), (250, 250, 250)), src / "train" / "coffee" / "blank.jpg")

    dataset = root / "ds"
    import_dataset(str(src), str(dataset), ImportOptions())
    out = root / "report"
    result = runner.invoke(app, ["doctor", str(dataset), "--out", str(out), "--workers", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"src": src, "dataset": dataset, "out": out, "output": result.output}


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_the_wrong_label_is_the_top_suspect_with_the_right_class_suggested(planted):
    issues = read_csv(planted["out"] / "label_issues.csv")
    assert issues[0]["id"] == "train/coffee/flipped.jpg"
    assert issues[0]["given"] == "coffee" and issues[0]["suggested"] == "rocket"
    assert len(issues) <= 4  # clean crops of three distinct photos are rarely doubted
    relabel = read_csv(planted["out"] / "relabel_suggested.csv")
    assert relabel[0] == {"id": "train/coffee/flipped.jpg", "labels": "rocket"}


def test_copies_across_splits_are_reported_first_as_leakage(planted):
    pairs = read_csv(planted["out"] / "duplicates.csv")
    by_ids = {frozenset((p["id_a"], p["id_b"])): p for p in pairs}
    exact = by_ids[frozenset(("train/rocket/rocket03.jpg", "val/rocket/exactcopy.jpg"))]
    near = by_ids[frozenset(("train/astronaut/astronaut05.jpg", "val/astronaut/nearcopy.jpg"))]
    assert exact["kind"] == "exact" and exact["leakage"] == "1"
    assert near["kind"] == "near" and near["leakage"] == "1"
    assert {p["leakage"] for p in pairs[:2]} == {"1"}
    # crops of one photo may hold each other (one keeping 80% of the other's area, as a
    # copy cropped by 5% per side would): such pairs are reported; crops of different
    # photos never are
    def photo(image_id: str) -> str:
        return "rocket" if image_id.endswith("flipped.jpg") else image_id.split("/")[1]

    assert all(photo(p["id_a"]) == photo(p["id_b"]) for p in pairs), pairs
    assert len(pairs) <= 8
    dropped = (planted["out"] / "drop_suggested.txt").read_text().split("\n")
    assert "val/rocket/exactcopy.jpg" in dropped and "val/astronaut/nearcopy.jpg" in dropped
    summary = json.loads((planted["out"] / "doctor.json").read_text())
    assert summary["counts"]["leaked_pairs"] >= 2
    assert summary["leakage"]["leaked_val_images"] >= 2 and summary["leakage"]["metric"] == "accuracy"


def test_the_blank_image_is_an_outlier(planted):
    outliers = read_csv(planted["out"] / "outliers.csv")
    assert {"id": "train/coffee/blank.jpg", "reason": "nearly-blank"}.items() <= next(
        o for o in outliers if o["reason"] == "nearly-blank").items()


def test_the_report_shows_thumbnails_side_by_side_for_pairs(planted):
    report = (planted["out"] / "report.md").read_text()
    assert report.index("## Leakage") < report.index("## Label issues") < report.index("## Duplicates")
    thumbs = list((planted["out"] / "thumbs").glob("*.jpg"))
    assert len(thumbs) >= 5
    for thumb in thumbs:
        assert f"thumbs/{thumb.name}" in report
        with Image.open(thumb) as img:
            assert max(img.size) <= 128
    pair_row = next(line for line in report.splitlines() if "exactcopy.jpg" in line and "**leak**" in line)
    assert pair_row.count("![") == 2  # both images of the pair in one row
    html = (planted["out"] / "report.html").read_text()
    assert html.count("<img ") == report.count("![") and "<table>" in html


def test_import_acts_on_the_doctors_files(planted, tmp_path):
    fixed = tmp_path / "fixed"
    result = runner.invoke(app, ["import", str(planted["src"]), "--out", str(fixed),
                                 "--drop-ids", str(planted["out"] / "drop_suggested.txt"),
                                 "--relabel", str(planted["out"] / "relabel_suggested.csv")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    before, after = load_manifest(str(planted["dataset"])), load_manifest(str(fixed))
    dropped = [line for line in (planted["out"] / "drop_suggested.txt").read_text().splitlines() if not line.startswith("#")]
    assert "val/rocket/exactcopy.jpg" in dropped
    assert after.splits["val"].count == before.splits["val"].count - sum(i.startswith("val/") for i in dropped)
    assert after.report["edits"]["drop_ids"]["dropped"] == len(dropped)
    relabelled = {r["id"]: r["labels"] for r in read_csv(planted["out"] / "relabel_suggested.csv")}
    assert relabelled["train/coffee/flipped.jpg"] == "rocket"
    to_rocket = sum(i.startswith("train/") and label == "rocket" and i not in dropped for i, label in relabelled.items())
    assert after.splits["train"].class_counts["rocket"] == before.splits["train"].class_counts["rocket"] + to_rocket
    metas = {s.meta["id"]: s.meta["labels"] for shard in after.splits["train"].shards
             for s in iter_shard(str(fixed / shard.name))}
    assert metas["train/coffee/flipped.jpg"] == ["rocket"]
    again = tmp_path / "again"
    result = runner.invoke(app, ["doctor", str(fixed), "--out", str(again)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((again / "doctor.json").read_text())
    assert summary["counts"]["leaked_pairs"] == 0


def test_bad_datasets_are_clear_errors_with_their_exit_codes(planted, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(planted["dataset"], damaged)
    shard = next(damaged.glob("train-*.tar"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside an image
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["doctor", str(damaged), "--out", str(tmp_path / "r1")])
    assert result.exit_code == DatasetError.exit_code and "sha256" in said(result)

    one_class = tmp_path / "one"
    shutil.copytree(planted["dataset"], one_class)
    manifest = load_manifest(str(one_class))
    manifest.classes = manifest.classes[:1]
    write_manifest(str(one_class), manifest)
    result = runner.invoke(app, ["doctor", str(one_class), "--out", str(tmp_path / "r2")])
    assert result.exit_code == EmptyDatasetError.exit_code and "1 class:" in said(result)

    empty = tmp_path / "empty"
    shutil.copytree(planted["dataset"], empty)
    manifest = load_manifest(str(empty))
    for shard in manifest.splits["val"].shards:
        (empty / shard.name).unlink()
    manifest.splits["val"].shards, manifest.splits["val"].count = [], 0
    write_manifest(str(empty), manifest)
    result = runner.invoke(app, ["doctor", str(empty), "--out", str(tmp_path / "r3")])
    assert result.exit_code == EmptyDatasetError.exit_code and "val split holds no images" in said(result)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    result = runner.invoke(app, ["train", str(planted["dataset"]), "--out", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run


def test_a_training_report_names_the_suspect_and_the_leak(trained):
    report = (trained / "report.md").read_text()
    section = report[report.index("## Data issues"):report.index("## Training config")]
    suspects = section[section.index("| id |"):]
    assert suspects.splitlines()[2].startswith("| train/coffee/flipped.jpg | coffee | rocket |")
    # the exact copy is certain; the recompressed one is left to the doctor (features alone cannot tell)
    leaks = int(re.search(r"\*\*Leakage\*\*: (\d+) of 20 validation", section).group(1))
    assert 1 <= leaks <= 2


def test_doctor_reuses_a_runs_feature_cache_and_reads_bundles(planted, trained, tmp_path):
    result = runner.invoke(app, ["doctor", str(planted["dataset"]), "--out", str(tmp_path / "r"), "--model", str(trained)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "doctor.json").read_text())
    assert "the run's feature cache for train, val" in summary["features_from"]
    first = read_csv(planted["out"] / "label_issues.csv")[0]
    assert read_csv(tmp_path / "r" / "label_issues.csv")[0] == first  # the same backbone: the same verdict

    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(trained), "--out", str(bundle)], catch_exceptions=False).exit_code == 0
    result = runner.invoke(app, ["doctor", str(planted["dataset"]), "--out", str(tmp_path / "b"), "--model", str(bundle)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "b" / "doctor.json").read_text())
    assert str(bundle) in summary["features_from"] and "cache" not in summary["features_from"]
    assert read_csv(tmp_path / "b" / "label_issues.csv")[0]["id"] == first["id"]


def test_multi_label_doctor_finds_a_missing_and_a_wrong_tag(tmp_path):
    """Tags of photo crops: coffee → drink; rocket → space; astronaut → space, person.
    One astronaut crop lost its "person" tag; one coffee crop gained "space"."""
    import skimage.data

    tags = {"coffee": ["drink"], "rocket": ["space"], "astronaut": ["space", "person"]}
    rows = []
    for c, name in enumerate(PHOTOS):
        for i, img in enumerate(crops(getattr(skimage.data, name)(), 20, seed=10 + c)):
            save(img, tmp_path / "img" / f"{name}{i:02d}.jpg")
            given = list(tags[name])
            if (name, i) == ("astronaut", 3):
                given.remove("person")
            if (name, i) == ("coffee", 7):
                given.append("space")
            rows.append(f'{name}{i:02d}.jpg,"{", ".join(given)}"')
    (tmp_path / "tags.csv").write_text("id,tags\n" + "\n".join(rows) + "\n")
    dataset = tmp_path / "ds"
    result = runner.invoke(app, ["import", str(tmp_path / "tags.csv"), "--images", str(tmp_path / "img"),
                                 "--out", str(dataset), "--multi-label"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["doctor", str(dataset), "--out", str(tmp_path / "r")], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    issues = read_csv(tmp_path / "r" / "label_issues.csv")
    top = {row["id"]: row for row in issues[:2]}
    assert set(top) == {"astronaut03.jpg", "coffee07.jpg"}
    assert top["astronaut03.jpg"]["kind"] == "missing_tag" and set(top["astronaut03.jpg"]["suggested"].split("|")) == {"space", "person"}
    assert top["coffee07.jpg"]["kind"] == "wrong_tag" and top["coffee07.jpg"]["suggested"] == "drink"
    assert len(issues) <= 6  # one row per image, few beyond the two planted
    relabel = {r["id"]: r["labels"] for r in read_csv(tmp_path / "r" / "relabel_suggested.csv")}
    assert relabel["coffee07.jpg"] == "drink"
