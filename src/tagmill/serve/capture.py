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
decides and appends to a bounded in-memory queue; a sender thread hands the queue, a
part's worth at a time, to the capture writer, a process of its own
(``serve/capture_writer.py``, which says why a process), and a receiver thread turns its
reports into ``/metrics`` and log lines. A full queue, the size cap reached, or a storage
error (S3 down, disk full, no permission) drops the item, counts it in ``/metrics``
(``tagmill_capture_dropped_total`` by reason) and logs it (rate-limited); the request
never sees any of it. If the writer process dies, the part it was handed is counted as
dropped (``error``) and a new one is started.

Where and how items are stored is ``formats/captures.py``'s layout (the same on a disk
and on S3): a *part* is a tar of the images and, after them, one JSON line per image
with what was served. A part is handed over once the queue holds ``PART_ITEMS`` images or
``PART_BYTES``, or its first image is ``PART_S`` old (and at shutdown). One write per
part, not per image: into S3 a PUT costs ~2 ms of CPU. Each part is written atomically
(renamed into place; on S3 one PUT), without an fsync: a killed or powered-off server
loses at most its last second of captures, which are a sample, and a reader never sees
half a part. ``<token>`` in the names is random per writer, so every worker of
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
import logging
import os
import random
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tagmill import storage
from tagmill.formats.captures import MARKER
from tagmill.serve import capture_writer
from tagmill.serve.capture_writer import DROP_REASONS, INTERNAL_ERROR, QUEUE_FULL, Channel, Item, WriterConfig

if TYPE_CHECKING:
    from tagmill.bundle.format import BundleMeta
    from tagmill.bundle.predictor import Prediction
    from tagmill.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

#: a part is handed to the writer once the queue holds this many images (a PUT's ~2 ms of client CPU, spread
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
#: image bytes waiting in the queue at most, whatever --capture-queue allows: 256 items
#: of --max-body-mb's 10 MB would hold 2.5 GB; 64 MiB is still ~600 typical 100 kB photos
QUEUE_BYTES = 64 * 1024 * 1024
#: at shutdown, how long the writer may go on storing what is queued
DRAIN_S = 5.0
#: after the drain time, how long the writer process may take to end before it is killed
#: (a write stuck on a dead endpoint)
EXIT_S = 1.0

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


