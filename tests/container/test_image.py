"""The image, built from this work tree on a Debian base bootstrapped here, run as
SageMaker runs a bring-your-own algorithm: ``IMAGE train`` on the Caltech-256 job's channel layout
under /opt/ml, then ``IMAGE serve`` on the /opt/ml/model it wrote, called with boto3's
``sagemaker-runtime`` client; a bad hyperparameter and a missing channel end in
/opt/ml/output/failure and a non-zero exit; ``IMAGE tagmill ...`` runs any command.

One test function: the image is built once and every check runs against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest

from tagmill import __version__
from tests.sagemaker_job import CLASSES, HYPERPARAMETERS, failure, make_job
from tests.serve.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("TAGMILL_TEST_IMAGE", "localhost/tagmill:test")
#: runc refuses to raise limits above the machine's hard limits (podman's defaults do)
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
#: the image's user (Dockerfile: useradd --uid 1000)
IMAGE_UID = 1000
#: the server loads torch and the model before /ping answers
READY_TIMEOUT_S = 120


def podman(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`make container-test` installs it on Debian)")
    probe = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[:300]}")
    build = subprocess.run(["container/build.sh"], cwd=REPO, capture_output=True, text=True, timeout=3600,
                           env={**os.environ, "IMAGE": IMAGE, "BASE": "debian", "ENGINE": "podman"})
    assert build.returncode == 0, f"{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return IMAGE


def job_folder(root: Path) -> Path:
    """The image's user writes model/ and output/ as SageMaker's container user would."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    return root


def run_job(image: str, root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return podman("run", "--rm", *LIMITS, "-v", f"{root}:/opt/ml", image, *command, check=False)


def test_the_image_trains_and_serves_as_a_sagemaker_algorithm(image: str, tmp_path: Path) -> None:
    root = job_folder(make_job(tmp_path / "ml"))

    trained = run_job(image, root, "train")

    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert not failure(root)
    assert json.loads((root / "model" / "model.json").read_text())["classes"] == list(CLASSES)
    assert (root / "output" / "data" / "report.md").is_file()

    check_serving_answers_invoke_endpoint(image, root)
    check_failures_reach_output_failure(image, tmp_path)
    check_plain_commands_run_as_a_non_root_user(image)


def check_serving_answers_invoke_endpoint(image: str, root: Path) -> None:
    port = free_port()
    name = f"tagmill-test-{uuid.uuid4().hex[:8]}"
    # SageMaker mounts the model read-only; the port comes as SageMaker passes it when it
    # picks one (the host's network: no bridge or port mapping needed on a test machine)
    podman("run", "-d", "--rm", "--name", name, *LIMITS, "--network", "host",
           "-v", f"{root / 'model'}:/opt/ml/model:ro",
           "-e", f"SAGEMAKER_BIND_TO_PORT={port}", "-e", "SAGEMAKER_MODEL_SERVER_WORKERS=2", image, "serve")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, name)
        runtime = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                               aws_access_key_id="x", aws_secret_access_key="x")
        for colour in CLASSES:
            picture = next((root / "input" / "data" / "validation" / colour).iterdir())
            response = runtime.invoke_endpoint(EndpointName="tagmill", ContentType="application/x-image",
                                               Body=picture.read_bytes(), Accept="application/json;verbose")
            assert json.loads(response["Body"].read())["predicted_label"] == colour
        with pytest.raises(runtime.exceptions.ClientError) as bad:
            runtime.invoke_endpoint(EndpointName="tagmill", ContentType="application/x-image", Body=b"not an image")
        assert bad.value.response["ResponseMetadata"]["HTTPStatusCode"] == 422
        # the explain extra is in the image: the web page's "why?" works there
        picture = next((root / "input" / "data" / "validation" / "red").iterdir())
        explained = httpx.post(f"{url}/predict", params={"explain": "true"}, files={"file": picture.read_bytes()},
                               timeout=60)
        assert explained.status_code == 200, explained.text
        assert explained.json()["explanations"][0]["overlay_png"]
        # the image's HEALTHCHECK, as the engine runs it
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        logs = podman("logs", name).stdout + podman("logs", name).stderr
        assert "onnx, 2 worker(s)" in logs
    finally:
        podman("stop", "-t", "5", name, check=False)


def wait_for_ping(url: str, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"/ping did not answer within {READY_TIMEOUT_S} s\n{logs.stdout}\n{logs.stderr}")


def check_failures_reach_output_failure(image: str, tmp_path: Path) -> None:
    bad = job_folder(make_job(tmp_path / "bad-hp", hyperparameters={**HYPERPARAMETERS, "mini_batch_size": "lots"}))
    result = run_job(image, bad, "train")
    assert result.returncode == 2
    assert "hyperparameter mini_batch_size must be a whole number, got 'lots'" in failure(bad)

    missing = make_job(tmp_path / "no-list")
    shutil.rmtree(missing / "input" / "data" / "train_lst")
    result = run_job(image, job_folder(missing), "train")
    assert result.returncode == 2
    assert "a 'validation_lst' channel needs a 'train_lst' channel" in failure(missing)


def check_plain_commands_run_as_a_non_root_user(image: str) -> None:
    assert podman("run", "--rm", *LIMITS, image, "tagmill", "--version").stdout.strip().endswith(__version__)
    assert podman("run", "--rm", *LIMITS, image, "id", "-u").stdout.strip() == str(IMAGE_UID)
    # no compiler in the final stage
    assert podman("run", "--rm", *LIMITS, image, "sh", "-c", "command -v gcc cc", check=False).returncode != 0
