"""``serve --capture``: request images the model was unsure of are stored with their
prediction, off the request path; full queues, the size cap and storage outages drop
items (counted), never requests. Real servers, a real disk, a real S3 endpoint (moto)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import signal
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tagmill import storage
from tagmill.bundle import Predictor
from tagmill.formats.captures import PREDICTIONS
from tagmill.bundle.suggest import suggest, uncertainty
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.capture import MARKER, Capture, decision_confidence
from tagmill.serve.capture_writer import Item, PartWriter, Report, WriterConfig
from tagmill.serve.metrics import ServeMetrics
from tagmill.bundle.predictor import Prediction
from tagmill.bundle.format import BundleMeta
from tagmill.dataset.transforms import Preprocess
from tests import images
from tests.s3.conftest import MotoServer, closed_port, new_bucket, point_at, s3_client, start_moto, stop_moto
from tests.serve.conftest import X_IMAGE, ServerProcess, metric, serving

WAIT_S = 60.0  # the writer is a process of its own: tests wait for what it did, up to this


def photos(count: int, seed: int = 0) -> list[bytes]:
    return [images.jpeg_bytes(64, 48, seed=seed + i) for i in range(count)]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


@dataclass
class Captured:
    """What a local capture folder holds (temporary files excluded), read as any tar reader would."""

    parts: list[Path]  #: the part files
    images: dict[str, bytes]  #: by member name
    records: dict[str, dict]  #: what was served, by the image's member name
    part_of: dict[str, Path]  #: the part each image is in
    other: list[Path]  #: anything else but the marker (nothing, in layout 3)


def captured(root: Path) -> Captured:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MARKER and not p.name.startswith(".")]
    found = Captured(sorted(p for p in files if p.suffix == ".tar"), {}, {}, {},
                     [p for p in files if p.suffix != ".tar"])
    for part in found.parts:
        with tarfile.open(part) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert members[-1][0] == PREDICTIONS  # the predictions come after the images they name
        for name, data in members[:-1]:
            found.images[name], found.part_of[name] = data, part
        lines = [json.loads(line) for line in members[-1][1].decode().splitlines()]
        assert [r["image"] for r in lines] == [name for name, _ in members[:-1]]  # a line per image, in order
        found.records.update((r["image"], r) for r in lines)
        assert part.name == f"part-{members[0][0].rsplit('.', 1)[0]}-n{len(lines)}.tar"  # its first image, its count
    return found


# --- what is captured --------------------------------------------------------------


def test_images_below_the_confidence_bound_are_stored_with_their_prediction(bundle: str, reference: Predictor,
                                                                            tmp_path: Path) -> None:
    sent = photos(12)
    confidence = [max(p.probabilities) for p in reference.predict_bytes(sent)]
    bound = float(np.median(confidence))
    unsure = {data for data, c in zip(sent, confidence) if c < bound}
    assert 0 < len(unsure) < len(sent)
    with serving(create_app(ServeConfig(bundle=bundle, capture=str(tmp_path), capture_below=bound))) as client:
        for data in sent:
            assert client.post("/invocations", content=data, headers=X_IMAGE).status_code == 200
        wait_for(lambda: metric(client.get("/metrics").text, "tagmill_captured_total") >= len(unsure), "captures")
        text = client.get("/metrics").text
    found = captured(tmp_path)
    assert set(found.images.values()) == unsure and len(found.images) == len(unsure)  # the unsure ones, byte for byte
    assert metric(text, "tagmill_captured_total", reason="low_confidence") == len(unsure)
    assert metric(text, "tagmill_capture_bytes_total") == sum(p.stat().st_size for p in found.parts)
    assert json.loads((tmp_path / MARKER).read_text()) == {"layout": "tagmill-capture", "version": 3}
    assert not found.other and len(found.parts) < len(unsure)  # parts, not a file per image
    for name, data in found.images.items():
        record = found.records[name]
        assert found.part_of[name].parent.name == record["captured_at"][:10]  # its date folder
        assert record["reason"] == "low_confidence" and record["confidence"] < bound
        expected = reference.predict_bytes([data])[0]
        assert np.allclose(record["probabilities"], expected.probabilities, atol=1e-5)
        assert record["labels"] == expected.labels and record["classes"] == ["cat", "dog", "owl"]
        assert record["request"]["path"] == "/invocations"
        assert record["request"]["content_type"] == "application/x-image"
        assert len(record["model_version"]) > 8
        assert record["request"]["bytes"] == len(data) and name.endswith(".jpg")


def test_every_prediction_route_captures_and_a_sample_is_marked_as_such(bundle: str, tmp_path: Path) -> None:
    config = ServeConfig(bundle=bundle, capture=str(tmp_path), capture_below=0.0, capture_sample=1.0)
    a, b, c, d = photos(4, seed=20)
    with serving(create_app(config)) as client:
        assert client.post("/invocations", content=a, headers=X_IMAGE).status_code == 200
        assert client.post("/predict", files={"file": ("b.jpg", b, "image/jpeg")}).status_code == 200
        instances = {"instances": [{"b64": base64.b64encode(x).decode()} for x in (c, d)]}
        assert client.post("/endpoints/x/invocations", json=instances).status_code == 200
        v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(a).decode()]}]}
        assert client.post("/v2/models/bundle/infer", json=v2).status_code == 200
        wait_for(lambda: metric(client.get("/metrics").text, "tagmill_captured_total", reason="sample") == 5, "captures")
    found = captured(tmp_path)
    requests = [found.records[name]["request"] for name in found.images]
    assert sorted(r["path"] for r in requests) == sorted(
        ["/invocations", "/predict", "/endpoints/x/invocations", "/endpoints/x/invocations", "/v2/models/bundle/infer"])
    assert {r["content_type"].split(";")[0] for r in requests} == {
        "application/x-image", "multipart/form-data", "application/json"}
    assert sorted((r["instance"], r["instances"]) for r in requests if r["path"].startswith("/endpoints")) == [(0, 2), (1, 2)]
    assert sorted(found.images.values()) == sorted([a, b, c, d, a])
    assert {name.rsplit(".", 1)[1] for name in found.images} == {"jpg"}


def test_the_random_sample_takes_about_its_fraction_and_confident_images_are_not_captured(tmp_path: Path) -> None:
    metrics = ServeMetrics()
    capture = Capture(str(tmp_path), metrics, below=0.6, sample=0.25, queue_items=10_000, seed=3)
    meta = BundleMeta(architecture="x", task="single", classes=("a", "b"), preprocess=Preprocess(input_size=16))
    sure = Prediction(probabilities=[0.9, 0.1], labels=["a"])
    unsure = Prediction(probabilities=[0.55, 0.45], labels=["a"])
    capture.offer([b"x"] * 1000, [sure] * 1000, "v1", meta)  # not started: the queue keeps what it takes
    assert 200 <= capture.pending <= 300  # 25% of 1,000, give or take four standard deviations
    taken = capture.pending
    capture.offer([b"y"] * 10, [unsure] * 10, "v1", meta)
    assert capture.pending == taken + 10  # every unsure one


def test_a_quiet_servers_capture_is_written_within_a_second_and_a_busy_ones_in_parts(tmp_path: Path) -> None:
    from tagmill.serve.capture import PART_ITEMS, PART_S

    metrics = ServeMetrics()
    capture = Capture(str(tmp_path), metrics, below=1.0, queue_items=10_000)
    meta = BundleMeta(architecture="x", task="single", classes=("a", "b"), preprocess=Preprocess(input_size=16))
    unsure = Prediction(probabilities=[0.55, 0.45], labels=["a"])
    capture.start()
    try:
        capture.offer(photos(1), [unsure], "v1", meta)
        started = time.monotonic()
        wait_for(lambda: captured(tmp_path).parts, "the first part")
        assert time.monotonic() - started < PART_S + 2  # no stop, no further image: the timer wrote it
        assert len(captured(tmp_path).records) == 1
        count = PART_ITEMS * 2 + 5
        capture.offer(photos(count, seed=1), [unsure] * count, "v1", meta)
        wait_for(lambda: len(captured(tmp_path).images) == count + 1, "every image")
    finally:
        capture.stop(drain_s=30)
    found = captured(tmp_path)
    assert len(found.images) == len(found.records) == count + 1 and not found.other
    sizes = sorted(int(part.stem.rsplit("-n", 1)[1]) for part in found.parts)
    # offered at once, the busy stretch fills whole parts (the last second's rest may be cut)
    assert sizes.count(1) >= 1 and max(sizes) == PART_ITEMS and len(sizes) <= 5 and sum(sizes) == count + 1
    assert metric(metrics.render()[0].decode(), "tagmill_captured_total") == count + 1


def test_the_writer_is_a_process_of_its_own_and_a_new_one_replaces_one_that_dies(tmp_path: Path,
                                                                                capture_errors: _Errors) -> None:
    metrics = ServeMetrics()
    capture = Capture(str(tmp_path), metrics, below=1.0)
    meta = BundleMeta(architecture="x", task="single", classes=("a", "b"), preprocess=Preprocess(input_size=16))
    unsure = Prediction(probabilities=[0.55, 0.45], labels=["a"])
    stored = lambda: metric(metrics.render()[0].decode(), "tagmill_captured_total")  # noqa: E731

    def writers() -> list[int]:
        """This process's live children that run the capture writer (a zombie has no command
        line); each thread lists the children it started."""
        children = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                children += (task / "children").read_text().split()
        return [int(pid) for pid in children if Path(f"/proc/{pid}").exists()
                and b"tagmill.serve.capture_writer" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    capture.start()
    try:
        assert len(writers()) == 1  # a child process, not a thread of the server
        first = writers()[0]
        assert b"libtorch" not in Path(f"/proc/{first}/maps").read_bytes()  # nothing of the model stack
        arguments = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")[1:-1]
        assert arguments[:2] == [b"-m", b"tagmill.serve.capture_writer"] and len(arguments) == 3  # only the socket:
        # the configuration, storage options and their credentials with it, goes over the socket
        capture.offer(photos(3), [unsure] * 3, "v1", meta)
        wait_for(lambda: stored() == 3, "the first images")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: first not in writers(), "the writer's end")
        capture.offer(photos(4, seed=10), [unsure] * 4, "v1", meta)
        wait_for(lambda: stored() == 7, "the images after the writer died")
        assert writers() != [first] and len(writers()) == 1
    finally:
        capture.stop(drain_s=30)
    assert not writers()  # stop() ends it
    assert any("writer process ended" in m for m in capture_errors.messages)
    found = captured(tmp_path)
    assert len(found.images) == 7 and {r["request"]["pid"] for r in found.records.values()} == {os.getpid()}


def test_multi_label_confidence_is_the_least_sure_tags_decision_at_its_threshold() -> None:
    thresholds = (0.5, 0.2)
    assert decision_confidence([1.0, 0.9], "multi", thresholds) == pytest.approx(0.9375)  # 0.7 of 0.8 of room
    assert decision_confidence([0.55, 0.0], "multi", thresholds) == pytest.approx(0.55)  # at t=0.5: max(p, 1-p)
    assert decision_confidence([1.0, 0.2], "multi", thresholds) == pytest.approx(0.5)  # a tag at its threshold
    assert decision_confidence([0.3, 0.1], "multi", thresholds) == pytest.approx(0.7)  # min(0.7, 0.75)
    probs = np.random.default_rng(0).uniform(size=(50, 2))
    ours = [decision_confidence(row.tolist(), "multi", thresholds) for row in probs]
    np.testing.assert_allclose(ours, 1 - uncertainty(probs, "multi", thresholds) / 2)  # what suggest ranks first
    assert decision_confidence([0.2, 0.7, 0.1], "single", None) == pytest.approx(0.7)


# --- what is dropped, never failing a request ----------------------------------------


def test_the_size_cap_drops_and_counts_and_holds_across_a_restart(bundle: str, tmp_path: Path) -> None:
    cap = 12_000  # bytes: room for a few of these 64x48 photos and their predictions
    config = ServeConfig(bundle=bundle, capture=str(tmp_path), capture_below=0.0, capture_sample=1.0,
                         capture_max_gb=cap / 1024**3)
    sent = photos(20, seed=40)

    def run() -> str:
        with serving(create_app(config)) as client:
            assert all(client.post("/invocations", content=x, headers=X_IMAGE).status_code == 200 for x in sent)

            def done() -> bool:
                text = client.get("/metrics").text
                return metric(text, "tagmill_captured_total") + metric(text, "tagmill_capture_dropped_total") == 20
            wait_for(done, "every image stored or dropped")
            return client.get("/metrics").text

    text = run()
    found = captured(tmp_path)
    assert 0 < len(found.images) == len(found.records) == metric(text, "tagmill_captured_total") < 20
    assert metric(text, "tagmill_capture_dropped_total", reason="cap_reached") == 20 - len(found.images)
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk - (tmp_path / MARKER).stat().st_size <= cap
    # a restart counts what the folder holds: the same photos again may fill what is left, no more
    text = run()
    assert metric(text, "tagmill_capture_dropped_total", reason="cap_reached") >= 1
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= cap  # a cap of the folder, not per run


def test_the_cap_counts_a_part_to_the_byte(tmp_path: Path) -> None:
    # the writer sizes a part before it exists; a cap of exactly a part's bytes takes it
    # whole, one byte less leaves its last image out (images of sizes off the tar's blocks)
    sent = [Item(os.urandom(size), "low_confidence", 0.5, 1_700_000_000.25, "v1", "single", ("a", "b"),
                 [0.5, 0.5], ["a"], "/invocations", "image/jpeg", 0, 1, 0.0)
            for size in (300, 1024, 1500, 2049, 777)]

    def write(folder: str, cap: int) -> tuple[Report, list[Path]]:
        writer = PartWriter(WriterConfig(str(tmp_path / folder), cap, 1, 1))
        writer.write(sent)
        return writer.take_report(), captured(tmp_path / folder).parts

    report, [part] = write("unbounded", 10**9)
    whole = part.stat().st_size
    assert report.bytes == whole and sum(report.captured.values()) == len(sent)
    report, [part] = write("exact", whole)
    assert part.stat().st_size == whole and sum(report.captured.values()) == len(sent)
    report, [part] = write("short", whole - 1)
    assert sum(report.captured.values()) == len(sent) - 1 and report.dropped == {"cap_reached": 1}
    assert part.stat().st_size < whole


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def capture_errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger("tagmill.serve.capture")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_an_unwritable_folder_fails_no_request_and_shows_in_metrics_and_log(bundle: str, tmp_path: Path,
                                                                            capture_errors: _Errors) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    config = ServeConfig(bundle=bundle, capture=str(blocker / "capture"), capture_sample=1.0)
    with serving(create_app(config)) as client:
        for data in photos(3):
            assert client.post("/invocations", content=data, headers=X_IMAGE).status_code == 200
        wait_for(lambda: metric(client.get("/metrics").text, "tagmill_capture_dropped_total",
                                reason="storage_error") == 3, "the storage errors")
    assert any("cannot store into" in m and "a-file" in m for m in capture_errors.messages)


# --- on S3 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """tests/s3's moto server (its conftest's fixtures reach only tests/s3)."""
    server = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    yield server
    stop_moto(server)


@pytest.fixture
def s3(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh bucket on the moto server, botocore pointed at it."""
    point_at(monkeypatch, moto.endpoint, tmp_path_factory.getbasetemp())
    storage.set_storage_options({})
    yield new_bucket()


