"""Scaling out on this machine: processes vs threads, and shards over the network.

    .venv/bin/python bench/scale.py [--images 600] [--size 128]

1. Training (the unfrozen stage, EfficientNet-Lite0 from ImageNet weights) through the
   real CLI: 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo), same
   global batch. images/s is read from the run's metrics.jsonl.
2. Reading a split as decoded tensors (what the data loader does), from local disk vs
   from a real S3 endpoint on loopback (moto's server): streamed with no cache, and
   through tagmill's shard cache (first epoch fills it, second epoch reads disk).
GPU throughput needs a GPU machine; see bench/README.md for what was measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(12, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=88)


def tagmill(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "tagmill", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def train_rate(dataset: str, out: Path, size: int, nproc: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = ["train", dataset, "--out", str(out), "--image-size", str(size), "--frozen-epochs", "0",
            "--epochs", "1", "--batch-size", "32", "--workers", "1"]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    tagmill(*args, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def read_rate(dataset: str, size: int, cache=None, epochs: int = 1) -> list[float]:
    from tagmill.dataset.torch_data import ShardDataset
    from tagmill.dataset.transforms import Preprocess, eval_transform

    data = ShardDataset(dataset, "train", eval_transform(Preprocess(input_size=size)), cache=cache)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = sum(1 for _ in data)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tagmill-scale-"))
    make_images(work / "src", args.images)
    local = str(work / "ds")
    tagmill("import", str(work / "src"), "--out", local, "--shard-size-mb", "4")

    rows: list[tuple[str, str, float]] = []
    print("training: 1 process x 2 threads ...", flush=True)
    rows.append(("train", "1 process x 2 threads (baseline)", train_rate(local, work / "r1", args.size, 1, 2)))
    print("training: 2 processes x 1 thread ...", flush=True)
    rows.append(("train", "2 processes x 1 thread (torchrun, gloo)", train_rate(local, work / "r2", args.size, 2, 1)))

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="bench")
        for path in Path(local).iterdir():
            s3.upload_file(str(path), "bench", f"ds/{path.name}")
        from tagmill.dataset.shard_cache import ShardCache

        print("reading shards ...", flush=True)
        rows.append(("read", "local disk (baseline)", read_rate(local, args.size)[0]))
        rows.append(("read", "S3 on loopback, streamed, no cache", read_rate("s3://bench/ds", args.size)[0]))
        cache = ShardCache(str(work / "cache"), 10**9)
        first, second = read_rate("s3://bench/ds", args.size, cache=cache, epochs=2)
        rows.append(("read", "S3 with shard cache, epoch 1 (fills it)", first))
        rows.append(("read", "S3 with shard cache, epoch 2 (disk)", second))
    finally:
        moto.terminate()

    print(f"\n{args.images} images, Lite0 at {args.size} px, {os.cpu_count()} cores\n")
    print(f"| {'what':<5} | {'configuration':<42} | {'images/s':>9} | {'vs baseline':>11} |")
    print(f"|{'-' * 7}|{'-' * 44}|{'-' * 11}|{'-' * 13}|")
    baseline: dict[str, float] = {}
    for group, label, rate in rows:
        baseline.setdefault(group, rate)
        print(f"| {group:<5} | {label:<42} | {rate:9.1f} | {rate / baseline[group]:10.2f}x |")


if __name__ == "__main__":
    main()
