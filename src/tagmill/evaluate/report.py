"""report.md: one readable page per run, beside metrics.json and the plots.

The report links its images by paths relative to the run directory, so the whole
directory can be copied, zipped or browsed on GitHub and still show its pictures.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import torch
from torch import Tensor

from tagmill import storage
from tagmill.errors import InputError
from tagmill.evaluate.markdown import image, labels, table, text
from tagmill.evaluate.metrics import EvaluationResult

REPORT_NAME = "report.md"
#: with more classes than this, the per-class table lists only the worst by F1
TABLE_MAX_CLASSES = 30

_UNDEFINED_BECAUSE = {
    "mAP": "no positive sample in this data",
    "roc_auc": "all samples positive or all negative in this data",
}
#: fastai's multi-label metrics keep their names, marked as fastai's definitions
_METRIC_LABELS = {
    "accuracy_thresh": "accuracy_thresh (fastai's: share of all image×tag decisions right)",
    "fbeta": "fbeta (fastai's: F-beta per image, averaged; an untagged image scores 0)",
}
_PLOT_TITLES = {
    "curves": "Training curves",
    "confusion": "Confusion matrix",
    "per_class_f1": "F1 per class",
}


def write_report(
    run_dir: str,
    *,
    title: str,
    result: EvaluationResult,
    plots: dict[str, str],
    top_losses: list[dict[str, Any]],
    config: dict[str, Any],
    sources: dict[str, str] | None = None,
    fixed: dict[str, Any] | None = None,
    data_issues: str = "",
) -> str:
    """Write ``run_dir/report.md`` and return its location.

    ``plots`` maps a name ("curves", "confusion", "per_class_f1", or any other) to a
    PNG path, relative to ``run_dir`` or inside it. ``top_losses`` rows are
    {"thumbnail", "id", "true", "predicted", "loss"}, thumbnails already written.
    ``sources`` says in words where the numbers come from ({"metrics", "model",
    "thresholds"}); ``fixed`` holds the headline at one fixed threshold when the
    main table uses per-tag ones ({"threshold", "headline"}). ``data_issues`` is a
    ready section (``doctor.in_training``), placed before the configuration.
    """
    sections = [
        f"# {text(title)}",
        _overview(result),
        _sources_section(sources or {}),
        _headline_section(result, fixed),
        _plots_section(run_dir, plots),
        _per_class_section(result),
        _top_losses_section(run_dir, top_losses),
        data_issues,
        _config_section(config),
    ]
    location = storage.join(run_dir, REPORT_NAME)
    storage.write_bytes(location, ("\n\n".join(s for s in sections if s) + "\n").encode("utf-8"))
    return location


def top_losses(losses: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest losses (N,), largest first; fewer when N < k."""
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        raise InputError("losses must be a 1-d tensor (one loss per sample)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"k must be a non-negative integer, got {k!r}")
    k = min(k, len(losses))
    return torch.topk(losses.detach().float(), k).indices.tolist()


def write_thumbnail(image_bytes: bytes, out: str, size: int = 128) -> None:
    """A thumbnail fitting ``size``×``size`` (aspect kept), JPEG unless ``out`` ends in .png."""
    from PIL import Image

    from tagmill.dataset.images import decode, to_rgb

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"thumbnail size must be a positive integer, got {size!r}")
    picture = to_rgb(decode(image_bytes, shrink_to=size))  # decode keeps Pillow's bomb guard
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if out.lower().endswith(".png"):
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=85)
    storage.write_bytes(out, buffer.getvalue())


# --- sections ------------------------------------------------------------------------


def _overview(result: EvaluationResult) -> str:
    classes = len(result.classes) or len(result.per_class)
    if result.task == "single":
        line = f"Single-label classification: {result.num_samples:,} evaluated samples, {classes:,} classes."
        if "top_k" in result.params:
            line += f" Top-k accuracy with k = {result.params['top_k']}."
        return line
    threshold = result.params.get("threshold")
    rule = f"prob > {threshold:g}" if isinstance(threshold, (int, float)) else "prob > its own tuned threshold"
    return (
        f"Multi-label tagging: {result.num_samples:,} evaluated samples, {classes:,} tags. "
        f"A tag is predicted when {rule}; F-beta uses β = {result.params.get('beta', 2.0):g}, "
        "computed per sample and averaged over samples (as fastai's `fbeta`)."
    )


