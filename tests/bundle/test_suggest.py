"""The ranking behind ``tagmill suggest``: uncertainty by margin or by distance to each
tag's threshold, and diversity that keeps near-copies out of one batch; and a folder
that ``serve --capture`` filled, read as its images with what the server answered."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tagmill.bundle import Predictor
from tagmill.bundle.batch_predict import Settings, run_task, plan
from tagmill.formats.captures import PREDICTIONS
from tagmill.bundle.suggest import SERVED_COLUMNS, choose, suggest, uncertainty, write_suggestions
from tagmill.errors import InputError
from tagmill.serve.capture import Capture
from tagmill.serve.metrics import ServeMetrics
from tests import images
from tests.serve.conftest import build_bundle


def test_single_label_uncertainty_is_the_margin_between_the_two_best_classes() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(uncertainty(probs, "single"), [1.0, 0.15, 0.8, 0.0])


def test_multi_label_uncertainty_is_the_closest_tag_to_its_own_threshold() -> None:
    thresholds = (0.2, 0.5)
    probs = np.array([
        [0.2, 0.0],  # first tag exactly at its threshold
        [0.6, 0.0],  # 0.4 above a 0.2 threshold: half the room to certainty (0.8)
        [0.1, 1.0],  # 0.1 below a 0.2 threshold: half the room; the second tag is certain
        [1.0, 0.0],  # certain on both
    ])
    np.testing.assert_allclose(uncertainty(probs, "multi", thresholds), [1.0, 0.5, 0.5, 0.0])


def _pool() -> tuple[np.ndarray, np.ndarray]:
    """100 single-label rows: 0-9 near-copies of one picture, the most uncertain of all
    (coin tosses between two classes); 10-99 distinct pictures, less uncertain."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(100, 64)).astype(np.float32)
    features[:10] = features[0] + 0.01 * rng.normal(size=(10, 64))
    margin = np.concatenate([np.full(10, 0.01), rng.uniform(0.1, 0.5, 90)])
    top = (1 + margin) / 2
    probs = np.stack([top, 1 - top], axis=1)
    return probs, features


def test_near_copies_fill_one_place_in_a_batch_not_all_of_it() -> None:
    probs, features = _pool()
    plain, _ = choose(probs, features, 5, task="single", pool_factor=1)
    assert set(plain.tolist()) <= set(range(10))  # uncertainty alone: five copies of one picture
    chosen, scores = choose(probs, features, 5, task="single")
    assert len(chosen) == len(set(chosen.tolist())) == 5
    assert sum(row < 10 for row in chosen) == 1  # one copy: the rest are other pictures
    assert chosen[0] < 10  # and the copies' group gives its most uncertain row, first
    assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
    others = np.setdiff1d(np.arange(10, 100), chosen)
    assert scores[chosen[1:]].min() >= np.quantile(scores[others], 0.5)  # still among the uncertain ones


def test_asking_for_everything_returns_everything_most_uncertain_first_and_bad_counts_are_refused() -> None:
    probs, features = _pool()
    chosen, scores = choose(probs[10:20], features[10:20], 50, task="single")
    assert sorted(chosen.tolist()) == list(range(10))
    assert list(scores[chosen]) == sorted(scores, reverse=True)
    with pytest.raises(InputError, match="at least 1"):
        choose(probs, features, 0, task="single")


# --- a folder that `serve --capture` filled --------------------------------------------


def _capture_folder(root: Path, bundle: str, count: int) -> list[bytes]:
    """What `serve --capture --capture-sample 1` writes for ``count`` photos, through the
    server's own writer (Capture), plus the leftovers of an interrupted write."""
    predictor = Predictor.from_bundle(bundle)
    sent = [images.jpeg_bytes(64, 48, seed=100 + i) for i in range(count)]
    capture = Capture(str(root), ServeMetrics(), below=0.0, sample=1.0)
    capture.start()
    capture.offer(sent, predictor.predict_bytes(sent), "v-test", predictor.meta)
    capture.stop(drain_s=60)
    day = next(p for p in root.iterdir() if p.is_dir())
    images.write(day / ".tmp-abc-20261129T000000Z-x-000001.jpg", images.truncated_jpeg_bytes())
    return sent


