"""SageMaker's container contract, run on the host: ``tagmill sagemaker train`` on
the Caltech-256 job's channel layout, then ``tagmill sagemaker serve``'s settings. The image that
runs these as ``train`` and ``serve`` is tested in tests/container/ (CI's own step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tagmill.bundle import Predictor
from tagmill.sagemaker_container import find_channels, serve_config
from tests import images
from tests.cli import run
from tests.sagemaker_job import CLASSES, HYPERPARAMETERS, failure, make_job


def test_training_job_writes_a_bundle_that_knows_the_classes(tmp_path: Path) -> None:
    root = make_job(tmp_path / "ml")

    result = run("sagemaker", "train", "--root", str(root))

    assert "importing .lst + image channels" in result.output
    model = root / "model"
    meta = json.loads((model / "model.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert (model / "model.onnx").is_file()  # serve's faster backend comes with the job
    assert not failure(root)
    assert (root / "output" / "data" / "report.md").is_file()
    # validation came from the validation channel, not from a split of train
    predictor = Predictor.from_bundle(str(model))
    picture = next((root / "input" / "data" / "validation" / "blue").iterdir())
    assert predictor.predict_bytes([picture.read_bytes()])[0].top[0][0] == "blue"

    config = serve_config(root, env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SAGEMAKER_BIND_TO_PORT": "9090"})
    assert (config.bundle, config.host, config.port, config.workers, config.backend) == (
        str(model), "0.0.0.0", 9090, 2, "onnx")


def test_a_stopped_job_resumes_from_its_checkpoint_folder(tmp_path: Path) -> None:
    """With a checkpoint folder (SageMaker's spot training), the dataset and the run live
    there: a second start reuses the import and continues the run."""
    root = make_job(tmp_path / "ml", hyperparameters={**HYPERPARAMETERS, "epochs": "1"})
    (root / "checkpoints").mkdir()
    run("sagemaker", "train", "--root", str(root))
    shutil.rmtree(root / "model")

    again = run("sagemaker", "train", "--root", str(root))

    assert "dataset already imported" in again.output and "continuing the training run" in again.output
    assert (root / "model" / "model.json").is_file()


@pytest.mark.parametrize(("change", "code", "reason"), [
    ({"epochs": "many"}, 2, "hyperparameter epochs must be a whole number, got 'many'"),
    ({"num_classes": "5"}, 2, "num_classes=5 but the dataset has 3 classes"),
    ({"learning_rat": "0.1"}, 2, "unknown SageMaker hyperparameter(s): learning_rat"),
])
def test_a_bad_hyperparameter_ends_in_output_failure(tmp_path: Path, change, code, reason) -> None:
    root = make_job(tmp_path / "ml", hyperparameters={**HYPERPARAMETERS, **change})

    run("sagemaker", "train", "--root", str(root), code=code)

    assert reason in failure(root)
    assert not (root / "model" / "model.json").exists()


def test_missing_channels_end_in_output_failure(tmp_path: Path) -> None:
    root = make_job(tmp_path / "ml")
    shutil.rmtree(root / "input" / "data" / "validation_lst")
    run("sagemaker", "train", "--root", str(root), code=2)
    assert "a 'validation' channel but no 'validation_lst' channel" in failure(root)

    shutil.rmtree(root / "input" / "data" / "train")
    run("sagemaker", "train", "--root", str(root), code=2)
    assert "the job has no 'train' channel (channels found: train_lst, validation)" in failure(root)


def test_pipe_mode_and_several_hosts_are_refused_before_any_work(tmp_path: Path) -> None:
    root = make_job(tmp_path / "ml")
    config = root / "input" / "config"
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "Pipe"}}))
    run("sagemaker", "train", "--root", str(root), code=2)
    assert "channel 'train' uses input mode Pipe" in failure(root)

    (config / "inputdataconfig.json").unlink()
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]}))
    run("sagemaker", "train", "--root", str(root), code=2)
    assert "runs on 2 instances" in failure(root)


def test_other_channel_layouts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    images.write(data / "train" / "cat" / "a.jpg", images.jpeg_bytes())
    assert (find_channels(data).source, find_channels(data).options) == (str(data / "train"), {"format": "folder"})
    images.write(data / "validation" / "cat" / "b.jpg", images.jpeg_bytes())
    assert find_channels(data).options == {"format": "folder", "val_source": str(data / "validation")}

    (data / "train" / "train.rec").write_bytes(b"")
    (data / "validation" / "val.rec").write_bytes(b"")
    channels = find_channels(data)
    assert (channels.source, channels.options) == (
        str(data / "train" / "train.rec"), {"format": "recordio", "val_source": str(data / "validation" / "val.rec")})
    (data / "train" / "more.rec").write_bytes(b"")
    with pytest.raises(Exception, match=r"exactly one \.rec file \(found: more\.rec, train\.rec\)"):
        find_channels(data)


def test_serve_needs_a_bundle_in_model(tmp_path: Path) -> None:
    result = run("sagemaker", "serve", "--root", str(tmp_path), code=2)
    assert "no model bundle in" in result.output
