"""Experiment tracking: ``tagmill train --track tensorboard|mlflow``.

The training loop tells its trackers three things, on rank 0 only: the run started
(with its configuration), an epoch ended (with its metrics), the run ended (with the
final evaluation's metrics and the report files). Nothing else in the loop knows about
tracking.

    tensorboard  event files in RUN/tensorboard (scalars per epoch, the configuration
                 as text, the final metrics and plots); ``tensorboard --logdir RUN``
    mlflow       a run in the tracking server ``MLFLOW_TRACKING_URI`` names (default: a
                 SQLite store in RUN/mlruns): the configuration as parameters, metrics
                 per epoch, the final metrics, the report files and the exported bundle
                 as artifacts. ``MLFLOW_EXPERIMENT_NAME`` picks the experiment
                 (default "tagmill").

A tracker is a convenience beside the run directory, never a condition of it: when a
tracker fails (a tracking server that does not answer, a full disk), the failure is
reported once through the loop's log, that tracker falls silent for the rest of the
run, and training goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tagmill import storage
from tagmill.errors import InputError
from tagmill.train.run_format import MLFLOW_DIR, TENSORBOARD_DIR, read_run

TRACKERS = ("tensorboard", "mlflow")
#: how long the first contact with a tracking server may take before it counts as down
PROBE_TIMEOUT_S = 5.0
#: MLflow's HTTP client retries 7 times with exponential backoff (minutes against a
#: server that went away mid-run); tagmill asks for fewer unless the user set it
MLFLOW_RETRIES = "2"
#: per-epoch row fields that are not metrics
_NOT_METRICS = {"epoch", "stage", "metric", "val_metric", "improved", "train_fingerprint"}

#: ``export(run_dir, out_dir)`` writes the run's model bundle (``bundle.from_run.export_run``)
Export = Callable[[str, str], Any]


class Tracker(Protocol):
    """What the training loop calls; every method runs on rank 0 only."""

    name: str

    def start(self, config: dict[str, Any]) -> None:
        """The run began (or resumed) with this configuration."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Epoch ``epoch`` (1-based, over both stages) ended with these metrics."""

    def finish(self, final_metrics: dict[str, Any], files: Sequence[str]) -> None:
        """The run ended: the final evaluation's metrics, and the report files (paths
        relative to the run directory)."""


def create_trackers(names: Sequence[str], run_dir: str, *, export: Export | None = None) -> list[Tracker]:
    """The trackers ``--track`` names, checked before any work starts: an unknown name, a
    package that is not installed, or MLflow's default store under a URL is an InputError."""
    trackers: list[Tracker] = []
    for name in dict.fromkeys(n.strip().lower() for n in names):
        if name not in TRACKERS:
            raise InputError(f"--track {name!r}: choose {' or '.join(TRACKERS)}")
        package = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
        if importlib.util.find_spec(package) is None:
            raise InputError(f"--track {name} needs the {package} package", hint="pip install 'tagmill[tracking]'")
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        else:
            if not os.environ.get("MLFLOW_TRACKING_URI") and not storage.is_local(run_dir):
                raise InputError(
                    f"--track mlflow keeps its store in the run directory by default, and {run_dir} is a URL",
                    hint="set MLFLOW_TRACKING_URI to a tracking server (or a local sqlite:/// store)",
                )
            trackers.append(MlflowTracker(run_dir, export=export))
    return trackers


