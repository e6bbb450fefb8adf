"""Fixtures for the server tests: a tiny real bundle, a TestClient on it, and real
uvicorn servers (in a thread, or in a subprocess as ``tagmill serve`` runs it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import timm
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tagmill.bundle import BundleMeta, Predictor, save_bundle
from tagmill.dataset.transforms import Preprocess
from tagmill.serve import ServeConfig, create_app
from tests import images

CLASSES = ("cat", "dog", "owl")
SIZE = 48
READY_TIMEOUT_S = 60.0


def build_bundle(root: Path, *, task: str = "single", seed: int = 0, size: int = SIZE,
                 classes: tuple[str, ...] = CLASSES, name: str = "bundle") -> str:
    """A test_efficientnet bundle whose scores depend clearly on the image: a random
    timm head gives near-equal probabilities, so its weights are scaled up. Another
    ``seed`` gives other weights, so another model version."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(classes)).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(300.0)
    meta = BundleMeta(
        architecture="test_efficientnet",
        task=task,
        classes=classes,
        preprocess=Preprocess(input_size=size),
        thresholds=(0.6, 0.5, 0.4) if task == "multi" and classes == CLASSES else None,
        default_top_k=2,
        metrics={"accuracy": 0.75, "split": "val"},
    )
    location = save_bundle(str(root / name), model, meta)
    examples = root / name / "examples"
    images.write(examples / "red-cat.jpg", images.jpeg_bytes(64, 48, seed=11))
    images.write(examples / "owl.png", images.png_bytes(40, 40, seed=12))
    images.write(examples / "notes.txt", b"not an example image")
    return location


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_bundle(tmp_path_factory.mktemp("serve-single"))


@pytest.fixture(scope="session")
def reference(bundle: str) -> Predictor:
    """What `tagmill predict` computes: the server must give the same scores."""
    return Predictor.from_bundle(bundle)


def wait_ready(get: Callable[[str], httpx.Response], timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)
    raise TimeoutError("the server did not become ready")


@contextmanager
def serving(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:  # runs the lifespan: starts the model thread
        wait_ready(client.get)
        yield client


@pytest.fixture(scope="module")
def client(bundle: str) -> Iterator[TestClient]:
    with serving(create_app(ServeConfig(bundle=bundle))) as c:
        yield c


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """A real uvicorn server on a free loopback port, in a thread of this process (so a
    test can hold on to the model it serves)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                http="tagmill.serve.server:NoDelayHTTPProtocol", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        with httpx.Client(base_url=self.url) as client:
            wait_ready(client.get)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class ServerProcess:
    """``python -m tagmill.serve BUNDLE --port P ...``: the server as users run it."""

    def __init__(self, bundle: str, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "tagmill.serve", bundle, "--port", str(self.port),
                        "--log-level", "warning", *options]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(self.command, env=env)
        with httpx.Client(base_url=self.url) as client:
            try:
                wait_ready(client.get)
                self._wait_for_every_worker()
            except TimeoutError:
                self.__exit__()
                raise
        return self

    def _wait_for_every_worker(self) -> None:
        """With ``--workers N``, until all N listen: /readyz answers once the first one
        does, and a worker listens only when its model is loaded, so connections made
        before the others are up all land on the first (a test counting the workers that
        answered saw one of two)."""
        if "--workers" not in self.command:
            return
        count = int(self.command[self.command.index("--workers") + 1])
        if count < 2:
            return  # one worker is the server process itself, ready when /readyz is
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            workers = server_workers(self.process.pid)
            if len(workers) == count and all(is_listening(pid) for pid in workers):
                return
            time.sleep(0.1)
        raise TimeoutError(f"not all {count} workers are listening")

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()  # SIGTERM: uvicorn shuts its workers down
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def server_workers(parent: int) -> list[int]:
    """The live worker processes of a ``--workers N`` server (spawned interpreters)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in _command_line(int(pid))]


def _command_line(pid: int) -> bytes:
    """``/proc/PID/cmdline``, or nothing for a child reaped since it was listed (a worker
    the test killed can go between reading the children and reading its command line)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def is_listening(pid: int) -> bool:
    """Whether process ``pid`` holds a TCP socket in the LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                return True
    return False


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def error_of(response: httpx.Response) -> dict:
    """The error object every failing route answers with."""
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    return body["error"]


X_IMAGE = {"Content-Type": "application/x-image"}
