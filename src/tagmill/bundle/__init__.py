"""Model bundles: ``model.json`` + ``model.safetensors`` (+ ``model.onnx``), and the
:class:`Predictor` that serves them."""

from tagmill.bundle.format import (
    FORMAT,
    MODEL_JSON,
    ONNX_FILE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    BundleError,
    BundleMeta,
    build_model,
    load_bundle,
    read_meta,
    save_bundle,
)
from tagmill.bundle.onnx_export import add_onnx, export_onnx, verify_onnx
from tagmill.bundle.predictor import Prediction, Predictor

__all__ = [
    "FORMAT",
    "MODEL_JSON",
    "ONNX_FILE",
    "SCHEMA_VERSION",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleMeta",
    "Prediction",
    "Predictor",
    "add_onnx",
    "build_model",
    "export_onnx",
    "load_bundle",
    "read_meta",
    "save_bundle",
    "verify_onnx",
]
