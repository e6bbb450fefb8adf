"""`tagmill serve s3://…/bundle`: a real server process loading its bundle from S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tagmill.bundle import BundleMeta, Predictor, load_bundle, save_bundle
from tagmill.dataset.transforms import Preprocess
from tagmill.models import create_classifier
from tests import images
from tests.s3.conftest import free_port


def test_serve_a_bundle_straight_from_s3(bucket):
    url = f"s3://{bucket}/bundles/tiny"
    model = create_classifier("test_efficientnet", 3, pretrained=False)
    save_bundle(url, model, BundleMeta(architecture="test_efficientnet", task="single", classes=("a", "b", "c"),
                                       preprocess=Preprocess(input_size=48)))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tagmill", "serve", url, "--port", str(port)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        photo = images.jpeg_bytes(64, 48, seed=3)
        answer = httpx.post(f"{base}/invocations", content=photo, headers={"Content-Type": "application/x-image"}, timeout=30)
        assert answer.status_code == 200, answer.text
        local_model, meta = load_bundle(url)
        expected = Predictor(local_model, meta).predict_bytes([photo])[0].probabilities
        assert len(answer.json()) == 3
        assert all(abs(a - b) < 1e-6 for a, b in zip(answer.json(), expected))
    finally:
        server.terminate()
        server.wait(timeout=30)