def _part_records(part: Path) -> dict[str, dict]:
    with tarfile.open(part) as tar:
        lines = tar.extractfile(PREDICTIONS).read().decode().splitlines()
    return {record["image"]: record for record in map(json.loads, lines)}


def test_suggest_reads_a_capture_folder_as_its_images_and_carries_what_the_server_answered(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "model")
    sent = _capture_folder(tmp_path / "capture", bundle, 6)
    folder = str(tmp_path / "capture")
    found = suggest(Predictor.from_bundle(bundle), [folder], 3)
    assert found.considered == 6 and not found.skipped  # no predictions, marker or temporary file is an input
    assert all(entry is not None and entry["model_version"] == "v-test" for entry in found.served)
    (part,) = (tmp_path / "capture").rglob("part-*.tar")  # six images offered at once: one part
    out = tmp_path / "job" / "to_label.csv"
    write_suggestions(found, str(out), [folder], multilabel=False)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "labels", "confidence", "priority", "source", *SERVED_COLUMNS]
    records = _part_records(part)
    for row in rows:
        assert row["source"].startswith(f"{part}/")  # the image inside its part
        record = records[Path(row["source"]).name]
        assert row["served_labels"] == "|".join(record["labels"]) and row["served_version"] == "v-test"
        assert row["served_labels"] == row["labels"]  # the same model: the guess is what was served
        assert row["captured_at"] == record["captured_at"]
        assert (out.parent / row["id"]).read_bytes() in sent
        assert row["id"].endswith(".jpg")
    # `tagmill predict` reads the folder too: one row per captured image
    rows = run_batch(bundle, [folder])
    assert sorted(row.name for row in rows) == sorted(f"{part}/{name}" for name in records)


def test_earlier_layouts_and_a_damaged_part_are_read_and_reported(tmp_path: Path) -> None:
    """A folder may hold earlier layouts: loose images with their predictions in
    ``predictions-*.jsonl`` parts (layout 2; a line may be lost or torn) or in a sidecar
    beside each image (layout 1). A damaged part is reported, and the rest ranked."""
    bundle = build_bundle(tmp_path / "model")
    sent = _capture_folder(tmp_path / "capture", bundle, 4)
    (part,) = (tmp_path / "capture").rglob("part-*.tar")
    records = list(_part_records(part).values())
    old = tmp_path / "capture" / "2025-01-01"  # layout 1: a sidecar beside each image
    old.mkdir()
    (old / "a.jpg").write_bytes(sent[0])
    (old / "a.json").write_text(json.dumps({**records[0], "image": "a.jpg", "model_version": "v-old"}))
    older = tmp_path / "capture" / "2025-01-02"  # layout 2: loose images, predictions in parts
    older.mkdir()
    for name, data in (("b.jpg", sent[1]), ("c.jpg", sent[2]), ("d.jpg", sent[3])):
        (older / name).write_bytes(data)
    (older / "predictions-b.jsonl").write_text(
        json.dumps({**records[1], "image": "b.jpg", "model_version": "v-2"}) + "\nnot json\n")  # c's line torn, d's lost
    damaged = part.with_name(part.name.replace("-n4.tar", "x-n2.tar"))
    damaged.write_bytes(part.read_bytes()[:700])  # cut inside its first image
    found = suggest(Predictor.from_bundle(bundle), [str(tmp_path / "capture")], 20)
    assert found.considered == 4 + 4 and [name for name, _ in found.skipped] == [str(damaged)]
    assert "unreadable capture part" in found.skipped[0][1]
    served = {Path(name).name: entry for name, entry in zip(found.names, found.served)}
    assert served["a.jpg"]["model_version"] == "v-old" and served["b.jpg"]["model_version"] == "v-2"
    assert served["c.jpg"] is None and served["d.jpg"] is None
    assert sum(entry is not None and entry["model_version"] == "v-test" for entry in served.values()) == 4


def run_batch(bundle: str, paths: list[str]) -> list:
    predictor = Predictor.from_bundle(bundle)
    settings = Settings(bundle=bundle, backend="torch", top_k=None, threshold=None, batch_size=4)
    return [row for task in plan(paths, None) for row in run_task(predictor, task, settings)]
