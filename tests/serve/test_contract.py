"""The HTTP contract, route by route, through FastAPI's TestClient on a real bundle."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tagmill.bundle import BundleError, Predictor
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.app import STATIC_DIR
from tests import images
from tests.bundle import MULTI_THRESHOLDS, multilabel_onnx_bundle
from tests.serve.conftest import CLASSES, X_IMAGE, ServerProcess, error_of, is_listening, metric, server_workers, serving

JPEG = images.jpeg_bytes(80, 60, seed=1)
PNG = images.png_bytes(50, 70, seed=2)


def webp_bytes() -> bytes:
    from PIL import Image

    return images.encode(Image.fromarray(images.pattern(64, 48, seed=3)), "WEBP", quality=90)


def expected(reference: Predictor, *data: bytes) -> list[list[float]]:
    return [p.probabilities for p in reference.predict_bytes(list(data))]


def test_health_routes(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.json()["status"] == "ready" and ready.json()["model"] == "bundle"
    assert ready.json()["model_version"] == ready.headers["x-model-version"]
    assert client.get("/ping").status_code == 200


def test_not_ready_until_the_model_is_loaded(bundle: str) -> None:
    # without the lifespan (no `with`), the model thread never starts
    client = TestClient(create_app(ServeConfig(bundle=bundle)))
    assert client.get("/livez").status_code == 200
    for path in ("/readyz", "/ping"):
        response = client.get(path)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert error_of(response)["type"] == "NotReadyError"
    assert client.post("/invocations", content=JPEG, headers=X_IMAGE).status_code == 503


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("application/x-image", JPEG), ("image/jpeg", JPEG), ("image/png", PNG), ("image/webp", webp_bytes())],
)
@pytest.mark.parametrize("path", ["/invocations", "/endpoints/demo/invocations"])
def test_invocations_answer_probabilities_like_the_predictor(
    client: TestClient, reference: Predictor, path: str, content_type: str, data: bytes
) -> None:
    response = client.post(path, content=data, headers={"Content-Type": content_type})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    probabilities = response.json()
    assert len(probabilities) == len(CLASSES)
    assert probabilities == pytest.approx(expected(reference, data)[0], abs=1e-6)


def test_json_instances_answer_a_list_per_image(client: TestClient, reference: Predictor) -> None:
    batch = [JPEG, PNG, images.jpeg_bytes(40, 90, seed=5)]
    body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in batch]}

    response = client.post("/invocations", json=body)

    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 3
    for got, want in zip(answers, expected(reference, *batch), strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    # one instance is still a list of lists: the shape follows the request, not the count
    one = client.post("/invocations", json={"instances": [{"b64": base64.b64encode(PNG).decode()}]}).json()
    assert len(one) == 1 and one[0] == pytest.approx(expected(reference, PNG)[0], abs=1e-6)


@pytest.mark.parametrize("accept", ["application/json;verbose", "application/json; verbose", "text/html, application/json;verbose"])
def test_verbose_answers_name_the_classes(client: TestClient, reference: Predictor, accept: str) -> None:
    response = client.post("/invocations", content=JPEG, headers={**X_IMAGE, "Accept": accept})

    assert response.status_code == 200, response.text
    answer = response.json()
    want = reference.predict_bytes([JPEG])[0]
    assert answer["classes"] == list(CLASSES)
    assert answer["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    assert answer["predicted_label"] == want.top[0][0] == CLASSES[max(range(3), key=want.probabilities.__getitem__)]
    assert answer["labels"] == want.labels
    assert [entry["label"] for entry in answer["top"]] == [label for label, _ in want.top]


def test_verbose_answers_for_json_instances(client: TestClient) -> None:
    body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in (JPEG, PNG)]}
    answers = client.post("/invocations", json=body, headers={"Accept": "application/json;verbose"}).json()
    assert [set(a) for a in answers] == [{"probabilities", "classes", "labels", "predicted_label", "top"}] * 2


@pytest.mark.parametrize(("accept", "verbose"), [("application/jsonlines", False), ("application/jsonlines;verbose", True)])
def test_jsonlines_answer_one_line_per_image(client: TestClient, reference: Predictor, accept: str, verbose: bool) -> None:
    body = {"instances": [{"b64": base64.b64encode(data).decode()} for data in (JPEG, PNG)]}

    response = client.post("/invocations", json=body, headers={"Accept": accept})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jsonlines"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 2
    got = [line["probabilities"] for line in lines] if verbose else lines
    for g, want in zip(got, expected(reference, JPEG, PNG), strict=True):
        assert g == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    ("accept", "status", "verbose"),
    [
        ("*/*", 200, False),
        ("application/*", 200, False),
        ("text/html;q=0.9, application/json;q=0.5", 200, False),
        ("application/json;verbose;q=0.2, application/json;q=0.8", 200, False),
        ("application/json;q=0.2, application/json;verbose;q=0.8", 200, True),
        ("text/html", 406, None),
        ("application/json;q=0", 406, None),
    ],
)
def test_accept_negotiation(client: TestClient, accept: str, status: int, verbose: bool | None) -> None:
    response = client.post("/invocations", content=JPEG, headers={**X_IMAGE, "Accept": accept})

    assert response.status_code == status
    if status == 406:
        assert error_of(response)["type"] == "NotAcceptableError"
    else:
        assert isinstance(response.json(), dict) is verbose


def test_predict_multipart_and_raw_bytes(client: TestClient, reference: Predictor) -> None:
    want = reference.predict_bytes([JPEG])[0]

    upload = client.post("/predict", files={"file": ("photo.jpg", JPEG, "image/jpeg")})
    raw = client.post("/predict", content=JPEG, headers={"Content-Type": "image/jpeg"})
    three = client.post("/predict?top_k=3", files={"file": ("photo.jpg", JPEG, "image/jpeg")})

    assert upload.status_code == raw.status_code == three.status_code == 200, upload.text
    answer = upload.json()
    assert answer == raw.json()
    assert set(answer) == {"labels", "scores", "top", "task", "model_version"} and answer["task"] == "single"
    assert answer["labels"] == [want.top[0][0]]
    assert answer["scores"] == pytest.approx(want.scores, abs=1e-6)
    assert len(answer["top"]) == 2  # the bundle's default_top_k
    assert [t["label"] for t in three.json()["top"]] == [label for label, _ in reference.predict_bytes([JPEG], top_k=3)[0].top]


@pytest.fixture(scope="module")
def onnx_client() -> TestClient:
    """The multi-label bundle with model.onnx, served by onnxruntime."""
    with serving(create_app(ServeConfig(bundle=multilabel_onnx_bundle(), backend="onnx"))) as c:
        yield c


def test_onnx_backend_gives_the_onnx_predictors_scores(onnx_client: TestClient) -> None:
    reference = Predictor.from_bundle(multilabel_onnx_bundle(), backend="onnx", intra_op_threads=1)

    response = onnx_client.post("/invocations", content=PNG, headers={"Content-Type": "image/png"})

    assert response.status_code == 200
    assert response.json() == pytest.approx(reference.predict_bytes([PNG])[0].probabilities, abs=1e-6)


def test_multilabel_predict_uses_tuned_thresholds_unless_given(onnx_client: TestClient) -> None:
    files = {"file": ("photo.png", PNG, "image/png")}

    tuned = onnx_client.post("/predict", files=files).json()
    everything = onnx_client.post("/predict?threshold=0", files=files).json()
    nothing = onnx_client.post("/predict?threshold=1", files=files).json()

    assert tuned["task"] == "multi"
    # the bundle's classifier biases put the probabilities near 0.88 / 0.52 / 0.12
    assert onnx_client.get("/api/model").json()["thresholds"] == list(MULTI_THRESHOLDS)
    assert tuned["labels"] == ["dog", "owl"]
    assert everything["labels"] == ["cat", "dog", "owl"] and nothing["labels"] == []


def test_onnx_backend_needs_model_onnx(bundle: str) -> None:
    with pytest.raises(BundleError, match="model.onnx"):
        create_app(ServeConfig(bundle=bundle, backend="onnx"))


def test_api_model_describes_the_bundle_for_the_page(client: TestClient, bundle: str) -> None:
    info = client.get("/api/model").json()

    assert info["name"] == Path(bundle).name
    assert info["architecture"] == "test_efficientnet" and info["task"] == "single"
    assert info["classes"] == list(CLASSES) and info["thresholds"] is None
    assert info["default_top_k"] == 2 and info["input_size"] == 48
    assert info["metrics"] == {"accuracy": 0.75, "split": "val"}
    assert info["api_key_required"] is False and info["backend"] == "torch"
    assert info["examples"] == ["/examples/owl.png", "/examples/red-cat.jpg"]  # notes.txt is no image
    for url in info["examples"]:
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"].startswith("image/")
        assert client.post("/predict", content=response.content, headers={"Content-Type": "image/*"}).status_code == 200


@pytest.mark.parametrize("name", ["notes.txt", "..%2Fmodel.json", "../model.json", "%2e%2e%2fmodel.json", "missing.jpg"])
def test_examples_serve_only_listed_images(client: TestClient, name: str) -> None:
    response = client.get(f"/examples/{name}")
    assert response.status_code == 404
    assert b"weights_sha256" not in response.content


def test_web_page_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    if (STATIC_DIR / "index.html").is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    else:
        assert page.status_code == 404 and error_of(page)["type"] == "NotFound"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/invocations", "/endpoints/{name}/invocations", "/predict", "/ping", "/api/model"} <= set(paths)
    assert "application/x-image" in paths["/invocations"]["post"]["requestBody"]["content"]


def test_metrics_count_requests_and_batches(client: TestClient) -> None:
    client.post("/invocations", content=JPEG, headers=X_IMAGE)
    client.post("/invocations", content=b"junk", headers=X_IMAGE)

    text = client.get("/metrics").text

    assert metric(text, "tagmill_http_requests_total", route="/invocations", status="200") >= 1
    assert metric(text, "tagmill_http_requests_total", route="/invocations", status="422") >= 1
    assert metric(text, "tagmill_batch_size_count") >= 1
    assert metric(text, "tagmill_http_request_duration_seconds_count", route="/invocations") >= 2
    assert "tagmill_queue_depth" in text
    client.get("/no/such/route")
    assert metric(client.get("/metrics").text, "tagmill_http_requests_total", route="unmatched", status="404") >= 1


def test_api_key_guards_predictions_but_not_health_or_the_page(bundle: str, tmp_path: Path) -> None:
    with serving(create_app(ServeConfig(bundle=bundle, api_key="s3cret"))) as client:
        missing = client.post("/invocations", content=JPEG, headers=X_IMAGE)
        wrong = client.post("/predict", content=JPEG, headers={**X_IMAGE, "X-Api-Key": "guess"})
        sigv4 = client.post("/invocations", content=JPEG,
                            headers={**X_IMAGE, "Authorization": "AWS4-HMAC-SHA256 Credential=x/..."})
        by_header = client.post("/invocations", content=JPEG, headers={**X_IMAGE, "X-Api-Key": "s3cret"})
        by_bearer = client.post("/endpoints/e/invocations", content=JPEG,
                                headers={**X_IMAGE, "Authorization": "Bearer s3cret"})

        for refused in (missing, wrong, sigv4):
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
            assert error_of(refused)["type"] == "UnauthorizedError"
        assert by_header.status_code == by_bearer.status_code == 200
        for path in ("/ping", "/livez", "/readyz", "/metrics", "/api/model", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        assert client.get("/api/model").json()["api_key_required"] is True
        schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}


def test_without_an_api_key_authorization_headers_are_ignored(client: TestClient) -> None:
    # boto3 signs every request (SigV4); a server without a key must not care
    response = client.post("/invocations", content=JPEG,
                           headers={**X_IMAGE, "Authorization": "AWS4-HMAC-SHA256 Credential=x/20240101/us-east-1"})
    assert response.status_code == 200


def test_a_bundle_that_is_not_one_fails_at_startup(tmp_path: Path, bundle: str) -> None:
    with pytest.raises(BundleError, match="not a tagmill bundle"):
        create_app(ServeConfig(bundle=str(tmp_path)))
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    # model.json reads fine, so the app starts; loading the weights fails in the model thread
    with TestClient(create_app(ServeConfig(bundle=str(broken)))) as client:
        app_service = client.app.state.service
        assert app_service.batcher.wait_ready(30)
        response = client.get("/readyz")
        assert response.status_code == 503 and "failed to load" in error_of(response)["message"]
        assert client.get("/livez").status_code == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_a_truncated_bundle_as_predict_does_before_binding(tmp_path: Path, bundle: str, workers: int) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    results = {
        command: subprocess.run([sys.executable, "-m", "tagmill", *args], capture_output=True, text=True, timeout=120)
        for command, args in {
            "predict": ["predict", str(broken), str(tmp_path)],
            "serve": ["serve", str(broken), "--port", "0", "--workers", str(workers)],
        }.items()
    }
    for command, result in results.items():
        assert result.returncode == 8, (command, result.stdout, result.stderr)  # the bundle error's exit code
        assert "is corrupt or was replaced" in result.stderr, command
    assert "Uvicorn running" not in results["serve"].stderr + results["serve"].stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_is_a_clean_shutdown(bundle: str, workers: str) -> None:
    server = ServerProcess(bundle, "--workers", workers)
    with server:
        pass  # ready: it answered /readyz
    assert server.process is not None and server.process.returncode == 0  # stopped by SIGTERM, not killed (143)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_the_supervisor_of_several_workers_holds_no_model(bundle: str) -> None:
    """Only the workers import torch and load the model; the process that starts and
    restarts them stays a small Python program (it held ~740 MB when it imported the
    model stack to check the bundle)."""
    with ServerProcess(bundle, "--workers", "2") as server:
        assert server.process is not None
        workers = server_workers(server.process.pid)
        assert len(workers) == 2
        supervisor, worker = rss_mb(server.process.pid), max(rss_mb(pid) for pid in workers)  # a ready one
        # importing torch alone takes a process past 300 MB; bare Python with uvicorn ~40
        assert supervisor < 150 < worker, (supervisor, worker)


def test_a_replaced_worker_takes_no_connection_before_its_model_is_loaded(bundle: str) -> None:
    """Workers share the port; while a killed one is replaced (a new process loading the
    model for seconds), every new connection is still answered by a ready model."""
    import signal

    with ServerProcess(bundle, "--workers", "2") as server:
        assert server.process is not None
        workers = server_workers(server.process.pid)
        assert len(workers) == 2 and all(is_listening(pid) for pid in workers)
        os.kill(workers[0], signal.SIGKILL)
        while is_alive(workers[0]):  # its sockets close when it exits: a connection the kernel
            time.sleep(0.01)         # queued on them in the meantime is reset (SIGKILL's doing)
        statuses: list[int] = []
        resets = 0
        after_listening = 0  # requests sent since the replacement started listening
        deadline = time.monotonic() + 90
        while after_listening < 40 and time.monotonic() < deadline:
            # a new connection each time: the kernel picks among the listening workers
            try:
                statuses.append(httpx.post(f"{server.url}/invocations", content=images.jpeg_bytes(40, 30, seed=5),
                                           headers={"Content-Type": "image/jpeg"}).status_code)
            except httpx.ReadError:
                # Known, not yet explained: in a few full-suite runs one connection was reset
                # while the replacement started. Bounded here (at most one) so the test still
                # fails on a worker that answers before its model is loaded (a 503).
                resets += 1
            replacements = set(server_workers(server.process.pid)) - set(workers)
            if any(is_listening(pid) for pid in replacements):
                after_listening += 1
        assert after_listening == 40, "no replacement worker came to listen"
        assert set(statuses) == {200}, statuses
        assert resets <= 1, f"{resets} connections reset while the replacement started"


def is_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has exited and closed its files)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_client_that_never_finishes_its_headers_is_disconnected(bundle: str) -> None:
    """Slow loris: half a request line holds a connection only until the header deadline;
    a client that pauses longer than that between whole requests is still served."""
    import socket

    with ServerProcess(bundle, "--header-timeout-s", "1") as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"GET /pi")  # and nothing more
        start = time.monotonic()
        closed = [sock.recv(1) == b"" for sock in stalled]  # the server hangs up: EOF
        waited = time.monotonic() - start
        assert all(closed) and 0.5 < waited < 8
        with httpx.Client(base_url=server.url) as client:  # keep-alive; reconnects if the idle connection was closed
            for _ in range(2):
                assert client.get("/ping").status_code == 200
                time.sleep(1.5)
            assert client.get("/ping").status_code == 200
        for sock in stalled:
            sock.close()


def test_open_connections_per_worker_are_capped(bundle: str) -> None:
    import socket

    with ServerProcess(bundle, "--max-connections", "4") as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        with httpx.Client(base_url=server.url) as client:
            refused = client.get("/ping")  # a fifth connection: refused, not queued forever
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert error_of(refused)["type"] == "TooManyConnectionsError"  # tagmill's JSON error format
            for sock in idle:
                sock.close()
            deadline = time.monotonic() + 10
            while (status := client.get("/ping").status_code) != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status == 200  # room again once they are gone