def test_capture_into_s3(bundle: str, s3: str) -> None:
    config = ServeConfig(bundle=bundle, capture=f"s3://{s3}/capture", capture_below=0.0, capture_sample=1.0)
    sent = photos(3, seed=60)
    with serving(create_app(config)) as client:
        for data in sent:
            assert client.post("/invocations", content=data, headers=X_IMAGE).status_code == 200
        wait_for(lambda: metric(client.get("/metrics").text, "tagmill_captured_total") == 3, "captures")
    client_s3 = s3_client()
    keys = [o["Key"] for o in client_s3.list_objects_v2(Bucket=s3, Prefix="capture/")["Contents"]]
    assert f"capture/{MARKER}" in keys
    parts = [k for k in keys if k.endswith(".tar")]
    assert len(keys) == len(parts) + 1 and 1 <= len(parts) < 3  # the images: one PUT per part, not per image
    members, lines = [], []
    for key in parts:
        body = client_s3.get_object(Bucket=s3, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar if m.name != PREDICTIONS]
            lines += tar.extractfile(PREDICTIONS).read().decode().splitlines()
    assert sorted(json.loads(line)["image"] for line in lines) == sorted(name for name, _ in members)
    assert sorted(data for _, data in members) == sorted(sent)
    # and `tagmill suggest` takes the capture URL as it is: the images, with what was served
    found = suggest(Predictor.from_bundle(bundle), [f"s3://{s3}/capture"], 2)
    assert found.considered == 3 and not found.skipped and len(found.names) == 2
    assert all(name.endswith(".jpg") and entry is not None and entry["image"] == name.rsplit("/", 1)[1]
               for name, entry in zip(found.names, found.served))


