"""train → evaluate → export → predict through the CLI, single- and multi-label."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tagmill.bundle import Predictor, load_bundle
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.errors import BundleError, DatasetError, InputError
from tests import images
from tests.cli import TINY, run
from tests.conftest import make_colour_classes, make_colour_tags



@pytest.fixture(scope="module")
def trained(colour_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    run("train", colour_dataset, "--out", str(root / "run"), *TINY)
    return colour_dataset, root


def test_run_directory_has_report_plots_and_metrics(trained):
    _, root = trained
    run_dir = root / "run"
    for name in ("report.md", "curves.png", "confusion.png", "per_class_f1.png", "metrics.json", "metrics.jsonl", "best.pt"):
        assert (run_dir / name).exists(), name
    report = (run_dir / "report.md").read_text()
    assert "![Confusion matrix](confusion.png)" in report and "top_losses/000.jpg" in report
    assert len(list((run_dir / "top_losses").glob("*.jpg"))) == 12


def test_export_predict_files_and_formats(trained, tmp_path):
    dataset, root = trained
    bundle = tmp_path / "bundle"
    run("export", str(root / "run"), "--out", str(bundle))
    model, meta = load_bundle(str(bundle))
    assert meta.classes == ("blue", "green", "red") and meta.architecture == "test_efficientnet"
    assert meta.preprocess.input_size == 48 and meta.metrics["split"] == "val"
    # the default pooling (avg+max of the final map and the last blocks, for CNNs) is
    # rebuilt from model.json alone
    assert meta.model_kwargs == {"global_pool": "catavgmax",
                                 "tagmill_feature_levels": {"indices": [2, 3, 4, 5], "extra_blocks": True}}
    assert model.get_classifier().in_features == model.num_features > 2 * model.conv_head.out_channels

    photos = tmp_path / "photos"
    make_colour_classes(photos, 2)
    images.write(photos / "broken.jpg", images.truncated_jpeg_bytes())
    table = run("predict", str(bundle), str(photos), "--top-k", "2")
    assert "broken.jpg" in table.output and "could not be read" in table.output

    # on the CPU, as the Predictor below: the CLI and the library must agree to rounding (a
    # GPU's convolutions round differently; tests/test_cuda.py compares the two devices)
    run("predict", str(bundle), str(photos), "--jsonl", str(tmp_path / "p.jsonl"), "--csv", str(tmp_path / "p.csv"),
        "--device", "cpu")
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 7
    broken = next(line for line in lines if line["input"].endswith("broken.jpg"))
    assert broken["error"] and broken["probabilities"] == []
    good = [line for line in lines if not line["error"]]
    assert all(abs(sum(line["probabilities"]) - 1) < 1e-5 for line in good)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert set(rows[0]) == {"input", "labels", "error", "blue", "green", "red"}

    # a packed dataset as input: every validation sample, same scores as the Predictor
    run("predict", str(bundle), dataset, "--split", "val", "--json", str(tmp_path / "val.json"))
    predictions = json.loads((tmp_path / "val.json").read_text())
    assert len(predictions) == 12
    direct = Predictor(model, meta).predict_bytes([(photos / "red" / "000.png").read_bytes()])[0]
    from_cli = next(line for line in lines if line["input"].endswith("red/000.png"))
    assert from_cli["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)


def test_evaluate_a_run_and_a_bundle(trained, tmp_path):
    dataset, root = trained
    bundle = tmp_path / "bundle"
    run("export", str(root / "run"), "--out", str(bundle))
    from_run = run("evaluate", str(root / "run"), dataset, "--out", str(tmp_path / "e1"))
    from_bundle = run("evaluate", str(bundle), dataset, "--out", str(tmp_path / "e2"))
    first = json.loads((tmp_path / "e1" / "metrics.json").read_text())["result"]["headline"]
    second = json.loads((tmp_path / "e2" / "metrics.json").read_text())["result"]["headline"]
    assert first == pytest.approx(second)
    assert "accuracy" in from_run.output and (tmp_path / "e2" / "report.md").exists()
    assert "val: accuracy" in from_bundle.output


def test_multi_label_thresholds_travel_from_training_to_the_bundle(tmp_path):
    tags_csv = make_colour_tags(tmp_path / "src", 48)
    import_dataset(str(tags_csv), str(tmp_path / "ds"), ImportOptions(val_fraction=0.25))
    run("train", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), *TINY, "--pos-weight")
    tuned = json.loads((tmp_path / "run" / "thresholds.json").read_text())
    assert len(tuned) == 4 and all(0 < t < 1 for t in tuned)
    run("export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"))
    _, meta = load_bundle(str(tmp_path / "bundle"))
    assert meta.task == "multi" and list(meta.thresholds) == pytest.approx(tuned)
    assert {"fbeta", "accuracy_thresh", "mAP"} <= set(meta.metrics)


def test_bad_inputs_to_train_export_and_predict(colour_dataset, tmp_path):
    # a dataset whose shard was damaged after import
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(colour_dataset, broken)
    shard = next(broken.glob("train-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-600] + b"x" * 600)
    result = run("train", str(broken), "--out", str(tmp_path / "r1"), *TINY, code=DatasetError.exit_code)
    assert "sha256" in result.output and not (tmp_path / "r1").exists()
    shard.unlink()
    assert "missing shard" in run("train", str(broken), "--out", str(tmp_path / "r2"), *TINY, code=DatasetError.exit_code).output

    assert "resnet43" in run("train", colour_dataset, "--out", str(tmp_path / "r3"), "--backbone", "resnet43", code=InputError.exit_code).output
    small = run("train", colour_dataset, "--out", str(tmp_path / "r4"), "--backbone", "vit_tiny_patch16_224",
                "--no-pretrained", "--image-size", "64", "--epochs", "1", code=InputError.exit_code)
    assert "cannot classify 64x64 images" in small.output and not (tmp_path / "r4").exists()
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: refused with or without GPUs
    assert "no CUDA GPU" in run("train", colour_dataset, "--out", str(tmp_path / "r5"), *TINY, "--device", absent, code=InputError.exit_code).output
    assert "not a training run" in run("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b"), code=InputError.exit_code).output
    assert "not a tagmill bundle" in run("predict", str(tmp_path), str(tmp_path), code=BundleError.exit_code).output


def test_predict_spreads_over_processes_keeping_order_and_every_input(trained, tmp_path):
    dataset, root = trained
    run("export", str(root / "run"), "--out", str(tmp_path / "bundle"))
    # tiny shards: many tasks to spread over the processes
    import_dataset(dataset_source(tmp_path), str(tmp_path / "many"), ImportOptions(val_fraction=0.2, shard_bytes=3000))
    one = tmp_path / "one.jsonl"
    two = tmp_path / "two.jsonl"
    run("predict", str(tmp_path / "bundle"), str(tmp_path / "many"), "--jsonl", str(one))
    run("predict", str(tmp_path / "bundle"), str(tmp_path / "many"), "--jsonl", str(two), "--nproc", "2")
    first = [json.loads(line) for line in one.read_text().splitlines()]
    second = [json.loads(line) for line in two.read_text().splitlines()]
    assert len(first) == 30 and len({row["input"] for row in first}) == 30
    assert [row["input"] for row in first] == [row["input"] for row in second]
    for a, b in zip(first, second):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def dataset_source(tmp_path: Path) -> str:
    make_colour_classes(tmp_path / "colours", 10)
    return str(tmp_path / "colours")
