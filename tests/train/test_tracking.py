"""``tagmill train --track tensorboard|mlflow``: read back with TensorBoard's own reader
and MLflow's own client, against a real ``mlflow server`` on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from tagmill.cli import app
from tagmill.errors import InputError
from tagmill.train.tracking import Tracking, create_trackers, epoch_metrics

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

runner = CliRunner()
#: two epochs (one-cycle head, then the whole network) of a tiny random network
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "1", "--epochs", "1", "--cache-views", "1", "--lr", "0.02"]
#: what a finished run directory holds, tracked or not
RUN_FILES = ("config.json", "best.pt", "last.pt", "metrics.jsonl", "metrics.json", "report.md", "curves.png", "confusion.png")


def train_cli(*args: str, env: dict[str, str] | None = None, code: int = 0):
    result = runner.invoke(app, ["train", *args], catch_exceptions=False, env={"COLUMNS": "300", **(env or {})})
    assert result.exit_code == code, result.output
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server (SQLite store, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    assert mlflow, "the mlflow command comes with the mlflow package"
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)  # its own session: the server and its workers
        server.wait(timeout=30)
        log.close()


def test_mlflow_server_gets_params_metrics_per_epoch_plots_and_the_bundle(colour_dataset, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "colours"}
    result = train_cli(colour_dataset, "--out", str(run_dir), *TINY, "--track", "mlflow", env=env)
    assert "warning" not in result.output

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("colours")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "run" and tracked.info.status == "FINISHED"
    saved = json.loads((run_dir / "config.json").read_text())
    params = tracked.data.params
    # the resolved configuration, including what the run chose itself
    assert params["backbone"] == "test_efficientnet" and params["image_size"] == "48"
    assert params["unfrozen_epochs"] == "1" and params["dataset"] == colour_dataset
    assert params["pooling"] == saved["config"]["pooling"] and float(params["lr"]) == saved["config"]["lr"]
    # one point per epoch, equal to metrics.jsonl
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(tracked.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_loss"]) for r in rows]
    assert [m.value for m in client.get_metric_history(tracked.info.run_id, "val_accuracy")] == [r["val_metric"] for r in rows]
    final = json.loads((run_dir / "metrics.json").read_text())["result"]["headline"]
    assert tracked.data.metrics["final_val_accuracy"] == pytest.approx(final["accuracy"])
    # the plots, the report and the exported bundle, as artifacts
    top = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"curves.png", "confusion.png", "report.md", "config.json", "metrics.json", "bundle"} <= top
    bundle = {a.path for a in client.list_artifacts(tracked.info.run_id, "bundle")}
    assert bundle == {"bundle/model.json", "bundle/model.safetensors"}
    local = client.download_artifacts(tracked.info.run_id, "bundle", str(tmp_path / "downloaded"))
    from tagmill.bundle.predictor import Predictor

    assert Predictor.from_bundle(local).classes == ("blue", "green", "red")


def test_an_unreachable_tracking_server_never_loses_the_run(colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = train_cli(colour_dataset, "--out", str(run_dir), *TINY, "--track", "mlflow", "--track", "tensorboard",
                       env={"MLFLOW_TRACKING_URI": closed})
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "mlflow" in warnings[0] and closed in warnings[0], result.output
    assert "best accuracy" in result.output
    assert all((run_dir / name).exists() for name in RUN_FILES)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the other tracker carried on


def test_tensorboard_event_files_and_the_default_local_mlflow_store(colour_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir = tmp_path / "run"
    train_cli(colour_dataset, "--out", str(run_dir), *TINY, "--track", "tensorboard,mlflow")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(r["epoch"], pytest.approx(r["val_loss"])) for r in rows]
    assert [e.value for e in events.Scalars("val_accuracy")] == [pytest.approx(r["val_metric"]) for r in rows]
    assert "final_val_accuracy" in tags["scalars"]
    assert {"curves", "confusion", "per_class_f1"} <= set(tags["images"])
    assert any(t.startswith("config") for t in tags["tensors"])  # add_text

    store = run_dir / "mlruns"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("tagmill").experiment_id])
    assert len(client.get_metric_history(tracked.info.run_id, "train_loss")) == 2
    assert (store / "artifacts").is_dir()
    assert {"bundle", "report.md"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}


def test_a_failing_tracker_is_reported_once_and_left_out_while_the_others_go_on():
    calls: list[tuple[str, str]] = []

    class Recorder:
        def __init__(self, name, fail_on=None):
            self.name, self.fail_on = name, fail_on

        def _call(self, method):
            calls.append((self.name, method))
            if method == self.fail_on:
                raise ConnectionError("server went away")

        def start(self, config):
            self._call("start")

        def log_epoch(self, epoch, metrics):
            self._call("log_epoch")

        def finish(self, final_metrics, files):
            self._call("finish")

    lines: list[str] = []
    tracking = Tracking([Recorder("flaky", fail_on="log_epoch"), Recorder("steady")], lines.append)
    tracking.start({})
    for epoch in (1, 2):
        tracking.log_epoch(epoch, {"epoch": epoch, "stage": "head", "metric": "accuracy", "val_metric": 0.5, "val_loss": 1.0})
    tracking.finish({"split": "val", "accuracy": 0.5}, [])
    assert [c for c in calls if c[0] == "flaky"] == [("flaky", "start"), ("flaky", "log_epoch")]
    assert [c for c in calls if c[0] == "steady"] == [("steady", m) for m in ("start", "log_epoch", "log_epoch", "finish")]
    assert len(lines) == 1 and "flaky" in lines[0] and "server went away" in lines[0]


def test_epoch_rows_become_named_metrics():
    row = {"epoch": 3, "stage": "unfrozen", "train_loss": 0.5, "val_loss": 0.6, "metric": "mAP", "val_metric": 0.7,
           "val_f1_micro": 0.4, "images_per_s": 10.0, "seconds": 1.5, "train_images": 48, "train_fingerprint": 123456789,
           "improved": True}
    assert epoch_metrics(row) == {"train_loss": 0.5, "val_loss": 0.6, "val_mAP": 0.7, "val_f1_micro": 0.4,
                                  "images_per_s": 10.0, "seconds": 1.5, "train_images": 48.0}


def test_unknown_trackers_fail_before_any_work(tmp_path, colour_dataset, monkeypatch):
    with pytest.raises(InputError, match="wandb"):
        create_trackers(["wandb"], str(tmp_path / "run"))
    result = train_cli(colour_dataset, "--out", str(tmp_path / "run"), *TINY, "--track", "wandb", code=InputError.exit_code)
    assert "--track" in result.output and not (tmp_path / "run").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(InputError, match="MLFLOW_TRACKING_URI"):
        create_trackers(["mlflow"], "s3://bucket/runs/a")
    assert len(create_trackers(["tensorboard", "TensorBoard"], str(tmp_path / "x"))) == 1


def test_under_torchrun_only_rank_0_tracks(colour_dataset, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-m", "tagmill", "train", colour_dataset, "--out", str(run_dir), "--nproc", "2", "--device", "cpu",
         *TINY, "--track", "tensorboard", "--track", "mlflow"],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stdout + done.stderr
    (events_file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2]
    client = MlflowClient(f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("tagmill").experiment_id])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "val_loss")] == [1, 2]
