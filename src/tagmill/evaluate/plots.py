"""PNG plots of a training run: loss/metric curves, confusion matrix, per-class F1,
and the learning-rate finder's sweep.

Figures are built from ``matplotlib.figure.Figure`` with an Agg canvas attached, never
through pyplot: pyplot keeps global state (current figure, backend) that a server or
a notebook importing tagmill must not have changed under it. matplotlib is imported
inside the functions, so this module adds no import cost to code that only computes
metrics (torchmetrics happens to import matplotlib today; nothing here relies on
that). Every PNG is rendered into memory and written through ``storage.write_bytes``
(atomic, and any fsspec URL works).
"""

from __future__ import annotations

import io
import itertools
import math
from textwrap import fill
from typing import TYPE_CHECKING, Any

from tagmill import storage
from tagmill.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from tagmill.train.lr_find import LRSweep

DPI = 100
#: a confusion matrix gets count annotations up to this many classes
ANNOTATE_MAX_CLASSES = 20
#: ... and tick labels up to this many (beyond, labels would overlap at any sane size)
LABEL_MAX_CLASSES = 60
#: the per-class F1 chart shows at most this many bars (the worst ones)
MAX_BARS = 200
#: class names are shortened to this many characters on axes
LABEL_CHARS = 28


def plot_curves(history: list[dict[str, Any]], out: str) -> str:
    """Loss (train and val) and the validation metric per epoch, stages marked.

    ``history`` rows: {"epoch", "stage", "train_loss", "val_loss", "metric", "val_metric"};
    a missing or None value leaves a gap. When the epoch numbers restart in a new
    stage (fastai counts each ``fit`` from 1), epochs are numbered on through the run.
    """
    if not history:
        raise InputError("no training history to plot")
    epochs = _running_epochs(history)
    fig = _figure(10, 4.2)
    loss_ax, metric_ax = fig.subplots(1, 2)

    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(epochs, _column(history, key), marker="o", markersize=3, label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    loss_ax.legend(loc="best", fontsize=8)

    names = list(dict.fromkeys(_metric_name(row) for row in history))  # usually one; each its own line
    for name in names:
        values = [_number(row.get("val_metric")) if _metric_name(row) == name else math.nan for row in history]
        metric_ax.plot(epochs, values, marker="o", markersize=3, label=name)
    metric_ax.set(title="Validation metric", xlabel="epoch", ylabel=names[0] if len(names) == 1 else "value")
    metric_ax.legend(loc="best", fontsize=8)

    for ax in (loss_ax, metric_ax):
        ax.margins(y=0.12)  # headroom for the stage names along the top
        _mark_stages(ax, history, epochs)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out)


def plot_confusion(confusion: list[list[int]], classes: list[str], out: str) -> str:
    """Confusion matrix, each row normalised by its true-class count, counts annotated for few classes."""
    import numpy as np

    counts = np.asarray(confusion, dtype=np.int64)  # (C, C) rows = true
    n = len(classes)
    if counts.shape != (n, n) or n == 0:
        raise InputError(f"confusion matrix of shape {counts.shape} does not match {n} classes")
    row_sums = counts.sum(axis=1, keepdims=True)  # (C, 1)
    # a class with no true samples has an all-zero row; leave it at 0 instead of 0/0
    normalised = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)  # (C, C)

    side = min(max(3.0 + 0.32 * n, 6.0), 22.0)  # inches: ~0.3 in per class, capped
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, aspect=30, pad=0.02, label="fraction of the true class")
    ax.set(xlabel="predicted", ylabel="true (number of samples)", title="Confusion matrix (rows normalised)")
    _confusion_ticks(ax, classes, row_sums[:, 0].tolist())
    if n <= ANNOTATE_MAX_CLASSES:
        _annotate_counts(ax, counts, normalised)
    return _save(fig, out)


def plot_per_class_f1(per_class: list[dict[str, Any]], out: str, top: int | None = None) -> str:
    """Horizontal F1 bars, worst class on top; ``top`` keeps only that many worst classes.

    The figure grows with the number of bars (~0.2 in each) and shows at most
    ``MAX_BARS``; the title says when classes were left out.
    """
    if not per_class:
        raise InputError("no per-class metrics to plot")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InputError(f"top must be a positive integer, got {top!r}")
    rows = sorted(per_class, key=lambda row: (_number(row.get("f1"), 0.0), -int(row.get("support") or 0)))
    shown = rows[: min(top or len(rows), MAX_BARS)]
    count = len(shown)

    fig = _figure(8.5, 1.3 + 0.2 * max(count, 4))
    ax = fig.subplots()
    f1 = [_number(row.get("f1"), 0.0) for row in shown]
    positions = list(range(count))
    ax.barh(positions, f1, height=0.75, color=_f1_colours(f1))
    ax.set_yticks(positions, [_short(str(row.get("class", "?"))) for row in shown], fontsize=8)
    ax.invert_yaxis()  # worst at the top, where the eye starts
    ax.set_ylim(count - 0.5, -0.5)
    ax.set_xlim(0, 1.18)  # room right of a full bar for its label
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    for y, (value, row) in enumerate(zip(f1, shown)):
        ax.text(value + 0.01, y, f"{value:.2f}  n={row.get('support', '?')}", va="center", fontsize=7)
    ax.xaxis.set_ticks_position("both")  # long charts: the scale is visible at either end
    ax.tick_params(axis="x", labeltop=True)
    ax.grid(axis="x", alpha=0.3)
    title = "F1 per class" if count == len(rows) else f"F1 per class: the {count} worst of {len(rows)}"
    ax.set_title(title, pad=18)
    ax.set_xlabel("F1")
    return _save(fig, out)


