"""The ``tagmill`` command line. It only parses options into config objects and calls
the library; every behaviour lives in the packages below it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tagmill import __version__, storage
from tagmill.api import parse_duration
from tagmill.errors import InputError, TagmillError

#: Predictions printed as a table when no output file is given.
TABLE_ROWS = 50
#: ``train`` and ``lr-find`` share it; the numbers are ``dataset.torch_data.default_workers``'s
#: (not imported here: the command line starts without loading torch)
LOADER_WORKERS_HELP = "Data-loading processes (default: none below 1,000 images, else one per core up to 4)."
#: ``predict`` and ``serve``
PRECISION_HELP = ("With --backend onnx: auto (the bundle's INT8 graph when it has one and runs on the CPU) | fp32 | "
                  "int8 (`tagmill export --int8`).")
INFERENCE_DEVICE_HELP = ("auto (a GPU when there is one) | cpu | cuda | cuda:N; with --backend onnx, a GPU needs "
                         "onnxruntime-gpu (auto falls back to the CPU without it).")

app = typer.Typer(
    name="tagmill",
    help="Image classification from a folder of labelled images to a live service.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(func: F) -> F:
    """Print a TagmillError as one clear message and exit with its code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TagmillError as exc:
            _report(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _report(exc: TagmillError) -> None:
    err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    if exc.hint:
        err.print(f"  [dim]hint:[/] {escape(exc.hint)}", highlight=False)


#: a saved run's configuration fields (``config.json``) whose train option has another name
RUN_CONFIG_OPTIONS = {"resize_method": "resize", "unfrozen_epochs": "epochs"}


def _config_file(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """--config FILE, read before every other option (it is eager) into the command's
    defaults: a flag on the command line still wins over the file."""
    if value:
        from tagmill.config_file import command_defaults

        try:
            defaults = command_defaults(ctx.command, value, ctx, saved_run=RUN_CONFIG_OPTIONS if ctx.command.name == "train" else None)
        except TagmillError as exc:
            _report(exc)
            raise typer.Exit(exc.exit_code) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigFile = Annotated[
    Optional[str],
    typer.Option("--config", is_eager=True, callback=_config_file,
                 help="YAML or JSON file of this command's options (image_size or image-size: 64); flags override it."),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"tagmill {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    storage_option: Annotated[
        Optional[list[str]],
        typer.Option("--storage-option", help="fsspec option for URLs, KEY=VALUE (e.g. endpoint_url=http://...); repeatable."),
    ] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    options: dict[str, Any] = {}
    for item in storage_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err.print(f"[bold red]error:[/] --storage-option expects KEY=VALUE, got {item!r}")
            raise typer.Exit(InputError.exit_code)
        options[key.strip()] = value
    storage.set_storage_options(options)


def _split_list(values: list[str] | None) -> tuple[str, ...]:
    """Options given several times or comma-separated: --keep a --keep b,c."""
    return tuple(v.strip() for value in values or [] for v in value.split(",") if v.strip())


def _class_names(value: str | None) -> tuple[str, ...] | None:
    """--class-names: a file with one name per line, or a comma-separated list."""
    if value is None:
        return None
    if storage.exists(value) and not storage.isdir(value):
        return tuple(line.strip() for line in storage.read_text(value).splitlines() if line.strip())
    return _split_list([value])


@app.command("import")
@reports_errors
def import_command(
    source: Annotated[str, typer.Argument(help="Folder per class, CSV/TSV, one-hot CSV, .lst, or .rec/.idx; a path or URL.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Where to write the packed dataset (path or URL).")],
    fmt: Annotated[str, typer.Option("--format", help="auto | folder | csv | onehot | lst | recordio")] = "auto",
    images: Annotated[Optional[str], typer.Option(help="Folder holding the images named by a CSV or .lst (default: beside it).")] = None,
    root: Annotated[Optional[str], typer.Option(help="Same as --images (MXNet's name, for .lst files).")] = None,
    suffix: Annotated[Optional[str], typer.Option(help="Appended to CSV ids to name image files, e.g. .jpg.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="CSV column naming each image.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="CSV column with the label or the delimited tags.")] = None,
    class_columns: Annotated[Optional[list[str]], typer.Option(help="One-hot CSV: the 0/1 class columns (default: all of them).")] = None,
    delimiter: Annotated[Optional[str], typer.Option(help="CSV field delimiter (default: detected).")] = None,
    tag_sep: Annotated[Optional[str], typer.Option(help="Separator between tags in one CSV cell (default: detected).")] = None,
    split_column: Annotated[Optional[str], typer.Option(help="CSV column giving each row's split (train/val/test).")] = None,
    class_level: Annotated[int, typer.Option(help="Folder source: folder level naming the class (1 = first; -1 = the image's folder).")] = 1,
    class_names: Annotated[Optional[str], typer.Option(help=".lst/.rec: class names by index, a file or a comma list.")] = None,
    label_format: Annotated[str, typer.Option(help=".lst/.rec with several labels: auto | index | onehot.")] = "auto",
    multi_label: Annotated[Optional[bool], typer.Option("--multi-label/--single-label", help="Force the task (default: inferred).")] = None,
    val_from: Annotated[Optional[str], typer.Option(help="A second source, same format, used as the validation set.")] = None,
    val_images: Annotated[Optional[str], typer.Option(help="Folder holding --val-from's images, where it is not --images.")] = None,
    val_list: Annotated[Optional[str], typer.Option(help="Text file of ids (one per line) forming the validation set.")] = None,
    derive: Annotated[Optional[list[str]], typer.Option(help="Label rule, e.g. 'thriller = Thriller & Crime & ~Romance'; repeatable.")] = None,
    otherwise: Annotated[str, typer.Option(help="With one --derive rule: the name of the negative class.")] = "other",
    drop_ids: Annotated[Optional[str], typer.Option(help="Ids to leave out: one per line, or a CSV with an id column (tagmill doctor's).")] = None,
    relabel: Annotated[Optional[str], typer.Option(help="CSV of id,labels: new labels for those ids (after --derive).")] = None,
    keep: Annotated[Optional[list[str]], typer.Option(help="Keep only these classes/tags (repeatable or comma list).")] = None,
    drop: Annotated[Optional[list[str]], typer.Option(help="Drop these classes/tags (repeatable or comma list).")] = None,
    skip_untagged: Annotated[bool, typer.Option(help="Multi-label: drop images that have no tag.")] = False,
    min_per_class: Annotated[int, typer.Option(help="Remove classes with fewer images than this.")] = 0,
    max_per_class: Annotated[Optional[int], typer.Option(help="Sample at most this many images per class (seeded).")] = None,
    balance: Annotated[bool, typer.Option(help="Undersample every class to the rarest one (seeded).")] = False,
    val_fraction: Annotated[
        Optional[float], typer.Option(help="Fraction held out for validation, stratified (default 0.1; 0 when the source names a validation set).")
    ] = None,
    test_fraction: Annotated[float, typer.Option(help="Fraction held out for testing.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling and splits: same seed, same dataset.")] = 0,
    max_side: Annotated[int, typer.Option(help="Resize so the shorter side is at most this many pixels.")] = 320,
    no_resize: Annotated[bool, typer.Option("--no-resize", help="Keep images at their original size.")] = False,
    shard_size_mb: Annotated[Optional[int], typer.Option(help="Start a new shard after this many MB (default: a split's size / 32, within 16-256 MB, so that many readers each open only their own shards).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding images (default: one per core).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already at --out.")] = False,
    config_file: ConfigFile = None,
) -> None:
    """Import labelled images into a packed dataset (dataset.json + tar shards)."""
    from tagmill.dataset.edits import describe_edits
    from tagmill.dataset.importer import ImportOptions, import_dataset
    from tagmill.formats import SourceOptions
    from tagmill.progress import RichProgress

    if images and root and images != root:
        raise InputError("--images and --root name the same thing; give one of them")
    if label_format not in {"auto", "index", "onehot"}:
        raise InputError(f"--label-format must be auto, index or onehot, not {label_format!r}")
    source_options = SourceOptions(
        images=images or root,
        suffix=suffix,
        id_column=id_column,
        label_column=label_column,
        class_columns=_split_list(class_columns) or None,
        delimiter=delimiter,
        tag_separator=tag_sep,
        split_column=split_column,
        class_level=class_level,
        class_names=_class_names(class_names),
        label_format=label_format,  # type: ignore[arg-type]
        task=None if multi_label is None else ("multi" if multi_label else "single"),
    )
    options = ImportOptions(
        source=source_options,
        format=fmt,
        val_source=val_from,
        val_images=val_images,
        val_list=val_list,
        derive=tuple(derive or ()),
        otherwise=otherwise,
        drop_ids=drop_ids,
        relabel=relabel,
        keep=_split_list(keep),
        drop=_split_list(drop),
        skip_untagged=skip_untagged,
        min_per_class=min_per_class,
        max_per_class=max_per_class,
        balance=balance,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        max_side=None if no_resize else max_side,
        shard_bytes=shard_size_mb * 1024 * 1024 if shard_size_mb is not None else None,
        workers=workers,
        overwrite=overwrite,
    )
    result = import_dataset(source, out_dir, options, progress=RichProgress(err),
                            log=lambda line: err.print(line, highlight=False))
    print_import_summary(result)
    for line in describe_edits(result.report.get("edits", {})):
        out.print(f"  {line}", highlight=False, markup=False)  # file names may hold [brackets]


def print_import_summary(result: Any) -> None:
    from tagmill.summaries import import_summary

    for line in import_summary(result):
        out.print(line, highlight=False)


@app.command()
@reports_errors
def inspect(
    dataset: Annotated[str, typer.Argument(help="A packed dataset (path or URL).")],
    grid: Annotated[str, typer.Option(help="Contact sheet layout, COLSxROWS.")] = "4x3",
    sheet: Annotated[Optional[str], typer.Option(help="Where to write the contact sheet PNG (default: ./contact-sheet.png).")] = None,
    split: Annotated[str, typer.Option(help="Split to sample the contact sheet from.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed for the contact sheet's sample.")] = 0,
    no_sheet: Annotated[bool, typer.Option("--no-sheet", help="Only print statistics.")] = False,
) -> None:
    """Print classes, counts, imbalance and tag co-occurrence; write a contact sheet PNG."""
    from tagmill.dataset.contact_sheet import contact_sheet, parse_grid
    from tagmill.dataset.summary import summarize
    from tagmill.dataset.summary_console import render_summary

    columns_rows = parse_grid(grid)
    render_summary(summarize(dataset), out)
    if not no_sheet:
        target = sheet or "contact-sheet.png"
        drawn = contact_sheet(dataset, target, columns_rows, split=split, seed=seed)
        out.print(f"contact sheet: {drawn} {split} images → [bold]{target}[/]", highlight=False)


@app.command("train")
@reports_errors
def train_command(
    dataset: Annotated[Optional[str], typer.Argument(help="A packed dataset (from `tagmill import`); path or URL.")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Run directory to create.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run in this directory from its last checkpoint.")] = None,
    hyperparameters: Annotated[Optional[str], typer.Option(help="SageMaker image-classification hyperparameters (JSON file).")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="efficientnet_lite0 (default), lite1, lite2, or any timm architecture.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights (default: yes).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Local weights file for the backbone (.safetensors or .pth state dict).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels (default: from the images' size, at most the backbone's).")] = None,
    resize: Annotated[Optional[str], typer.Option(help="squish | crop | pad")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="avg | avgmax | levels: how the feature maps become the head's input (default: levels for CNNs that allow it: avg+max of the final map and of the last blocks; avgmax: fastai's concat pooling).")] = None,
    augmentation: Annotated[Optional[str], typer.Option(help="none | crop | crop_color | crop_color_transform")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch.")] = None,
    frozen_epochs: Annotated[Optional[int], typer.Option(help="One-cycle head epochs on cached features (fastai's frozen fit; default: the head is fitted to convergence).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Exactly N whole-network epochs after the head (default: none, or while validation improves within --time-budget).")] = None,
    time_budget: Annotated[Optional[str], typer.Option(help="Wall time the run may take, e.g. 90s, 10m, 1h: fine-tunes the whole network with what is left after the head, while validation improves.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the head's one-cycle epochs (default: the lr finder's suggestion).")] = None,
    lr_mult: Annotated[Optional[float], typer.Option(help="Unfrozen stage: head lr / earliest layers' lr.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Single-label: label smoothing.")] = None,
    pos_weight: Annotated[Optional[bool], typer.Option("--pos-weight/--no-pos-weight", help="Multi-label: weight rare tags' positives up.")] = None,
    cache_views: Annotated[Optional[int], typer.Option(help="Views of each image in the feature cache (default: from the input size).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="k of the k-fold that chooses the head's regularisation and tunes tag thresholds.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without improvement.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed: same seed, same run (on the same machine).")] = None,
    workers: Annotated[Optional[int], typer.Option(help=LOADER_WORKERS_HELP)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Multi-label: threshold for accuracy_thresh and F-beta.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Single-label: k of the top-k accuracy.")] = None,
    nproc: Annotated[Optional[int], typer.Option(help="Run N training processes on this machine (torchrun; DDP).")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from this bundle: same classes keep their head rows (incremental training).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Local cache for shards read from URLs (s3://…): later epochs read disk.")] = None,
    cache_gb: Annotated[Optional[float], typer.Option(help="Size bound of --cache-dir in GB.")] = None,
    track: Annotated[Optional[list[str]], typer.Option(help="tensorboard | mlflow: follow the run there (RUN/tensorboard; MLflow at $MLFLOW_TRACKING_URI, default RUN/mlruns); repeatable.")] = None,
    unfrozen_lr_scale: Annotated[Optional[float], typer.Option(help="Whole-network stage: its peak lr is the head's (--lr or the finder's) times this (default 0.1; 5e-4 when the head had no lr: fitted to convergence without --lr).")] = None,
    config_file: ConfigFile = None,
) -> None:
    """Train a classifier: cached-feature head training, then discriminative fine-tuning."""
    if nproc is not None:
        raise typer.Exit(_launch_torchrun(nproc))
    from tagmill.api import training_config
    from tagmill.progress import RichProgress
    from tagmill.train.loop import train

    given = {
        "backbone": backbone, "pretrained": pretrained, "weights": weights, "image_size": image_size,
        "resize_method": resize, "pooling": pooling, "augmentation": augmentation, "batch_size": batch_size,
        "frozen_epochs": frozen_epochs, "unfrozen_epochs": epochs, "lr": lr, "lr_mult": lr_mult, "unfrozen_lr_scale": unfrozen_lr_scale,
        "time_budget": parse_duration(time_budget) if time_budget is not None else None, "folds": folds,
        "weight_decay": weight_decay, "label_smoothing": label_smoothing, "pos_weight": pos_weight,
        "cache_views": cache_views, "precision": precision, "channels_last": channels_last,
        "patience": patience, "seed": seed, "workers": workers, "device": device,
        "threshold": threshold, "top_k": top_k, "init_from": init_from, "cache_dir": cache_dir, "cache_gb": cache_gb,
    }
    options = {k: v for k, v in given.items() if v is not None}
    progress = RichProgress(err)
    from tagmill.bundle.as_start import starting_point
    from tagmill.bundle.from_run import export_run
    from tagmill.train.tracking import create_trackers

    run_dir = resume or out_dir
    trackers = create_trackers(_split_list(track), run_dir, export=export_run) if track and run_dir else []
    if resume:
        if dataset or out_dir or options or hyperparameters:
            raise InputError("--resume takes the run directory only: its dataset and options are in the run")
        result = train(None, resume, resume=True, load_start=starting_point, progress=progress, log=out.print,
                       trackers=trackers)
    else:
        if dataset is None or out_dir is None:
            raise InputError("give a DATASET and --out RUN (or --resume RUN)")
        config = training_config(dataset, options, hyperparameters=hyperparameters, log=out.print)
        result = train(dataset, out_dir, config, load_start=starting_point, progress=progress, log=out.print, trackers=trackers)
    out.print(f"best {result.metric_name}: {result.best_metric:.4f} — run in [bold]{result.run_dir}[/]", highlight=False)


def _launch_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun with N local processes (gloo or nccl)."""
    import subprocess
    import sys

    if nproc < 1:
        raise InputError("--nproc must be >= 1")
    if "WORLD_SIZE" in os.environ:
        raise InputError("--nproc cannot be used inside torchrun: torchrun already started the processes")
    args = _without_option(sys.argv[1:], "--nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "tagmill", *args]
    err.print(f"[dim]$ {' '.join(cmd[1:])}[/]", highlight=False)
    code = subprocess.call(cmd)
    if code != 0:
        err.print(f"[bold red]error:[/] distributed training failed (exit code {code}); see the rank errors above")
    return code


def _without_option(args: list[str], name: str) -> list[str]:
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


@app.command("lr-find")
@reports_errors
def lr_find_command(
    dataset: Annotated[str, typer.Argument(help="A packed dataset (from `tagmill import`); path or URL.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Where to write lr_find.png and lr_find.json.")],
    backbone: Annotated[Optional[str], typer.Option(help="efficientnet_lite0 (default), lite1, lite2, or any timm architecture.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights (default: yes).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Local weights file for the backbone (.safetensors or .pth state dict).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels (default: from the images' size, at most the backbone's).")] = None,
    resize: Annotated[Optional[str], typer.Option(help="squish | crop | pad")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="avg | avgmax | levels: how the feature maps become the head's input (default: levels for CNNs that allow it: avg+max of the final map and of the last blocks; avgmax: fastai's concat pooling).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch (as in training).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed: same seed, same sweep.")] = None,
    workers: Annotated[Optional[int], typer.Option(help=LOADER_WORKERS_HELP)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    start_lr: Annotated[float, typer.Option(help="Learning rate of the sweep's first step.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Learning rate of its last step.")] = 10.0,
    steps: Annotated[int, typer.Option(help="Steps in the sweep (it stops early when the loss diverges).")] = 100,
) -> None:
    """Suggest a head learning rate: fastai's lr_find, on cached backbone features."""
    from tagmill.progress import RichProgress
    from tagmill.train.config import TrainConfig
    from tagmill.train.lr_find import PLOT, find_lr

    given = {
        "backbone": backbone, "pretrained": pretrained, "weights": weights, "image_size": image_size,
        "resize_method": resize, "pooling": pooling, "batch_size": batch_size, "seed": seed, "workers": workers,
        "device": device,
    }
    config = TrainConfig.from_dict({k: v for k, v in given.items() if v is not None})
    sweep = find_lr(dataset, out_dir, config, start=start_lr, end=end_lr, num_steps=steps, progress=RichProgress(err))
    out.print(f"suggested lr: [bold]{sweep.suggestion:.1e}[/] ({sweep.method})", highlight=False)
    if sweep.method != "valley":
        out.print(f"[yellow]{sweep.message}[/]", highlight=False)
    out.print(f"plot: [bold]{storage.join(out_dir, PLOT)}[/]", highlight=False)


@app.command()
@reports_errors
def doctor(
    dataset: Annotated[str, typer.Argument(help="A packed dataset (from `tagmill import`); path or URL.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Where to write report.md/.html, the CSVs and doctor.json.")],
    model: Annotated[Optional[str], typer.Option(help="A training run or bundle whose backbone gives the features (a run's feature cache is reused when it matches); default: the pretrained backbone training would start from.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Without --model: efficientnet_lite0 (default), lite1, lite2, or any timm architecture.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Without --model: input size in pixels (default: as training would choose).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch for the features.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the k-fold split that judges the labels.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding images.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
) -> None:
    """Find mislabelled images, duplicates, train/val leakage, outliers and scarce classes."""
    from tagmill.doctor.diagnose import diagnose
    from tagmill.doctor.report import write_report
    from tagmill.progress import RichProgress
    from tagmill.train.config import TrainConfig

    given = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size, "seed": seed,
             "workers": workers, "device": device}
    config = TrainConfig.from_dict({k: v for k, v in given.items() if v is not None})
    found = diagnose(dataset, model=model, config=config, workers=workers, progress=RichProgress(err),
                     log=lambda line: err.print(line, highlight=False))
    report = write_report(found, out_dir)
    counts = found.counts()
    out.print(f"label issues: [bold]{counts['label_issues']}[/] images", highlight=False)
    dupes = counts["duplicate_pairs"]
    out.print(f"duplicates: [bold]{dupes['exact']}[/] exact, [bold]{dupes['near']}[/] near pairs; "
              f"[bold]{counts['leaked_pairs']}[/] across splits", highlight=False)
    leak = found.leakage
    if counts["leaked_pairs"] and leak.get("without_leaked") is not None:
        out.print(f"[yellow]leakage: validation {leak['metric']} {leak['with_leaked']:.4f} with the leaked images, "
                  f"{leak['without_leaked']:.4f} without[/]", highlight=False)
    out.print(f"outliers: [bold]{sum(counts['outliers'].values())}[/]; scarce classes: [bold]{counts['scarce_labels']}[/]",
              highlight=False)
    out.print(f"report: [bold]{report}[/]", highlight=False)


@app.command()
@reports_errors
def export(
    run: Annotated[str, typer.Argument(help="A training run directory.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Bundle directory to write.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Also write model.onnx (checked against PyTorch with onnxruntime).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx: quantized, calibrated on the run's training images, checked on its validation split (implies --onnx).")] = False,
    int8_max_drop: Annotated[Optional[float], typer.Option(help="With --int8: the largest drop of the validation metric (0-1) accepted; more is refused (exit 10). Default 0.01.")] = None,
    calibration_images: Annotated[Optional[int], typer.Option(help="With --int8: training images the quantization ranges are calibrated on. Default 200.")] = None,
) -> None:
    """Export a run's best checkpoint as a model bundle (model.json + model.safetensors)."""
    from tagmill.bundle.from_run import export_run

    if not int8 and (int8_max_drop is not None or calibration_images is not None):
        raise InputError("--int8-max-drop and --calibration-images apply to --int8 only")
    meta = export_run(run, out_dir, onnx=onnx, int8=int8, max_drop=int8_max_drop, calibration_images=calibration_images)
    files = "model.json, model.safetensors" + (", model.onnx" if onnx or int8 else "") + (", model.int8.onnx" if int8 else "")
    out.print(f"bundle [bold]{out_dir}[/]: {meta.architecture}, {len(meta.classes)} classes ({files})", highlight=False)
    if meta.int8 is not None:
        check = meta.int8
        out.print(f"INT8: {check['agreement']} agreement {check['agreement_rate']:.2%} with fp32 on {check['images']:,} "
                  f"{check['split']} images; {check['metric']} {check['fp32']:.4f} -> {check['int8']:.4f}", highlight=False)


@app.command()
@reports_errors
def predict(
    bundle: Annotated[str, typer.Argument(help="A model bundle (from `tagmill export`).")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders, or packed datasets.")],
    top_k: Annotated[Optional[int], typer.Option(help="How many best classes to show.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Multi-label: one threshold for every tag (default: the bundle's tuned ones).")] = None,
    split: Annotated[Optional[str], typer.Option(help="For packed datasets: only this split.")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write all predictions to this JSON file.")] = None,
    jsonl_out: Annotated[Optional[str], typer.Option("--jsonl", help="Write one JSON line per image to this file.")] = None,
    csv_out: Annotated[Optional[str], typer.Option("--csv", help="Write a CSV (a probability column per class).")] = None,
    backend: Annotated[str, typer.Option(help="torch | onnx")] = "torch",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=INFERENCE_DEVICE_HELP)] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    nproc: Annotated[int, typer.Option(help="Processes to spread the work over (output order is unchanged).")] = 1,
    explain_dir: Annotated[Optional[str], typer.Option("--explain", help="Also write a Grad-CAM heatmap overlay PNG per image and explained class (the top class; each predicted tag) to this folder. Needs tagmill[explain].")] = None,
) -> None:
    """Predict classes or tags for images; unreadable files are reported, not fatal."""
    import itertools

    from tagmill.bundle.batch_predict import Settings, predict_all, write_rows
    from tagmill.bundle.format import read_meta
    from tagmill.progress import RichProgress
    from tagmill.summaries import prediction_table

    meta = read_meta(bundle)
    if explain_dir:
        from tagmill.bundle.explain import require_grad_cam

        require_grad_cam()  # before any work
    settings = Settings(bundle, backend, top_k, threshold, batch_size, device, precision)
    predictor = None
    if nproc == 1 or explain_dir:  # loaded here, so the user is told what it runs on
        from tagmill.bundle.predictor import Predictor

        predictor = Predictor.from_bundle(bundle, backend=backend, device=device, precision=precision)
        err.print(f"running on {predictor.runs_on}", highlight=False)
    outputs = [(location, fmt) for location, fmt in ((json_out, "json"), (jsonl_out, "jsonl"), (csv_out, "csv")) if location]
    failed = 0

    def counted(rows):
        nonlocal failed
        for row in rows:
            failed += not row.prediction.ok
            yield row

    rows = counted(predict_all(settings, paths, split=split, nproc=nproc, progress=RichProgress(err), predictor=predictor))
    if outputs:
        # one output streams; several need the rows more than once
        source = list(rows) if len(outputs) > 1 else rows
        for location, fmt in outputs:
            written = write_rows(source, location, fmt, meta.classes)
            out.print(f"{written:,} predictions → [bold]{location}[/]", highlight=False)
    else:
        shown = list(itertools.islice(rows, TABLE_ROWS))
        hidden = sum(1 for _ in rows)
        out.print(prediction_table(shown, multi=meta.task == "multi", hidden=hidden))
    if failed:
        err.print(f"[yellow]{failed:,} inputs could not be read[/] (see the error column)")
    if explain_dir and predictor is not None:
        from tagmill.bundle.explain import explain_paths

        summary = explain_paths(predictor, paths, explain_dir, split=split, progress=RichProgress(err))
        out.print(f"{len(summary.written):,} heatmaps → [bold]{explain_dir}[/]", highlight=False)
        for name, why in summary.failed:
            err.print(f"[yellow]not explained:[/] {escape(name)}: {escape(why)}", highlight=False)


@app.command()
@reports_errors
def suggest(
    bundle: Annotated[str, typer.Argument(help="A model bundle (from `tagmill export`).")],
    paths: Annotated[list[str], typer.Argument(help="Unlabelled images: files, folders, packed datasets or URLs.")],
    out_csv: Annotated[str, typer.Option("--out", "-o", help="The CSV to write (`tagmill import` reads it back); the chosen images are copied into <name>_images/ beside it.")],
    count: Annotated[int, typer.Option(help="How many images to suggest.")] = 100,
    split: Annotated[Optional[str], typer.Option(help="For packed datasets: only this split.")] = None,
    device: Annotated[str, typer.Option(help=INFERENCE_DEVICE_HELP)] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the diversity step's clustering.")] = 0,
) -> None:
    """Choose the unlabelled images whose labels would help the model most: uncertain, and unlike each other."""
    from tagmill.bundle.predictor import Predictor
    from tagmill.bundle.suggest import import_hint, suggest as rank, write_suggestions
    from tagmill.progress import RichProgress

    predictor = Predictor.from_bundle(bundle, device=device, batch_size=batch_size)
    found = rank(predictor, paths, count, split=split, seed=seed, progress=RichProgress(err))
    for name, why in found.skipped:
        err.print(f"[yellow]skipped:[/] {escape(name)}: {escape(why)}", highlight=False)
    multi = predictor.meta.multilabel
    folder = write_suggestions(found, out_csv, paths, split=split, multilabel=multi)
    out.print(f"{len(found.names):,} of {found.considered:,} images suggested → [bold]{out_csv}[/] (images in {folder})"
              + (f"; {len(found.skipped):,} unreadable skipped" if found.skipped else ""), highlight=False)
    out.print(f"correct the labels column, then: {escape(import_hint(out_csv, multilabel=multi))}", highlight=False)


@app.command()
@reports_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="A training run directory or a model bundle.")],
    dataset: Annotated[str, typer.Argument(help="A packed dataset.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Where to write metrics, plots and report.md.")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="Multi-label: tune per-tag thresholds on this split (default: use the model's).")] = False,
) -> None:
    """Evaluate a run or bundle on a dataset split: metrics, plots and report.md."""
    from tagmill.progress import RichProgress
    from tagmill.bundle.evaluate_model import evaluate_model

    target = out_dir or storage.join(model, f"eval-{split}")
    result = evaluate_model(model, dataset, split, target, tune=tune, progress=RichProgress(err))
    out.print(f"{split}: {result.summary_line()}", highlight=False)
    out.print(f"report: [bold]{storage.join(target, 'report.md')}[/]", highlight=False)


@app.command()
@reports_errors
def serve(
    bundle: Annotated[str, typer.Argument(help="A model bundle (path or URL).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 opens it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (8080, as SageMaker containers).")] = 8080,
    workers: Annotated[int, typer.Option(help="Server processes, each with its own copy of the model.")] = 1,
    threads: Annotated[int, typer.Option(help="Inference threads per worker.")] = 1,
    backend: Annotated[str, typer.Option(help="torch | onnx (needs model.onnx: `tagmill export --onnx`).")] = "torch",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=INFERENCE_DEVICE_HELP)] = "auto",
    api_key: Annotated[Optional[str], typer.Option(help="Require this key (X-Api-Key or Bearer) on prediction routes.", envvar="TAGMILL_API_KEY")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted.")] = 10.0,
    max_batch: Annotated[Optional[int], typer.Option(help="Requests grouped into one forward pass (default: 1 for torch, where batching is slower on CPUs; 4 for onnx, which gains nothing per image from larger batches and holds their activations in memory).")] = None,
    max_wait_ms: Annotated[float, typer.Option(help="Longest a batch waits to fill.")] = 5.0,
    queue_size: Annotated[int, typer.Option(help="Requests waiting at most; beyond, 503 + Retry-After.")] = 64,
    decode_threads: Annotated[Optional[int], typer.Option(help="Threads per worker decoding request images beside the model; 0: the model thread decodes them (default: 0 when the workers' inference threads use every CPU and the model runs on it, else 2).")] = None,
    max_connections: Annotated[int, typer.Option(help="Open connections per worker, idle ones included; beyond, 503.")] = 512,
    header_timeout_s: Annotated[float, typer.Option(help="Seconds a client may take to send a request's headers.")] = 10.0,
    model_name: Annotated[Optional[str], typer.Option(help="The model's name on the /v2 (KServe/Triton) routes; default: the bundle directory's name. Kept when the model is swapped.")] = None,
    explain_concurrency: Annotated[int, typer.Option(help="Explanations (POST /predict?explain=true) running at once per worker; apart from predictions.")] = 1,
    explain_wait_s: Annotated[float, typer.Option(help="Longest an explanation waits for a slot; beyond, 503 + Retry-After.")] = 1.0,
    capture: Annotated[Optional[str], typer.Option(help="Store request images the model is unsure of, with its predictions, in this folder or s3:// URL (for `tagmill suggest`).")] = None,
    capture_below: Annotated[float, typer.Option(help="With --capture: store images whose confidence is below this (multi-label: the least sure tag's, 0.5 at its threshold).")] = 0.6,
    capture_sample: Annotated[float, typer.Option(help="With --capture: also store this random fraction of all images.")] = 0.0,
    capture_max_gb: Annotated[float, typer.Option(help="With --capture: stop storing when the folder holds this many GiB.")] = 5.0,
    capture_queue: Annotated[int, typer.Option(help="With --capture: images waiting for the writer at most; beyond, dropped and counted.")] = 256,
    config_file: ConfigFile = None,
) -> None:
    """Serve a bundle: SageMaker-compatible endpoint, KServe/Triton v2 protocol, REST API and a web page.

    POST /admin/model (with the API key) or SIGHUP switches to a new bundle without downtime."""
    from tagmill.serve.config import ServeConfig
    from tagmill.serve.server import run_server

    config = ServeConfig(
        bundle=bundle, host=host, port=port, workers=workers, threads=threads, backend=backend, precision=precision, device=device,
        api_key=api_key,
        max_body_mb=max_body_mb, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
        decode_threads=decode_threads,
        max_connections=max_connections, header_timeout_s=header_timeout_s, model_name=model_name,
        capture=capture, capture_below=capture_below, capture_sample=capture_sample, capture_max_gb=capture_max_gb,
        capture_queue=capture_queue, explain_concurrency=explain_concurrency, explain_wait_s=explain_wait_s,
    )
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    out.print(f"serving {bundle} — web page: [bold]http://{shown}:{port}/[/]  (Ctrl+C to stop)", highlight=False)
    run_server(config)


@app.command()
@reports_errors
def backbones(
    names: Annotated[Optional[list[str]], typer.Argument(help="Backbones to show (default: the usual ones and whatever the Hugging Face cache holds).")] = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", help="Also every timm pretrained name matching this pattern, e.g. 'convnext_*'.")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Time inference and a training step on this machine (random weights; seconds per backbone).")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the rows to this JSON file.")] = None,
) -> None:
    """List backbones: weights available here, input size, parameters, GFLOPs (and speed with --measure)."""
    import json

    from tagmill.models.catalog import default_names, describe, matching
    from tagmill.summaries import backbone_table

    chosen = list(names or ([] if filter_ else default_names()))
    if filter_:
        chosen += [name for name in matching(filter_) if name not in chosen]
    rows = []
    with err.status("measuring" if measure else "counting") as status:
        for name in chosen:
            status.update(f"{'measuring' if measure else 'counting'} {name}")
            rows.append(describe(name, measure=measure))
    out.print(backbone_table(rows, measured=measure))
    if json_out:
        with storage.atomic_write(json_out) as raw:
            raw.write(json.dumps([row.as_dict() for row in rows], indent=1).encode())


@app.command()
@reports_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its dataset and outputs.")] = Path("runs/demo"),
    port: Annotated[int, typer.Option(help="Port the demo serves its model on at the end.")] = 8080,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Stop after predicting; do not start the server.")] = False,
) -> None:
    """Run the main job on the bundled sample data (Fashion-MNIST images + labels CSV)."""
    from tagmill.demo import run_demo

    run_demo(workdir, out, err, serve_port=None if no_serve else port)


sagemaker_app = typer.Typer(
    help="SageMaker's container contract (the image's `train` and `serve`): the job's files under --root.",
    no_args_is_help=True,
)
app.add_typer(sagemaker_app, name="sagemaker")


@sagemaker_app.command("train")
def sagemaker_train(
    root: Annotated[str, typer.Option(help="SageMaker's folder (input/, model/, output/).")] = "/opt/ml",
) -> None:
    """Import the job's channels, train with its hyperparameters, write the bundle to ROOT/model;
    on any failure, the reason goes to ROOT/output/failure and the exit code is non-zero."""
    import signal
    import sys

    from tagmill.sagemaker_container import run_training, write_failure

    # As a container's PID 1 the process has no default action for SIGTERM: without a
    # handler, `docker stop` and SageMaker's StopTrainingJob would wait out their grace period.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_training(root, log=lambda line: out.print(line, highlight=False, markup=False))
    except Exception as exc:  # every failure, tagmill's or not, must reach output/failure
        if isinstance(exc, TagmillError):
            _report(exc)
        code = write_failure(root, exc)
        if not isinstance(exc, TagmillError):
            raise
        raise typer.Exit(code) from None


@sagemaker_app.command("serve")
@reports_errors
def sagemaker_serve(
    root: Annotated[str, typer.Option(help="SageMaker's folder: the bundle is ROOT/model.")] = "/opt/ml",
) -> None:
    """Serve ROOT/model on port 8080 (SAGEMAKER_BIND_TO_PORT), all addresses; workers from
    SAGEMAKER_MODEL_SERVER_WORKERS; the onnx backend when the bundle has model.onnx."""
    from tagmill.sagemaker_container import serve_config
    from tagmill.serve.server import run_server

    config = serve_config(root)
    out.print(f"serving {config.bundle} on port {config.port} ({config.backend}, {config.workers} worker(s))",
              highlight=False)
    run_server(config)


def main() -> None:
    app()
