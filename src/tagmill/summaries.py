"""One-screen, human summaries of what a command did (rich markup lines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tagmill.dataset.importer import ImportResult

#: How many skipped inputs the summary lists by name before pointing at the report.
SHOWN_SKIPS = 5


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def skipped_line(report: dict) -> str:
    """"skipped 12 of 2,210: 9 unreadable, 3 missing — see report" (or "nothing skipped")."""
    count = report.get("skipped_count", 0)
    if not count:
        return "nothing skipped"
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in report.get("skipped_by_reason", {}).items())
    return f"skipped {count:,} of {report.get('inputs', 0):,}: {reasons} — see the report in dataset.json"


def import_summary(result: ImportResult) -> list[str]:
    manifest = result.manifest
    report = manifest.report
    task = "multi-label" if manifest.task == "multi" else "single-label"
    splits = " · ".join(f"{name} {info.count:,}" for name, info in manifest.splits.items())
    shards = [s for info in manifest.splits.values() for s in info.shards]
    size_mb = sum(s.bytes for s in shards) / 1e6
    resize = manifest.image.get("max_side")
    lines = [
        f"[bold green]imported[/] {_plural(report['imported'], 'image')} from {manifest.source.get('format', '')} → [bold]{result.location}[/]",
        f"  {task}, {len(manifest.classes):,} classes: {_class_preview(manifest.classes)}",
        f"  {splits}   ({_plural(len(shards), 'shard')}, {size_mb:,.1f} MB, "
        + (f"shorter side ≤ {resize} px)" if resize else "original sizes)"),
    ]
    if manifest.task == "multi":
        lines.append(f"  {report.get('untagged', 0):,} images with no tag (kept as all-negative examples)")
    for rule in report.get("derived", []):
        lines.append(f"  derived: {rule}")
    for step in report.get("sampling", []):
        lines.append(f"  {step['summary']}")
    lines.append(("  [yellow]" if report.get("skipped_count") else "  ") + skipped_line(report) + ("[/]" if report.get("skipped_count") else ""))
    for skip in report.get("skipped", [])[:SHOWN_SKIPS]:
        lines.append(f"    {skip['reason']}: {skip['source']}" + (f" ({skip['detail']})" if skip["detail"] else ""))
    hidden = report.get("skipped_count", 0) - SHOWN_SKIPS
    if hidden > 0:
        lines.append(f"    … and {hidden:,} more")
    return lines


def _class_preview(classes: list[str], shown: int = 8) -> str:
    text = ", ".join(classes[:shown])
    return text + (f", … (+{len(classes) - shown})" if len(classes) > shown else "")


def prediction_table(rows: list, *, multi: bool, hidden: int = 0):
    """A rich table of predictions: one line per input, best labels with scores."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    table.add_column("input", overflow="fold")
    table.add_column("tags (above threshold)" if multi else "prediction")
    table.add_column("top scores")
    for row in rows:
        p = row.prediction
        if not p.ok:
            table.add_row(row.name, f"[red]error: {p.error}[/]", "")
            continue
        top = ", ".join(f"{label} {score:.2f}" for label, score in p.top)
        table.add_row(row.name, ", ".join(p.labels) or "(none)", top)
    if hidden:
        table.caption = f"… {hidden:,} more (use --json/--jsonl/--csv for all)"
    return table


def backbone_table(rows: list, *, measured: bool):
    """A rich table of ``models.catalog.Backbone`` rows."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    table.add_column("backbone")
    table.add_column("weights here")
    table.add_column("input", justify="right")
    table.add_column("params (M)", justify="right")
    table.add_column("GFLOPs", justify="right")
    if measured:
        table.add_column("infer img/s", justify="right")
        table.add_column("train img/s", justify="right")
    for row in rows:
        cells = [row.name, row.weights or "[dim]no[/]", f"{row.input_size}px", f"{row.params_m:.1f}", f"{row.gflops:.2f}"]
        if measured:
            cells += [f"{row.infer_per_s:.1f}", f"{row.train_per_s:.1f}"]
        table.add_row(*cells)
    table.caption = ("GFLOPs: one image, one forward pass at the input size (a multiply-add counts 2). "
                     "Weights not here: see README, 'Backbones and weights'.")
    return table
