"""Evaluation: metrics (torchmetrics), per-tag threshold tuning, plots and run reports.

Pure functions over predictions: the training loop calls them on the validation
split, ``tagmill evaluate`` on any split. matplotlib is imported only when a plot is
drawn.
"""

from __future__ import annotations

from tagmill.evaluate.metrics import (
    DEFAULT_MULTI_THRESHOLD,
    EvaluationResult,
    multi_label_metrics,
    single_label_metrics,
)
from tagmill.evaluate.plots import plot_confusion, plot_curves, plot_lr_sweep, plot_per_class_f1
from tagmill.evaluate.report import top_losses, write_report, write_thumbnail
from tagmill.evaluate.thresholds import default_grid, tune_thresholds

__all__ = [
    "DEFAULT_MULTI_THRESHOLD",
    "EvaluationResult",
    "default_grid",
    "multi_label_metrics",
    "plot_confusion",
    "plot_curves",
    "plot_lr_sweep",
    "plot_per_class_f1",
    "single_label_metrics",
    "top_losses",
    "tune_thresholds",
    "write_report",
    "write_thumbnail",
]
