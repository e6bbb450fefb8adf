"""One worker's serving state: the bundle's metadata, the batcher, the decode pool.

The routes only parse and format; everything that touches images or the model goes
through :meth:`Service.predict`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tagmill import storage
from tagmill.bundle.format import ONNX_FILE, BundleMeta, read_meta
from tagmill.bundle.predictor import Prediction, Predictor, Threshold
from tagmill.errors import BundleError, UnreadableImageError
from tagmill.serve.batching import Batcher
from tagmill.serve.config import STARTUP_FAILURE, ServeConfig
from tagmill.serve.errors import NotReadyError
from tagmill.serve.metrics import ServeMetrics

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
        self.meta: BundleMeta = predictor.meta if predictor is not None else read_meta(config.bundle)
        if predictor is None and config.backend == "onnx":
            check_onnx(config.bundle, self.meta)
        self.metrics = ServeMetrics()
        self.examples = find_examples(config.bundle)
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
        log.info("model loaded: %s, %s", self.meta.architecture, predictor.runs_on)
        return predictor

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start decoding threads and the model thread (which loads the model); idempotent."""
        if self._pool is None:
            torch.set_num_threads(self.config.threads)  # decode threads run small torch ops too
            self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="tagmill-decode")
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @property
    def ready(self) -> bool:
        return self.batcher.ready

    def require_ready(self) -> Predictor:
        predictor = self.batcher.predictor
        if predictor is not None and self.batcher.ready:
            return predictor
        if self.batcher.load_error is not None:
            raise NotReadyError(f"the model failed to load: {self.batcher.load_error}", retry_after_s=60)
        raise NotReadyError("the model is still loading")

    # --- requests -------------------------------------------------------------------

    async def predict(
        self, images: Sequence[bytes], *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> list[Prediction]:
        """Decode in the pool, then run in the next batch; one Prediction per image.

        A bad image fails the whole request (UnreadableImageError, 422)."""
        predictor = self.require_ready()
        pool = self._pool
        if pool is None:
            raise NotReadyError("the server is not started")
        k, thresholds = predictor.resolve_options(top_k, threshold)  # bad options: 400 before any work
        with self.batcher.reserve() as slot:
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(pool, _preprocess_all, predictor, images)
            future = slot.submit(batch, k, thresholds)
        return await asyncio.wrap_future(future)


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


def bundle_name(location: str) -> str:
    return os.path.basename(location.rstrip("/")) or location
