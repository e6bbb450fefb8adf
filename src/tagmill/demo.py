"""``tagmill demo``: the main job, end to end, on the sample data in the repository."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tagmill.errors import InputError

#: The bundled sample: Fashion-MNIST images and a labels CSV (see its README).
SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "fashion-mnist"


def sample_data() -> Path:
    if not (SAMPLE / "labels.csv").exists():
        raise InputError(
            f"the sample data is not at {SAMPLE}",
            hint="the demo runs from a checkout of the tagmill repository (make demo)",
        )
    return SAMPLE


def run_demo(workdir: Path, out: Console, err: Console) -> None:
    from tagmill.dataset.importer import ImportOptions, import_dataset
    from tagmill.dataset.inspect import contact_sheet, render_summary, summarize
    from tagmill.formats import SourceOptions
    from tagmill.progress import RichProgress
    from tagmill.summaries import import_summary

    sample = sample_data()
    dataset = workdir / "data"
    out.rule("[bold]1. import[/] the labelled images into a packed dataset")
    out.print(f"$ tagmill import {sample}/labels.csv --images {sample}/images --suffix .png --out {dataset}\n", highlight=False)
    options = ImportOptions(
        source=SourceOptions(images=str(sample / "images"), suffix=".png"),
        val_fraction=0.2,
        overwrite=True,
    )
    result = import_dataset(str(sample / "labels.csv"), str(dataset), options, progress=RichProgress(err))
    for line in import_summary(result):
        out.print(line, highlight=False)

    out.rule("[bold]2. inspect[/] it")
    sheet = workdir / "contact-sheet.png"
    render_summary(summarize(str(dataset)), out)
    contact_sheet(str(dataset), str(sheet), (6, 4))
    out.print(f"\ncontact sheet of training images: [bold]{sheet}[/]", highlight=False)
    out.print("\nnext: `tagmill inspect` any dataset; training arrives with `tagmill train`.")
