"""KServe / Triton's Open Inference Protocol (v2), driven by its real client library,
``tritonclient.http``, against a real server over loopback."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tagmill.bundle import Predictor
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.models import model_version
from tests import images
from tests.serve.conftest import CLASSES, ThreadedServer, build_bundle

JPEG = images.jpeg_bytes(80, 60, seed=1)
PNG = images.png_bytes(50, 70, seed=2)
OTHER = images.jpeg_bytes(40, 90, seed=5)
NAME = "bundle"  # the served bundle directory's name


@pytest.fixture(scope="module")
def server(bundle: str) -> ThreadedServer:
    with ThreadedServer(create_app(ServeConfig(bundle=bundle))) as running:
        yield running


@pytest.fixture()
def client(server: ThreadedServer) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(url=server.url.removeprefix("http://")) as c:
        yield c


def image_input(data: list[bytes], *, binary: bool) -> triton.InferInput:
    """What a tritonclient user writes: raw bytes in binary mode; JSON carries text, so base64."""
    tensor = triton.InferInput("image", [len(data)], "BYTES")
    elements = data if binary else [base64.b64encode(d) for d in data]
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def text(element: bytes | str) -> str:
    return element.decode() if isinstance(element, bytes) else element


def test_health_and_metadata(client: triton.InferenceServerClient, bundle: str) -> None:
    version = model_version(Predictor.from_bundle(bundle).meta)

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, version)
    assert not client.is_model_ready("other")
    assert client.get_server_metadata()["name"] == "tagmill"
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == [version]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "scores": "FP32", "labels": "BYTES", "top_scores": "FP32", "predicted": "BOOL"}
    assert meta["parameters"]["classes"] == list(CLASSES)
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("other")
    assert unknown.value.status() == "404" and "unknown model 'other'" in unknown.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json-base64"])
@pytest.mark.parametrize("batch", [[JPEG], [JPEG, PNG, OTHER]], ids=["single", "batch"])
def test_infer_answers_what_the_predictor_computes(client: triton.InferenceServerClient, reference: Predictor,
                                                    bundle: str, binary: bool, batch: list[bytes]) -> None:
    result = client.infer(NAME, [image_input(batch, binary=binary)])

    want = reference.predict_bytes(batch)
    scores = result.as_numpy("scores")
    assert scores.shape == (len(batch), len(CLASSES)) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [p.probabilities for p in want], atol=1e-6)
    labels = result.as_numpy("labels")
    assert labels.shape == (len(batch), 2)  # the bundle's default top-k
    assert [[label.decode() for label in row] for row in labels] == [[label for label, _ in p.top] for p in want]
    np.testing.assert_allclose(result.as_numpy("top_scores"), [[s for _, s in p.top] for p in want], atol=1e-6)
    predicted = result.as_numpy("predicted")
    assert predicted.dtype == np.bool_
    assert [[CLASSES[i] for i in np.flatnonzero(row)] for row in predicted] == [p.labels for p in want]
    response = result.get_response()
    assert response["model_name"] == NAME and response["model_version"] == model_version(reference.meta)


@pytest.mark.parametrize("binary_output", [True, False])
def test_outputs_the_client_asks_for_in_the_form_it_asks(client: triton.InferenceServerClient, reference: Predictor,
                                                           binary_output: bool) -> None:
    outputs = [triton.InferRequestedOutput("labels", binary_data=binary_output),
               triton.InferRequestedOutput("top_scores", binary_data=binary_output)]

    result = client.infer(NAME, [image_input([PNG], binary=True)], outputs=outputs, request_id="req-7",
                          parameters={"top_k": 3})

    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["labels", "top_scores"] and response["id"] == "req-7"
    assert ("data" in response["outputs"][0]) is not binary_output
    assert result.as_numpy("scores") is None
    # tritonclient gives bytes for binary BYTES data and str for JSON strings
    assert [text(label) for label in result.as_numpy("labels")[0]] == \
        [label for label, _ in reference.predict_bytes([PNG], top_k=3)[0].top]


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests(client: triton.InferenceServerClient, reference: Predictor, compression: str) -> None:
    result = client.infer(NAME, [image_input([JPEG, PNG], binary=True)], request_compression_algorithm=compression)
    np.testing.assert_allclose(result.as_numpy("scores"), [p.probabilities for p in reference.predict_bytes([JPEG, PNG])],
                               atol=1e-6)


def test_a_compressed_body_may_not_inflate_past_the_limit(bundle: str) -> None:
    bomb = gzip.compress(b"{" + b" " * (3 * 1024 * 1024) + b"}")  # ~3 KB that inflates to 3 MB
    with ThreadedServer(create_app(ServeConfig(bundle=bundle, max_body_mb=1))) as server:
        response = httpx.post(f"{server.url}/v2/models/{NAME}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413 and "inflates" in response.json()["error"]
        other = httpx.post(f"{server.url}/v2/models/{NAME}/infer", content=b"{}", headers={"Content-Encoding": "br"})
        assert other.status_code == 415


def test_a_versioned_request_needs_the_served_version(client: triton.InferenceServerClient, reference: Predictor) -> None:
    version = model_version(reference.meta)
    assert client.infer(NAME, [image_input([JPEG], binary=True)], model_version=version).as_numpy("scores").shape == (1, 3)
    with pytest.raises(InferenceServerException) as other:
        client.infer(NAME, [image_input([JPEG], binary=True)], model_version="0" * 12)
    assert other.value.status() == "404" and version in other.value.message()


@pytest.mark.parametrize(("build", "status", "message"), [
    (lambda: [image_input([b"not an image"], binary=True)], "422", "not an image"),
    (lambda: [image_input([b"bm90IGFuIGltYWdl"], binary=False)], "422", "not an image"),  # base64 of no image
    (lambda: [triton.InferInput("image", [1], "FP32").set_data_from_numpy(np.zeros(1, np.float32))],
     "400", "must be BYTES"),
    (lambda: [triton.InferInput("pixels", [1], "BYTES").set_data_from_numpy(np.array([JPEG], dtype=np.object_))],
     "400", "unknown input 'pixels'"),
    (lambda: [image_input([JPEG], binary=True), image_input([PNG], binary=True)], "400", "exactly one tensor"),
    (lambda: [triton.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array(["not base64!"], dtype=np.object_),
                                                                          binary_data=False)],
     "400", "not base64"),
], ids=["binary-no-image", "base64-no-image", "fp32", "wrong-name", "two-inputs", "bad-base64"])
def test_bad_input_answers_the_protocols_error(client: triton.InferenceServerClient, build, status: str,
                                               message: str) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer(NAME, build())
    assert error.value.status() == status and message in error.value.message(), error.value


def test_errors_have_the_protocols_shape(server: ThreadedServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        cases = [
            http.post(f"/v2/models/{NAME}/infer", content=b"{not json"),
            http.post(f"/v2/models/{NAME}/infer", json={"inputs": [{"name": "image", "datatype": "BYTES",
                                                                    "shape": [2], "data": ["aGk="]}]}),
            http.post(f"/v2/models/{NAME}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}),
            http.post(f"/v2/models/{NAME}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "two"}),
            http.post("/v2/models/other/infer", json={}),
            http.get("/v2/no/such/route"),
        ]
        assert [r.status_code for r in cases] == [400, 400, 400, 400, 404, 404]
        for response in cases:
            body = response.json()
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        many = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [65],
                            "data": [base64.b64encode(JPEG).decode()] * 65}]}
        assert http.post(f"/v2/models/{NAME}/infer", json=many).status_code == 413


def test_infer_needs_the_api_key_when_the_server_has_one(bundle: str) -> None:
    with ThreadedServer(create_app(ServeConfig(bundle=bundle, api_key="k3y"))) as server:
        with triton.InferenceServerClient(url=server.url.removeprefix("http://")) as client:
            assert client.is_server_ready()  # health stays open
            with pytest.raises(InferenceServerException) as refused:
                client.infer(NAME, [image_input([JPEG], binary=True)])
            assert refused.value.status() == "401"
            ok = client.infer(NAME, [image_input([JPEG], binary=True)], headers={"Authorization": "Bearer k3y"})
            assert ok.as_numpy("scores").shape == (1, 3)


def test_the_model_name_can_be_set_and_survives_a_swap(bundle: str, tmp_path: Path) -> None:
    other = build_bundle(tmp_path, seed=1, name="retrained")
    with ThreadedServer(create_app(ServeConfig(bundle=bundle, model_name="posters", api_key="k"))) as server:
        with triton.InferenceServerClient(url=server.url.removeprefix("http://")) as client:
            assert client.get_model_metadata("posters")["name"] == "posters"
            assert not client.is_model_ready(NAME)
            swapped = httpx.post(f"{server.url}/admin/model", json={"bundle": other}, headers={"X-Api-Key": "k"})
            assert swapped.status_code == 200, swapped.text
            meta = client.get_model_metadata("posters")
            assert meta["versions"] == [swapped.json()["version"]] != [swapped.json()["previous_version"]]
            answer = client.infer("posters", [image_input([JPEG], binary=True)], headers={"X-Api-Key": "k"})
            assert answer.get_response()["model_version"] == swapped.json()["version"]
