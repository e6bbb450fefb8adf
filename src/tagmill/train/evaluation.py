"""Evaluate a trained model on a split: metrics, tuned thresholds, plots, report.

Used at the end of ``tagmill train`` (on the best checkpoint, validation split) and by
``tagmill evaluate`` (a run or a bundle, any split). Everything lands in one output
directory: ``metrics.json``, ``thresholds.json`` (multi-label), PNG plots, the
worst-predicted images as thumbnails, and ``report.md`` tying them together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from tagmill import storage
from tagmill.dataset.manifest import Manifest
from tagmill.dataset.shards import iter_shard
from tagmill.dataset.torch_data import ShardDataset, shard_loader
from tagmill.dataset.transforms import Preprocess, eval_transform
from tagmill.errors import DatasetError
from tagmill.objective import objective
from tagmill.progress import SILENT, Progress
from tagmill.train.device import autocast, inference_chunk, run_chunked
from tagmill.train.rows import Rows
from tagmill.train.run_format import THRESHOLDS

TOP_LOSSES = 12


@dataclass
class Predictions:
    probs: torch.Tensor  #: (N, C)
    targets: torch.Tensor  #: (N,) class indices or (N, C) multi-hot
    losses: torch.Tensor  #: (N,) per-sample loss
    keys: list[str]


@torch.inference_mode()
def predict_split(
    model: torch.nn.Module,
    dataset: str,
    manifest: Manifest,
    split: str,
    preprocess: Preprocess,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress = SILENT,
) -> Predictions:
    model.eval()
    data = ShardDataset(dataset, split, eval_transform(preprocess), manifest=manifest, across_ranks=False)
    loader = shard_loader(data, batch_size=batch_size, workers=workers)
    task = objective(manifest.task)
    # one tensor each, not a list of per-batch pieces (rows.py says why)
    probs, targets, losses = Rows(len(data)), Rows(len(data)), Rows(len(data))
    keys: list[str] = []
    with progress.task(f"predicting {split}", len(data)) as advance:
        for images, target, batch_keys in loader:
            with autocast(device, precision):
                logits = run_chunked(model, images.to(device), inference_chunk(device, preprocess.input_size)).float().cpu()  # (B, C)
            probs.add(task.probabilities(logits))
            losses.add(task.per_sample_loss(logits, target))
            targets.add(target)
            keys.extend(batch_keys)
            advance(len(batch_keys))
    return Predictions(probs.tensor(), targets.tensor(), losses.tensor(), keys)


def evaluate_predictions(preds: Predictions, manifest: Manifest, *, threshold: float, top_k: int, thresholds: torch.Tensor | None = None):
    cut = thresholds if thresholds is not None else threshold
    return objective(manifest.task).metrics(preds.probs, preds.targets, manifest.classes, threshold=cut, top_k=top_k)


def out_of_fold_thresholds(probs: torch.Tensor, targets: torch.Tensor, where: str) -> tuple[list[float], str]:
    """Thresholds tuned on out-of-fold predictions over the training split (never on the
    split that is reported), and a sentence saying where they come from."""
    from tagmill.evaluate.thresholds import OWN_THRESHOLD_MIN_POSITIVES, tune_thresholds

    tuned = tune_thresholds(probs, targets.long(), min_positives=OWN_THRESHOLD_MIN_POSITIVES)
    own = int((targets.sum(0) >= OWN_THRESHOLD_MIN_POSITIVES).sum())
    how = (f"{own} of {targets.shape[1]} tags with their own (those with ≥ {OWN_THRESHOLD_MIN_POSITIVES} positives), "
           "one shared by the rest")
    return tuned.tolist(), f"tuned on out-of-fold predictions over the training split ({len(targets):,} images; {where}): {how}"


def write_evaluation(
    out_dir: str,
    dataset: str,
    manifest: Manifest,
    split: str,
    preds: Predictions,
    *,
    title: str,
    config: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    threshold: float = 0.2,
    top_k: int = 5,
    tune: bool = False,
    thresholds: list[float] | None = None,
    threshold_source: str = "",
    selection: str = "",
    data_issues: str = "",
):
    """Metrics, plots, thumbnails and report.md in out_dir (``data_issues``: a ready
    markdown section for it).

    Multi-label decisions use ``thresholds`` (per tag, tuned elsewhere: say where in
    ``threshold_source``) or the one ``threshold``. ``tune`` tunes them on this very
    split instead, which flatters the result; the report says so."""
    from tagmill.evaluate import (
        plot_confusion,
        plot_curves,
        plot_per_class_f1,
        top_losses,
        tune_thresholds,
        write_report,
        write_thumbnail,
    )
    from tagmill.evaluate.thresholds import OWN_THRESHOLD_MIN_POSITIVES

    storage.makedirs(out_dir)
    fixed = evaluate_predictions(preds, manifest, threshold=threshold, top_k=top_k)
    result, tuned = fixed, None
    if manifest.task == "multi":
        if tune:
            tuned = tune_thresholds(preds.probs, preds.targets, min_positives=OWN_THRESHOLD_MIN_POSITIVES)  # (C,)
            threshold_source = f"tuned on this same {split} split: optimistic, the numbers are not held out"
        elif thresholds is not None:
            tuned = torch.tensor(thresholds, dtype=torch.float32)
        if tuned is not None:
            result = evaluate_predictions(preds, manifest, threshold=threshold, top_k=top_k, thresholds=tuned)
            storage.write_bytes(storage.join(out_dir, THRESHOLDS), (json.dumps(tuned.tolist()) + "\n").encode())
        elif not threshold_source:
            threshold_source = f"one threshold for every tag ({threshold:g})"
    metrics = {"split": split, "result": result.as_dict(), "sources": _sources(split, len(preds.keys), threshold_source, selection)}
    if tuned is not None:
        metrics["at_fixed_threshold"] = {"threshold": threshold, "headline": fixed.as_dict()["headline"]}
    storage.write_bytes(storage.join(out_dir, "metrics.json"), (json.dumps(metrics, indent=2) + "\n").encode())

    plots: dict[str, str] = {}
    if history:
        plots["curves"] = plot_curves(history, storage.join(out_dir, "curves.png"))
    if result.confusion is not None:
        plots["confusion"] = plot_confusion(result.confusion, manifest.classes, storage.join(out_dir, "confusion.png"))
    plots["per_class_f1"] = plot_per_class_f1(result.per_class, storage.join(out_dir, "per_class_f1.png"))
    worst = _write_top_losses(out_dir, dataset, manifest, split, preds, result, tuned, threshold, write_thumbnail, top_losses)
    write_report(out_dir, title=title, result=result, plots=plots, top_losses=worst, config=config,
                 sources=metrics["sources"], fixed=metrics.get("at_fixed_threshold"), data_issues=data_issues)
    return result, tuned


def _sources(split: str, count: int, threshold_source: str, selection: str) -> dict[str, str]:
    """Where each number of the evaluation comes from, in words (for metrics.json and report.md)."""
    sources = {"metrics": f"the {split} split ({count:,} images), which no model or threshold was fitted on"}
    if selection:
        sources["model"] = selection
    if threshold_source:
        sources["thresholds"] = threshold_source
    return sources


def _write_top_losses(out_dir, dataset, manifest, split, preds, result, tuned, threshold, write_thumbnail, top_losses) -> list[dict]:
    order = top_losses(preds.losses, TOP_LOSSES)
    wanted = {preds.keys[i]: rank for rank, i in enumerate(order)}
    rows: list[dict[str, Any]] = [{} for _ in order]
    for shard in manifest.split(split).shards:
        for sample in iter_shard(storage.join(dataset, shard.name)):
            rank = wanted.get(sample.key)
            if rank is None:
                continue
            i = order[rank]
            thumbnail = f"top_losses/{rank:03d}.jpg"
            write_thumbnail(sample.image, storage.join(out_dir, thumbnail))
            rows[rank] = {
                "thumbnail": thumbnail,
                "id": sample.meta.get("id", sample.key),
                "true": sample.meta["labels"],
                "predicted": _predicted(preds.probs[i], manifest, tuned, threshold),
                "loss": float(preds.losses[i]),
            }
    if any(not row for row in rows):
        raise DatasetError(f"some {split} samples vanished from their shards while evaluating")
    return rows


def _predicted(probs: torch.Tensor, manifest: Manifest, tuned: torch.Tensor | None, threshold: float) -> list[str]:
    if manifest.task == "single":
        return [manifest.classes[int(probs.argmax())]]
    cut = tuned if tuned is not None else torch.full_like(probs, threshold)
    return [c for c, p, t in zip(manifest.classes, probs.tolist(), cut.tolist()) if p > t]
