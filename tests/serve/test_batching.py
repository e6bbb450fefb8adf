"""Micro-batching and back-pressure over real HTTP, with real threads.

The model is the real bundle's, held at the start of each forward pass until the
test opens a gate: that makes "requests pile up while the model is busy"
deterministic instead of a race with the clock.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch

from tagmill.bundle import Predictor
from tagmill.errors import InputError
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.config import DECODE_THREADS
from tagmill.serve.service import decode_threads
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


@pytest.mark.parametrize(("max_batch", "passes", "decode_threads"), [(16, 2, 2), (1, 9, 2), (16, 2, 0)])
def test_concurrent_requests_share_forward_passes(bundle: str, reference: Predictor, max_batch: int, passes: int,
                                                  decode_threads: int) -> None:
    predictor = GatedPredictor.from_bundle(bundle, batch_size=max_batch)
    # the queue-depth metric counts requests still decoding too; a generous max_wait lets
    # the model thread wait for those (it stops waiting as soon as none is decoding), so
    # a loaded machine's slow decoding cannot split the batch (5 ms did, under load).
    # decode_threads=0: the model thread decodes each batch's requests itself
    app = create_app(ServeConfig(bundle=bundle, max_batch=max_batch, max_wait_ms=2000, decode_threads=decode_threads),
                     predictor=predictor)
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


@pytest.mark.parametrize("decode_threads", [2, 0])
def test_an_image_that_fails_to_decode_gives_its_place_back(bundle: str, decode_threads: int) -> None:
    # the decoding thread (or the model thread), not the event loop, queues or releases a
    # request: with room for one request, bad images one after another must each be
    # answered 422, never 503
    app = create_app(ServeConfig(bundle=bundle, max_batch=1, queue_size=1, decode_threads=decode_threads))
    with ThreadedServer(app) as server:
        for _ in range(3):
            response = post(server.url, b"\xff\xd8 not a JPEG after all")
            assert response.status_code == 422, response.text
        assert post(server.url, images.jpeg_bytes(60, 40, seed=5)).status_code == 200
        assert metric(httpx.get(f"{server.url}/metrics").text, "tagmill_queue_depth") == 0


class DecodeRecorder(GatedPredictor):
    """The gated model, noting which thread decodes each image, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoded_in: list[str] = []

    def preprocess(self, data: bytes) -> torch.Tensor:
        self.decoded_in.append(threading.current_thread().name)
        return super().preprocess(data)


def test_without_a_pool_the_model_thread_decodes_and_a_bad_image_fails_only_its_request(
        bundle: str, reference: Predictor) -> None:
    predictor = DecodeRecorder.from_bundle(bundle)
    app = create_app(ServeConfig(bundle=bundle, max_batch=16, decode_threads=0), predictor=predictor)
    good = [images.jpeg_bytes(48 + 4 * i, 40, seed=60 + i) for i in range(3)]
    payloads = [good[0], good[1], good[2][: len(good[2]) // 2], good[2]]  # a truncated JPEG: decoding fails

    with ThreadedServer(app) as server, ThreadPoolExecutor(1 + len(payloads)) as pool:
        first = pool.submit(post, server.url, images.jpeg_bytes(60, 40, seed=59))
        assert predictor.entered.wait(15)  # the model is busy: the next four wait in one queue
        rest = [pool.submit(post, server.url, data) for data in payloads]
        wait_for_queue(server.url, len(rest))
        assert predictor.decoded_in == ["tagmill-model"]  # only the first: the rest wait as bytes
        predictor.gate.set()
        responses = [f.result() for f in rest]
        assert first.result().status_code == 200
        count, images_run = batch_stats(server.url)

    assert [r.status_code for r in responses] == [200, 200, 422, 200]
    assert error_of(responses[2])["type"] == "UnreadableImageError"
    assert (count, images_run) == (2, 4)  # the first request, then the three good ones together
    assert predictor.decoded_in == ["tagmill-model"] * 5  # the truncated one too, where it failed
    for data, response in zip(good, [responses[0], responses[1], responses[3]], strict=True):
        assert response.json() == pytest.approx(reference.predict_bytes([data])[0].probabilities, abs=1e-5)


@pytest.mark.parametrize(("workers", "threads", "device", "cpus", "expected"), [
    (2, 1, "cpu", 2, 0),  # every CPU runs a model thread: the model thread decodes
    (1, 2, "cpu", 2, 0),
    (4, 1, "cpu", 2, 0),
    (1, 1, "cpu", 2, DECODE_THREADS),  # a CPU left over: a pool decodes beside the model
    (2, 1, "cpu", 8, DECODE_THREADS),
    (2, 1, "cuda", 2, DECODE_THREADS),  # the model runs on a GPU: decode beside it
    (2, 1, "auto", 2, DECODE_THREADS if torch.cuda.is_available() else 0),
])
def test_the_decoding_threads_picked(monkeypatch: pytest.MonkeyPatch, workers: int, threads: int, device: str,
                                     cpus: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cpus)))
    config = ServeConfig(bundle="models/a", workers=workers, threads=threads, device=device)
    assert decode_threads(config) == expected
    assert decode_threads(replace(config, decode_threads=3)) == 3  # a number given is kept


def test_decode_threads_is_checked() -> None:
    with pytest.raises(InputError, match="decode_threads must be an integer >= 0"):
        ServeConfig(bundle="models/a", decode_threads=-1)