class Capture:
    """Decides on the request path, stores through a writer process (see the module docstring).

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
        self._queue: deque[Item] = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self._stop_by: float | None = None
        self._writer: subprocess.Popen[bytes] | None = None
        self._channel: Channel  #: parts to the writer, its reports back; set with it
        self._receiver: threading.Thread | None = None  #: reads the reports
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
                self._enqueue(Item(
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

    def _enqueue(self, item: Item) -> None:
        with self._lock:
            if len(self._queue) >= self.queue_items or self._queued_bytes + len(item.data) > QUEUE_BYTES:
                full = True
            else:
                full = False
                self._queue.append(item)
                self._queued_bytes += len(item.data)
                # the sender sleeps until a part is due: woken by the first item (to time
                # it) and by a full part's worth, not by every item (each wake-up takes the
                # GIL from the threads answering requests)
                if len(self._queue) == 1 or len(self._queue) == PART_ITEMS or self._queued_bytes >= PART_BYTES:
                    self._ready.notify()
                self.metrics.capture_queued.inc()
        if full:
            self.metrics.capture_dropped.labels(QUEUE_FULL).inc()

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._sender is None:
            self._stop_by = None
            self._start_writer()
            self._sender = threading.Thread(target=self._send_parts, name="tagmill-capture", daemon=True)
            self._sender.start()

    def stop(self, drain_s: float = DRAIN_S) -> None:
        """Store what is queued for at most ``drain_s`` seconds, then end the writer."""
        sender = self._sender
        if sender is None:
            return
        with self._lock:
            self._stop_by = time.monotonic() + drain_s
            self._ready.notify()
        sender.join(drain_s + EXIT_S)  # a send stuck on a writer stuck on a dead endpoint is left behind
        self._sender = None
        self._end_writer(max(0.0, self._stop_by + EXIT_S - time.monotonic()))

    @property
    def pending(self) -> int:
        """Items queued, not yet handed to the writer or dropped."""
        with self._lock:
            return len(self._queue)

    # --- the writer process, and the threads that talk to it ---------------------------

    def _start_writer(self) -> None:
        """Start a writer process and the thread that reads its reports."""
        config = WriterConfig(self.location, self.max_bytes, self.workers, os.getpid(), storage.current_storage_options())
        ours, theirs = socket.socketpair()
        self._channel = Channel(ours)
        with theirs:  # the child holds its own copy: when it ends, the reports thread reads the end
            self._writer = subprocess.Popen(capture_writer.command(theirs.fileno()),
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self._channel.send(config)  # small: the socket's buffer takes it before the child reads
        self._receiver = threading.Thread(target=self._read_reports, args=(self._channel,),
                                          name="tagmill-capture-reports", daemon=True)
        self._receiver.start()

    def _end_writer(self, wait_s: float) -> None:
        writer = self._writer
        if writer is None:
            return
        # the writer stores what it holds, reads the end of the stream and ends; shutting
        # our side never blocks (a send could, behind a writer stuck on a dead endpoint,
        # and a send stuck there now fails: its part is abandoned, as the drain time says)
        self._channel.end_sending()
        try:
            writer.wait(wait_s)
        except subprocess.TimeoutExpired:
            writer.kill()  # past the drain time (a write stuck on a dead endpoint): what it holds is lost
            writer.wait()
        if self._receiver is not None:
            self._receiver.join(EXIT_S)  # the writer's last reports, then the end of the stream
        self._channel.close()
        self._writer = self._receiver = None

    def _send_parts(self) -> None:
        """The sender thread: sleep until a part is due (or stop), hand it to the writer."""
        while True:
            with self._lock:
                while not self._due():
                    self._ready.wait(self._until_due())
                part = self._take_part()
                stop_by = self._stop_by
                done = stop_by is not None and (not self._queue or time.monotonic() > stop_by)
            self.metrics.capture_queued.dec(len(part))
            if part and (stop_by is None or time.monotonic() <= stop_by):
                self._hand_over(part, stop_by)
            if done:
                return  # past the drain time, what is still queued is abandoned, as a kill would

    def _take_part(self) -> list[Item]:
        """The oldest items, up to a part's worth (lock held)."""
        part: list[Item] = []
        size = 0
        while self._queue and len(part) < PART_ITEMS and size < PART_BYTES:
            item = self._queue.popleft()
            part.append(item)
            size += len(item.data)
        self._queued_bytes -= size
        return part

    def _hand_over(self, part: list[Item], stop_by: float | None) -> None:
        if self._writer is not None and self._writer.poll() is not None:
            log.error("capture: the writer process ended (exit code %s); starting a new one", self._writer.returncode)
            if self._receiver is not None:
                self._receiver.join(EXIT_S)
            self._channel.close()
            try:
                self._start_writer()
            except OSError as exc:  # no process to be had (limits, memory): this part is lost, the next tries again
                log.error("capture: cannot start a writer process (%s); %d item(s) dropped", exc, len(part))
                self.metrics.capture_dropped.labels(INTERNAL_ERROR).inc(len(part))
                return
        try:
            self._channel.send((part, stop_by))
        except OSError as exc:  # the writer died under us: its part is lost
            log.error("capture: the writer process is gone (%s); %d item(s) dropped", exc, len(part))
            self.metrics.capture_dropped.labels(INTERNAL_ERROR).inc(len(part))

    def _read_reports(self, channel: Channel) -> None:
        """The receiver thread: a report per part, into /metrics and the log; ends with the writer."""
        while True:
            try:
                report: capture_writer.Report = channel.recv()
            except (EOFError, OSError):
                return
            for reason, count in report.captured.items():
                self.metrics.captured.labels(reason).inc(count)
            for reason, count in report.dropped.items():
                self.metrics.capture_dropped.labels(reason).inc(count)
            if report.bytes:
                self.metrics.capture_bytes.inc(report.bytes)
            for level, message in report.logs:
                log.log(logging.getLevelName(level), "%s", message)

    def _oldest(self) -> float | None:
        """time.monotonic() when the oldest item not yet handed over was queued (lock held)."""
        return self._queue[0].queued if self._queue else None

    def _due(self) -> bool:
        """Whether the sender has work now (lock held)."""
        if self._stop_by is not None or len(self._queue) >= PART_ITEMS or self._queued_bytes >= PART_BYTES:
            return True
        oldest = self._oldest()
        return oldest is not None and time.monotonic() - oldest >= PART_S

    def _until_due(self) -> float | None:
        """Seconds until the oldest item makes a part due; None: nothing waits (lock held)."""
        oldest = self._oldest()
        return None if oldest is None else max(0.0, oldest + PART_S - time.monotonic())


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
