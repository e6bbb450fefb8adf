"""INT8 bundles: the ONNX graph quantized, checked against fp32 before it is kept.

    model.onnx ─► onnxruntime static quantization (QDQ; weights int8 per output channel,
    activations uint8 with ranges calibrated on training images, preprocessed exactly
    as the bundle says; the stem's convolutions left in float) ─► bias correction (each
    convolution's int32 bias shifted by its mean output error against fp32, in graph
    order) ─► both graphs on the validation split ─► agreement and metric delta ─►
    refused past the user's bound, else model.int8.onnx + ``int8`` in model.json

Why static (calibrated) rather than dynamic quantization: dynamic quantization only
covers MatMul/Gemm (and LSTMs), and a CNN's time is in its convolutions. Why QDQ: it is
the format onnxruntime fuses into integer kernels on the CPU (VNNI where the CPU has
it) and that other runtimes read too. The fp32 graph stays in the bundle: the torch
backend, `--precision fp32` and any runtime without integer kernels use it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
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
#: calibration images the bias correction averages each convolution's error over: a
#: channel's mean is taken over every image and position, so 64 images at 224 px are
#: ~800k samples per early channel; each image costs one pass per convolution
BIAS_CORRECTION_IMAGES = 64


class _Session(torch.nn.Module):
    """An onnxruntime session behaving like the model ``train.evaluation`` expects."""

    def __init__(self, graph: bytes) -> None:
        super().__init__()
        from tagmill.bundle.onnx_export import make_session

        self.session = make_session(graph)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from tagmill.bundle.onnx_export import run_session

        return run_session(self.session, images)


def calibration_batches(dataset: str, meta: BundleMeta, count: int, *, seed: int = 0) -> list[np.ndarray]:
    """About ``count`` training images of ``dataset``, a seeded shuffle's first ones,
    preprocessed as the bundle does at inference (float32 NCHW batches)."""
    from tagmill.dataset.torch_data import ShardDataset, shard_loader
    from tagmill.dataset.transforms import eval_transform

    data = ShardDataset(dataset, "train", eval_transform(meta.preprocess), shuffle=True, seed=seed, across_ranks=False)
    batches, seen = [], 0
    for images, _, _ in shard_loader(data, batch_size=CALIBRATION_BATCH, workers=0):
        batches.append(images.numpy())
        seen += len(images)
        if seen >= count:
            break
    if not batches:
        raise InputError(f"{dataset} has no training images to calibrate the INT8 ranges on")
    return batches


def quantize_graph(graph: bytes, batches: list[np.ndarray], *, bias_correction: bool = True) -> bytes:
    """``graph`` statically quantized to INT8 (QDQ), ranges from ``batches``; with
    ``bias_correction`` the convolutions' biases are then corrected on the first
    ``BIAS_CORRECTION_IMAGES`` of them (``correct_biases``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    from tagmill.bundle.onnx_export import INPUT_NAME

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
        try:
            quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=float_stem(prepared.read_bytes()))
        except Exception as exc:  # onnxruntime's quantizer raises untyped errors for graphs it cannot handle
            raise BundleError(f"onnxruntime could not quantize the graph: {exc}") from exc
        if not bias_correction:
            return quantized.read_bytes()
        return correct_biases(prepared.read_bytes(), quantized.read_bytes(), _first(batches, BIAS_CORRECTION_IMAGES))


#: what may lie between the stem's convolutions: elementwise, one value in, one out
_STEM_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "BatchNormalization"})


