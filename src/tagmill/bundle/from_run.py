"""``tagmill export``: a training run's best checkpoint becomes a self-describing bundle."""

from __future__ import annotations

from tagmill.bundle.format import BundleMeta, save_bundle
from tagmill.dataset.transforms import Preprocess
from tagmill.models import create_classifier, pooling_kwargs, resolve_architecture
from tagmill.train.run_format import read_best, read_final_metrics, read_run, read_thresholds


def export_run(run_dir: str, out: str, *, onnx: bool = False) -> BundleMeta:
    """Write ``out`` (model.json + model.safetensors [+ model.onnx]) from ``run_dir``."""
    _, config = read_run(run_dir)
    best = read_best(run_dir)
    classes = list(best["classes"])
    # The bundle names the concrete timm architecture, never an alias: timm has its own,
    # differently padded "efficientnet_lite0" that would load these weights silently wrong.
    architecture = resolve_architecture(config.backbone)
    model = create_classifier(architecture, len(classes), pretrained=False, pooling=config.model_pooling)
    model.load_state_dict(best["model"])
    meta = BundleMeta(
        architecture=architecture,
        task=best["task"],
        model_kwargs=pooling_kwargs(architecture, config.model_pooling),
        classes=tuple(classes),
        preprocess=Preprocess.from_dict(best["preprocess"]),
        thresholds=read_thresholds(run_dir, best["task"]),
        default_top_k=min(config.top_k, len(classes)),
        training={"dataset": best.get("dataset"), "epochs_completed": best["epoch"], **config.as_dict()},
        metrics=read_final_metrics(run_dir, best),
    )
    save_bundle(out, model, meta, onnx=onnx)
    return meta
