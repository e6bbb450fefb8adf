"""Micro-batching and back-pressure over real HTTP, with real threads.

The model is the real bundle's, held at the start of each forward pass until the
test opens a gate: that makes "requests pile up while the model is busy"
deterministic instead of a race with the clock.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from tagmill.bundle import Predictor
from tagmill.serve import ServeConfig, create_app
from tests import images
from tests.serve.conftest import X_IMAGE, ThreadedServer, error_of, metric


class GatedPredictor(Predictor):
    """The bundle's model; every forward pass waits for ``gate``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(30)
        return super().logits(batch)


def post(url: str, data: bytes) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as client:  # one connection per request, like separate clients
        return client.post("/invocations", content=data, headers=X_IMAGE)


def wait_for_queue(url: str, depth: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url) as client:
        while time.monotonic() < deadline:
            if metric(client.get("/metrics").text, "tagmill_queue_depth") == depth:
                return
            time.sleep(0.02)
    raise TimeoutError(f"the queue never reached {depth}")


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    return metric(text, "tagmill_batch_size_count"), metric(text, "tagmill_batch_size_sum")


@pytest.mark.parametrize(("max_batch", "passes"), [(16, 2), (1, 9)])
def test_concurrent_requests_share_forward_passes(bundle: str, reference: Predictor, max_batch: int, passes: int) -> None:
    predictor = GatedPredictor.from_bundle(bundle, batch_size=max_batch)
    # the queue-depth metric counts requests still decoding too; a generous max_wait lets
    # the model thread wait for those (it stops waiting as soon as none is decoding), so
    # a loaded machine's slow decoding cannot split the batch (5 ms did, under load)
    app = create_app(ServeConfig(bundle=bundle, max_batch=max_batch, max_wait_ms=2000), predictor=predictor)
    payloads = [images.jpeg_bytes(50 + 3 * i, 40 + 2 * i, seed=20 + i) for i in range(9)]

    with ThreadedServer(app) as server, ThreadPoolExecutor(len(payloads)) as pool:
        first = pool.submit(post, server.url, payloads[0])
        assert predictor.entered.wait(15)  # the model is busy with the first request
        rest = [pool.submit(post, server.url, data) for data in payloads[1:]]
        wait_for_queue(server.url, len(rest))
        predictor.gate.set()
        responses = [first.result(), *(f.result() for f in rest)]
        count, images_run = batch_stats(server.url)

    assert [r.status_code for r in responses] == [200] * len(payloads)
    # with batching: the first request alone, then the other 8 in one pass
    assert (count, images_run) == (passes, len(payloads))
    for data, response in zip(payloads, responses, strict=True):  # each answer is its own image's
        assert response.json() == pytest.approx(reference.predict_bytes([data])[0].probabilities, abs=1e-5)


def test_full_queue_answers_503_and_recovers(bundle: str) -> None:
    predictor = GatedPredictor.from_bundle(bundle)
    app = create_app(ServeConfig(bundle=bundle, max_batch=1, queue_size=1), predictor=predictor)
    data = images.jpeg_bytes(60, 40, seed=3)

    with ThreadedServer(app) as server, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server.url, data)
        assert predictor.entered.wait(15)
        queued = pool.submit(post, server.url, data)
        wait_for_queue(server.url, 1)

        refused = post(server.url, data)

        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert error_of(refused)["type"] == "QueueFullError"
        predictor.gate.set()
        assert running.result().status_code == queued.result().status_code == 200
        assert post(server.url, data).status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "tagmill_http_requests_total", route="/invocations", status="503") == 1
    assert metric(text, "tagmill_queue_depth") == 0


def test_a_lone_request_does_not_wait_for_a_batch(bundle: str) -> None:
    # max_wait_ms is long, but nothing else is being decoded: the pass starts at once
    app = create_app(ServeConfig(bundle=bundle, max_batch=16, max_wait_ms=5000))
    data = images.jpeg_bytes(60, 40, seed=4)
    with ThreadedServer(app) as server:
        post(server.url, data)  # warm-up
        start = time.perf_counter()
        assert post(server.url, data).status_code == 200
        assert time.perf_counter() - start < 2.5


def test_an_image_that_fails_to_decode_gives_its_place_back(bundle: str) -> None:
    # the decoding thread, not the event loop, queues or releases a request: with room for
    # one request, bad images one after another must each be answered 422, never 503
    app = create_app(ServeConfig(bundle=bundle, max_batch=1, queue_size=1))
    with ThreadedServer(app) as server:
        for _ in range(3):
            response = post(server.url, b"\xff\xd8 not a JPEG after all")
            assert response.status_code == 422, response.text
        assert post(server.url, images.jpeg_bytes(60, 40, seed=5)).status_code == 200
        assert metric(httpx.get(f"{server.url}/metrics").text, "tagmill_queue_depth") == 0
