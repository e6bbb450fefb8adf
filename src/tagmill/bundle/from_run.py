"""``tagmill export``: a training run's best checkpoint becomes a self-describing bundle."""

from __future__ import annotations

from tagmill.bundle.format import BundleMeta, save_bundle
from tagmill.dataset.transforms import Preprocess
from tagmill.models import create_classifier, pooling_kwargs, resolve_architecture
from tagmill.train.run_format import read_best, read_final_metrics, read_run, read_thresholds


def export_run(run_dir: str, out: str, *, onnx: bool = False, int8: bool = False, max_drop: float | None = None,
               calibration_images: int | None = None) -> BundleMeta:
    """Write ``out`` (model.json + model.safetensors [+ model.onnx]) from ``run_dir``.
    ``int8`` adds model.int8.onnx (and so model.onnx), calibrated on the run's training
    images and checked on its validation split (``bundle.quantize.add_int8``)."""
    dataset, config = read_run(run_dir)
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
    save_bundle(out, model, meta, onnx=onnx or int8)
    if int8:
        from tagmill.bundle import quantize  # onnxruntime's quantizer: only when asked

        return quantize.add_int8(out, dataset, seed=config.seed,
                                 max_drop=quantize.DEFAULT_MAX_DROP if max_drop is None else max_drop,
                                 calibration_images=calibration_images or quantize.DEFAULT_CALIBRATION_IMAGES)
    return meta
