"""SageMaker's container contract: ``docker run IMAGE train`` and ``docker run IMAGE serve``.

A job written for SageMaker's built-in image-classification algorithm runs on the
tagmill image unchanged, as a "bring your own algorithm" container. SageMaker lays out
``/opt/ml`` (the ``root`` here) like this::

    input/config/hyperparameters.json   the job's hyperparameters (values are strings)
    input/config/inputdataconfig.json   the channels and their input mode
    input/config/resourceconfig.json    the hosts of the job
    input/data/<channel>/               one folder per channel, downloaded from S3
    checkpoints/                        synced with S3 when the job sets a checkpoint URI
    model/                              uploaded as model.tar.gz when training succeeds;
                                        unpacked here again on an endpoint
    output/data/                        uploaded as output.tar.gz
    output/failure                      why the job failed (shown as its FailureReason)

Channels, as the built-in algorithm names them:

    train + train_lst [+ validation + validation_lst]   images and one .lst file each
    train [+ validation] holding .rec files             RecordIO packs (im2rec's)
    train [+ validation] holding a folder per class     the layout tagmill reads anywhere

Training imports the channels (``dataset/importer``), trains with the hyperparameters
mapped as ``tagmill train --hyperparameters`` maps them (``train/sagemaker``), and writes
the bundle, with its ONNX graph, to ``model/``. The run's report, metrics and plots go
to ``output/data/``. When the job has a checkpoint folder the dataset and the run live
there, so a stopped spot job resumes where it was. Any failure ends in
``output/failure`` and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagmill import storage
from tagmill.errors import InputError, TagmillError

DEFAULT_ROOT = "/opt/ml"
#: the name SageMaker reads a failed job's reason from; it shows the first 1,024 characters
FAILURE = "output/failure"
FAILURE_LIMIT = 1024
#: what a failed job exits with when the error is not one of tagmill's own (the CLI's code for it)
UNEXPECTED_EXIT = 1
#: the run's files worth keeping with the job's output (report, metrics, plots)
OUTPUT_SUFFIXES = (".md", ".html", ".json", ".jsonl", ".png")


@dataclass(frozen=True)
class Channels:
    """What ``tagmill import`` is given for a job's input channels."""

    source: str
    options: dict[str, Any]
    description: str


def find_channels(data_dir: Path) -> Channels:
    """The import source and options for the channels under ``input/data``."""
    present = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    found = f"channels found: {', '.join(present) or 'none'}"
    train = data_dir / "train"
    if not train.is_dir():
        raise InputError(f"the job has no 'train' channel ({found})",
                         hint="name the training data's channel 'train' (and the validation data's 'validation')")
    validation = data_dir / "validation"
    if (data_dir / "train_lst").is_dir():
        return _lst_channels(data_dir, train, validation, found)
    if (data_dir / "validation_lst").is_dir():
        raise InputError(f"a 'validation_lst' channel needs a 'train_lst' channel ({found})")
    records = _files(train, ".rec")
    if records:
        options: dict[str, Any] = {"format": "recordio"}
        if validation.is_dir():
            options["val_source"] = str(_one(validation, ".rec", "validation"))
        return Channels(str(_one(train, ".rec", "train")), options, "RecordIO (.rec) channels")
    options = {"format": "folder"}
    if validation.is_dir():
        options["val_source"] = str(validation)
    return Channels(str(train), options, "folder-per-class channels")


def _lst_channels(data_dir: Path, train: Path, validation: Path, found: str) -> Channels:
    options: dict[str, Any] = {"format": "lst", "images": str(train)}
    validation_lst = data_dir / "validation_lst"
    if validation_lst.is_dir() != validation.is_dir():
        have, missing = ("validation", "validation_lst") if validation.is_dir() else ("validation_lst", "validation")
        raise InputError(f"the job has a '{have}' channel but no '{missing}' channel ({found})",
                         hint="with .lst files, validation needs both: the images and their list")
    if validation_lst.is_dir():
        options["val_source"] = str(_one(validation_lst, ".lst", "validation_lst"))
        options["val_images"] = str(validation)
    return Channels(str(_one(data_dir / "train_lst", ".lst", "train_lst")), options, ".lst + image channels")


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == suffix)