# --- helpers -------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout makes room for long tick labels instead of clipping them
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    storage.write_bytes(out, buffer.getvalue())
    return out


def _running_epochs(history: list[dict[str, Any]]) -> list[float]:
    """The rows' epochs, or 1..len when they are missing or restart (not increasing)."""
    epochs = [_number(row.get("epoch")) for row in history]
    increasing = all(math.isfinite(e) for e in epochs) and all(b > a for a, b in zip(epochs, epochs[1:]))
    return epochs if increasing else [float(i + 1) for i in range(len(history))]


def _mark_stages(ax: Axes, history: list[dict[str, Any]], epochs: list[float]) -> None:
    """A dashed line between stages, each stage's name at the top of its span."""
    from matplotlib.transforms import blended_transform_factory

    spans: list[tuple[str, float, float]] = []  # (stage, first epoch, last epoch)
    for row, epoch in zip(history, epochs):
        stage = str(row.get("stage") or "")
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], epoch)
        else:
            spans.append((stage, epoch, epoch))
    if len(spans) < 2:
        return  # one stage: nothing to separate, and its name would only add clutter
    to_axes_top = blended_transform_factory(ax.transData, ax.transAxes)
    for previous, current in zip(spans, spans[1:]):
        ax.axvline((previous[2] + current[1]) / 2, color="grey", linestyle="--", linewidth=1)
    for (stage, first, last), shade in zip(spans, itertools.cycle((True, False))):
        if shade:
            ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.07, linewidth=0)
        ax.text((first + last) / 2, 0.98, stage, transform=to_axes_top, ha="center", va="top", fontsize=8,
                color="dimgrey")


def _confusion_ticks(ax: Axes, classes: list[str], supports: list[int]) -> None:
    n = len(classes)
    if n > LABEL_MAX_CLASSES:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"predicted ({n} classes, in class order)")
        ax.set_ylabel(f"true ({n} classes, in class order)")
        return
    fontsize = 9 if n <= 20 else 7.5
    labels = [_short(name) for name in classes]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
    # the support tells an all-white row (no samples) from a row of scattered errors
    ax.set_yticks(range(n), [f"{label} ({count:,})" for label, count in zip(labels, supports)], fontsize=fontsize)


def _annotate_counts(ax: Axes, counts: Any, normalised: Any) -> None:
    n = counts.shape[0]
    fontsize = 9 if n <= 10 else 7
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0:
                continue  # zeros are the background; printing them hides the pattern
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=fontsize, color=colour)


def _f1_colours(values: list[float]) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"]
    return [cmap(0.1 + 0.8 * v) for v in values]  # avoid the darkest ends: labels stay readable


def _metric_name(row: dict[str, Any]) -> str:
    return str(row.get("metric") or "metric")


def _column(history: list[dict[str, Any]], key: str) -> list[float]:
    return [_number(row.get(key)) for row in history]


def _number(value: Any, missing: float = math.nan) -> float:
    if value is None or isinstance(value, bool):
        return missing
    try:
        return float(value)
    except (TypeError, ValueError):
        return missing


def _short(name: str, limit: int = LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_lr_sweep(sweep: LRSweep, out: str) -> str:
    """The learning-rate finder's loss against learning rate (log scale), the suggestion
    marked with a point on the curve and a labelled vertical line; the title names the
    method. A fallback without a curve still draws the line, and says why in the axes.
    """
    import numpy as np

    lrs = np.asarray(sweep.lrs, dtype=np.float64)  # (n,)
    smoothed = np.asarray(sweep.losses, dtype=np.float64)  # (n,)
    raw = np.asarray(sweep.raw_losses, dtype=np.float64)  # (n,)
    fig = _figure(8, 4.8)
    ax = fig.subplots()
    ax.set_xscale("log")
    suggestion = float(sweep.suggestion)
    if len(lrs):
        ax.plot(lrs, raw, color="grey", alpha=0.4, linewidth=1, label="batch loss")
        ax.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
        # the y range follows the smoothed curve: one exploding batch loss at the end
        # would otherwise flatten everything that matters into the bottom pixel row
        low, high = float(min(smoothed.min(), raw.min())), float(smoothed.max())
        # a flat curve still gets a readable range (and plain tick labels, not "+7e-1")
        pad = max(0.08 * (high - low), 0.005 * abs(high), 1e-6)
        ax.set_ylim(low - pad, high + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
        if sweep.method != "fallback" and lrs[0] <= suggestion <= lrs[-1]:
            at = float(np.interp(np.log(suggestion), np.log(lrs), smoothed))
            ax.plot([suggestion], [at], "o", color="C3", markersize=8, zorder=3, label="suggestion")
    else:
        ax.set_xlim(suggestion / 100, suggestion * 100)
        ax.set_yticks([])
    ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1.2)
    ax.annotate(f"suggested lr {suggestion:.1e}", xy=(suggestion, 1.0), xycoords=("data", "axes fraction"),
                xytext=(5, -5), textcoords="offset points", ha="left", va="top", fontsize=9, color="C3")
    if sweep.method == "fallback":
        ax.text(0.5, 0.5, fill(sweep.message, 70), transform=ax.transAxes, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "lightgrey"})
    ax.set(xlabel="learning rate (log scale)", ylabel="loss",
           title=f"Learning-rate finder: {suggestion:.1e} ({_METHODS.get(sweep.method, sweep.method)})")
    ax.grid(alpha=0.3, which="both")
    if len(lrs):
        ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out)


#: how each method of the learning-rate finder is named in its plot's title
_METHODS = {
    "valley": "valley: the longest descent of the loss",
    "steep": "steepest descent of the loss",
    "fallback": "fallback: no usable sweep",
}
