"""A real SageMaker client against the server as users start it: ``python -m
tagmill.serve BUNDLE --workers 2`` in a subprocess, boto3's ``sagemaker-runtime``
pointed at it with ``endpoint_url``, client code unchanged from what SageMaker users write.

Starting two workers costs seconds, so one test starts the server once and runs every
check against it (separate test functions would be spread over pytest-xdist workers,
each starting its own server)."""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import sys
import time

import boto3
import botocore.exceptions
import httpx
import pytest

from tagmill.bundle import Predictor
from tests import images
from tests.serve.conftest import ServerProcess, metric

JPEG = images.jpeg_bytes(120, 90, seed=30)


def test_sagemaker_runtime_client_against_a_two_worker_server(bundle: str, reference: Predictor) -> None:
    with ServerProcess(bundle, "--workers", "2") as server:
        runtime = boto3.client(
            "sagemaker-runtime",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        check_invoke_endpoint_returns_the_probabilities(runtime, reference)
        check_invoke_endpoint_verbose_and_json_instances(runtime, reference)
        check_batch_transform_json_lines_in_and_out(runtime, reference)
        check_bad_image_is_a_client_error_and_the_endpoint_keeps_serving(runtime)
        check_metrics_add_up_over_both_workers(server)
        check_keep_alive_responses_are_not_delayed_by_nagle(server)
        check_a_second_server_cannot_share_the_port(bundle, server)


def check_invoke_endpoint_returns_the_probabilities(runtime, reference: Predictor) -> None:
    response = runtime.invoke_endpoint(EndpointName="demo", ContentType="application/x-image", Body=JPEG)

    assert response["ContentType"] == "application/json"
    probabilities = json.loads(response["Body"].read())
    assert probabilities == pytest.approx(reference.predict_bytes([JPEG])[0].probabilities, abs=1e-6)


def check_invoke_endpoint_verbose_and_json_instances(runtime, reference: Predictor) -> None:
    png = images.png_bytes(70, 50, seed=31)
    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in (JPEG, png)]})

    verbose = runtime.invoke_endpoint(EndpointName="demo", ContentType="application/x-image", Body=JPEG,
                                      Accept="application/json;verbose")
    several = runtime.invoke_endpoint(EndpointName="demo", ContentType="application/json", Body=body)

    answer = json.loads(verbose["Body"].read())
    assert answer["predicted_label"] == reference.predict_bytes([JPEG])[0].top[0][0]
    lists = json.loads(several["Body"].read())
    for got, want in zip(lists, reference.predict_bytes([JPEG, png]), strict=True):
        assert got == pytest.approx(want.probabilities, abs=1e-6)


def check_batch_transform_json_lines_in_and_out(runtime, reference: Predictor) -> None:
    """A batch transform job's request: one record per line (SplitType=Line, several
    records per request), answered one line per record, in order (AssembleWith=Line)."""
    png = images.png_bytes(64, 48, seed=32)
    records = [JPEG, png, JPEG]
    body = "".join(json.dumps({"b64": base64.b64encode(r).decode()}) + "\n" for r in records)
    response = runtime.invoke_endpoint(EndpointName="demo", ContentType="application/jsonlines", Body=body,
                                       Accept="application/jsonlines")
    assert response["ContentType"] == "application/jsonlines"
    lines = response["Body"].read().decode().splitlines()
    assert len(lines) == 3
    for line, want in zip(lines, reference.predict_bytes(records), strict=True):
        assert json.loads(line) == pytest.approx(want.probabilities, abs=1e-6)


def check_bad_image_is_a_client_error_and_the_endpoint_keeps_serving(runtime) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        runtime.invoke_endpoint(EndpointName="demo", ContentType="application/x-image", Body=b"not a jpeg")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 422
    response = runtime.invoke_endpoint(EndpointName="demo", ContentType="application/x-image", Body=JPEG)
    assert len(json.loads(response["Body"].read())) == 3


def check_metrics_add_up_over_both_workers(server: ServerProcess) -> None:
    route = "/endpoints/{name}/invocations"
    before = metric(httpx.get(f"{server.url}/metrics").text, "tagmill_http_requests_total", route=route)
    for _ in range(12):  # a new connection each: the kernel hands them to either worker
        assert httpx.post(f"{server.url}/endpoints/x/invocations", content=JPEG,
                          headers={"Content-Type": "image/jpeg"}).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "tagmill_http_requests_total", route=route) == before + 12
    assert metric(text, "tagmill_images_total") >= 12


def check_keep_alive_responses_are_not_delayed_by_nagle(server: ServerProcess) -> None:
    # uvicorn's multi-worker socket leaves TCP_NODELAY off: each response would wait
    # ~40 ms for a delayed ACK. The server sets it per connection.
    with httpx.Client(base_url=server.url) as client:  # one keep-alive connection
        client.get("/livez")
        times = []
        for _ in range(15):
            start = time.perf_counter()
            client.get("/livez")
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.030


def check_a_second_server_cannot_share_the_port(bundle: str, server: ServerProcess) -> None:
    # the workers bind with SO_REUSEPORT; a second server must not silently join them
    second = subprocess.run([sys.executable, "-m", "tagmill.serve", bundle, "--port", str(server.port),
                             "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Address already in use" in second.stderr
    assert httpx.get(f"{server.url}/readyz").status_code == 200
