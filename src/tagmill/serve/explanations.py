"""Explanations over HTTP: ``POST /predict?explain=true`` adds a heatmap overlay per class.

Grad-CAM runs a backward pass per class explained, several times a plain prediction's
cost, so explanations get their own budget and never the prediction path's: at most
``explain_concurrency`` run at once in each worker, on their own threads (off the event
loop, outside the batcher), and a request that finds every slot busy waits at most
``explain_wait_s`` before it is answered 503 with ``Retry-After``. Plain predictions
keep flowing meanwhile: they only share the CPU.

The heatmaps come from the model that answered the request's prediction (the served
one when it arrived, even if another was swapped in since), through
:func:`tagmill.bundle.explain.explain`: the bundle's torch weights, whatever the backend.
"""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tagmill.errors import InputError, UnreadableImageError
from tagmill.serve.errors import (
    ExplainBusyError,
    ExplanationUnavailableError,
    ExplanationUnsupportedError,
    NotReadyError,
)
from tagmill.serve.metrics import ServeMetrics

if TYPE_CHECKING:
    from tagmill.bundle.explain import Heatmap
    from tagmill.bundle.predictor import Prediction
    from tagmill.serve.models import ServedModel

#: longest side of an overlay PNG: the web page shows the picture at most 340 px high, and
#: a 12-megapixel photo's full-size overlay would be ~30 MB of base64 per class
OVERLAY_MAX_SIDE = 512
#: classes explained in one request at most: each is a forward and backward pass and an
#: overlay PNG; more tags than this are a sign of a threshold too low to read heatmaps by
MAX_EXPLAINED = 8
#: how often a request waiting for a slot looks again: asyncio cannot await a thread
#: lock, and 10 ms is under a tenth of one explanation (~100 ms for Lite0 on a CPU)
POLL_S = 0.01


class Explainer:
    """One worker's explanation slots, threads and counts."""

    def __init__(self, concurrency: int, wait_s: float, metrics: ServeMetrics) -> None:
        self.concurrency = concurrency
        self.wait_s = wait_s
        self._metrics = metrics
        # a thread lock, not an asyncio one: a slot can be held from any thread (the
        # explanation thread itself, or a test filling the server)
        self._free = threading.BoundedSemaphore(concurrency)
        self._pool: ThreadPoolExecutor | None = None

    # --- slots --------------------------------------------------------------------

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Take a slot now or raise ExplainBusyError (503)."""
        if not self._free.acquire(blocking=False):
            raise self._busy()
        try:
            yield
        finally:
            self._free.release()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A slot, waiting at most ``wait_s`` for one; ExplainBusyError (503) otherwise.
        Counts the request's outcome: ok, refused (no slot) or failed (any error)."""
        deadline = time.monotonic() + self.wait_s
        while not self._free.acquire(blocking=False):
            if time.monotonic() >= deadline:
                self._metrics.explanations.labels("refused").inc()
                raise self._busy()
            await asyncio.sleep(POLL_S)
        try:
            yield
        except BaseException:
            self._metrics.explanations.labels("failed").inc()
            raise
        else:
            self._metrics.explanations.labels("ok").inc()
        finally:
            self._free.release()

    def _busy(self) -> ExplainBusyError:
        return ExplainBusyError(
            f"every explanation slot is busy ({self.concurrency} per worker)",
            retry_after_s=max(1, math.ceil(self.wait_s)),
            hint="retry later, or ask the operator for a higher --explain-concurrency; "
                 "predictions without explain=true are not limited by it",
        )

    # --- running --------------------------------------------------------------------

    def start(self) -> None:
        if self._pool is None:  # one thread per slot: an admitted explanation never queues here
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tagmill-explain")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run(self, model: ServedModel, image: bytes, classes: Sequence[str]) -> list[dict[str, Any]]:
        """The answer's ``explanations``: one entry per class, in order (call inside ``admit``)."""
        pool = self._pool
        if pool is None:
            raise NotReadyError("the server is not started")
        started = time.perf_counter()
        entries = await asyncio.get_running_loop().run_in_executor(pool, _explain, model, image, list(classes))
        self._metrics.explain_latency.observe(time.perf_counter() - started)
        return entries


def check_classes(asked: Sequence[str], known: Sequence[str]) -> list[str]:
    """The class names asked for, once each, in order; InputError (400) for a name the
    model does not have or for more than MAX_EXPLAINED."""
    from tagmill.bundle.explain import check_class_names

    try:
        chosen = check_class_names(asked, known)
    except InputError as exc:
        raise InputError(f"explain_class: {exc.message}", hint=exc.hint) from None
    if len(chosen) > MAX_EXPLAINED:
        raise InputError(f"explain_class: at most {MAX_EXPLAINED} classes per request, not {len(chosen)}")
    return chosen


def classes_to_explain(prediction: Prediction, asked: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """The classes asked for (checked against the model's), or what the answer names
    (``bundle.explain.default_classes``), the most probable first. At most MAX_EXPLAINED."""
    from tagmill.bundle.explain import default_classes

    if asked:
        return check_classes(asked, known)
    labels = sorted(default_classes(prediction), key=lambda label: -prediction.scores.get(label, 0.0))
    return labels[:MAX_EXPLAINED]


def _explain(model: ServedModel, image: bytes, classes: list[str]) -> list[dict[str, Any]]:
    """Grad-CAM for ``classes`` on ``model``, as JSON-ready entries (an explanation thread)."""
    from tagmill.bundle.explain import explain, require_grad_cam

    try:
        require_grad_cam()
    except InputError as exc:
        raise ExplanationUnavailableError(exc.message, hint=exc.hint) from exc
    try:
        found = explain(model.predictor, image, classes=classes)
    except UnreadableImageError:
        raise
    except InputError as exc:  # no torch weights, or a backbone family Grad-CAM cannot be drawn on
        raise ExplanationUnsupportedError(f"this model cannot be explained: {exc.message}", hint=exc.hint) from exc
    picture = _shrunk(found.image)
    return [_entry(_fitted(heatmap, picture.size), picture) for heatmap in found.heatmaps]


def _shrunk(image: Image.Image) -> Image.Image:
    if max(image.size) <= OVERLAY_MAX_SIDE:
        return image
    shrunk = image.copy()
    shrunk.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return shrunk


def _fitted(heatmap: Heatmap, size: tuple[int, int]) -> Heatmap:
    """The heatmap over a picture of ``size`` (the shrunk one the overlay is drawn on)."""
    if heatmap.heat.shape == (size[1], size[0]):
        return heatmap
    heat = Image.fromarray(heatmap.heat, mode="F").resize(size, Image.Resampling.BILINEAR)
    return replace(heatmap, heat=np.asarray(heat, dtype=np.float32).clip(0, 1))


def _entry(heatmap: Heatmap, picture: Image.Image) -> dict[str, Any]:
    return {
        "label": heatmap.label,
        "score": heatmap.score,
        "overlay_png": base64.b64encode(heatmap.overlay_png(picture)).decode("ascii"),
        "width": picture.width,
        "height": picture.height,
    }


__all__ = ["Explainer", "MAX_EXPLAINED", "OVERLAY_MAX_SIDE", "check_classes", "classes_to_explain"]
