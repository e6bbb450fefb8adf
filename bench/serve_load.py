"""Served throughput and latency against the model's in-process ceiling.

    .venv/bin/python bench/serve_load.py [--bundle DIR] [--workers 2] [--duration 10]

Without ``--bundle`` it builds, once, a pretrained EfficientNet-Lite0 bundle at 224 px
(257 classes, like Caltech-256; with model.onnx) under ``--workdir``.

For each backend (torch, onnx) it measures:
  * the ceiling: WORKERS processes with one thread each, ``Predictor.predict_bytes``
    in a loop on the same JPEGs (decoding included), one image per call and 16 per
    call; the better of the two is the ceiling;
  * the server (``python -m tagmill.serve``, WORKERS workers x 1 thread) with the
    backend's default max_batch, 16 and 1 (batching off), driven from this process over loopback
    HTTP/1.1 keep-alive by an asyncio load generator at concurrency 1, 8 and 32,
    bounded in requests and in time;
and, for torch, stock ``uvicorn --workers`` serving the same app (one shared socket,
TCP_NODELAY off) to show what tagmill's own worker startup changes.

``--paired ROUNDS`` measures the backends against each other instead: each one's server
with its default batching at the last ``--concurrency`` level, ROUNDS times in rotating
order, then each round's images/s over the first backend's (mean, 95% t-interval), the
same for the server's CPU per image (all its processes, user + system; the first backend's
over each one's), the load generator's own CPU per image, and the server's total RSS
(every process summed) when idle and its peak under the load:
``--backends onnx,onnx-int8 --concurrency 32 --paired 5`` is what INT8 gains when served.

``--swap`` measures model swaps under load instead: a server on bundle A (with 1 and
with WORKERS workers), concurrency 32 for ``--swap-duration`` seconds, and meanwhile
``--swaps`` admin calls switching A -> B -> A ... (B: the same network with its
classifier's biases nudged, so other weights and another version). It counts failed
requests and shows which version answered, in the order the answers came.

``--capture`` measures ``serve --capture`` instead: the same server (WORKERS workers,
the backends' default batching) at concurrency 32 without capture, capturing into a
local folder, and capturing into S3 (a moto server started on loopback, which shares
the CPU too), alternated ``--capture-rounds`` times so that drift in the machine's load
falls on every configuration alike. The bundle's random head makes every answer
unsure, so with the default ``--capture-below 0.6`` every image is captured: the worst
case. It reports images/s, p50/p99, errors, and the captured and dropped counts and
bytes from /metrics (counted over the measured load: a few warm-up items still queued
when it starts are among them), the server's CPU time per request (all its processes:
a shared machine blurs it far less than throughput), the CPU moto's process used
meanwhile (in cores: on this machine the S3 endpoint competes with the server for the
same two cores) and the capture writer processes' share of it (in cores), then a
summary: each capturing run against the no-capture run of its round.
On a machine with more cores, ``--cpus server=0-1,endpoint=2-3,load=4-7`` keeps the
S3 endpoint and the load generator off the server's cores (as a real S3 and real
clients would be), so only what capturing costs the server itself is measured.
``--capture-below``/``--capture-sample`` set the server's: ``--capture-below 0
--capture-sample 0.05`` is a realistic 5% capture.

Prints one table: images/s, p50/p99 latency, errors, mean batch size (from the
server's /metrics), how the open connections were spread over the worker processes
(seen with ``ss`` half-way through) and the ratio to the ceiling. The load generator shares the CPU
with the server, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tagmill.serve.config import AUTO_MAX_BATCH

CONCURRENCY = (1, 8, 32)
IMAGE_COUNT = 48
SWAP_CONCURRENCY = 32
API_KEY = "bench-admin"
#: --cpus: the CPUs ("0-1") the server, the S3 endpoint and the load generator run on, by role
PINNED: dict[str, str] = {}


def pinned(role: str, command: list[str]) -> list[str]:
    """``command``, run on the CPUs ``--cpus`` gave ``role`` (its children inherit them)."""
    return ["taskset", "-c", PINNED[role], *command] if role in PINNED else command


# --- inputs -----------------------------------------------------------------------


def photo(seed: int) -> bytes:
    """A smooth, photo-like JPEG of 300-800 px a side (gradients, blobs, mild noise)."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(300, 801, size=2))
    small = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-10, 10, size=(height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def lite0_bundle(workdir: Path) -> str:
    out = workdir / "lite0-224-bundle"
    if (out / "model.json").exists() and (out / "model.onnx").exists():
        return str(out)
    from tagmill.bundle import BundleMeta, save_bundle
    from tagmill.dataset.transforms import Preprocess
    from tagmill.models import create_classifier

    print(f"building a pretrained Lite0 bundle in {out} (once) ...", flush=True)
    classes = tuple(f"class{i:03d}" for i in range(257))
    model = create_classifier("efficientnet_lite0", len(classes), pretrained=True)
    meta = BundleMeta(architecture="tf_efficientnet_lite0", task="single", classes=classes,
                      preprocess=Preprocess(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic"))
    shutil.rmtree(out, ignore_errors=True)
    return save_bundle(str(out), model, meta, onnx=True)


# --- the ceiling: the model in-process, no HTTP --------------------------------------


def split_variant(name: str) -> tuple[str, str]:
    """``--backends`` entries: "torch", "onnx" (its fp32 graph) or "onnx-int8" (the
    bundle's INT8 graph, from ``tagmill export --int8``) -> (backend, precision)."""
    backend, _, precision = name.partition("-")
    return backend, precision or "fp32"


def _ceiling_worker(bundle: str, backend: str, per_call: int, seconds: float, photos: list[bytes],
                    barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    import torch

    from tagmill.bundle import Predictor

    torch.set_num_threads(1)
    backend, precision = split_variant(backend)
    predictor = Predictor.from_bundle(bundle, backend, intra_op_threads=1, batch_size=max(per_call, 1), precision=precision)
    predictor.predict_bytes(photos[:per_call])  # warm-up
    barrier.wait()
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = [photos[(i + k) % len(photos)] for k in range(per_call)]
        predictor.predict_bytes(batch)
        done += per_call
        i += per_call
    results.put(done / (time.perf_counter() - start))


def ceiling(bundle: str, backend: str, per_call: int, processes: int, seconds: float, photos: list[bytes]) -> float:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_worker, args=(bundle, backend, per_call, seconds, photos, barrier, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
        if "server" in PINNED:  # the model's speed on the server's CPUs (still importing: pinned in time)
            os.sched_setaffinity(p.pid, cpu_list(PINNED["server"]))
    rates = [results.get(timeout=seconds + 180) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


# --- the server -----------------------------------------------------------------------


def cpu_list(spec: str) -> set[int]:
    """The CPUs of a taskset list: "0-1,4" -> {0, 1, 4}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m tagmill.serve`` (or, with ``stock=True``, plain ``uvicorn --workers``
    on the same app factory) in a subprocess."""

    def __init__(self, bundle: str, *, backend: str, max_batch: int, workers: int, stock: bool = False,
                 precision: str = "fp32", extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.metrics_dir: str | None = None
        if stock:
            from tagmill.serve.config import ServeConfig

            config = ServeConfig(bundle=bundle, backend=backend, max_batch=max_batch, port=self.port, precision=precision)
            self.metrics_dir = tempfile.mkdtemp(prefix="bench-metrics-")
            self.env.update(TAGMILL_SERVE_CONFIG=config.to_json(), PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
            self.command = [sys.executable, "-m", "uvicorn", "tagmill.serve.server:app_from_env", "--factory",
                            "--workers", str(workers), "--port", str(self.port), "--log-level", "warning",
                            "--no-access-log", "--timeout-worker-healthcheck", "60"]
        else:
            self.command = [sys.executable, "-m", "tagmill.serve", bundle, "--port", str(self.port),
                            "--workers", str(workers), "--threads", "1", "--backend", backend,
                            *(["--precision", precision] if backend == "onnx" else []),
                            "--max-batch", str(max_batch), "--log-level", "warning", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(pinned("server", self.command), env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                # every worker must be ready: ask a few times over fresh connections
                if all(httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200 for _ in range(6)):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise TimeoutError("the server did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def connections_per_worker(self) -> str:
        """Established connections per server process, e.g. "16/16" (Linux ``ss``)."""
        try:
            out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{self.port} )"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "-"
        counts: dict[str, int] = {}
        for pid in re.findall(r"pid=(\d+)", out):
            counts[pid] = counts.get(pid, 0) + 1
        return "/".join(str(n) for n in sorted(counts.values(), reverse=True)) or "-"

    def metric_totals(self, *names: str) -> dict[str, float]:
        """The sum of every sample of each metric (all labels, all workers)."""
        totals = dict.fromkeys(names, 0.0)
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            if name in totals:
                totals[name] += float(line.split()[-1])
        return totals

    def batch_totals(self) -> tuple[float, float]:
        """(forward passes, images) so far, over every worker."""
        passes = images = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("tagmill_batch_size_count"):
                passes += float(line.split()[-1])
            elif line.startswith("tagmill_batch_size_sum"):
                images += float(line.split()[-1])
        return passes, images


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def drive(url: str, photos: list[bytes], concurrency: int, seconds: float, max_requests: int,
                versions: list[str] | None = None, headers: str = "") -> LoadResult:
    """``concurrency`` clients, each on its own keep-alive connection, posting JPEGs
    back to back; stops at ``seconds`` or ``max_requests``, whichever comes first.
    ``versions`` collects each answer's X-Model-Version in the order answers arrive
    ("failed" for a failed request); ``headers``: extra header lines.

    A minimal HTTP/1.1 client on asyncio streams: it shares the CPU with the server,
    so it should cost far less per request than the server does (httpx costs ~1 ms)."""
    host, port = url.removeprefix("http://").split(":")
    requests = [
        (f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-image\r\n{headers}"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in photos
    ]
    latencies: list[float] = []
    errors = 0
    issued = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def one_client(offset: int) -> None:
        nonlocal errors, issued
        reader, writer = await asyncio.open_connection(host, int(port))
        i = offset
        try:
            while time.perf_counter() < stop_at and issued < max_requests:
                issued += 1
                sent = time.perf_counter()
                writer.write(requests[i % len(requests)])
                i += concurrency
                version = "failed"
                try:
                    status, body, version = await _read_response(reader)
                    ok = status == 200 and body.startswith(b"[")
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                latencies.append(time.perf_counter() - sent)
                errors += not ok
                if versions is not None:
                    versions.append(version if ok else "failed")
                if not ok:  # start over on a fresh connection
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    return LoadResult(len(latencies), errors, time.perf_counter() - start, latencies)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
    """(status, body, X-Model-Version or "")."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, await reader.readexactly(int(fields["content-length"])), fields.get("x-model-version", "")


# --- swaps under load -------------------------------------------------------------------


def second_version(bundle: str, workdir: Path) -> str:
    """Bundle B: ``bundle``'s network with its classifier's biases nudged, so other
    weights and another version, and nearly the same answers; built once."""
    out = workdir / f"{Path(bundle).name}-b"
    if (out / "model.json").exists():
        return str(out)
    import torch

    from tagmill.bundle.format import load_bundle, save_bundle

    print(f"building bundle B in {out} (once) ...", flush=True)
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.get_classifier().bias.add_(0.01)
    shutil.rmtree(out, ignore_errors=True)
    return save_bundle(str(out), model, meta, onnx=meta.onnx_sha256 is not None)


#: runs of one version shorter than this, side by side, are shown as one mixed stretch:
#: while several workers swap one after the other, both versions answer, interleaved
MIXED_RUN = 10


def version_runs(versions: list[str], names: dict[str, str]) -> str:
    """Answers in arrival order as runs: "A 412 > A/B 57 > B 380 > ..." (A/B: both
    versions interleaved, while the workers swap one at a time)."""
    runs: list[list[Any]] = []
    for version in versions:
        name = names.get(version, version)
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    merged: list[list[Any]] = []
    for name, count in runs:
        if count < MIXED_RUN:
            name = "/".join(sorted(set(names.values())))
        if merged and merged[-1][0] == name:
            merged[-1][1] += count
        else:
            merged.append([name, count])
    return " > ".join(f"{name} {count}" for name, count in merged)


def swap_under_load(bundle_a: str, bundle_b: str, backend: str, workers: int, swaps: int, seconds: float,
                    photos: list[bytes]) -> list[str]:
    """One server on A, SWAP_CONCURRENCY clients for ``seconds``, ``swaps`` admin swaps
    evenly spread over them (A -> B -> A ...). Returns the table row."""
    kind, precision = split_variant(backend)
    with Server(bundle_a, backend=kind, max_batch=AUTO_MAX_BATCH[kind], workers=workers, precision=precision,
                extra=("--api-key", API_KEY)) as server:
        asyncio.run(drive(server.url, photos, 8, 3.0, 10**6))  # warm-up, not counted
        names = {httpx.get(f"{server.url}/readyz", timeout=10).json()["model_version"]: "A"}
        done: list[tuple[int, float, str]] = []  # (status, seconds, answer)

        def swapper() -> None:
            # at fixed times from the start, so the swaps' own durations do not push the
            # last ones past the end of the load
            start, interval = time.monotonic(), seconds / (swaps + 1)
            with httpx.Client(base_url=server.url, headers={"X-Api-Key": API_KEY}, timeout=600) as admin:
                for index in range(swaps):
                    time.sleep(max(0.0, start + (index + 1) * interval - time.monotonic()))
                    target = bundle_b if index % 2 == 0 else bundle_a
                    asked = time.perf_counter()
                    response = admin.post("/admin/model", json={"bundle": target})
                    done.append((response.status_code, time.perf_counter() - asked, response.text))
                    print(f"  swap {index + 1} at {time.monotonic() - start:.1f} s: {response.status_code} "
                          f"{response.text} in {done[-1][1]:.2f} s", flush=True)
                    if response.status_code == 200:
                        names.setdefault(response.json()["version"], "B")

        versions: list[str] = []
        with ThreadPoolExecutor(1) as pool:
            swapping = pool.submit(swapper)
            result = asyncio.run(drive(server.url, photos, SWAP_CONCURRENCY, seconds, 10**9, versions,
                                       headers=f"X-Api-Key: {API_KEY}\r\n"))
            swapping.result()
    for status, _, text in done:
        if status != 200:
            print(f"swap answered {status}: {text}", flush=True)
    ok = sum(status == 200 for status, _, _ in done)
    mean_swap = sum(s for _, s, _ in done) / len(done) if done else float("nan")
    return [backend, str(workers), str(SWAP_CONCURRENCY), str(result.requests), str(result.errors),
            f"{result.rate:.1f}", f"{result.percentile(0.5):.0f}", f"{result.percentile(0.99):.0f}",
            f"{max(result.latencies) * 1000:.0f}", f"{ok}/{len(done)}", f"{mean_swap:.1f}",
            version_runs(versions, names)]


# --- capture under load -----------------------------------------------------------------

CAPTURE_CONCURRENCY = 32
CAPTURE_METRICS = ("tagmill_captured_total", "tagmill_capture_dropped_total", "tagmill_capture_bytes_total")
#: botocore pointed at the moto server with dummy keys, away from any AWS config here
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def process_cpu_seconds(pid: int, tree: bool = True) -> float:
    """CPU time (user + system) a process has used so far, with its live descendants'
    (Linux /proc): the server's cost per image, which a busy shared machine blurs far
    less than it blurs throughput."""
    return sum(map(_cpu_seconds, process_tree(pid) if tree else [pid]))


def tree_rss_mb(pid: int) -> float:
    """The resident memory of a process and its live descendants, summed (MB): what
    "total RSS" means for a server of several processes (shared pages count in each)."""
    return sum(map(_rss_mb, process_tree(pid)))


def process_tree(pid: int) -> list[int]:
    """A process and its live descendants (none of them if it is gone)."""
    try:
        children = child_pids(pid)
    except OSError:
        return []
    return [pid, *(p for child in children for p in process_tree(child))]


def child_pids(pid: int) -> list[int]:
    """A process's live children. Each thread lists the children it started (a capture
    writer restarted by its sender thread is not the main thread's). OSError: it is gone."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    try:
        return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


class PeakRSS:
    """The largest :func:`tree_rss_mb` of a server, sampled every 0.2 s while in the block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb = pid, tree_rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def writer_cpu_seconds(pid: int) -> float:
    """CPU time of the capture writer processes under ``pid`` (serve/capture_writer.py)."""
    return sum(_cpu_seconds(p) for p in process_tree(pid)[1:] if _is_writer(p))


def _is_writer(pid: int) -> bool:
    try:
        return b"tagmill.serve.capture_writer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class MotoS3:
    """moto's S3 server on a loopback port, in a subprocess (``moto[server]``, a dev dependency)."""

    def __enter__(self) -> MotoS3:
        executable = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if executable is None:
            raise SystemExit("moto_server is not installed (make install: moto[server] is a dev dependency)")
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.process = subprocess.Popen(pinned("endpoint", [executable, "-H", "127.0.0.1", "-p", str(port)]),
                                        env={**os.environ, **self.env},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("moto_server did not start")

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def capture_run(bundle: str, backend: str, workers: int, target: str | None, seconds: float, max_requests: int,
                photos: list[bytes], s3: MotoS3, options: tuple[str, ...] = ()) -> list[str]:
    """One server (capturing into ``target`` with ``options``, or not), CAPTURE_CONCURRENCY
    clients: the table row."""
    kind, precision = split_variant(backend)
    extra = ("--capture", target, *options) if target else ()
    with Server(bundle, backend=kind, max_batch=AUTO_MAX_BATCH[kind], workers=workers, precision=precision,
                extra=extra, env=s3.env) as server:
        asyncio.run(drive(server.url, photos, 8, 3.0, 10**6))  # warm-up, not counted
        before = server.metric_totals(*CAPTURE_METRICS)
        assert server.process is not None
        moto_before, server_before = s3.cpu_seconds(), process_cpu_seconds(server.process.pid)
        writer_before = writer_cpu_seconds(server.process.pid)
        result = asyncio.run(drive(server.url, photos, CAPTURE_CONCURRENCY, seconds, max_requests))
        moto_cpu = s3.cpu_seconds() - moto_before
        server_cpu = process_cpu_seconds(server.process.pid) - server_before
        writer_cpu = writer_cpu_seconds(server.process.pid) - writer_before
        after = server.metric_totals(*CAPTURE_METRICS)
    captured, dropped, stored = (after[name] - before[name] for name in CAPTURE_METRICS)
    where = "no capture" if target is None else ("capture to S3 (moto)" if target.startswith("s3://") else "capture to local dir")
    return [backend, where, str(workers), str(CAPTURE_CONCURRENCY), str(result.requests), f"{result.rate:.1f}",
            f"{result.percentile(0.5):.0f}", f"{result.percentile(0.99):.0f}", str(result.errors),
            f"{server_cpu / max(result.requests, 1) * 1000:.1f}",
            "-" if target is None else f"{captured:.0f}", "-" if target is None else f"{dropped:.0f}",
            "-" if target is None else f"{stored / 1e6:.1f}", f"{moto_cpu / result.seconds:.3f}",
            "-" if target is None else f"{writer_cpu / result.seconds:.3f}"]


def capture_under_load(bundle: str, backends: list[str], workers: int, rounds: int, seconds: float,
                       max_requests: int, photos: list[bytes], workdir: Path,
                       options: tuple[str, ...] = ()) -> list[list[str]]:
    rows = []
    with MotoS3() as s3:
        for round_ in range(rounds):
            for backend in backends:
                # each round starts at the next configuration, so slow drift of the
                # machine's speed does not fall on one configuration more than another
                for target in CAPTURE_TARGETS[round_ % 3:] + CAPTURE_TARGETS[:round_ % 3]:
                    folder = None
                    if target == "local":
                        folder = tempfile.mkdtemp(prefix="capture-", dir=workdir)
                        where: str | None = folder
                    elif target == "s3":
                        where = f"s3://{s3.bucket(f'capture-{round_}-{backend}')}/capture"
                    else:
                        where = None
                    try:
                        rows.append(capture_run(bundle, backend, workers, where, seconds, max_requests, photos,
                                                s3, options))
                    finally:
                        if folder:
                            shutil.rmtree(folder, ignore_errors=True)
                    print(rows[-1], flush=True)
    return rows


CAPTURE_TARGETS = ("none", "local", "s3")


def capture_summary(rows: list[list[str]]) -> list[list[str]]:
    """Per backend and capture target, across the rounds: images/s, and the ratio of each
    round's images/s (and p50, p99) to the no-capture run of the same round, as a mean with
    its 95% t-interval. The rounds pair runs made minutes apart, so the host's slow
    spells, which move every configuration of a round alike, drop out of the ratio;
    an interval that holds 1.00 means no cost this many rounds can tell from noise."""
    out = []
    for backend in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == backend]
        base = [row for row in mine if row[1] == "no capture"]
        for where in dict.fromkeys(row[1] for row in mine):
            runs = [row for row in mine if row[1] == where]
            rate = np.array([float(row[5]) for row in runs])
            line = [backend, where, str(len(runs)), f"{rate.mean():.1f}", f"{rate.min():.1f}-{rate.max():.1f}"]
            if where == "no capture" or len(runs) != len(base):
                out.append(line + ["-", "-", "-"])
                continue
            for column in (5, 6, 7):  # images/s, p50, p99
                line.append(mean_interval([float(r[column]) / float(b[column]) for r, b in zip(runs, base)]))
            out.append(line)
    return out


def mean_interval(values: list[float]) -> str:
    """"mean (low-high)": the mean and its 95% t-interval."""
    from scipy import stats

    ratio = np.array(values)
    half = stats.t.ppf(0.975, len(ratio) - 1) * ratio.std(ddof=1) / np.sqrt(len(ratio)) if len(ratio) > 1 else np.nan
    return f"{ratio.mean():.3f} ({ratio.mean() - half:.3f}-{ratio.mean() + half:.3f})"


def paired_runs(bundle: str, backends: list[str], workers: int, rounds: int, concurrency: int, seconds: float,
                max_requests: int, photos: list[bytes]) -> list[list[str]]:
    """Each backend's server with its default batching, ``rounds`` times, the order rotating
    each round: one row per run."""
    rows = []
    for round_ in range(rounds):
        for backend in backends[round_ % len(backends):] + backends[:round_ % len(backends)]:
            kind, precision = split_variant(backend)
            with Server(bundle, backend=kind, max_batch=AUTO_MAX_BATCH[kind], workers=workers,
                        precision=precision) as server:
                assert server.process is not None
                idle_mb = tree_rss_mb(server.process.pid)
                with PeakRSS(server.process.pid) as memory:
                    asyncio.run(drive(server.url, photos, 8, 3.0, 10**6))  # warm-up, not counted
                    # the load generator's CPU: this process's, its RSS sampling thread included
                    server_before = process_cpu_seconds(server.process.pid)
                    load_before = process_cpu_seconds(os.getpid(), tree=False)
                    result = asyncio.run(drive(server.url, photos, concurrency, seconds, max_requests))
                    server_cpu = process_cpu_seconds(server.process.pid) - server_before
                    load_cpu = process_cpu_seconds(os.getpid(), tree=False) - load_before
            per_image = 1000 / max(result.requests, 1)  # ms per request of one image
            rows.append([str(round_ + 1), backend, str(concurrency), str(result.requests), f"{result.rate:.1f}",
                         f"{result.percentile(0.5):.0f}", f"{result.percentile(0.99):.0f}", str(result.errors),
                         f"{idle_mb:.0f}", f"{memory.peak_mb:.0f}", f"{server_cpu * per_image:.2f}",
                         f"{load_cpu * per_image:.3f}"])
            print(rows[-1], flush=True)
    return rows


def paired_summary(rows: list[list[str]], backends: list[str]) -> list[list[str]]:
    """Per backend: images/s across the rounds, and each round's images/s over the first
    backend's in the same round (mean, 95% t-interval): a slow spell of the host moves
    both runs of a round alike and drops out of the ratio. Then the same for the server's
    CPU per image, as the first backend's over this one's (above 1: cheaper), which the
    load generator's share of the CPU and other jobs on the host blur less."""
    base = {row[0]: float(row[4]) for row in rows if row[1] == backends[0]}
    base_cpu = {row[0]: float(row[10]) for row in rows if row[1] == backends[0]}
    out = []
    for backend in backends:
        runs = [row for row in rows if row[1] == backend]
        rate = np.array([float(row[4]) for row in runs])
        out.append([backend, str(len(runs)), f"{rate.mean():.1f}", f"{rate.min():.1f}-{rate.max():.1f}",
                    mean_interval([float(row[4]) / base[row[0]] for row in runs]),
                    f"{np.mean([float(row[10]) for row in runs]):.2f}",
                    mean_interval([base_cpu[row[0]] / float(row[10]) for row in runs]),
                    f"{np.mean([float(row[11]) for row in runs]):.3f}",
                    str(sum(int(row[7]) for row in runs)), f"{max(float(row[9]) for row in runs):.0f}"])
    return out


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


# --- the run ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a bundle with model.onnx (default: build a pretrained Lite0 one)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tagmill-serve-bench"))
    parser.add_argument("--workers", type=int, help="server workers (default: one per CPU it may use)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level")
    parser.add_argument("--max-requests", type=int, default=3000, help="requests per load level, at most")
    parser.add_argument("--backends", default="torch,onnx",
                        help="comma-separated: torch, onnx (fp32 graph), onnx-int8 (needs `tagmill export --int8`)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="load levels, comma-separated")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="instead: each backend's default server at the last --concurrency, ROUNDS times "
                             "in rotating order, and its images/s over the first backend's of each round")
    parser.add_argument("--swap", action="store_true", help="measure model swaps under load instead (see above)")
    parser.add_argument("--swaps", type=int, default=6, help="with --swap: admin swaps per run (A -> B -> A ...)")
    parser.add_argument("--swap-duration", type=float, default=30.0, help="with --swap: seconds of load per run")
    parser.add_argument("--capture", action="store_true", help="measure serve --capture under load instead (see above)")
    parser.add_argument("--capture-rounds", type=int, default=2,
                        help="with --capture: times the three configurations are run, alternated")
    parser.add_argument("--capture-below", type=float, default=0.6, help="with --capture: the server's --capture-below")
    parser.add_argument("--capture-sample", type=float, default=0.0, help="with --capture: the server's --capture-sample")
    parser.add_argument("--cpus", default="",
                        help="pin by role, e.g. server=0-1,endpoint=2-3,load=4-7 (each a CPU or a range): the server, "
                             "the S3 endpoint (moto) and this process (the load generator); default: not pinned")
    args = parser.parse_args()
    for part in filter(None, args.cpus.split(",")):
        role, _, cpus = part.partition("=")
        if role not in ("server", "endpoint", "load") or not cpus:
            parser.error(f"--cpus: {part!r} is not ROLE=CPUS with ROLE server, endpoint or load")
        PINNED[role] = cpus
    if "load" in PINNED:
        os.sched_setaffinity(0, cpu_list(PINNED["load"]))
    if args.workers is None:
        args.workers = len(cpu_list(PINNED["server"])) if "server" in PINNED else os.cpu_count() or 1

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or lite0_bundle(workdir)
    photos = [photo(seed) for seed in range(IMAGE_COUNT)]
    kb = sum(map(len, photos)) / len(photos) / 1024
    print(f"bundle {bundle}; {len(photos)} JPEGs of 300-800 px (mean {kb:.0f} KB); "
          f"{args.workers} workers x 1 thread; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}"
          + (f"; pinned: {args.cpus}" if PINNED else ""),
          flush=True)

    if args.capture:
        options = ("--capture-below", str(args.capture_below), "--capture-sample", str(args.capture_sample))
        print(f"capture options: {' '.join(options)}", flush=True)
        rows = capture_under_load(bundle, args.backends.split(","), args.workers, args.capture_rounds, args.duration,
                                  args.max_requests, photos, workdir, options)
        header = ["backend", "configuration", "workers", "concurrency", "requests", "images/s", "p50 ms", "p99 ms",
                  "errors", "server CPU ms/image", "captured", "dropped", "MB stored", "moto CPU (cores)",
                  "writers' CPU (cores)"]
        print_table(header, rows)
        print_table(["backend", "configuration", "rounds", "images/s, mean", "range",
                     "images/s vs no capture (95% interval)", "p50 vs no capture", "p99 vs no capture"],
                    capture_summary(rows))
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        (workdir / "capture_results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        return

    if args.paired:
        backends, concurrency = args.backends.split(","), int(args.concurrency.split(",")[-1])
        rows = paired_runs(bundle, backends, args.workers, args.paired, concurrency, args.duration,
                           args.max_requests, photos)
        header = ["round", "backend", "concurrency", "requests", "images/s", "p50 ms", "p99 ms", "errors",
                  "RSS idle MB", "RSS peak MB", "server CPU ms/image", "load CPU ms/image"]
        print_table(header, rows)
        print_table(["backend", "rounds", "images/s, mean", "range", f"images/s vs {backends[0]} (95% interval)",
                     "server CPU ms/image", f"{backends[0]}'s CPU / this (95% interval)", "load CPU ms/image",
                     "errors", "RSS peak MB, largest"], paired_summary(rows, backends))
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        (workdir / "paired_results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        return

    if args.swap:
        bundle_b = second_version(bundle, workdir)
        rows = []
        for backend in args.backends.split(","):
            for workers in sorted({1, args.workers}):
                rows.append(swap_under_load(bundle, bundle_b, backend, workers, args.swaps, args.swap_duration, photos))
                print(rows[-1], flush=True)
        header = ["backend", "workers", "concurrency", "requests", "failed", "images/s", "p50 ms", "p99 ms",
                  "max ms", "swaps ok", "s per swap", "answering version, in arrival order"]
        print_table(header, rows)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        (workdir / "swap_results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        return

    rows: list[list[str]] = []
    for backend in args.backends.split(","):
        ceilings = {n: ceiling(bundle, backend, n, args.workers, 8.0, photos) for n in (1, 16)}
        best = max(ceilings.values())
        for n, rate in ceilings.items():
            rows.append([backend, f"in-process, {n}/call", "-", "-", f"{rate:.1f}", "-", "-", "-", "-", "-",
                         f"{rate / best:.2f}"])
            print(rows[-1], flush=True)
        default = AUTO_MAX_BATCH[split_variant(backend)[0]]
        variants = [(f"batching {'off' if n == 1 else 'on'} ({n}){' [default]' if n == default else ''}", n, False)
                    for n in dict.fromkeys((default, 16, 1))]
        if backend == "torch":
            variants.append(("batching off, stock uvicorn --workers", 1, True))
        for label, max_batch, stock in variants:
            kind, precision = split_variant(backend)
            with Server(bundle, backend=kind, max_batch=max_batch, workers=args.workers, stock=stock,
                        precision=precision) as server:
                asyncio.run(drive(server.url, photos, 8, 3.0, 10**6))  # warm-up, not counted
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    before = server.batch_totals()
                    with ThreadPoolExecutor(1) as pool:  # look at the connections mid-run
                        spread = pool.submit(lambda: (time.sleep(args.duration / 2), server.connections_per_worker())[1])
                        result = asyncio.run(drive(server.url, photos, concurrency, args.duration, args.max_requests))
                    after = server.batch_totals()
                    passes, images = after[0] - before[0], after[1] - before[1]
                    rows.append([backend, f"server, {label}", str(concurrency), str(result.requests),
                                 f"{result.rate:.1f}", f"{result.percentile(0.5):.0f}",
                                 f"{result.percentile(0.99):.0f}", str(result.errors),
                                 f"{images / passes:.1f}" if passes else "-", spread.result(), f"{result.rate / best:.2f}"])
                    print(rows[-1], flush=True)

    header = ["backend", "configuration", "concurrency", "requests", "images/s", "p50 ms", "p99 ms", "errors",
              "mean batch", "conns/worker", "vs ceiling"]
    print_table(header, rows)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    (workdir / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
