"""The Python API: what a notebook needs, as plain functions over the library the
command line uses (``import tagmill`` exposes them lazily; see ``tagmill/__init__.py``).

    tagmill.import_dataset(source, out, **options)   tagmill import
    tagmill.train_model(dataset, out, **options)     tagmill train
    tagmill.evaluate_model(model, dataset, ...)      tagmill evaluate
    tagmill.export_bundle(run, out)                  tagmill export
    tagmill.load_bundle(bundle).predict(images)      tagmill predict
    tagmill.diagnose_dataset(dataset, out)           tagmill doctor

The verbs carry a noun (``train_model``, not ``train``) because ``tagmill.train`` and
``tagmill.evaluate`` are the packages that do the work: a function of the same name
would be replaced by the package the moment it is imported.

Options are keyword arguments named as the command line's options are (underscores for
dashes), and the same checks apply: a misspelt option is an InputError, not ignored.
Progress bars and the run's lines go through rich, which draws them in Jupyter too;
``progress=False`` silences both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from tagmill.errors import InputError

if TYPE_CHECKING:
    from tagmill.bundle.format import BundleMeta
    from tagmill.doctor.diagnose import Diagnosis
    from tagmill.bundle.predictor import Predictor
    from tagmill.dataset.importer import ImportResult
    from tagmill.evaluate.metrics import EvaluationResult
    from tagmill.train.config import TrainConfig
    from tagmill.train.loop import TrainResult

PathLike = str | os.PathLike[str]

#: import options that hold several values (a list is accepted for each)
_TUPLES = {"derive", "keep", "drop", "class_columns", "class_names"}


def _progress_and_log(progress: bool) -> tuple[Any, Callable[[str], None]]:
    from tagmill.progress import SILENT, RichProgress

    if not progress:
        return SILENT, lambda line: None
    from rich.console import Console

    console = Console(stderr=True)
    return RichProgress(console), lambda line: console.print(line, highlight=False, markup=False)


def import_dataset(source: PathLike, out: PathLike, *, progress: bool = True, **options: Any) -> ImportResult:
    """Import labelled images (a folder per class, a CSV, a one-hot CSV, .lst or RecordIO;
    a path or URL) into a packed dataset at ``out``, as ``tagmill import`` does.

    ``options`` are the import options: how to read the source (``images``, ``suffix``,
    ``id_column``, ``label_column``, ``class_columns``, ``delimiter``, ``tag_separator``,
    ``split_column``, ``class_level``, ``class_names``, ``label_format``, ``task``) and
    what to make of it (``val_fraction``, ``test_fraction``, ``val_source``,
    ``val_list``, ``derive``, ``otherwise``, ``drop_ids``, ``relabel``, ``keep``,
    ``drop``, ``skip_untagged``, ``min_per_class``, ``max_per_class``, ``balance``,
    ``seed``, ``max_side``, ``shard_bytes``, ``workers``, ``overwrite``). The result's
    ``manifest`` holds the classes, split counts and the import report."""
    from tagmill.dataset.importer import ImportOptions
    from tagmill.dataset.importer import import_dataset as run_import
    from tagmill.formats import SourceOptions

    reading = {f.name for f in fields(SourceOptions)}
    making = {f.name for f in fields(ImportOptions)} - {"source"}
    unknown = sorted(set(options) - reading - making)
    if unknown:
        raise InputError(f"unknown import option(s): {', '.join(unknown)}",
                         hint=f"options: {', '.join(sorted(reading | making))}")
    values = {k: tuple(v) if k in _TUPLES and isinstance(v, (list, tuple)) else v for k, v in options.items()}
    for name in ("derive", "keep", "drop"):
        if isinstance(values.get(name), str):
            values[name] = (values[name],)
    source_options = SourceOptions(**{k: v for k, v in values.items() if k in reading})
    import_options = ImportOptions(source=source_options, **{k: v for k, v in values.items() if k in making})
    bars, _ = _progress_and_log(progress)
    return run_import(os.fspath(source), os.fspath(out), import_options, progress=bars)


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '10m', '1.5h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise InputError(f"--time-budget {text!r} is not a duration", hint="write e.g. 90s, 10m or 1h") from None
    if not seconds > 0 or seconds == float("inf"):
        raise InputError(f"--time-budget {text!r} must be a positive duration")
    return seconds


def training_config(
    dataset: str, options: dict[str, Any], *, hyperparameters: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> TrainConfig:
    """The configuration a new run starts from, as ``tagmill train`` resolves it: the
    given options over SageMaker ``hyperparameters`` (a JSON file) and over the settings
    of the bundle ``init_from`` names."""
    from tagmill.train.config import TrainConfig

    options = dict(options)
    if isinstance(options.get("time_budget"), str):
        options["time_budget"] = parse_duration(options["time_budget"])
    if hyperparameters:
        from tagmill.train.sagemaker import config_from_hyperparameters

        options = {**config_from_hyperparameters(hyperparameters, dataset, log=log), **options}
    if options.get("init_from"):
        from tagmill.bundle.as_start import training_settings

        options = {**training_settings(options["init_from"]), **options}
    if options.get("pretrained") is False and "frozen_epochs" not in options and not options.get("weights"):
        # a random backbone's features are noise: there is nothing to train a head on
        options["frozen_epochs"] = 0
    return TrainConfig.from_dict(options)


def train_model(
    dataset: PathLike | None, out: PathLike, *, resume: bool = False, hyperparameters: str | None = None,
    track: Sequence[str] = (), progress: bool = True, **options: Any,
) -> TrainResult:
    """Train a classifier on a packed dataset into the run directory ``out``, as
    ``tagmill train`` does; ``resume=True`` continues the run in ``out`` (give
    ``dataset=None``: the run knows it).

    ``options`` are ``TrainConfig``'s fields (``backbone``, ``image_size``,
    ``time_budget`` as seconds or "10m", ``unfrozen_epochs``, ``lr``, ``seed``, ...);
    ``track`` names trackers ("tensorboard", "mlflow"). The result holds the per-epoch
    history and the best validation metric; the run directory holds the report."""
    from tagmill.bundle.as_start import starting_point
    from tagmill.bundle.from_run import export_run
    from tagmill.train.loop import train
    from tagmill.train.tracking import create_trackers

    run_dir = os.fspath(out)
    bars, log = _progress_and_log(progress)
    trackers = create_trackers(list(track), run_dir, export=export_run) if track else []
    if resume:
        if dataset is not None or options or hyperparameters:
            raise InputError("resume=True takes the run directory only: its dataset and options are in the run")
        return train(None, run_dir, resume=True, load_start=starting_point, progress=bars, log=log, trackers=trackers)
    if dataset is None:
        raise InputError("give a dataset (or resume=True to continue the run in out)")
    config = training_config(os.fspath(dataset), options, hyperparameters=hyperparameters, log=log)
    return train(os.fspath(dataset), run_dir, config, load_start=starting_point, progress=bars, log=log, trackers=trackers)


def evaluate_model(
    model: PathLike, dataset: PathLike, *, split: str = "val", out: PathLike | None = None, tune: bool = False,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a run's best model or a bundle on a dataset split, as ``tagmill evaluate``
    does: metrics, plots and report.md in ``out`` (default: MODEL/eval-SPLIT). The
    result's ``headline`` holds the main numbers, ``summary_line()`` prints them."""
    from tagmill import storage
    from tagmill.bundle.evaluate_model import evaluate_model as run_evaluation

    location = os.fspath(model)
    target = os.fspath(out) if out is not None else storage.join(location, f"eval-{split}")
    bars, _ = _progress_and_log(progress)
    return run_evaluation(location, os.fspath(dataset), split, target, tune=tune, progress=bars)


