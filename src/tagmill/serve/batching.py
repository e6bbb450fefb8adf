"""Dynamic micro-batching: many requests, one forward pass, one model thread.

A request goes through three stages:

1. **admission** (event loop): :meth:`Batcher.reserve` counts it as waiting, or
   refuses it with :class:`QueueFullError` when ``queue_size`` requests already wait.
   Refusing before decoding sheds load before any CPU is spent on it.
2. **decoding**: bytes → (n, 3, S, S). In a thread pool, in parallel with the forward
   pass that is running meanwhile; the decoding thread queues the tensors itself
   (:meth:`Slot.decode_and_submit`), so the event loop is not woken in between. Or,
   with no pool (where the workers' inference threads already keep every CPU busy:
   ``service.decode_threads``), the request is queued as bytes and the model thread
   decodes it when it takes it into a batch: no hand-off between threads, and the
   images are decoded right before the forward pass that reads them.
3. **inference** (the one model thread): the
   model thread takes every queued request that fits in ``max_batch`` images, runs one
   forward pass, post-processes each request with its own options, and hands the
   answers of the whole batch to the event loop at once.

The model thread waits for more requests (at most ``max_wait_ms``) only while other
admitted requests are still being decoded in the pool: a lone request at concurrency 1
never waits, and under load batches fill without a fixed delay.

Each request is decoded for, and run by, the model that was served when it was
admitted: after a swap (``models.py``) the requests already admitted finish on the old
model, and a forward pass never mixes the two.

The model runs in one dedicated thread, which also loads it and sets the torch
thread count there; other threads only decode. (On a 2-core CPU a model with 2
threads next to busy Python threads runs at half speed; one thread per worker
process is the fast setting, measured.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tagmill.serve.errors import NotReadyError, QueueFullError
from tagmill.bundle.predictor import Prediction, Predictor
from tagmill.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's images, waiting for the model."""

    images: torch.Tensor | None  #: (n, 3, S, S); None until ``decode`` runs in the model thread
    size: int  #: n, the request's image count
    predictor: Predictor  #: the model the images are preprocessed for, which runs them
    top_k: int
    thresholds: list[float] | None
    loop: asyncio.AbstractEventLoop  #: the event loop the request waits on
    future: asyncio.Future[list[Prediction]]  #: of ``loop``: set there only (see :func:`_settle`)
    decode: Callable[[], torch.Tensor] | None = None  #: for the model thread, when there is no pool


