"""``tagmill export``: a training run's best checkpoint becomes a self-describing bundle."""

from __future__ import annotations

import json

from tagmill import storage
from tagmill.bundle.format import BundleMeta, save_bundle
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import InputError
from tagmill.models import create_classifier, resolve_architecture
from tagmill.train.checkpoint import load_checkpoint
from tagmill.train.loop import BEST, read_run


def export_run(run_dir: str, out: str, *, onnx: bool = False) -> BundleMeta:
    """Write ``out`` (model.json + model.safetensors [+ model.onnx]) from ``run_dir``."""
    _, config = read_run(run_dir)
    best_location = storage.join(run_dir, BEST)
    if not storage.exists(best_location):
        raise InputError(f"{run_dir} has no best checkpoint yet: no epoch has finished", hint="train it (or --resume) first")
    best = load_checkpoint(best_location)
    classes = list(best["classes"])
    # The bundle names the concrete timm architecture, never an alias: timm has its own,
    # differently padded "efficientnet_lite0" that would load these weights silently wrong.
    architecture = resolve_architecture(config.backbone)
    model = create_classifier(architecture, len(classes), pretrained=False)
    model.load_state_dict(best["model"])
    meta = BundleMeta(
        architecture=architecture,
        task=best["task"],
        classes=tuple(classes),
        preprocess=Preprocess.from_dict(best["preprocess"]),
        thresholds=_tuned_thresholds(run_dir, best["task"]),
        default_top_k=min(config.top_k, len(classes)),
        training={"dataset": best.get("dataset"), "epochs_completed": best["epoch"], **config.as_dict()},
        metrics=_final_metrics(run_dir, best),
    )
    save_bundle(out, model, meta, onnx=onnx)
    return meta


def _tuned_thresholds(run_dir: str, task: str) -> tuple[float, ...] | None:
    location = storage.join(run_dir, "thresholds.json")
    if task != "multi" or not storage.exists(location):
        return None
    return tuple(float(t) for t in json.loads(storage.read_text(location)))


def _final_metrics(run_dir: str, best: dict) -> dict:
    location = storage.join(run_dir, "metrics.json")
    if storage.exists(location):
        saved = json.loads(storage.read_text(location))
        return {"split": saved["split"], **saved["result"]["headline"]}
    return {"split": "val", **best.get("metrics", {}).get("headline", {})}
