"""Export a bundle's model to ONNX and prove the export computes the same thing.

The graph takes ``images`` (batch, 3, S, S) — already preprocessed as ``model.json``
says — and returns ``logits`` (batch, classes); the batch dimension is dynamic.
Softmax/sigmoid stay outside the graph so the torch and ONNX backends share one
post-processing path.

Exporter: torch's ``torch.export``-based exporter (``dynamo=True``, needs onnxscript)
is used first; if it cannot trace a model, the legacy TorchScript exporter
(``dynamo=False``, deprecated but present in torch 2.14) is tried. Every export is
checked with onnxruntime against PyTorch before it is returned.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tagmill import storage
from tagmill.bundle.format import MODEL_JSON, ONNX_FILE, BundleError, BundleMeta, load_bundle, sha256, unwrap
from tagmill.errors import InputError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
MIN_OPSET = 17
#: Largest |onnx - torch| allowed per logit, relative to the logit's size above 1.
TOLERANCE = 1e-4


def export_onnx(model: torch.nn.Module, meta: BundleMeta, out_path: str, *, opset: int = DEFAULT_OPSET) -> str:
    """Export ``model`` to ``out_path`` (path or URL), verified; returns ``out_path``."""
    storage.write_bytes(out_path, onnx_bytes(model, meta, opset=opset))
    return out_path


def add_onnx(location: str, *, opset: int = DEFAULT_OPSET) -> str:
    """Export the model of an existing bundle into its ``model.onnx`` and record the
    file's sha256 in ``model.json``; returns the path of ``model.onnx``."""
    model, meta = load_bundle(location)
    graph = onnx_bytes(model, meta, opset=opset)
    path = storage.join(location, ONNX_FILE)
    storage.write_bytes(path, graph)
    # model.json last: until it names the new graph, a reader gets a checksum error for
    # model.onnx, never an unverified graph; the torch weights stay valid throughout
    # an INT8 graph quantized from the old one no longer describes it (its file is left
    # behind, unnamed: model.json is what says which files belong to the bundle)
    updated = replace(meta, onnx_sha256=sha256(graph), int8=None)
    storage.write_bytes(storage.join(location, MODEL_JSON), updated.to_json().encode("utf-8"))
    return path


def onnx_bytes(model: torch.nn.Module, meta: BundleMeta, *, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialised, verified ONNX graph of ``model``."""
    if opset < MIN_OPSET:
        raise InputError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer")
    # Export a float32 CPU copy in eval mode: the caller's model stays as it was
    # (device, dtype, train mode), and dropout/batch-norm statistics are frozen.
    subject = copy.deepcopy(unwrap(model)).float().cpu().eval()
    size = meta.preprocess.input_size
    # batch 2, not 1: an example batch of 1 lets the tracer specialise the dimension
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, S, S)
    graph = _export(subject, example, opset)
    _compare(graph, subject, meta.preprocess.input_size, batch_size=3)
    return graph


def _export(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    try:
        return _export_dynamo(model, example, opset)
    except Exception as dynamo_exc:  # the tracer fails in many ways on unusual models
        log.warning("torch.export-based ONNX export failed (%s); trying the TorchScript exporter", dynamo_exc)
        try:
            return _export_torchscript(model, example, opset)
        except Exception as legacy_exc:
            raise BundleError(
                f"cannot export {type(model).__name__} to ONNX: torch.export exporter: {dynamo_exc}; "
                f"TorchScript exporter: {legacy_exc}"
            ) from legacy_exc


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example,),
        None,  # keep the graph in memory: storage writes it, so URLs work too
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: batch},),  # positional: timm's forward argument names vary
        external_data=False,  # one self-contained file (bundles are far below 2 GB)
        verbose=False,
    )
    if program is None:
        raise BundleError("torch.onnx.export returned no program")
    return program.model_proto.SerializeToString()


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # We only get here when the new exporter failed; its deprecation notice is known.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buffer.getvalue()


def onnx_providers(device: torch.device, *, required: bool) -> list[Any]:
    """onnxruntime's execution providers for ``device``: CUDA (on that GPU) then CPU for a
    GPU, CPU alone otherwise. The CUDA provider exists only in the onnxruntime-gpu build:
    without it a GPU that was ``required`` (asked for by name) is an InputError, and one
    that "auto" found is passed over for the CPU."""
    import onnxruntime as ort  # heavy; only the ONNX paths need it

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if not required:
            return ["CPUExecutionProvider"]
        raise InputError(
            f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDA provider",
            hint="install onnxruntime-gpu in place of onnxruntime, or serve with --backend torch or --device cpu",
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def make_session(graph: bytes, *, intra_op_threads: int | None = None,
                 providers: list[Any] | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session for ``graph`` (``providers``: default the CPU's);
    ``intra_op_threads`` None = ORT's default."""
    import onnxruntime as ort  # heavy; only the ONNX paths need it

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        if intra_op_threads < 0:
            raise InputError(f"intra_op_threads must be >= 0, not {intra_op_threads}")
        options.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(graph, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise BundleError(f"onnxruntime cannot load the ONNX graph: {exc}") from exc


def run_session(session: onnxruntime.InferenceSession, batch: torch.Tensor) -> torch.Tensor:
    """logits (N, C) for a preprocessed batch (N, 3, S, S)."""
    images = batch.detach().to("cpu", torch.float32).contiguous().numpy()  # (N, 3, S, S)
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})  # (N, C)
    return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def verify_onnx(graph: bytes, model: torch.nn.Module, meta: BundleMeta, *, batch_size: int = 3) -> float:
    """Check the ONNX graph against ``model`` on a random batch; returns the largest difference.

    The default batch size differs from the export example so the dynamic batch is
    exercised.
    """
    subject = copy.deepcopy(unwrap(model)).float().cpu().eval()
    return _compare(graph, subject, meta.preprocess.input_size, batch_size=batch_size)


def _compare(graph: bytes, model: torch.nn.Module, size: int, *, batch_size: int) -> float:
    """``model`` must already be a float32 CPU model in eval mode."""
    _check_opset(graph)
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))  # (B, 3, S, S)
    with torch.inference_mode():
        expected = model(images).float()  # (B, C)
    actual = run_session(make_session(graph), images)  # (B, C)
    if actual.shape != expected.shape:
        raise BundleError(f"ONNX graph returns shape {list(actual.shape)}, PyTorch {list(expected.shape)}")
    diff = (actual - expected).abs()  # (B, C)
    allowed = TOLERANCE * expected.abs().clamp(min=1.0)  # large logits get proportional slack
    if not bool((diff <= allowed).all()):
        raise BundleError(
            f"the ONNX export does not match PyTorch: largest logit difference {diff.max().item():.3g} "
            f"(allowed {TOLERANCE:g})",
            hint="the model uses an operation the ONNX exporter translates differently",
        )
    return float(diff.max().item())


def _check_opset(graph: bytes) -> None:
    import onnx  # only to read the header; onnxruntime does the real check

    proto = onnx.load_model_from_string(graph)
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise BundleError(f"the ONNX graph uses opset {version}; tagmill needs {MIN_OPSET} or newer")