def float_stem(graph: bytes) -> list[str]:
    """The names of the convolutions that read the image before any 1x1 convolution,
    each the only reader of what came before, through elementwise activations only: a
    CNN's stem (EfficientNet-Lite's 3x3 and the depthwise 3x3 after it; ResNet's 7x7).
    They are left in float.

    Why: quantizing the stem costs the most agreement with fp32 for the least time.
    Measured on the dev set (Fashion-MNIST train images the model never saw, 2,000, Lite0
    at 224 px, bias correction on): disagreements with fp32 41 -> 25 (stem alone) -> 20
    (stem and depthwise); INT8 speed over fp32 (one thread, batches of 16) x2.38 -> x2.30
    -> x2.31. The loss is in what the stem's convolutions output, not in rounding the
    image they read: with the input made exact (for a mean and std of 0.5, the image plus
    half a level quantized at 2/255 with zero point 127 holds every pixel level), the
    quantized stem still disagreed on 39 of the 2,000. Leaving further convolutions in
    float went on gaining agreement at a real cost in speed (the first four: x1.86), so
    the stem ends at the first 1x1 convolution."""
    import onnx

    model = onnx.load_model_from_string(graph)
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            if node.op_type != "Shape":  # reads only the tensor's dimensions (dynamic batch)
                readers.setdefault(name, []).append(node)
    kernels = {i.name: tuple(i.dims[2:]) for i in model.graph.initializer if len(i.dims) == 4}  # conv weights
    stem: list[str] = []
    tensor = model.graph.input[0].name
    while len(readers.get(tensor, [])) == 1:
        (node,) = readers[tensor]
        if node.op_type == "Conv":
            kernel = next((tuple(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
            if (kernel or kernels.get(node.input[1], (1, 1))) in {(1, 1), ()}:
                break
            stem.append(node.name)
        elif node.op_type not in _STEM_ACTIVATIONS:
            break
        tensor = node.output[0]
    return stem


def _first(batches: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first ``count`` images of ``batches`` (at least one batch)."""
    kept, seen = [], 0
    for b in batches:
        kept.append(b[: count - seen])
        seen += len(kept[-1])
        if seen >= count:
            break
    return kept


def correct_biases(fp32: bytes, int8: bytes, batches: list[np.ndarray]) -> bytes:
    """``int8`` with each quantized convolution's int32 bias shifted so that its output's
    mean, per channel over ``batches``, is the fp32 graph's (empirical bias correction).

    Why: rounding activations is not error-free on average. The uint8 input need not
    hold the normalised pixel levels exactly (with a mean and std of 0.5 each level
    falls half a step off, the same way across a whole background), and each clipped,
    rounded activation after it shifts the next layer a little; these shifts add up
    through the network to the logits, and a multi-level head reads the early blocks'
    shifts directly. A bias is free at run time: the graph, its scales and its integer
    weights stay as they are.

    ``fp32`` is the graph ``int8`` was quantized from (the same node names). The
    convolutions are corrected in graph order, each measured after the ones before it
    were corrected: correcting all at once from one measurement counts an upstream
    error again in every later layer, which overshoots and grows with depth."""
    import onnx
    from onnx import numpy_helper

    from tagmill.bundle.onnx_export import INPUT_NAME, make_session

    quantized, reference = onnx.load_model_from_string(int8), onnx.load_model_from_string(fp32)
    fp32_output = {n.name: n.output[0] for n in reference.graph.node if n.op_type == "Conv"}
    initializers = {i.name: i for i in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    convs = []  # (fp32 output, int8 output, int32 bias, its scale), in graph order
    for node in quantized.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.name not in fp32_output:
            continue
        dq = producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue  # a bias left in float, or none: nothing to shift
        convs.append((fp32_output[node.name], node.output[0], dq.input[0], dq.input[1]))

    def channel_means(model: Any, names: list[str]) -> list[np.ndarray]:
        exposed = type(model)()
        exposed.CopyFrom(model)
        exposed.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
        session = make_session(exposed.SerializeToString())
        sums, counts = [0.0] * len(names), [0] * len(names)
        for batch in batches:
            for i, output in enumerate(session.run(names, {INPUT_NAME: batch})):  # each (N, C, ...)
                sums[i] = sums[i] + output.sum(axis=tuple(a for a in range(output.ndim) if a != 1), dtype=np.float64)
                counts[i] += output.size // output.shape[1]
        return [np.asarray(total) / count for total, count in zip(sums, counts, strict=True)]

    # one fp32 pass gives every target; the INT8 graph is measured once per convolution,
    # its outputs computed in float from the dequantized inputs (exposing them keeps
    # onnxruntime from fusing that convolution into an integer kernel): the same values
    # the integer kernel accumulates before it rounds its output
    if not convs:
        return int8
    targets = channel_means(reference, [c[0] for c in convs])
    for (_, output, bias, scale), target in zip(convs, targets, strict=True):
        (mean,) = channel_means(quantized, [output])
        values = numpy_helper.to_array(initializers[bias]).astype(np.int64)
        step = numpy_helper.to_array(initializers[scale]).astype(np.float64)  # input scale × weight scale
        shifted = values - np.round((mean - target) / step).astype(np.int64)
        info = np.iinfo(np.int32)
        initializers[bias].CopyFrom(numpy_helper.from_array(np.clip(shifted, info.min, info.max).astype(np.int32),
                                                            bias))
    return quantized.SerializeToString()


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
             calibration_images: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> BundleMeta:
    """Quantize the bundle at ``location`` (it must hold model.onnx), calibrated on
    ``dataset``'s training images and checked on its validation split; write
    ``model.int8.onnx`` and the check into ``model.json``, or raise QuantizationError
    (nothing written) when the metric drops by more than ``max_drop``."""
    if not 0.0 <= max_drop <= 1.0:
        raise InputError(f"the largest metric drop allowed must lie in [0, 1], not {max_drop}")
    if calibration_images < 1:
        raise InputError(f"calibration needs at least one image, not {calibration_images}")
    meta = read_meta(location)
    if meta.onnx_sha256 is None:
        raise BundleError(f"bundle {location} has no {ONNX_FILE} to quantize", hint="export it with --onnx")
    fp32 = read_checked(location, ONNX_FILE, meta.onnx_sha256)
    batches = calibration_batches(dataset, meta, calibration_images, seed=seed)
    int8 = quantize_graph(fp32, batches)
    check = compare(dataset, meta, fp32, int8)
    calibrated = sum(len(b) for b in batches)
    check.update(calibration_images=calibrated, bias_correction_images=min(calibrated, BIAS_CORRECTION_IMAGES),
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


__all__ = ["BIAS_CORRECTION_IMAGES", "DEFAULT_CALIBRATION_IMAGES", "DEFAULT_MAX_DROP", "add_int8",
           "calibration_batches", "compare", "correct_biases", "float_stem", "quantize_graph"]
