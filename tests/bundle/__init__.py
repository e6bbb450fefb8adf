"""Helpers shared by the bundle tests: tiny real timm models and their metadata."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import timm
import torch

from tagmill.bundle import BundleMeta, save_bundle
from tagmill.dataset.transforms import Preprocess

CLASSES = ("cat", "dog", "owl")
SIZE = 64  # small input keeps every forward pass and export fast


def tiny_model(architecture: str = "test_efficientnet", *, seed: int = 0, bias: tuple[float, ...] | None = None):
    """A randomly initialised timm model for CLASSES; ``bias`` shifts the classifier's
    logits so probabilities are far apart (random init gives ~equal ones)."""
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=len(CLASSES)).eval()
    if bias is not None:
        with torch.no_grad():
            model.get_classifier().bias.copy_(torch.tensor(bias))
    return model


def tiny_meta(architecture: str = "test_efficientnet", task: str = "single", **extra) -> BundleMeta:
    return BundleMeta(
        architecture=architecture,
        task=task,
        classes=CLASSES,
        preprocess=Preprocess(input_size=SIZE),
        **extra,
    )


#: Classifier biases that put the multi-label probabilities near (0.88, 0.52, 0.12)
#: whatever the image: random-init logits stay within about ±0.02.
MULTI_BIAS = (2.0, 0.1, -2.0)
MULTI_THRESHOLDS = (0.9, 0.5, 0.1)  # -> labels dog, owl


@functools.cache
def multilabel_onnx_bundle() -> str:
    """A multi-label bundle with model.onnx, exported once per test run: the
    torch.export-based exporter takes seconds, and several test modules need one.
    Tests must copy it before changing anything in it."""
    root = tempfile.mkdtemp(prefix="tagmill-bundle-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model = tiny_model(seed=1, bias=MULTI_BIAS)
    meta = tiny_meta(task="multi", thresholds=MULTI_THRESHOLDS, default_top_k=2)
    return save_bundle(os.path.join(root, "bundle"), model, meta, onnx=True)
