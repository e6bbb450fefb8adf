"""Model swaps while the server runs: the admin route, SIGHUP, refusals, and no request
lost under concurrent load, with one worker and with several. Real servers, real
clients (httpx over loopback), real bundles."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tagmill.bundle import Predictor
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.models import model_version
from tests import images
from tests.serve.conftest import (X_IMAGE, ServerProcess, ThreadedServer, build_bundle, error_of, metric,
                                  server_workers)

KEY = "admin-key"
AUTH = {"X-Api-Key": KEY}
JPEG = images.jpeg_bytes(80, 60, seed=21)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two versions of one model (same classes, other weights), and variations."""
    root = tmp_path_factory.mktemp("swap")
    return {
        "a": build_bundle(root, seed=0, name="a"),
        "b": build_bundle(root, seed=1, name="b"),
        "larger": build_bundle(root, seed=2, size=64, name="larger"),  # another input size
        "classes": build_bundle(root, seed=3, classes=("cat", "dog", "fox"), name="classes"),
        "multi": build_bundle(root, seed=4, task="multi", name="multi"),
    }


@pytest.fixture(scope="module")
def references(bundles: dict[str, str]) -> dict[str, Predictor]:
    """Each bundle's own predictor, by version: what the server must answer with it."""
    predictors = [Predictor.from_bundle(location) for location in bundles.values()]
    return {model_version(p.meta): p for p in predictors}


def version_of(location: str) -> str:
    return model_version(Predictor.from_bundle(location).meta)


def swap(client: httpx.Client, bundle: str | None, **extra: object) -> httpx.Response:
    body = {} if bundle is None else {"bundle": bundle}
    return client.post("/admin/model", json={**body, **extra}, headers=AUTH, timeout=120)


def classify(client: httpx.Client, data: bytes = JPEG) -> tuple[str, list[float]]:
    response = client.post("/invocations", content=data, headers={**X_IMAGE, **AUTH})
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"], response.json()


def test_versions_are_stable_and_differ_between_bundles(bundles: dict[str, str]) -> None:
    assert version_of(bundles["a"]) == version_of(bundles["a"])
    assert len({version_of(location) for location in bundles.values()}) == len(bundles)


@pytest.fixture()
def server(bundles: dict[str, str]) -> ThreadedServer:
    # a decoding pool on any machine (test_every_worker_swaps_... swaps without one)
    with ThreadedServer(create_app(ServeConfig(bundle=bundles["a"], api_key=KEY, decode_threads=2))) as running:
        yield running


def test_admin_swap_changes_the_model_that_answers(server: ThreadedServer, bundles: dict[str, str],
                                                   references: dict[str, Predictor]) -> None:
    a, b = version_of(bundles["a"]), version_of(bundles["b"])
    with httpx.Client(base_url=server.url) as client:
        assert classify(client)[0] == a
        assert client.get("/readyz").json()["model_version"] == a

        response = swap(client, bundles["b"])

        assert response.status_code == 200, response.text
        assert response.json() == {"status": "swapped", "version": b, "previous_version": a,
                                   "bundle": bundles["b"], "workers": 1}
        version, scores = classify(client)
        assert version == b and scores == pytest.approx(references[b].predict_bytes([JPEG])[0].probabilities, abs=1e-6)
        predicted = client.post("/predict", content=JPEG, headers={**X_IMAGE, **AUTH})
        assert predicted.json()["model_version"] == b == predicted.headers["x-model-version"]
        ready = client.get("/readyz")
        assert ready.json() == {"status": "ready", "model": "a", "model_version": b, "bundle": bundles["b"]}
        assert client.get("/api/model").json()["version"] == b
        text = client.get("/metrics").text
        assert metric(text, "tagmill_model_version", version=b) == 1
        assert metric(text, "tagmill_model_version", version=a) == 0
        assert metric(text, "tagmill_model_answers_total", version=a) >= 1
        assert metric(text, "tagmill_model_answers_total", version=b) >= 2
        assert metric(text, "tagmill_model_swaps_total", outcome="swapped") == 1

        again = swap(client, bundles["b"])  # the served version: nothing to load
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
        back = swap(client, None)  # no bundle: the served location read again
        assert back.json()["status"] == "unchanged" and back.json()["version"] == b
        assert swap(client, bundles["a"]).json()["version"] == a
        assert classify(client)[0] == a