def export_bundle(run: PathLike, out: PathLike, *, onnx: bool = False) -> BundleMeta:
    """Write a run's best model as a bundle (model.json + model.safetensors, and
    model.onnx with ``onnx=True``), as ``tagmill export`` does; returns what model.json says."""
    from tagmill.bundle.from_run import export_run

    return export_run(os.fspath(run), os.fspath(out), onnx=onnx)


def load_bundle(bundle: PathLike, *, backend: str = "torch", device: str = "cpu", batch_size: int = 32) -> Predictor:
    """A bundle, ready to predict: ``load_bundle(b).predict(image)`` takes a PIL image,
    a numpy array, a path or URL, bytes, or a list of them (``top_k=``, ``threshold=``)."""
    from tagmill.bundle.predictor import Predictor

    return Predictor.from_bundle(os.fspath(bundle), backend, device=device, batch_size=batch_size)


def diagnose_dataset(dataset: PathLike, out: PathLike | None = None, *, model: PathLike | None = None,
                     progress: bool = True) -> Diagnosis:
    """Check a packed dataset for label issues, duplicates, leakage, outliers and scarce
    classes, as ``tagmill doctor`` does; with ``out``, also write its report and CSVs
    there. The result's ``counts()`` summarises; ``label_issues``, ``duplicates`` and
    ``outliers`` hold the findings (rows of ``facts``, which carry each image's id)."""
    from tagmill.doctor.diagnose import diagnose
    from tagmill.doctor.report import write_report

    bars, log = _progress_and_log(progress)
    found = diagnose(os.fspath(dataset), model=os.fspath(model) if model is not None else None, progress=bars, log=log)
    if out is not None:
        write_report(found, os.fspath(out))
    return found


__all__ = ["diagnose_dataset", "evaluate_model", "export_bundle", "import_dataset", "load_bundle", "parse_duration",
           "train_model", "training_config"]