class Tracking:
    """The trackers of one run, each failing on its own: the first error a tracker raises
    is reported once through ``log`` and that tracker is skipped from then on."""

    def __init__(self, trackers: Sequence[Tracker] = (), log: Callable[[str], None] = lambda line: None) -> None:
        self.trackers = list(trackers)
        self.log = log
        self.failed: set[str] = set()

    def start(self, config: dict[str, Any]) -> None:
        self._each("start", config)

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """``row``: the epoch's line of ``metrics.jsonl``."""
        metrics = epoch_metrics(row)
        self._each("log_epoch", epoch, metrics)

    def finish(self, final_metrics: dict[str, Any], files: Sequence[str]) -> None:
        self._each("finish", final_metrics, list(files))

    def _each(self, method: str, *args: Any) -> None:
        for tracker in self.trackers:
            if tracker.name in self.failed:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
                self.failed.add(tracker.name)
                reason = " ".join(str(exc).split()) or type(exc).__name__
                if len(reason) > 300:
                    reason = reason[:300] + "…"
                self.log(f"warning: {tracker.name} tracking stopped ({reason}); the run goes on without it")


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` row, the selection metric under its own name
    (``val_accuracy``, ``val_mAP``) rather than ``val_metric``."""
    metrics = {k: float(v) for k, v in row.items()
               if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "metric" in row and "val_metric" in row:
        metrics[f"val_{row['metric']}"] = float(row["val_metric"])
    return metrics


def final_numbers(final_metrics: dict[str, Any]) -> dict[str, float]:
    """``{"split": "val", "accuracy": 0.9, ...}`` → ``{"final_val_accuracy": 0.9, ...}``."""
    split = final_metrics.get("split", "val")
    return {f"final_{split}_{k}": float(v) for k, v in final_metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _local_path(location: str) -> str:
    return location.removeprefix("file://")


# ---------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files in RUN/tensorboard. A run directory at a URL gets them at the end
    (written locally meanwhile: TensorBoard's writer needs a file system)."""

    name = "tensorboard"

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._writer: Any = None
        self._step = 0

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if storage.is_local(self.target):
            log_dir = _local_path(self.target)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tagmill-tensorboard-")
            log_dir = self._tmp.name
        self._writer = SummaryWriter(log_dir=log_dir)
        # indented: TensorBoard renders text as markdown, and this keeps the JSON as is
        text = "\n".join("    " + line for line in json.dumps(config, indent=2, default=str).splitlines())
        self._writer.add_text("config", text)
        self._writer.flush()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, epoch)
        self._writer.flush()  # a killed run keeps every finished epoch
        self._step = epoch

    def finish(self, final_metrics: dict[str, Any], files: Sequence[str]) -> None:
        import numpy as np
        from PIL import Image

        for key, value in final_numbers(final_metrics).items():
            self._writer.add_scalar(key, value, self._step)
        for name in files:
            if name.endswith(".png") and "/" not in name:  # the plots (curves, confusion, per-class F1)
                with Image.open(storage.open_read(storage.join(self.run_dir, name))) as image:
                    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
                self._writer.add_image(name.removesuffix(".png"), pixels, self._step, dataformats="HWC")
        self._writer.close()
        if self._tmp is not None:
            for path in sorted(Path(self._tmp.name).rglob("*")):
                if path.is_file():
                    relative = path.relative_to(self._tmp.name).as_posix()
                    storage.write_bytes(storage.join(self.target, relative), path.read_bytes())
            self._tmp.cleanup()


# ---------------------------------------------------------------------- MLflow


class MlflowTracker:
    """One MLflow run per ``tagmill train`` session (a resumed run starts another, named
    the same, logging from the epoch it resumes at)."""

    name = "mlflow"

    def __init__(self, run_dir: str, *, export: Export | None = None) -> None:
        self.run_dir = run_dir
        self.export = export
        self._client: Any = None
        self._run_id: str | None = None
        self._params: dict[str, str] = {}

    @property
    def tracking_uri(self) -> str:
        given = os.environ.get("MLFLOW_TRACKING_URI")
        if given:
            return given
        # MLflow 3 refuses its plain-folder store; a SQLite file in the folder is the local one
        store = Path(_local_path(storage.join(self.run_dir, MLFLOW_DIR))).resolve()
        return f"sqlite:///{store / 'mlflow.db'}"

    def start(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
        artifacts = None
        if uri.startswith(("http://", "https://")):
            _probe(uri)
        elif not os.environ.get("MLFLOW_TRACKING_URI"):
            store = Path(uri.removeprefix("sqlite:///")).parent
            store.mkdir(parents=True, exist_ok=True)
            artifacts = (store / "artifacts").as_uri()
            # a new store per run: MLflow's "creating database tables" notices say nothing useful
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self._client = client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tagmill"
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name, artifact_location=artifacts)
        tags = {"tagmill.run_dir": self.run_dir, "tagmill.dataset": str(config.get("dataset", ""))}
        run = client.create_run(experiment_id, run_name=storage.basename(self.run_dir.rstrip("/")), tags=tags)
        self._run_id = run.info.run_id
        params = _params(config)
        client.log_batch(self._run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("mlflow.source.name", "tagmill train")])
        self._params = params

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def finish(self, final_metrics: dict[str, Any], files: Sequence[str]) -> None:
        from mlflow.entities import Metric, Param

        client, run_id = self._client, self._run_id
        # choices made during the run (the lr finder's rate, the augmentation the head's
        # cross-validation chose) are in the final config.json; MLflow parameters cannot
        # change, so only those still missing are added
        dataset, config = read_run(self.run_dir)
        later = {k: v for k, v in _params({"dataset": dataset, **config.as_dict()}).items() if k not in self._params}
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in final_numbers(final_metrics).items()],
                         params=[Param(k, v) for k, v in later.items()])
        with tempfile.TemporaryDirectory(prefix="tagmill-mlflow-") as tmp:
            reports = Path(tmp, "report")
            for name in files:
                target = reports / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(storage.join(self.run_dir, name)))
            if files:
                client.log_artifacts(run_id, str(reports))
            if self.export is not None:
                bundle = str(Path(tmp, "bundle"))
                self.export(self.run_dir, bundle)
                client.log_artifacts(run_id, bundle, "bundle")
        client.set_terminated(run_id)


def _params(config: dict[str, Any]) -> dict[str, str]:
    """MLflow parameters: strings; values still open (None) are left out."""
    return {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in config.items() if v is not None}


def _probe(uri: str) -> None:
    """Fail fast when a tracking server does not answer at all (any HTTP answer counts:
    a proxy asking for credentials is a server that answers)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"the MLflow tracking server {uri} does not answer: {reason}") from None