def broken_bundles(source: str, root: Path) -> dict[str, str]:
    """Copies of ``source``, each broken one way."""
    made = {}
    for kind in ("truncated", "no-model-json", "bad-json", "wrong-weights"):
        target = root / kind
        shutil.copytree(source, target)
        made[kind] = str(target)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "no-model-json" / "model.json").unlink()
    (root / "bad-json" / "model.json").write_text("{not json")
    # the sha256 in model.json no longer matches: a bundle copied half-way or tampered with
    (root / "wrong-weights" / "model.safetensors").write_bytes(b"\0" * 64)
    made["missing"] = str(root / "nowhere")
    return made


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "is corrupt or was replaced"),
    ("no-model-json", "it has no model.json"),
    ("bad-json", "is not valid JSON"),
    ("wrong-weights", "is corrupt or was replaced"),
    ("missing", "no such directory"),
])
def test_a_broken_bundle_is_refused_and_the_old_model_keeps_answering(
        server: ThreadedServer, bundles: dict[str, str], tmp_path: Path, kind: str, message: str) -> None:
    broken = broken_bundles(bundles["b"], tmp_path)[kind]
    a = version_of(bundles["a"])
    with httpx.Client(base_url=server.url) as client:
        response = swap(client, broken)

        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["type"] == "BundleRefusedError"
        assert broken in error["message"] and message in error["message"]
        assert classify(client)[0] == a
        assert client.get("/readyz").json()["model_version"] == a
        assert metric(client.get("/metrics").text, "tagmill_model_swaps_total", outcome="refused") == 1


@pytest.mark.parametrize(("kind", "message"), [("classes", "adds ['fox'] and drops ['owl']"), ("multi", "multi-label")])
def test_a_bundle_with_other_classes_or_task_is_refused_unless_allowed(
        server: ThreadedServer, bundles: dict[str, str], kind: str, message: str) -> None:
    with httpx.Client(base_url=server.url) as client:
        refused = swap(client, bundles[kind])
        assert refused.status_code == 409 and error_of(refused)["type"] == "IncompatibleBundleError"
        assert message in error_of(refused)["message"] and "allow_class_change" in error_of(refused)["hint"]
        assert classify(client)[0] == version_of(bundles["a"])

        allowed = swap(client, bundles[kind], allow_class_change=True)
        assert allowed.status_code == 200 and classify(client)[0] == version_of(bundles[kind])


def test_a_bundle_with_another_input_size_is_served_at_its_size(
        server: ThreadedServer, bundles: dict[str, str], references: dict[str, Predictor]) -> None:
    larger = version_of(bundles["larger"])
    with httpx.Client(base_url=server.url) as client:
        assert swap(client, bundles["larger"]).status_code == 200
        version, scores = classify(client)
        assert version == larger
        assert scores == pytest.approx(references[larger].predict_bytes([JPEG])[0].probabilities, abs=1e-6)
        assert client.get("/api/model").json()["input_size"] == 64


def test_the_admin_route_needs_the_api_key(server: ThreadedServer, bundles: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url) as client:
        missing = client.post("/admin/model", json={"bundle": bundles["b"]})
        wrong = client.post("/admin/model", json={"bundle": bundles["b"]}, headers={"X-Api-Key": "guess"})
        for refused in (missing, wrong):
            assert refused.status_code == 401 and error_of(refused)["type"] == "UnauthorizedError"
        bad_body = client.post("/admin/model", json={"bundle": bundles["b"], "extra": 1}, headers=AUTH)
        assert bad_body.status_code == 400 and error_of(bad_body)["type"] == "InputError"
        assert classify(client)[0] == version_of(bundles["a"])


def test_a_server_without_an_api_key_keeps_the_admin_route_closed(bundles: dict[str, str]) -> None:
    with ThreadedServer(create_app(ServeConfig(bundle=bundles["a"]))) as server:
        response = httpx.post(f"{server.url}/admin/model", json={"bundle": bundles["b"]})
        assert response.status_code == 403 and error_of(response)["type"] == "ForbiddenError"
        assert "--api-key" in error_of(response)["hint"]
        assert httpx.get(f"{server.url}/readyz").json()["model_version"] == version_of(bundles["a"])


def hammer(url: str, stop: threading.Event, seen: list[tuple[int, str, list[float] | str]]) -> None:
    """Post images back to back until ``stop``; every answer is recorded, none dropped."""
    photos = [images.jpeg_bytes(60 + 8 * i, 50, seed=30 + i) for i in range(4)]
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            data = photos[i % len(photos)]
            i += 1
            try:
                response = client.post("/invocations", content=data, headers={**X_IMAGE, **AUTH})
            except httpx.HTTPError as exc:
                seen.append((0, type(exc).__name__, repr(exc)))
                continue
            body = response.json() if response.status_code == 200 else response.text
            seen.append((response.status_code, response.headers.get("x-model-version", ""), body, data))


def under_load(url: str, threads: int, action) -> list[tuple]:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    seen: list[tuple] = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(hammer, url, stop, seen)
        try:
            action()
        finally:
            stop.set()
    return seen


