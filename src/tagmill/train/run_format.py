"""A training run directory: the files it holds and how to read them.

The training loop writes a run; ``tagmill export`` and ``tagmill evaluate`` read one.
Both go through this module, so the layout is defined once:

    config.json           {"dataset": ..., "config": TrainConfig as a dict}, written at the
                          start (and again once automatic choices such as lr are made)
    last.pt               checkpoint after the latest epoch: everything needed to resume
    best.pt               checkpoint of the best epoch by the selection metric, plus its metrics
    metrics.jsonl         one line per epoch
    features.safetensors  the frozen backbone's cached features (train views + val)
    oof.safetensors       out-of-fold probabilities over train from the head's k-fold fit
    metrics.json, thresholds.json, report.md, *.png
                          the final evaluation of best.pt on validation
    tensorboard/, mlruns/ what ``--track tensorboard|mlflow`` writes (``train.tracking``)

A checkpoint is a dict of plain values and tensors (loaded with ``weights_only=True``);
:data:`CHECKPOINT_KEYS` lists what every one holds.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from tagmill import storage
from tagmill.errors import InputError
from tagmill.train.checkpoint import load_checkpoint
from tagmill.train.config import TrainConfig

CONFIG, LAST, BEST = "config.json", "last.pt", "best.pt"
METRICS, FEATURES, OOF = "metrics.jsonl", "features.safetensors", "oof.safetensors"
FINAL_METRICS, THRESHOLDS = "metrics.json", "thresholds.json"

#: what every checkpoint holds; best.pt adds "metrics" ({"headline": {selection metric: value}}:
#: the per-epoch number; the full evaluation is metrics.json, written once at the end)
CHECKPOINT_KEYS = (
    "epoch", "stage", "classes", "task", "preprocess", "config", "dataset", "model",
    "optimizer", "scheduler", "history", "best_metric", "bad_epochs", "elapsed",
)


def is_run(location: str) -> bool:
    return storage.exists(storage.join(location, CONFIG))


def read_run(run_dir: str) -> tuple[str, TrainConfig]:
    """The dataset and configuration a run directory was started with."""
    location = storage.join(run_dir, CONFIG)
    if not storage.exists(location):
        raise InputError(f"{run_dir} is not a training run (it has no {CONFIG})")
    saved = json.loads(storage.read_text(location))
    return saved["dataset"], TrainConfig.from_dict(saved["config"])


def write_run(run_dir: str, dataset: str, config: TrainConfig) -> None:
    saved = {"dataset": dataset, "config": config.as_dict()}
    storage.write_bytes(storage.join(run_dir, CONFIG), (json.dumps(saved, indent=2) + "\n").encode())


def read_best(run_dir: str) -> dict[str, Any]:
    location = storage.join(run_dir, BEST)
    if not storage.exists(location):
        raise InputError(f"{run_dir} has no best checkpoint yet: no epoch has finished", hint="train it (or --resume) first")
    return load_checkpoint(location)


def write_history(run_dir: str, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_bytes(storage.join(run_dir, METRICS), lines.encode())


#: what describes a run to a reader (tracked as artifacts): not checkpoints, caches, or
#: the trackers' own folders (RUN/tensorboard, RUN/mlruns)
REPORT_SUFFIXES = (".json", ".jsonl", ".md", ".png", ".jpg")
TENSORBOARD_DIR, MLFLOW_DIR = "tensorboard", "mlruns"
TRACKER_DIRS = (TENSORBOARD_DIR + "/", MLFLOW_DIR + "/")


def report_files(run_dir: str) -> list[str]:
    """The run's configuration, metrics, report, plots and thumbnails, relative to it."""
    return [name for name in storage.list_files(run_dir)
            if name.endswith(REPORT_SUFFIXES) and not name.startswith(TRACKER_DIRS) and not posixpath.basename(name).startswith(".tmp-")]


def read_thresholds(run_dir: str, task: str) -> tuple[float, ...] | None:
    """The per-tag thresholds the final evaluation chose (multi-label runs only)."""
    location = storage.join(run_dir, THRESHOLDS)
    if task != "multi" or not storage.exists(location):
        return None
    return tuple(float(t) for t in json.loads(storage.read_text(location)))


def read_final_metrics(run_dir: str, best: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation's headline numbers, with the split they were measured on."""
    location = storage.join(run_dir, FINAL_METRICS)
    if storage.exists(location):
        saved = json.loads(storage.read_text(location))
        return {"split": saved["split"], **saved["result"]["headline"]}
    return {"split": "val", **best.get("metrics", {}).get("headline", {})}


def write_oof(run_dir: str, probs: Tensor, targets: Tensor, folds: int) -> None:
    """Out-of-fold probabilities over the training images (each from a head that did not see it)."""
    data = save_tensors({"probs": probs.contiguous(), "targets": targets.contiguous()}, metadata={"folds": str(folds)})
    storage.write_bytes(storage.join(run_dir, OOF), data)


def read_oof(run_dir: str) -> tuple[Tensor, Tensor, int] | None:
    location = storage.join(run_dir, OOF)
    if not storage.exists(location):
        return None
    data = storage.read_bytes(location)
    tensors = load_tensors(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: 8-byte length, JSON
    return tensors["probs"], tensors["targets"], int(header.get("__metadata__", {}).get("folds", 0))