class Slot:
    """An admitted request's place in the queue; :meth:`decode_and_submit` its images."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.submitted = False

    def decode_and_submit(self, pool: Executor | None, decode: Callable[[], torch.Tensor], size: int, top_k: int,
                          thresholds: list[float] | None, *,
                          predictor: Predictor | None = None) -> asyncio.Future[list[Prediction]]:
        """Run ``decode`` (-> (``size``, 3, S, S)) in ``pool`` and queue its images from there
        for ``predictor`` (default: the served one), or with no pool, queue ``decode`` for
        the model thread to run; await the answer, or ``decode``'s error, on the running
        event loop. Cancelling it skips the images if the model has not taken them yet.

        Why the pool thread queues them: handing the decoded images back to the event loop
        first woke it once more per request, and each wake-up costs the waking thread a
        wait for the interpreter lock (~9% of an INT8 worker's samples at concurrency 32,
        in the decoding threads)."""
        batcher = self._batcher
        model = predictor if predictor is not None else batcher.predictor
        if model is None:
            raise NotReadyError("the model is still loading")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Prediction]] = loop.create_future()
        if pool is None:
            batcher._enqueue(Job(None, size, model, top_k, thresholds, loop, future, decode))
            self.submitted = True
            return future

        def work() -> None:
            try:
                images = decode()
            except BaseException as exc:  # the request's error (a bad image): its place goes back
                batcher._release()
                _settle([(loop, future, exc)])
                return
            batcher._enqueue(Job(images, size, model, top_k, thresholds, loop, future))

        pool.submit(work)
        self.submitted = True
        return future


class Batcher:
    """Groups requests into forward passes, run by one dedicated model thread."""

    def __init__(
        self,
        load: Callable[[], Predictor],
        metrics: ServeMetrics,
        *,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        threads: int,
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._load = load
        self._on_load_error = on_load_error
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.threads = threads
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._waiting = 0  # admitted, not yet taken into a forward pass (decoding + queued)
        self._decoding = 0  # admitted, not yet submitted
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.predictor: Predictor | None = None
        self.load_error: BaseException | None = None

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread, which loads the model; idempotent."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._main, name="tagmill-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running forward pass, fail the queued requests, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            queued = [(job.loop, job.future, NotReadyError("the server is shutting down")) for job in self._queue]
            self._queue.clear()
        _settle(queued)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.predictor is not None

    @property
    def waiting(self) -> int:
        return self._waiting

    def swap(self, predictor: Predictor) -> None:
        """Serve ``predictor`` from now on; requests already submitted keep their own."""
        with self._cond:
            self.predictor = predictor

    # --- the request side (event loop) --------------------------------------------

    @contextmanager
    def reserve(self) -> Iterator[Slot]:
        """Admit one request, or raise QueueFullError. Leaving the block without
        submitting (a decoding error, a cancelled request) gives the place back."""
        with self._cond:
            if self._stopping:
                raise NotReadyError("the server is shutting down")
            if self._waiting >= self.queue_size:
                raise QueueFullError(
                    f"the server is busy: {self._waiting} requests are waiting for the model",
                    hint="retry after a second, or start the server with more --workers / a larger --queue-size",
                )
            self._waiting += 1
            self._decoding += 1
            self._metrics.queue_depth.set(self._waiting)
        slot = Slot(self)
        try:
            yield slot
        finally:
            if not slot.submitted:
                self._release()

    def _release(self) -> None:
        """Give an admitted request's place back (it will not be queued)."""
        with self._cond:
            self._waiting -= 1
            self._decoding -= 1
            self._metrics.queue_depth.set(self._waiting)
            self._cond.notify_all()  # the model thread may be waiting for this one

    def _enqueue(self, job: Job) -> None:
        with self._cond:
            self._decoding -= 1
            if not self._stopping:
                self._queue.append(job)
                self._cond.notify_all()
                return
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)
        _settle([(job.loop, job.future, NotReadyError("the server is shutting down"))])

    # --- the model thread -----------------------------------------------------------

    def _main(self) -> None:
        # The thread that runs the model sets its thread count: OpenMP settings are per thread.
        torch.set_num_threads(self.threads)
        try:
            self.predictor = self._load()
        except BaseException as exc:  # reported by /readyz, unless on_load_error ends the process
            self.load_error = exc
            log.error("cannot load the model: %s", exc)
            self._ready.set()
            if self._on_load_error is not None:
                self._on_load_error(exc)
            return
        self._ready.set()
        log.info("model loaded: %s, %d classes", self.predictor.meta.architecture, self.predictor.meta.num_classes)
        while True:
            jobs = self._next_batch()
            if not jobs:
                return
            self._run(jobs[0].predictor, jobs)

    def _next_batch(self) -> list[Job]:
        """Block until a request is queued, then gather a batch. Empty list: stop."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while self._fitting_images() < self.max_batch and self._decoding > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            jobs = [self._queue.popleft()]
            total = jobs[0].size  # a request larger than max_batch runs alone (in chunks)
            # one model per forward pass: requests for the model swapped out come first
            # (they were queued first) and are not mixed with the new model's
            while (self._queue and self._queue[0].predictor is jobs[0].predictor
                   and total + self._queue[0].size <= self.max_batch):
                total += self._queue[0].size
                jobs.append(self._queue.popleft())
            self._waiting -= len(jobs)
            self._metrics.queue_depth.set(self._waiting)
            return jobs

    def _fitting_images(self) -> int:
        total = 0
        for job in self._queue:
            if total + job.size > self.max_batch and total:
                return self.max_batch  # the next one would not fit: the batch is as full as it gets
            total += job.size
        return total

    def _run(self, predictor: Predictor, jobs: list[Job]) -> None:
        # a client that went away cancelled its future: skip its images (read from this
        # thread, a cancel can come just after; _settle then drops that answer)
        ready = _decoded([job for job in jobs if not job.future.cancelled()])
        if not ready:
            return
        jobs = [job for job, _ in ready]
        start = time.perf_counter()
        images = ready[0][1] if len(ready) == 1 else torch.cat([tensor for _, tensor in ready])  # (N, 3, S, S)
        try:
            logits = predictor.logits(images)  # (N, C)
        except Exception as exc:  # a failing model fails these requests, not the server
            log.exception("forward pass failed")
            _settle([(job.loop, job.future, exc) for job in jobs])
            return
        answers: list[_Answer] = []
        offset = 0
        for job in jobs:
            part = logits[offset : offset + job.size]  # (n, C)
            offset += job.size
            try:
                answers.append((job.loop, job.future, predictor.postprocess(part, job.top_k, job.thresholds)))
            except Exception as exc:
                answers.append((job.loop, job.future, exc))
        _settle(answers)
        self._metrics.observe_batch(int(images.shape[0]), time.perf_counter() - start)


def _decoded(jobs: list[Job]) -> list[tuple[Job, torch.Tensor]]:
    """Each job with its images, decoding those queued as bytes (no pool) first; a request
    whose images fail gets its error (a bad image: 422) and leaves the batch."""
    ready: list[tuple[Job, torch.Tensor]] = []
    failed: list[_Answer] = []
    for job in jobs:
        if job.images is None and job.decode is not None:
            try:
                job.images = job.decode()
            except Exception as exc:
                failed.append((job.loop, job.future, exc))
        if job.images is not None:
            ready.append((job, job.images))
    _settle(failed)
    return ready


#: a request's answer: the loop its future belongs to, the future, predictions or an error
_Answer = tuple[asyncio.AbstractEventLoop, "asyncio.Future[list[Prediction]]", "list[Prediction] | BaseException"]


def _settle(answers: list[_Answer]) -> None:
    """Set each future to its answer (predictions or an exception), from any thread:
    one hand-off to each event loop for all of them. Waking a loop costs a write to its
    self-pipe, after which this thread waits for the interpreter lock again; once per
    request that was ~5% of an INT8 worker's samples at concurrency 32, in the model
    thread, where it delays the next forward pass (~3% once per batch)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0], []).append(answer)
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_answers, mine)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass


def _set_answers(answers: list[_Answer]) -> None:
    for _, future, answer in answers:
        if future.done():  # cancelled: the client went away
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)
