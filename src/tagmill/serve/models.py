"""The model a server answers with, and how a running server replaces it (hot swap).

A swap loads the new bundle beside the served one, checks it as the server checks a
bundle before it starts (:func:`check_bundle`), runs one forward pass on it, and only
then makes it the served model. Requests already admitted keep the model they were
admitted with: each request is decoded for, batched with and answered by one
:class:`ServedModel`, so a swap to a bundle with another input size changes nothing
for them. The old model is freed when its last request is answered.

A bundle is identified by its **version**: a hash of its ``model.json``, which records
the sha256 of every graph and weights file, the classes, thresholds and preprocessing.
Two bundles with the same version answer identically; a retrained one never shares it.

This module imports the model stack only inside its functions: the supervisor of
several workers, which imports ``tagmill.serve.workers``, must not hold it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tagmill.errors import BundleError, StorageError, TagmillError
from tagmill.serve.config import ServeConfig
from tagmill.serve.errors import BundleRefusedError, IncompatibleBundleError

if TYPE_CHECKING:
    from tagmill.bundle.format import BundleMeta
    from tagmill.bundle.predictor import Predictor

log = logging.getLogger(__name__)

#: hex digits of the version: 48 bits, enough that two bundles one server sees never
#: collide by chance, short enough to read in a header or a log line
VERSION_CHARS = 12


def model_version(meta: BundleMeta) -> str:
    """The bundle's version: the start of the sha256 of its model.json (as this tagmill
    writes it, so fields a later tagmill adds do not change it)."""
    return hashlib.sha256(meta.to_json().encode("utf-8")).hexdigest()[:VERSION_CHARS]


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded bundle: the predictor and what identifies it."""

    predictor: Predictor
    location: str  #: where it was loaded from (what SIGHUP reads again)
    version: str

    @property
    def meta(self) -> BundleMeta:
        return self.predictor.meta

    @classmethod
    def of(cls, predictor: Predictor, location: str) -> ServedModel:
        return cls(predictor, location, model_version(predictor.meta))


@dataclass(frozen=True)
class SwapOutcome:
    """What a swap did; the admin route's answer."""

    status: str  #: "swapped", or "unchanged" (the bundle has the served version already)
    version: str
    previous_version: str
    bundle: str
    workers: int = 1  #: worker processes now serving ``version``

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "previous_version": self.previous_version,
                "bundle": self.bundle, "workers": self.workers}


def check_bundle(config: ServeConfig) -> BundleMeta:
    """Fail with the bundle's own error (as ``predict`` would) before any port is bound,
    worker started or model swapped in: model.json, weights that are whole and readable,
    and the graph the configured backend and precision need. Returns the bundle's meta."""
    from tagmill.bundle.format import verify_bundle
    from tagmill.serve.service import check_onnx
    from tagmill.train.device import resolve_device

    meta = verify_bundle(config.bundle)
    device = resolve_device(config.device)  # a GPU asked for and absent: say so now
    if config.backend == "onnx":
        from tagmill.bundle.onnx_export import onnx_providers  # only the onnx backend needs it

        check_onnx(config.bundle, meta)
        onnx_providers(device, required=config.device != "auto")
        if config.precision == "int8" and meta.int8 is None:
            raise BundleError(f"bundle {config.bundle} has no INT8 graph, which --precision int8 needs",
                              hint="export it with `tagmill export RUN --out BUNDLE --int8`, or leave --precision out")
    return meta


def check_compatible(served: BundleMeta, new: BundleMeta, *, allow_class_change: bool) -> None:
    """Refuse a bundle whose answers would mean something else to the server's clients.

    SageMaker's answer is a bare list of probabilities in class order, so a client
    cannot tell that the classes moved; a single-label model answering where a
    multi-label one did changes what ``labels`` means. The input size may change: each
    request is preprocessed for the model that answers it."""
    if allow_class_change:
        return
    if new.task != served.task:
        raise IncompatibleBundleError(
            f"the new bundle is a {new.task}-label model; the served one is {served.task}-label",
            hint='send "allow_class_change": true to switch anyway, or start a new server',
        )
    if new.classes != served.classes:
        added = [c for c in new.classes if c not in served.classes]
        dropped = [c for c in served.classes if c not in new.classes]
        change = (f"adds {added[:5]}" if added else "") + (" and " if added and dropped else "") + \
                 (f"drops {dropped[:5]}" if dropped else "")
        raise IncompatibleBundleError(
            f"the new bundle's classes differ from the served model's ({change or 'same classes, another order'}): "
            "clients reading probabilities in class order would misread them",
            hint='send "allow_class_change": true to switch anyway, or start a new server',
        )


def read_version(location: str) -> tuple[BundleMeta, str]:
    """model.json of the bundle at ``location`` and its version; a bundle that is no
    bundle is refused (:class:`BundleRefusedError`)."""
    from tagmill.bundle.format import read_meta

    with refusing(location):
        meta = read_meta(location)
    return meta, model_version(meta)


def load_model(config: ServeConfig, location: str) -> ServedModel:
    """Load and check the bundle at ``location`` for a server configured as ``config``
    (its backend, precision, device and threads): the start-up check, the model, and
    one forward pass on a blank image. Anything wrong is a :class:`BundleRefusedError`."""
    import torch

    from tagmill.bundle.predictor import Predictor

    with refusing(location):
        check_bundle(replace(config, bundle=location))
        predictor = Predictor.from_bundle(location, config.backend, device=config.device,
                                          intra_op_threads=config.threads, batch_size=config.batch_limit,
                                          precision=config.precision)
        size = predictor.meta.preprocess.input_size
        logits = predictor.logits(torch.zeros(1, 3, size, size))  # (1, C): the graph runs
        if tuple(logits.shape) != (1, predictor.meta.num_classes) or not bool(torch.isfinite(logits).all()):
            raise BundleError(f"the model answers a blank image with {list(logits.shape)} values, "
                              f"not {predictor.meta.num_classes} finite ones")
    return ServedModel.of(predictor, location)


@contextmanager
def refusing(location: str) -> Iterator[None]:
    """Turn any failure while reading or loading a candidate bundle into one
    :class:`BundleRefusedError` (422) that names the bundle and keeps the cause's hint:
    a bundle sent to a running server is the caller's input, not the server's fault."""
    try:
        yield
    except (BundleRefusedError, StorageError):
        raise  # StorageError: the store cannot be reached (502), which says nothing of the bundle
    except TagmillError as exc:
        raise BundleRefusedError(f"bundle {location} refused: {exc.message}", hint=exc.hint) from exc
    except Exception as exc:  # onnxruntime or torch failing on the graph: the bundle, not the server
        raise BundleRefusedError(f"bundle {location} refused: {type(exc).__name__}: {exc}") from exc


__all__ = ["ServedModel", "SwapOutcome", "check_bundle", "check_compatible", "load_model", "model_version",
           "read_version"]
