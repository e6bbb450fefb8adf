"""Capture from traffic: keep request images the model was unsure of, for labelling.

``tagmill serve --capture DIR|s3://...`` stores an image when the model's confidence in
its answer is below ``--capture-below`` (or, with ``--capture-sample P``, a random
fraction P of all images), with the prediction beside it. ``tagmill suggest`` reads the
folder back as a pool of unlabelled images.

Confidence (:func:`decision_confidence`):

- single-label: the top class's probability;
- multi-label: for each tag, how sure the model is of its yes/no decision at the tag's
  own threshold ``t`` in the bundle — ``0.5 + 0.5 * |p - t| / room``, ``room`` being the
  distance from ``t`` to certainty on that side (``t`` below it, ``1 - t`` above) — and
  the image's confidence is its least sure tag's. It is 0.5 at the threshold and 1 at
  0 or 1; for ``t = 0.5`` it is ``max(p, 1 - p)``, the probability of the decision
  taken, exactly what the top probability of a two-class single-label model is. So one
  ``--capture-below`` means the same for both tasks: at 0.6, a tag with threshold 0.5
  is captured between 0.4 and 0.6; one with threshold 0.2, between 0.16 and 0.32.
  It is ``1 - u / 2`` for ``bundle/suggest.py``'s uncertainty ``u``: the images this
  captures are those ``suggest`` ranks first.

It never slows or fails a request. The request path (:meth:`Capture.offer`) only
decides and appends to a bounded in-memory queue; a writer thread stores the items.
A full queue, the size cap reached, or a storage error (S3 down, disk full, no
permission) drops the item, counts it in ``/metrics`` (``tagmill_capture_dropped_total``
by reason) and logs it (rate-limited); the request never sees any of it.

Where and how items are stored is ``bundle/captures.py``'s layout (the same on a disk
and on S3): the writer collects what it takes from the queue into a *part* — a tar of
the images and, after them, one JSON line per image with what was served — and writes
the part once it holds ``PART_ITEMS`` images or ``PART_BYTES``, or its first image is
``PART_S`` old (and at shutdown). One write per part, not per image: into S3 a PUT costs
~2 ms of the server's CPU, which a model using every core feels. Each part is written
atomically (renamed into place; on S3 one PUT), without an fsync: a killed or powered-off
server loses at most its last second of captures, which are a sample, and a reader never
sees half a part. ``<token>`` in the names is random per process, so every worker of
``--workers N`` (and every replica writing to one bucket) names its parts apart without
any locking. The date folders keep listings short and let a person take or delete one
day's capture.

The size cap (``--capture-max-gb``) counts the bytes of the parts. At start each
worker adds up what the folder already holds and takes an equal share of what is left,
so N workers together stay within the cap; it holds approximately across restarts (a
worker restarted later shares what is left then).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from tagmill import storage
from tagmill.bundle import captures
from tagmill.bundle.captures import LAYOUT, LAYOUT_VERSION, MARKER
from tagmill.formats.base import image_extension

if TYPE_CHECKING:
    from tagmill.bundle.format import BundleMeta
    from tagmill.bundle.predictor import Prediction
    from tagmill.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

#: a part is written once it holds this many images (a PUT's ~2 ms of client CPU, spread
#: over 64 images, is ~0.03 ms each; what is left is per byte) ...
PART_ITEMS = 64
#: ... or this many bytes (the writer's memory, beside the queue's QUEUE_BYTES) ...
PART_BYTES = 16 * 1024 * 1024
#: ... or once its first image is this old: a busy worker (~35 images/s each, two
#: workers on two cores) fills a part a second anyway, a quiet one still writes within
#: a second, at most one write a second per worker, and a kill loses at most a second
PART_S = 1.0
#: why an item is stored
LOW_CONFIDENCE, SAMPLE = "low_confidence", "sample"
#: why an item is dropped (the reason label of tagmill_capture_dropped_total)
QUEUE_FULL, CAP_REACHED, STORAGE_ERROR, INTERNAL_ERROR = "queue_full", "cap_reached", "storage_error", "error"
DROP_REASONS = (QUEUE_FULL, CAP_REACHED, STORAGE_ERROR, INTERNAL_ERROR)
#: image bytes waiting in the queue at most, whatever --capture-queue allows: 256 items
#: of --max-body-mb's 10 MB would hold 2.5 GB; 64 MiB is still ~600 typical 100 kB photos
QUEUE_BYTES = 64 * 1024 * 1024
#: a storage outage fails every write: log the first failure, then a count this often
LOG_EVERY_S = 60.0
#: at shutdown, how long the writer may go on storing what is queued
DRAIN_S = 5.0

#: (path, content type) of the HTTP request being answered; set by CaptureContext
_request: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "tagmill_capture_request", default=None)


def decision_confidence(probabilities: Sequence[float], task: str, thresholds: Sequence[float] | None) -> float:
    """How sure the model is of its answer, in [0, 1] (multi-label: [0.5, 1]); see the
    module docstring."""
    if not probabilities:
        return 1.0
    if task == "single":
        return float(max(probabilities))
    limits = thresholds if thresholds is not None else (0.5,) * len(probabilities)
    least = 1.0
    for p, t in zip(probabilities, limits):
        room = t if p < t else 1.0 - t
        least = min(least, 0.5 + 0.5 * min(abs(p - t) / max(room, 1e-6), 1.0))
    return least


@dataclass(frozen=True)
class _Item:
    data: bytes
    reason: str
    confidence: float
    at: float  #: time.time() when the request was answered
    version: str
    task: str
    classes: tuple[str, ...]
    probabilities: list[float]
    labels: list[str]
    path: str | None
    content_type: str | None
    instance: int  #: the image's index in its request (JSON instances carry several)
    instances: int
    queued: float  #: time.monotonic() when it was queued: a part is due PART_S after its first item's


@dataclass(frozen=True)
class _Taken:
    """An item in the part being filled: where and under which name it goes, what was served."""

    item: _Item
    folder: str  #: the date folder of the part it starts, if it starts one
    stem: str  #: its name without extension; a part is named after its first item's
    image: str  #: its member name in the part
    line: bytes  #: its JSON line: what was served


class Capture:
    """Decides on the request path, stores in a writer thread (see the module docstring).

    ``workers``: processes capturing into the same location at once, each taking an
    equal share of the cap. ``seed`` makes the random sample reproducible (tests)."""

    def __init__(self, location: str, metrics: ServeMetrics, *, below: float = 0.6, sample: float = 0.0,
                 max_bytes: int = 5 * 1024**3, queue_items: int = 256, workers: int = 1,
                 seed: int | None = None) -> None:
        self.location = location.rstrip("/") if "://" in location else location
        self.metrics = metrics
        self.below = below
        self.sample = sample
        self.max_bytes = max_bytes
        self.queue_items = queue_items
        self.workers = workers
        self._random = random.Random(seed)
        self._token = secrets.token_hex(4)  # 32 random bits: names apart across workers and replicas
        self._sequence = 0
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop_by: float | None = None
        self._budget: int | None = None  #: bytes this process may still write; None until scanned
        self._part: list[_Taken] = []  #: items in the part being filled, not yet written
        self._failures = 0  #: storage errors not yet logged
        self._logged_at = float("-inf")
        for reason in DROP_REASONS:  # every reason shows in /metrics from the start, at 0
            metrics.capture_dropped.labels(reason)
        for reason in (LOW_CONFIDENCE, SAMPLE):
            metrics.captured.labels(reason)

    # --- the request path ---------------------------------------------------------

    def offer(self, images: Sequence[bytes], predictions: Sequence[Prediction], version: str,
              meta: BundleMeta) -> None:
        """Queue the images worth keeping. Cheap, never blocks, never raises."""
        try:
            request = _request.get()
            now, queued = time.time(), time.monotonic()
            for index, (data, prediction) in enumerate(zip(images, predictions)):
                if not prediction.ok:
                    continue
                confidence = decision_confidence(prediction.probabilities, meta.task, meta.thresholds)
                reason = self._reason(confidence)
                if reason is None:
                    continue
                self._enqueue(_Item(
                    data, reason, confidence, now, version, meta.task, meta.classes, prediction.probabilities, prediction.labels,
                    request[0] if request else None, request[1] if request else None, index, len(images), queued))
        except Exception:  # noqa: BLE001 - capture must never fail the request it watches
            log.exception("capture: could not queue an image")
            self.metrics.capture_dropped.labels(INTERNAL_ERROR).inc()

    def _reason(self, confidence: float) -> str | None:
        if confidence < self.below:
            return LOW_CONFIDENCE
        if self.sample > 0 and self._random.random() < self.sample:
            return SAMPLE
        return None

    def _enqueue(self, item: _Item) -> None:
        with self._lock:
            if len(self._queue) >= self.queue_items or self._queued_bytes + len(item.data) > QUEUE_BYTES:
                full = True
            else:
                full = False
                self._queue.append(item)
                self._queued_bytes += len(item.data)
                # the writer sleeps until a part is due: woken by the first item (to time
                # it) and by a full part's worth, not by every item (each wake-up takes the
                # GIL from the threads answering requests)
                if len(self._queue) == 1 or len(self._queue) == PART_ITEMS or self._queued_bytes >= PART_BYTES:
                    self._ready.notify()
                self.metrics.capture_queued.inc()
        if full:
            self.metrics.capture_dropped.labels(QUEUE_FULL).inc()

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop_by = None
            self._thread = threading.Thread(target=self._run, name="tagmill-capture", daemon=True)
            self._thread.start()

    def stop(self, drain_s: float = DRAIN_S) -> None:
        """Store what is queued for at most ``drain_s`` seconds, then end the writer."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stop_by = time.monotonic() + drain_s
            self._ready.notify()
        thread.join(drain_s + 1.0)  # a write stuck on a dead endpoint is left behind (daemon)
        self._thread = None

    @property
    def pending(self) -> int:
        """Items queued, not yet stored or dropped."""
        with self._lock:
            return len(self._queue)

    # --- the writer thread ----------------------------------------------------------

    def _run(self) -> None:
        """Sleep until a part is due (or stop), take everything queued at once, write the
        parts that are full or due."""
        while True:
            with self._lock:
                while not self._due():
                    self._ready.wait(self._until_due())
                taken = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                stopping = self._stop_by is not None
            self.metrics.capture_queued.dec(len(taken))
            for item in taken:
                if self._late():
                    break  # out of drain time: what is left is abandoned, as a kill would
                self._take(item)
                if len(self._part) >= PART_ITEMS or sum(len(t.item.data) for t in self._part) >= PART_BYTES:
                    self._write_part()
            if stopping or self._late():
                self._write_part()
                return
            if self._part and time.monotonic() - self._part[0].item.queued >= PART_S:
                self._write_part()

    def _late(self) -> bool:
        """Whether stop()'s drain time is over."""
        return self._stop_by is not None and time.monotonic() > self._stop_by

    def _oldest(self) -> float | None:
        """time.monotonic() when the oldest item not yet written was queued (lock held)."""
        if self._part:
            return self._part[0].item.queued
        return self._queue[0].queued if self._queue else None

    def _due(self) -> bool:
        """Whether the writer has work now (lock held)."""
        if self._stop_by is not None or len(self._queue) >= PART_ITEMS or self._queued_bytes >= PART_BYTES:
            return True
        oldest = self._oldest()
        return oldest is not None and time.monotonic() - oldest >= PART_S

    def _until_due(self) -> float | None:
        """Seconds until the oldest item makes a part due; None: nothing waits (lock held)."""
        oldest = self._oldest()
        return None if oldest is None else max(0.0, oldest + PART_S - time.monotonic())

    def _take(self, item: _Item) -> None:
        """Add an item to the part being filled, if the cap leaves room for the part with it."""
        try:
            if self._budget is None:
                self._budget = self._scan()
            taken = self._entry(item)
            if self._part_bytes([*self._part, taken]) > self._budget:
                self.metrics.capture_dropped.labels(CAP_REACHED).inc()
                return
            self._part.append(taken)
        except Exception as exc:  # noqa: BLE001 - S3 down, disk full, no permission: count, log, go on
            self.metrics.capture_dropped.labels(STORAGE_ERROR).inc()
            self._log_failure(exc)

    @staticmethod
    def _part_bytes(part: list[_Taken]) -> int:
        return captures.part_size([len(t.item.data) for t in part] + [sum(len(t.line) for t in part)])

    def _write_part(self) -> None:
        """Write the part being filled (into its first image's date folder); its items are
        counted as captured, or, on a storage error, as dropped."""
        part, self._part = self._part, []
        if not part:
            return
        first = part[0]
        data = captures.pack_part([(t.image, t.item.data) for t in part], b"".join(t.line for t in part), first.item.at)
        try:
            _put(storage.join(first.folder, captures.part_name(first.stem, len(part))), data)
        except Exception as exc:  # noqa: BLE001 - as _take: never let the writer die
            self.metrics.capture_dropped.labels(STORAGE_ERROR).inc(len(part))
            self._log_failure(exc, len(part))
            return
        self._budget = (self._budget or 0) - len(data)
        for taken in part:
            self.metrics.captured.labels(taken.item.reason).inc()
        self.metrics.capture_bytes.inc(len(data))

    def _scan(self) -> int:
        """What this process may write: its share of what the cap leaves. Also creates
        the folder and its marker. Raises StorageError/OSError when the target is unusable
        (the item is dropped and the scan is tried again with the next one)."""
        storage.makedirs(self.location)
        fs, path = storage.filesystem(self.location)
        found = fs.find(path, detail=True)
        used = sum(int(info.get("size") or 0) for info in found.values())
        marker = storage.join(self.location, MARKER)
        if not any(name.rstrip("/").endswith("/" + MARKER) or name == MARKER for name in found):
            storage.write_bytes(marker, json.dumps({"layout": LAYOUT, "version": LAYOUT_VERSION}).encode())
        budget = max(0, self.max_bytes - used) // self.workers
        log.info("capture: %s holds %.1f MB; this process may add %.1f MB", self.location, used / 1e6, budget / 1e6)
        return budget

    def _entry(self, item: _Item) -> _Taken:
        """Where an item goes, under which name, with which prediction line."""
        moment = datetime.fromtimestamp(item.at, tz=timezone.utc)
        self._sequence += 1
        stem = f"{moment:%Y%m%dT%H%M%S.%f}Z-{self._token}-{self._sequence:06d}"
        folder = storage.join(self.location, f"{moment:%Y-%m-%d}")
        image_name = stem + image_extension(item.data)
        record: dict[str, Any] = {
            "image": image_name,
            "captured_at": moment.isoformat().replace("+00:00", "Z"),
            "reason": item.reason,
            "confidence": round(item.confidence, 6),
            "model_version": item.version,
            "task": item.task,
            "classes": list(item.classes),
            "probabilities": np.round(np.asarray(item.probabilities, dtype=np.float64), 6).tolist(),  # 257 at once
            "labels": list(item.labels),
            "request": {"path": item.path, "content_type": item.content_type, "instance": item.instance,
                        "instances": item.instances, "bytes": len(item.data), "pid": os.getpid()},
        }
        return _Taken(item, folder, stem, image_name, json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def _log_failure(self, exc: BaseException, items: int = 1) -> None:
        self._failures += items
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.error("capture: cannot store into %s (%d item(s) dropped since the last report): %s",
                      self.location, self._failures, exc)
            self._failures = 0
            self._logged_at = now


def _put(location: str, data: bytes) -> None:
    """Write a file atomically, without an fsync (see the module docstring). On S3 one
    PUT is atomic already (an object appears whole or not at all): no local temporary file."""
    if storage.is_s3(location):
        fs, path = storage.filesystem(location)
        fs.pipe_file(path, data)
    else:
        storage.write_bytes(location, data, durable=False)


class CaptureContext:
    """Pure ASGI middleware: remembers each request's path and content type for
    :meth:`Capture.offer`, which runs deep inside the route (``Service.predict``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = next((value.decode("latin-1") for key, value in scope.get("headers", ())
                             if key == b"content-type"), None)
        token = _request.set((scope.get("path", ""), content_type))
        try:
            await self.app(scope, receive, send)
        finally:
            _request.reset(token)


__all__ = ["Capture", "CaptureContext", "MARKER", "decision_confidence"]