def _one(folder: Path, suffix: str, channel: str) -> Path:
    files = _files(folder, suffix)
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise InputError(f"the '{channel}' channel must hold exactly one {suffix} file (found: {names})")
    return files[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _check_job(config_dir: Path) -> None:
    """Refuse what the container cannot do, before any work: pipe mode and several hosts."""
    data_config = config_dir / "inputdataconfig.json"
    if data_config.is_file():
        for name, channel in (_read_json(data_config) or {}).items():
            if isinstance(channel, dict) and channel.get("TrainingInputMode", "File") != "File":
                raise InputError(f"channel '{name}' uses input mode {channel['TrainingInputMode']}; "
                                 "tagmill's container reads File mode only",
                                 hint="set input_mode='File' (or 'FastFile') on the estimator")
    resources = config_dir / "resourceconfig.json"
    if resources.is_file():
        hosts = (_read_json(resources) or {}).get("hosts") or []
        if len(hosts) > 1:
            raise InputError(f"the job runs on {len(hosts)} instances; tagmill's container trains on one",
                             hint="set instance_count=1 (several GPUs on one instance are used)")


def run_training(root: str | os.PathLike[str] = DEFAULT_ROOT, *, log: Callable[[str], None] = print,
                 progress: bool = True) -> None:
    """SageMaker's ``train``: channels -> dataset -> run -> bundle in ``model/``."""
    base = Path(root)
    _check_job(base / "input" / "config")
    channels = find_channels(base / "input" / "data")
    checkpoints = base / "checkpoints"
    if checkpoints.is_dir():
        # SageMaker keeps this folder across spot interruptions: the dataset and the run
        # live there, so a restarted job resumes
        _train(base, checkpoints / "tagmill", channels, log, progress)
    else:
        # the dataset and the run are not the job's output (model/ and output/data are)
        with tempfile.TemporaryDirectory(prefix="tagmill-job-") as scratch:
            _train(base, Path(scratch), channels, log, progress)


def _train(base: Path, work: Path, channels: Channels, log: Callable[[str], None], progress: bool) -> None:
    from tagmill.api import export_bundle, import_dataset, train_model

    dataset, run = work / "dataset", work / "run"
    if storage.exists(str(dataset / "dataset.json")):
        log(f"dataset already imported in {dataset} (resuming the job)")
    else:
        log(f"importing {channels.description} from {channels.source}")
        # an import killed half way continues from its journal (same records, same options)
        result = import_dataset(channels.source, dataset, progress=progress, **channels.options)
        log(f"imported {result.manifest.task}-label dataset: {len(result.manifest.classes)} classes, "
            + ", ".join(f"{name} {info.count}" for name, info in result.manifest.splits.items()))
    if (run / "config.json").is_file():
        log(f"continuing the training run in {run}")
        train_model(None, run, resume=True, progress=progress)
    else:
        hyperparameters = base / "input" / "config" / "hyperparameters.json"
        params = str(hyperparameters) if hyperparameters.is_file() else None
        train_model(dataset, run, hyperparameters=params, progress=progress)
    model_dir = base / "model"
    _empty(model_dir)
    # the ONNX graph too: `serve` picks the onnx backend when the bundle has one (~2x torch's throughput)
    export_bundle(run, model_dir, onnx=True)
    _copy_outputs(run, base / "output" / "data")
    log(f"model written to {model_dir}")


def _empty(folder: Path) -> None:
    """``model/`` holds the bundle only (SageMaker tars all of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _copy_outputs(run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for entry in run.iterdir():
        if entry.is_file() and entry.suffix in OUTPUT_SUFFIXES:
            shutil.copy2(entry, out / entry.name)


def write_failure(root: str | os.PathLike[str], exc: BaseException) -> int:
    """Write why the job failed where SageMaker reads it; the exit code to end with."""
    if isinstance(exc, TagmillError):
        reason, code = str(exc), exc.exit_code
    else:
        reason, code = f"internal error: {type(exc).__name__}: {exc}\n\n{traceback.format_exc()}", UNEXPECTED_EXIT
    path = Path(root) / FAILURE
    path.parent.mkdir(parents=True, exist_ok=True)
    # the reason first: SageMaker shows the file's first FAILURE_LIMIT characters
    with storage.atomic_write(str(path)) as raw:
        raw.write(reason.encode("utf-8", errors="replace"))
    return code


def serve_config(root: str | os.PathLike[str] = DEFAULT_ROOT, env: Mapping[str, str] = os.environ):
    """SageMaker's ``serve``: the bundle in ``model/`` on port 8080 of every address,
    with the settings SageMaker passes in the environment."""
    from tagmill.serve.config import ServeConfig

    bundle = Path(root) / "model"
    if not (bundle / "model.json").is_file():
        raise InputError(f"no model bundle in {bundle} (model.json is missing)",
                         hint="train with this image first, or unpack a tagmill bundle (model.tar.gz) there")
    options: dict[str, Any] = {
        "bundle": str(bundle),
        "host": "0.0.0.0",  # the endpoint's traffic arrives from outside the container
        "port": _env_int(env, "SAGEMAKER_BIND_TO_PORT", 8080),
        "backend": "onnx" if (bundle / "model.onnx").is_file() else "torch",
        "api_key": env.get("TAGMILL_API_KEY") or None,
    }
    workers = _env_int(env, "SAGEMAKER_MODEL_SERVER_WORKERS", None)
    if workers is not None:
        options["workers"] = workers
    return ServeConfig(**options)


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise InputError(f"{name} must be a whole number, got {value!r}") from exc