def _sources_section(sources: dict[str, str]) -> str:
    if not sources:
        return ""
    names = {"metrics": "Metrics", "model": "Model", "thresholds": "Thresholds"}
    lines = ["## Where the numbers come from", ""]
    lines += [f"- **{names.get(key, key.capitalize())}**: {text(said)}." for key, said in sources.items()]
    return "\n".join(lines)


def _headline_section(result: EvaluationResult, fixed: dict[str, Any] | None = None) -> str:
    values = {**result.headline, **result.extra}
    header = ["metric", "value"]
    if fixed:
        header.append(f"at threshold {fixed['threshold']:g}")
    rows = []
    for name, value in values.items():
        row = [text(_METRIC_LABELS.get(name, name)), _fmt(value)]
        if fixed:
            row.append(_fmt(fixed["headline"].get(name)))
        rows.append(row)
    lines = ["## Metrics", "", table(header, rows)]
    for metric, names in result.excluded.items():
        if names:
            lines.append("")
            reason = _UNDEFINED_BECAUSE.get(metric, "it is undefined for them")
            lines.append(
                f"{metric} averages over {len(result.per_class) - len(names)} classes; it leaves out "
                f"{len(names)} ({reason}): {text(_preview(names))}."
            )
    return "\n".join(lines)


def _plots_section(run_dir: str, plots: dict[str, str]) -> str:
    if not plots:
        return ""
    lines = ["## Plots"]
    for name, path in plots.items():
        heading = _PLOT_TITLES.get(name, name.replace("_", " ").capitalize())
        lines += ["", f"### {text(heading)}", "", image(run_dir, path, heading)]
    return "\n".join(lines)


def _per_class_section(result: EvaluationResult) -> str:
    rows = result.per_class
    if not rows:
        return ""
    multi = result.task == "multi"
    thresholds = {row.get("threshold") for row in rows}
    per_tag_threshold = multi and len(thresholds) > 1
    header = ["class", "precision", "recall", "F1", "support"]
    header += ["AP", "ROC-AUC"] if multi else []
    header += ["threshold"] if per_tag_threshold else []

    shown = rows
    lines = ["## Per-class metrics", ""]
    if len(rows) > TABLE_MAX_CLASSES:
        shown = sorted(rows, key=lambda r: (_sortable(r.get("f1")), -int(r.get("support") or 0)))[:TABLE_MAX_CLASSES]
        lines += [f"The {TABLE_MAX_CLASSES} classes with the lowest F1, of {len(rows)}; metrics.json has them all.", ""]
    table_rows = []
    for row in shown:
        cells = [text(str(row.get("class", ""))), *(_fmt(row.get(k)) for k in ("precision", "recall", "f1"))]
        cells.append(str(row.get("support", "")))
        cells += [_fmt(row.get("ap")), _fmt(row.get("roc_auc"))] if multi else []
        cells += [_fmt(row.get("threshold"), 2)] if per_tag_threshold else []
        table_rows.append(cells)
    lines.append(table(header, table_rows))
    return "\n".join(lines)


def _top_losses_section(run_dir: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    table_rows = [
        [
            image(run_dir, str(row["thumbnail"]), str(row.get("id", ""))) if row.get("thumbnail") else "",
            text(str(row.get("id", ""))),
            labels(row.get("true")),
            labels(row.get("predicted")),
            _fmt(row.get("loss")),
        ]
        for row in rows
    ]
    return "\n".join(
        [
            "## Worst-predicted validation images",
            "",
            "The validation images with the highest loss: mislabelled data shows up here first.",
            "",
            table(["image", "id", "true", "predicted", "loss"], table_rows),
        ]
    )


def _config_section(config: dict[str, Any]) -> str:
    dumped = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return "\n".join(["## Training config", "", "```json", dumped.replace("```", "`\u200b``"), "```"])


# --- formatting ---------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _sortable(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not math.isnan(value) else -1.0


def _preview(names: list[str], shown: int = 10) -> str:
    shown_names = ", ".join(names[:shown])
    return shown_names + (f", … (+{len(names) - shown})" if len(names) > shown else "")
