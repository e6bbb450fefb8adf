"""Prometheus metrics: requests, latency, batch sizes, queue depth, the served model version.

Each app gets its own registry, so several apps in one process (tests) do not
collide in prometheus_client's global one. With several uvicorn workers,
``run_server`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start; every
worker then writes its samples to files there and ``/metrics``, whichever worker
answers it, adds up all of them. prometheus_client picks its storage when it is
first imported, so the variable must be set before that (it is: workers are fresh
processes).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class ServeMetrics:
    """The server's metrics, and their exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tagmill_http_requests", "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "tagmill_http_request_duration_seconds", "Time from request start to the end of the answer.",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "tagmill_batch_size", "Images per forward pass (its _count is the number of forward passes).",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.inference = Histogram(
            "tagmill_inference_duration_seconds", "Time of one forward pass, post-processing included.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.images = Counter("tagmill_images", "Images run through the model.", registry=self.registry)
        # livesum: in multiprocess mode, the sum over the workers that are alive
        self.queue_depth = Gauge(
            "tagmill_queue_depth", "Requests admitted but not yet in a forward pass.",
            multiprocess_mode="livesum", registry=self.registry,
        )

        # livesum: with several workers, how many serve each version (both show while a
        # swap rolls over the workers; a version no longer served reads 0)
        self.model_version = Gauge(
            "tagmill_model_version", "Worker processes serving each model version (1 with one worker).",
            ["version"], multiprocess_mode="livesum", registry=self.registry,
        )
        self.answers = Counter(
            "tagmill_model_answers", "Prediction requests answered, by the model version that answered them.",
            ["version"], registry=self.registry,
        )
        self.swaps = Counter(
            "tagmill_model_swaps", "Requests to switch the served model, by outcome (swapped, unchanged, refused).",
            ["outcome"], registry=self.registry,
        )

        # explanations have their own budget (explanations.py), so their own counts
        self.explanations = Counter(
            "tagmill_explanations", "POST /predict?explain=true requests, by outcome: ok, refused (503: every "
            "explanation slot busy), failed (any other error).", ["outcome"], registry=self.registry,
        )
        self.explain_latency = Histogram(
            "tagmill_explanation_duration_seconds", "Time to draw one request's heatmaps (Grad-CAM and the "
            "overlay PNGs), the wait for a slot excluded.", buckets=LATENCY_BUCKETS, registry=self.registry,
        )

        # capture from traffic (serve --capture; capture.py)
        self.captured = Counter(
            "tagmill_captured", "Request images stored by --capture, by reason (low_confidence, sample).",
            ["reason"], registry=self.registry,
        )
        self.capture_dropped = Counter(
            "tagmill_capture_dropped", "Images --capture wanted but did not store, by reason "
            "(queue_full, cap_reached, storage_error, error).", ["reason"], registry=self.registry,
        )
        self.capture_bytes = Counter(
            "tagmill_capture_bytes", "Bytes --capture stored (images and their predictions).", registry=self.registry,
        )
        # livesum, as queue_depth: a queue that stays near --capture-queue is about to drop
        self.capture_queued = Gauge(
            "tagmill_capture_queued", "Images waiting for the --capture writer.",
            multiprocess_mode="livesum", registry=self.registry,
        )

    def serving(self, version: str, previous: str | None = None) -> None:
        """This process now serves ``version`` (instead of ``previous``)."""
        if previous is not None and previous != version:
            self.model_version.labels(previous).set(0)
        self.model_version.labels(version).set(1)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)
        self.images.inc(images)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # reads every worker's files
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: no per-request task or copy).

    Requests are labelled with the route *template* (``/endpoints/{name}/invocations``),
    never the raw path, so a scan of random URLs cannot blow up the label set.
    """

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe_request(route_label(scope), scope["method"], status, time.perf_counter() - start)


def route_label(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("path", "").startswith("/static/"):
        return "/static"
    return "unmatched"