def test_swaps_under_concurrent_requests_lose_none(server: ThreadedServer, bundles: dict[str, str],
                                                   references: dict[str, Predictor]) -> None:
    a, b = version_of(bundles["a"]), version_of(bundles["b"])
    outcomes = []

    def swap_back_and_forth() -> None:
        with httpx.Client(base_url=server.url) as admin:
            for target in ("b", "a", "b", "a"):
                time.sleep(0.3)  # let requests pile up on the model about to go
                outcomes.append(swap(admin, bundles[target]))
            time.sleep(0.3)

    seen = under_load(server.url, 8, swap_back_and_forth)

    assert [r.status_code for r in outcomes] == [200] * 4
    failed = [s for s in seen if s[0] != 200]
    assert not failed, failed[:3]
    assert len(seen) > 20
    # every answer came from the model it names, in-flight ones from the old model
    for _, version, scores, data in seen:
        assert scores == pytest.approx(references[version].predict_bytes([data])[0].probabilities, abs=1e-6)
    counts = Counter(version for _, version, *_ in seen)
    assert set(counts) == {a, b}, counts


# --- several workers, and SIGHUP: the server as users run it --------------------------


def versions_seen(url: str, count: int) -> Counter:
    """Which version answers ``count`` requests, each on a new connection (the kernel
    spreads new connections over the workers)."""
    seen: Counter = Counter()
    for _ in range(count):
        response = httpx.post(f"{url}/invocations", content=JPEG, headers={**X_IMAGE, **AUTH})
        assert response.status_code == 200, response.text
        seen[response.headers["x-model-version"]] += 1
    return seen


def wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never held")
        time.sleep(0.1)


def test_every_worker_swaps_under_load_and_none_loses_a_request(bundles: dict[str, str], tmp_path: Path) -> None:
    a, b = version_of(bundles["a"]), version_of(bundles["b"])
    # --decode-threads 0: each worker's model thread decodes (the pick on 2 cores, here on
    # any machine); the tests on the `server` fixture swap with a decoding pool
    with ServerProcess(bundles["a"], "--workers", "2", "--decode-threads", "0", "--api-key", KEY) as server:
        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "tagmill_model_version", version=a) == 2)
        outcomes = []

        def swap_twice() -> None:
            with httpx.Client(base_url=server.url) as admin:
                for target in ("b", "a", "b"):
                    time.sleep(0.5)
                    outcomes.append(swap(admin, bundles[target]))
                time.sleep(0.5)

        seen = under_load(server.url, 6, swap_twice)

        assert [r.status_code for r in outcomes] == [200] * 3, [r.text for r in outcomes]
        assert [r.json()["workers"] for r in outcomes] == [2, 2, 2]
        assert not [s for s in seen if s[0] != 200]
        assert set(Counter(s[1] for s in seen)) == {a, b}
        assert versions_seen(server.url, 12) == {b: 12}  # every worker serves b now
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "tagmill_model_version", version=b) == 2
        assert metric(text, "tagmill_model_version", version=a) == 0

        refused = swap(httpx.Client(base_url=server.url), broken_bundles(bundles["a"], tmp_path)["truncated"])
        assert refused.status_code == 422 and error_of(refused)["type"] == "BundleRefusedError"
        assert versions_seen(server.url, 8) == {b: 8}

        # a worker that dies is replaced on the bundle swapped in, not the one started with
        assert server.process is not None
        victim = server_workers(server.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in server_workers(server.process.pid)
                 and len(server_workers(server.process.pid)) == 2
                 and metric(httpx.get(f"{server.url}/metrics").text, "tagmill_model_version", version=b) == 2)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reads_the_bundle_location_again(bundles: dict[str, str], tmp_path: Path, workers: str) -> None:
    """A path such as .../bundles/latest that a pipeline points at each new bundle."""
    latest = tmp_path / "latest"
    latest.symlink_to(bundles["a"])
    a, b = version_of(bundles["a"]), version_of(bundles["b"])
    with ServerProcess(str(latest), "--workers", workers, "--api-key", KEY) as server:
        assert server.process is not None
        assert httpx.get(f"{server.url}/readyz").json()["model"] == "latest"
        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "tagmill_model_version", version=a)
                 == int(workers))
        replacement = tmp_path / "latest.new"
        replacement.symlink_to(bundles["b"])
        os.replace(replacement, latest)  # atomic, as a deployment would

        os.kill(server.process.pid, signal.SIGHUP)

        wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "tagmill_model_version", version=b)
                 == int(workers))
        assert versions_seen(server.url, 6) == {b: 6}
        assert server.process.poll() is None  # SIGHUP did not end it


def test_workers_under_uvicorns_own_supervisor_refuse_to_swap_alone(bundles: dict[str, str]) -> None:
    """Without SO_REUSEPORT, uvicorn supervises the workers and no channel reaches them
    all: one worker swapping alone would answer with another model than its siblings."""
    app = create_app(ServeConfig(bundle=bundles["a"], workers=2, api_key=KEY))
    with ThreadedServer(app) as server, httpx.Client(base_url=server.url) as client:
        refused = swap(client, bundles["b"])
        assert refused.status_code == 501 and error_of(refused)["type"] == "SwapUnsupportedError"
        assert classify(client)[0] == version_of(bundles["a"])
