"""INT8 bundles: the ONNX graph quantized, checked against fp32 before it is kept.

    model.onnx ─► onnxruntime static quantization (QDQ; weights int8 per output channel,
    activations uint8 with ranges calibrated on training images, preprocessed exactly
    as the bundle says; the classifier stays fp32) ─► the classifier refit on the INT8
    graph's features to give the fp32 graph's logits (on training images) ─► both graphs
    on the validation split ─► agreement and metric delta ─► refused past the user's
    bound, else model.int8.onnx + ``int8`` in model.json

Why the classifier is refit (tried on quality.py's dev set C, Fashion-MNIST train, Lite0
with its multi-level head; bench/README.md): quantized as it is, the graph agrees with
fp32 on 97.2% of the validation images and costs 1.3 points of accuracy. Quantization
shifts the features the classifier reads in a systematic way (the head reads early
blocks too), so a ridge regression of the classifier onto the fp32 logits, pulled
towards the fp32 weights, takes much of it back: 98.2%, 0.3 points. Keeping the first
convolutions in fp32 as well (``fp32_leading_convs``) adds a little agreement for a lot
of speed, so it is off by default: 7 (the stem and two blocks) 98.5% at ~1.6x fp32's
speed instead of ~2x.

Why static (calibrated) rather than dynamic quantization: dynamic quantization only
covers MatMul/Gemm (and LSTMs), and a CNN's time is in its convolutions. Why QDQ: it is
the format onnxruntime fuses into integer kernels on the CPU (VNNI where the CPU has
it) and that other runtimes read too. The fp32 graph stays in the bundle: the torch
backend, `--precision fp32` and any runtime without integer kernels use it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagmill import storage
from tagmill.bundle.format import INT8_FILE, MODEL_JSON, ONNX_FILE, BundleMeta, read_checked, read_meta, sha256
from tagmill.errors import BundleError, InputError, QuantizationError
from tagmill.objective import objective

#: training images whose activations set the quantization ranges: onnxruntime's
#: MinMax calibration settles within a few hundred images (more only costs time)
DEFAULT_CALIBRATION_IMAGES = 200
#: the largest drop of the validation metric (accuracy or mAP, 0–1) an INT8 graph may
#: cost before it is refused: one point, about the run-to-run noise of a head fit
DEFAULT_MAX_DROP = 0.01
#: images per calibration batch handed to onnxruntime
CALIBRATION_BATCH = 16
#: convolutions, counted from the input, kept in fp32 by default: none. They run at the
#: highest resolution, so each one kept costs speed (module docstring: 7 cost ~20%)
FP32_LEADING_CONVS = 0
#: training images the classifier is refit on: the features have thousands of dimensions
#: (3,968 for Lite0's multi-level head), so the regression wants more rows than calibration
DEFAULT_REFIT_IMAGES = 2400
#: the refit's pull towards the fp32 weights, per image: 1 kept most agreement on the dev
#: set (0.01: 96.0%, an overfit; 1: 98.2%; 30: 98.0%)
REFIT_L2 = 1.0


class _Session(torch.nn.Module):
    """An onnxruntime session behaving like the model ``train.evaluation`` expects."""

    def __init__(self, graph: bytes) -> None:
        super().__init__()
        from tagmill.bundle.onnx_export import make_session

        self.session = make_session(graph)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from tagmill.bundle.onnx_export import run_session

        return run_session(self.session, images)


def training_batches(dataset: str, meta: BundleMeta, count: int, *, seed: int = 0) -> Iterator[np.ndarray]:
    """About ``count`` training images of ``dataset``, a seeded shuffle's first ones,
    preprocessed as the bundle does at inference (float32 NCHW batches), one batch at a time."""
    from tagmill.dataset.torch_data import ShardDataset, shard_loader
    from tagmill.dataset.transforms import eval_transform

    data = ShardDataset(dataset, "train", eval_transform(meta.preprocess), shuffle=True, seed=seed, across_ranks=False)
    seen = 0
    for images, _, _ in shard_loader(data, batch_size=CALIBRATION_BATCH, workers=0):
        yield images.numpy()
        seen += len(images)
        if seen >= count:
            return


def calibration_batches(dataset: str, meta: BundleMeta, count: int, *, seed: int = 0) -> list[np.ndarray]:
    """:func:`training_batches` as a list (calibration goes over them more than once)."""
    batches = list(training_batches(dataset, meta, count, seed=seed))
    if not batches:
        raise InputError(f"{dataset} has no training images to calibrate the INT8 ranges on")
    return batches


def quantize_graph(graph: bytes, batches: list[np.ndarray], *, fp32_leading_convs: int = FP32_LEADING_CONVS) -> bytes:
    """``graph`` statically quantized to INT8 (QDQ), ranges from ``batches``; its first
    ``fp32_leading_convs`` convolutions and its classifier (the node giving the logits, so
    that :func:`refit_head` can change its fp32 weights) stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    from tagmill.bundle.onnx_export import INPUT_NAME, OUTPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left: Iterator[dict[str, np.ndarray]] = iter({INPUT_NAME: b} for b in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.left, None)

    with tempfile.TemporaryDirectory(prefix="tagmill-int8-") as tmp:
        source, prepared, quantized = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(graph)
        # constant folding and shape inference first (onnxruntime's advice); its symbolic
        # shape inference fails on torch.export's graphs, and ONNX's own suffices here
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node
        convs = [node.name for node in nodes if node.op_type == "Conv"]
        head = [node.name for node in nodes if OUTPUT_NAME in node.output]
        try:
            quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=convs[:fp32_leading_convs] + head)
        except Exception as exc:  # onnxruntime's quantizer raises untyped errors for graphs it cannot handle
            raise BundleError(f"onnxruntime could not quantize the graph: {exc}") from exc
        return quantized.read_bytes()


