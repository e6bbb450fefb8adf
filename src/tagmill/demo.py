"""``tagmill demo``: the main job, end to end, on the sample data in the repository.

import → inspect → train (pretrained EfficientNet-Lite0) → export → predict, with the
same library calls the individual commands make, each printed as the command a user
would type.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from tagmill.errors import InputError

#: The bundled sample: Fashion-MNIST images and a labels CSV (see its README).
SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "fashion-mnist"
PREDICTED_EXAMPLES = ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "00005.png"]


def sample_data() -> Path:
    if not (SAMPLE / "labels.csv").exists():
        raise InputError(
            f"the sample data is not at {SAMPLE}",
            hint="the demo runs from a checkout of the tagmill repository (make demo)",
        )
    return SAMPLE


def run_demo(workdir: Path, out: Console, err: Console, *, serve_port: int | None = 8080) -> None:
    from tagmill.bundle.batch_predict import Settings, predict_all
    from tagmill.bundle.from_run import export_run
    from tagmill.dataset.importer import ImportOptions, import_dataset
    from tagmill.dataset.contact_sheet import contact_sheet
    from tagmill.formats import SourceOptions
    from tagmill.progress import RichProgress
    from tagmill.summaries import import_summary, prediction_table
    from tagmill.train.config import TrainConfig
    from tagmill.train.loop import train

    sample = sample_data()
    progress = RichProgress(err)
    dataset, run_dir, bundle = workdir / "data", workdir / "run", workdir / "bundle"
    for stale in (run_dir, bundle):  # the demo always starts over
        shutil.rmtree(stale, ignore_errors=True)

    out.rule("[bold]1. import[/] labelled images into a packed dataset")
    _command(out, f"tagmill import {sample}/labels.csv --images {sample}/images --suffix .png --val-fraction 0.2 --out {dataset}")
    options = ImportOptions(source=SourceOptions(images=str(sample / "images"), suffix=".png"), val_fraction=0.2, overwrite=True)
    result = import_dataset(str(sample / "labels.csv"), str(dataset), options, progress=progress)
    for line in import_summary(result):
        out.print(line, highlight=False)
    sheet = workdir / "contact-sheet.png"
    contact_sheet(str(dataset), str(sheet), (6, 4))
    out.print(f"  contact sheet of training images: {sheet}", highlight=False)

    out.rule("[bold]2. train[/] from ImageNet weights: a converged head on cached features")
    _command(out, f"tagmill train {dataset} --out {run_dir}")
    # the defaults: on Fashion-MNIST, whole-network epochs after the converged head lowered
    # validation accuracy (dev data of bench/quality.py), so none are run unless asked for
    config = TrainConfig()
    trained = train(str(dataset), str(run_dir), config, progress=progress, log=lambda line: out.print(line, highlight=False))
    out.print(f"  best validation {trained.metric_name}: [bold]{trained.best_metric:.1%}[/]", highlight=False)
    out.print(f"  report with plots and worst predictions: {run_dir / 'report.md'}", highlight=False)

    out.rule("[bold]3. export[/] a self-describing bundle")
    _command(out, f"tagmill export {run_dir} --out {bundle}")
    meta = export_run(str(run_dir), str(bundle))
    # a few validation-style images ride along: the web page offers a bundle's examples/
    (bundle / "examples").mkdir(exist_ok=True)
    for name in PREDICTED_EXAMPLES:
        shutil.copyfile(sample / "images" / name, bundle / "examples" / name)
    out.print(f"  {bundle}: {meta.architecture}, {len(meta.classes)} classes, model.json + model.safetensors", highlight=False)

    out.rule("[bold]4. predict[/] with the bundle")
    examples = [str(sample / "images" / name) for name in PREDICTED_EXAMPLES]
    _command(out, f"tagmill predict {bundle} {' '.join(PREDICTED_EXAMPLES[:2])} … --top-k 3")
    rows = list(predict_all(Settings(str(bundle), "torch", 3, None, 32), examples))
    out.print(prediction_table(rows, multi=False))
    out.print(f"\n[bold green]done.[/] Bundle: [bold]{bundle}[/]   Report: [bold]{run_dir / 'report.md'}[/]", highlight=False)
    if serve_port is None:
        return

    from tagmill.serve.config import ServeConfig
    from tagmill.serve.server import run_server

    out.rule("[bold]5. serve[/] it: SageMaker-compatible endpoint, REST API and web page")
    _command(out, f"tagmill serve {bundle} --port {serve_port}")
    out.print(f"  web page: [bold]http://127.0.0.1:{serve_port}/[/]   (Ctrl+C to stop)", highlight=False)
    run_server(ServeConfig(bundle=str(bundle), port=serve_port))


def _command(out: Console, text: str) -> None:
    out.print(f"[dim]$ {text}[/]", highlight=False, soft_wrap=True)
