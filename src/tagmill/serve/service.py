"""One worker's serving state: the served model, the batcher, the decoding threads.

The routes only parse and format; everything that touches images or the model goes
through :meth:`Service.predict`, which also says which model answered, and
:meth:`Service.swap_to`, which replaces the model while requests keep being answered
(``models.py``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from tagmill import storage
from tagmill.bundle.format import ONNX_FILE, BundleMeta, read_meta
from tagmill.bundle.predictor import Prediction, Predictor, Threshold
from tagmill.errors import BundleError, UnreadableImageError
from tagmill.serve.batching import Batcher
from tagmill.serve.capture import Capture
from tagmill.serve.config import DECODE_THREADS, STARTUP_FAILURE, ServeConfig
from tagmill.serve.errors import NotReadyError
from tagmill.serve.explanations import Explainer
from tagmill.serve.metrics import ServeMetrics
from tagmill.serve.models import ServedModel, SwapOutcome, check_compatible, load_model, read_version
from tagmill.train.device import resolve_device

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
EXAMPLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
MAX_EXAMPLES = 48


class Service:
    """Loads the model (in the batcher's thread) and runs requests through it."""

    def __init__(
        self, config: ServeConfig, predictor: Predictor | None = None, *, exit_on_load_error: bool = False
    ) -> None:
        self.config = config
        # model.json is read now, so a wrong bundle fails before the server binds a port
        self._initial_meta: BundleMeta = predictor.meta if predictor is not None else read_meta(config.bundle)
        if predictor is None and config.backend == "onnx":
            check_onnx(config.bundle, self._initial_meta)
        self.metrics = ServeMetrics()
        self.examples = find_examples(config.bundle)
        #: the model new requests get; None until loaded
        self._model: ServedModel | None = None
        self._swap_lock = threading.Lock()  # one swap at a time; the next one waits
        if predictor is not None:
            self._serve(ServedModel.of(predictor, config.bundle))
        self.batcher = Batcher(
            (lambda: predictor) if predictor is not None else self._load,
            self.metrics,
            max_batch=config.batch_limit,
            max_wait_ms=config.max_wait_ms,
            queue_size=config.queue_size,
            threads=config.threads,
            on_load_error=_exit_process if exit_on_load_error else None,
        )
        self._pool: ThreadPoolExecutor | None = None
        #: POST /predict?explain=true: its own slots and threads, apart from predictions
        self.explainer = Explainer(config.explain_concurrency, config.explain_wait_s, self.metrics)
        #: stores the images the model was unsure of (serve --capture); None: off
        self.capture: Capture | None = None if config.capture is None else Capture(
            config.capture, self.metrics, below=config.capture_below, sample=config.capture_sample,
            max_bytes=int(config.capture_max_gb * 1024**3), queue_items=config.capture_queue, workers=config.workers)
        #: what the model runs on ("torch on cpu", "onnxruntime CUDAExecutionProvider"); None until loaded
        self.runs_on: str | None = predictor.runs_on if predictor is not None else None

    def _load(self) -> Predictor:
        predictor = Predictor.from_bundle(
            self.config.bundle,
            self.config.backend,
            device=self.config.device,
            intra_op_threads=self.config.threads,
            batch_size=self.config.batch_limit,
            precision=self.config.precision,
        )
        self.runs_on = predictor.runs_on
        self._serve(ServedModel.of(predictor, self.config.bundle))
        log.info("model loaded: %s, %s", predictor.meta.architecture, predictor.runs_on)
        return predictor

    def _serve(self, model: ServedModel) -> None:
        previous, self._model = self._model, model
        self.metrics.serving(model.version, None if previous is None else previous.version)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start decoding threads and the model thread (which loads the model); idempotent."""
        if self._pool is None:
            torch.set_num_threads(self.config.threads)  # decode threads run small torch ops too
            threads = decode_threads(self.config)
            if threads > 0:  # else the model thread decodes (Slot.decode_and_submit)
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tagmill-decode")
        self.explainer.start()
        self.batcher.start()
        if self.capture is not None:
            self.capture.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.capture is not None:
            self.capture.stop()
        self.explainer.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @property
    def ready(self) -> bool:
        return self.batcher.ready

    @property
    def meta(self) -> BundleMeta:
        """The served model's metadata (the configured bundle's until it is loaded)."""
        model = self._model
        return model.meta if model is not None else self._initial_meta

    @property
    def current(self) -> ServedModel | None:
        """The model new requests get; None until it is loaded."""
        return self._model

    def require_ready(self) -> ServedModel:
        model = self._model
        if model is not None and self.batcher.ready:
            return model
        if self.batcher.load_error is not None:
            raise NotReadyError(f"the model failed to load: {self.batcher.load_error}", retry_after_s=60)
        raise NotReadyError("the model is still loading")

    # --- requests -------------------------------------------------------------------

    async def predict(
        self, images: Sequence[bytes], *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> tuple[ServedModel, list[Prediction]]:
        """Decode in the pool, then run in the next batch: the model that answered (the
        one served when the request came, even if another was swapped in since) and
        one Prediction per image.

        A bad image fails the whole request (UnreadableImageError, 422)."""
        model = self.require_ready()
        predictor = model.predictor
        if not self.batcher.started:
            raise NotReadyError("the server is not started")
        k, thresholds = predictor.resolve_options(top_k, threshold)  # bad options: 400 before any work
        with self.batcher.reserve() as slot:
            future = slot.decode_and_submit(self._pool, partial(_preprocess_all, predictor, images), len(images), k,
                                            thresholds, predictor=predictor)
        predictions = await future
        self.metrics.answers.labels(model.version).inc()
        if self.capture is not None:  # every prediction route comes through here: one hook
            self.capture.offer(images, predictions, model.version, model.meta)
        return model, predictions

    # --- swapping the model -----------------------------------------------------------

    def swap_to(self, location: str | None = None, *, allow_class_change: bool = False) -> SwapOutcome:
        """Load the bundle at ``location`` (None: the served model's location again,
        e.g. a ``.../latest`` path that now holds another bundle) beside the served
        model, check it, and serve it. Blocking: call it from a thread.

        Refused (BundleRefusedError 422, IncompatibleBundleError 409) without touching
        the served model. A bundle with the served version is not loaded again."""
        with self._swap_lock:
            if self.batcher.started:  # a worker just started loads its first model before it swaps
                self.batcher.wait_ready()
            served = self.require_ready()  # NotReadyError when that load failed
            target = location or served.location
            try:
                meta, version = read_version(target)
                if version == served.version:
                    if target != served.location:  # the same bundle, found elsewhere: reload from there
                        self._serve(ServedModel(served.predictor, target, version))
                    self.metrics.swaps.labels("unchanged").inc()
                    return SwapOutcome("unchanged", version, version, target)
                check_compatible(served.meta, meta, allow_class_change=allow_class_change)
                model = load_model(self.config, target)
            except Exception:
                self.metrics.swaps.labels("refused").inc()
                raise
            self.batcher.swap(model.predictor)
            self._serve(model)
            self.runs_on = model.predictor.runs_on
            self.examples = find_examples(target)
            self.metrics.swaps.labels("swapped").inc()
            log.info("model swapped: %s -> %s (%s)", served.version, model.version, target)
            return SwapOutcome("swapped", model.version, served.version, target)


def decode_threads(config: ServeConfig) -> int:
    """How many threads of each worker decode request images beside its model thread:
    ``config.decode_threads``, or where that is None, 0 (the model thread decodes) when the
    model runs on the CPU and the workers' inference threads (workers x threads) are at
    least as many as the CPUs this process may use, else DECODE_THREADS. With every CPU
    running the model, a decoding pool adds no CPU, only hand-offs between threads; with a
    GPU, or CPUs left over, it decodes the next requests while the model runs."""
    if config.decode_threads is not None:
        return config.decode_threads
    on_cpu = config.device == "cpu" or (config.device == "auto" and resolve_device("auto").type == "cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if on_cpu and config.workers * config.threads >= cpus else DECODE_THREADS


def _exit_process(_: BaseException) -> None:
    """A server whose model cannot load will never be ready: end it (the error is
    logged already) rather than answer 503 forever. uvicorn's "cannot start" status
    tells a supervisor not to restart it."""
    sys.stderr.flush()
    os._exit(STARTUP_FAILURE)


def _preprocess_all(predictor: Predictor, images: Sequence[bytes]) -> torch.Tensor:
    tensors = []
    for index, data in enumerate(images):
        try:
            tensors.append(predictor.preprocess(data))  # (3, S, S)
        except UnreadableImageError as exc:
            if len(images) == 1:
                raise
            raise UnreadableImageError(f"instance {index}: {exc.message}", reason=exc.reason) from exc
    return torch.stack(tensors)  # (n, 3, S, S)


def check_onnx(location: str, meta: BundleMeta) -> None:
    """The onnx backend needs model.onnx; say so before the server starts."""
    if meta.onnx_sha256 is None or not storage.exists(storage.join(location, ONNX_FILE)):
        raise BundleError(
            f"bundle {location} has no {ONNX_FILE}, which --backend onnx needs",
            hint="add it with `tagmill export --onnx`, or serve with --backend torch",
        )


def find_examples(location: str) -> dict[str, Path]:
    """Example images in the bundle's ``examples/`` folder (local bundles only), by name.

    Only these names are ever served, so a request cannot reach any other file."""
    if not storage.is_local(location):
        return {}
    folder = Path(location.removeprefix("file://")) / EXAMPLES_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in EXAMPLE_SUFFIXES and not path.name.startswith(".") and path.is_file():
            found[path.name] = path
            if len(found) >= MAX_EXAMPLES:
                break
    return found