def refit_head(int8: bytes, fp32: bytes, batches: Iterable[np.ndarray], *, l2: float = REFIT_L2) -> tuple[bytes, int]:
    """``int8`` with its classifier refit so that, on ``batches``, its logits come as close
    as they can to ``fp32``'s: ridge regression of the classifier's weights and bias on the
    INT8 graph's features, pulled towards the fp32 weights by ``l2`` per image. Returns the
    graph and the number of images it was refit on; (``int8``, 0) unchanged when the logits
    do not come from a plain fp32 Gemm on initializers (a graph this export did not write)."""
    import onnx
    from onnx import numpy_helper

    from tagmill.bundle.onnx_export import INPUT_NAME, OUTPUT_NAME, make_session

    model = onnx.load_from_string(int8)
    weights = {init.name: init for init in model.graph.initializer}
    head = next((node for node in model.graph.node if OUTPUT_NAME in node.output), None)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute} if head is not None else {}
    if (head is None or head.op_type != "Gemm" or not set(head.input[1:]) <= weights.keys()
            or attributes.get("transA", 0) != 0 or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0):
        return int8, 0
    w = numpy_helper.to_array(weights[head.input[1]])
    w = w if attributes.get("transB", 0) else w.T  # (classes, features)
    if len(head.input) == 2:  # a classifier without a bias gains one (zero before the fit)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(len(w), np.float32), f"{head.name}_refit_bias"))
        head.input.append(f"{head.name}_refit_bias")
        weights[head.input[2]] = model.graph.initializer[-1]
    bias = numpy_helper.to_array(weights[head.input[2]])  # (classes,)
    features = head.input[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    quantized, reference = make_session(model.SerializeToString()), make_session(fp32)
    # the normal equations, summed batch by batch: X = [features, 1], targets the fp32 logits
    xtx = np.zeros((w.shape[1] + 1,) * 2)
    xty = np.zeros((w.shape[1] + 1, w.shape[0]))
    seen = 0
    for batch in batches:
        (x,) = quantized.run([features], {INPUT_NAME: batch})  # (n, features)
        (target,) = reference.run([OUTPUT_NAME], {INPUT_NAME: batch})  # (n, classes)
        x = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).astype(np.float64)
        xtx += x.T @ x
        xty += x.T @ target.astype(np.float64)
        seen += len(x)
    if seen == 0:
        return int8, 0
    start = np.concatenate([w, bias[:, None]], axis=1).T.astype(np.float64)  # (features + 1, classes)
    pull = l2 * seen
    solved = np.linalg.solve(xtx + pull * np.eye(len(xtx)), xty + pull * start)  # (features + 1, classes)
    new_w = solved[:-1].T if attributes.get("transB", 0) else solved[:-1]
    model.graph.output.pop()  # the features were an output for the fit only
    weights[head.input[1]].CopyFrom(numpy_helper.from_array(new_w.astype(np.float32), head.input[1]))
    weights[head.input[2]].CopyFrom(numpy_helper.from_array(solved[-1].astype(np.float32), head.input[2]))
    return model.SerializeToString(), seen


