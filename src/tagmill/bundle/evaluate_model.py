"""``tagmill evaluate RUN|BUNDLE DATASET``: the same evaluation for a run or a bundle."""

from __future__ import annotations

import torch

from tagmill import storage
from tagmill.bundle.format import MODEL_JSON, load_bundle
from tagmill.dataset.manifest import load_manifest, verify_shards
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import InputError
from tagmill.progress import SILENT, Progress
from tagmill.train.evaluation import predict_split, write_evaluation
from tagmill.train.run_format import is_run, read_best, read_run, read_thresholds


def _from_run(run_dir: str) -> tuple[torch.nn.Module, dict, Preprocess, list[float] | None]:
    from tagmill.models import create_classifier

    _, config = read_run(run_dir)
    best = read_best(run_dir)
    model = create_classifier(config.backbone, len(best["classes"]), pretrained=False, pooling=config.model_pooling)
    model.load_state_dict(best["model"])
    info = {"classes": best["classes"], "task": best["task"], "config": config.as_dict(), "title": config.backbone}
    thresholds = read_thresholds(run_dir, best["task"])
    return model.eval(), info, Preprocess.from_dict(best["preprocess"]), list(thresholds) if thresholds else None


def _from_bundle(location: str) -> tuple[torch.nn.Module, dict, Preprocess, list[float] | None]:
    model, meta = load_bundle(location)
    info = {"classes": list(meta.classes), "task": meta.task, "config": dict(meta.training), "title": meta.architecture}
    return model, info, meta.preprocess, list(meta.thresholds) if meta.thresholds else None


def load_model(model_location: str) -> tuple[torch.nn.Module, dict, Preprocess, list[float] | None]:
    """A run's best model or a bundle's: (model, {"classes", "task", "config", "title"},
    preprocessing, per-tag thresholds or None)."""
    if storage.exists(storage.join(model_location, MODEL_JSON)):
        return _from_bundle(model_location)
    if is_run(model_location):
        return _from_run(model_location)
    raise InputError(f"{model_location} is neither a training run nor a model bundle")


def evaluate_model(model_location: str, dataset: str, split: str, out_dir: str, *, tune: bool = False,
                   progress: Progress = SILENT):
    model, info, preprocess, thresholds = load_model(model_location)
    manifest = load_manifest(dataset)
    verify_shards(dataset, manifest)
    if list(manifest.classes) != list(info["classes"]) or manifest.task != info["task"]:
        raise InputError(
            f"the model knows {len(info['classes'])} {info['task']}-label classes, the dataset has "
            f"{len(manifest.classes)} {manifest.task}-label classes: they must be the same, in the same order"
        )
    device = torch.device("cpu")
    preds = predict_split(model, dataset, manifest, split, preprocess, device=device, progress=progress)
    config = info["config"]
    result, _ = write_evaluation(
        out_dir, dataset, manifest, split, preds,
        title=f"{info['title']} on {storage.basename(dataset)} ({split})",
        config=config, threshold=float(config.get("threshold", 0.2)), top_k=int(config.get("top_k", 5)),
        tune=tune, thresholds=thresholds,
        threshold_source="the model's own per-tag thresholds" if thresholds else "",
    )
    return result