def test_an_unreachable_s3_endpoint_fails_no_request_and_is_counted(bundle: str, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path, capture_errors: _Errors) -> None:
    point_at(monkeypatch, f"http://127.0.0.1:{closed_port()}", tmp_path)
    storage.set_storage_options({})
    config = ServeConfig(bundle=bundle, capture="s3://nowhere/capture", capture_sample=1.0)
    with serving(create_app(config)) as client:
        for data in photos(2):
            assert client.post("/invocations", content=data, headers=X_IMAGE).status_code == 200
        wait_for(lambda: metric(client.get("/metrics").text, "tagmill_capture_dropped_total",
                                reason="storage_error") == 2, "the storage errors")
    assert any("cannot store into s3://nowhere/capture" in m for m in capture_errors.messages)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: storage that hangs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # the kernel completes handshakes; nothing ever reads
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_full_queue_drops_and_counts_while_every_request_is_answered(bundle: str, black_hole: str,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    point_at(monkeypatch, black_hole, tmp_path)  # the server process inherits it
    with ServerProcess(bundle, "--capture", "s3://stuck/capture", "--capture-sample", "1",
                       "--capture-queue", "1") as server, httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [client.post("/invocations", content=x, headers=X_IMAGE).status_code for x in photos(8)]
        text = client.get("/metrics").text
    assert answers == [200] * 8
    # one item waits in the queue (the writer, woken by it, takes it within a second and
    # sticks on the endpoint; the next one then waits behind it): the rest were dropped
    assert metric(text, "tagmill_capture_dropped_total", reason="queue_full") >= 6
    assert metric(text, "tagmill_capture_queued") == 1  # what waits behind the stuck write
    assert metric(text, "tagmill_captured_total") == 0


def test_workers_write_apart_under_unique_names(bundle: str, tmp_path: Path) -> None:
    with ServerProcess(bundle, "--workers", "2", "--capture", str(tmp_path), "--capture-sample", "1",
                       "--capture-below", "0") as server:
        sent = photos(24, seed=80)
        for data in sent:  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=server.url, timeout=30) as client:
                assert client.post("/invocations", content=data, headers=X_IMAGE).status_code == 200
        with httpx.Client(base_url=server.url, timeout=30) as client:
            wait_for(lambda: metric(client.get("/metrics").text, "tagmill_captured_total") == 24, "captures")
    found = captured(tmp_path)
    assert len(found.images) == len(found.records) == 24 and sorted(found.images.values()) == sorted(sent)
    pids = {r["request"]["pid"] for r in found.records.values()}
    tokens = {name.split("-")[1] for name in found.images}
    assert len(pids) == len(tokens) == 2  # both workers captured, each under its own names
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # no temporary file left behind
    assert os.path.getsize(tmp_path / MARKER) > 0