def compare(dataset: str, meta: BundleMeta, fp32: bytes, int8: bytes, *, split: str = "val") -> dict[str, Any]:
    """Both graphs on ``split`` of ``dataset``: agreement and the validation metric.
    Single-label: top-1 agreement; multi-label: the share of (image, tag) decisions, at
    the bundle's thresholds, that are the same."""
    from tagmill.dataset.manifest import load_manifest
    from tagmill.train.evaluation import predict_split

    manifest = load_manifest(dataset)
    if tuple(manifest.classes) != meta.classes:
        raise InputError(f"{dataset} has other classes than the bundle: the INT8 graph cannot be checked on it",
                         hint="quantize against the dataset the run was trained on")
    if split not in manifest.splits or manifest.split(split).count == 0:
        raise InputError(f"{dataset} has no {split} split to check the INT8 graph on",
                         hint="import it with a validation split (--val-fraction)")
    task = objective(meta.task)
    device = torch.device("cpu")
    before = predict_split(_Session(fp32), dataset, manifest, split, meta.preprocess, device=device)
    after = predict_split(_Session(int8), dataset, manifest, split, meta.preprocess, device=device)
    if task.single:
        agreement = float((before.probs.argmax(dim=1) == after.probs.argmax(dim=1)).float().mean())
    else:
        thresholds = torch.tensor(meta.thresholds)
        agreement = float(((before.probs >= thresholds) == (after.probs >= thresholds)).float().mean())
    fp32_score = task.selection_score(before.probs, before.targets)
    int8_score = task.selection_score(after.probs, after.targets)
    return {"agreement": "top-1" if task.single else "tag decisions", "agreement_rate": round(agreement, 6),
            "metric": task.selection_metric, "fp32": round(fp32_score, 6), "int8": round(int8_score, 6),
            "drop": round(fp32_score - int8_score, 6), "images": len(before.keys), "split": split,
            "max_abs_probability_difference": round(float((before.probs - after.probs).abs().max()), 6)}


def add_int8(location: str, dataset: str, *, max_drop: float = DEFAULT_MAX_DROP,
             calibration_images: int = DEFAULT_CALIBRATION_IMAGES, refit_images: int = DEFAULT_REFIT_IMAGES,
             seed: int = 0) -> BundleMeta:
    """Quantize the bundle at ``location`` (it must hold model.onnx), calibrated on
    ``dataset``'s training images, its classifier refit on up to ``refit_images`` of them
    (0: not refit), and checked on its validation split; write
    ``model.int8.onnx`` and the check into ``model.json``, or raise QuantizationError
    (nothing written) when the metric drops by more than ``max_drop``."""
    if not 0.0 <= max_drop <= 1.0:
        raise InputError(f"the largest metric drop allowed must lie in [0, 1], not {max_drop}")
    if calibration_images < 1:
        raise InputError(f"calibration needs at least one image, not {calibration_images}")
    if refit_images < 0:
        raise InputError(f"the classifier is refit on 0 or more images, not {refit_images}")
    meta = read_meta(location)
    if meta.onnx_sha256 is None:
        raise BundleError(f"bundle {location} has no {ONNX_FILE} to quantize", hint="export it with --onnx")
    fp32 = read_checked(location, ONNX_FILE, meta.onnx_sha256)
    batches = calibration_batches(dataset, meta, calibration_images, seed=seed)
    calibrated = sum(len(b) for b in batches)
    int8 = quantize_graph(fp32, batches)
    del batches  # ~600 KB per image at 224 px; the refit streams its own
    int8, refit = refit_head(int8, fp32, training_batches(dataset, meta, refit_images, seed=seed)) if refit_images else (int8, 0)
    check = compare(dataset, meta, fp32, int8)
    check.update(calibration_images=calibrated, refit_images=refit, fp32_leading_convs=FP32_LEADING_CONVS,
                 max_drop=max_drop)
    if check["drop"] > max_drop:
        raise QuantizationError(
            f"INT8 costs {check['drop']:.4f} of {check['metric']} on {check['images']} validation images "
            f"({check['fp32']:.4f} -> {check['int8']:.4f}), more than the {max_drop:.4f} allowed; "
            f"the bundle at {location} keeps its fp32 graphs only",
            hint="serve the fp32 ONNX graph, or allow more with --int8-max-drop")
    # model.json last: until it names the INT8 file, the bundle is the fp32 one it was
    storage.write_bytes(storage.join(location, INT8_FILE), int8)
    updated = replace(meta, int8={"sha256": sha256(int8), **check})
    storage.write_bytes(storage.join(location, MODEL_JSON), updated.to_json().encode("utf-8"))
    return updated


__all__ = ["DEFAULT_CALIBRATION_IMAGES", "DEFAULT_MAX_DROP", "DEFAULT_REFIT_IMAGES", "add_int8", "calibration_batches",
           "compare", "quantize_graph", "refit_head", "training_batches"]
