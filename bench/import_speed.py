"""How fast `tagmill import` packs poster-sized JPEGs, and how fast the shards read back.

    .venv/bin/python bench/import_speed.py [--count 2000] [--workdir /tmp/tagmill-bench] [--import-only]

Generates COUNT JPEGs of 1000x1500 pixels (two classes, in folders), then measures:
  * `tagmill import` (the real CLI, in a subprocess) with resizing (default 320 px)
    on 1 worker and on every core, and with --no-resize;
  * reading every image back decoded to a uint8 CHW tensor: from the original folder
    with PIL (the baseline a hand-written PyTorch script uses) vs from the packed shards.
Prints a table of images/second and the ratio to each group's baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tagmill.dataset.manifest import load_manifest, shard_locations
from tagmill.dataset.shards import iter_shard

torch.set_num_threads(1)


def poster(seed: int, width: int = 1000, height: int = 1500) -> bytes:
    """A smooth, photo-like image (gradients + blobs + mild noise) compressing like a poster."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 50, width // 50, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, size=(height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def make_posters(root: Path, count: int) -> None:
    marker = root / f".complete-{count}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(count):
        folder = root / ("thriller" if i % 2 else "other")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(poster(i))
    marker.touch()


def time_import(source: Path, out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tagmill", "import", str(source), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def to_tensor(data: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def time_folder_read(root: Path) -> tuple[float, int]:
    files = sorted(root.rglob("*.jpg"))
    start = time.perf_counter()
    for path in files:
        to_tensor(path.read_bytes())
    return time.perf_counter() - start, len(files)


def time_shard_read(dataset: Path) -> tuple[float, int]:
    manifest = load_manifest(str(dataset))
    start = time.perf_counter()
    n = 0
    for split in manifest.splits:
        for shard in shard_locations(str(dataset), manifest, split):
            for sample in iter_shard(shard):
                to_tensor(sample.image)
                n += 1
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tagmill-bench"))
    parser.add_argument("--import-only", action="store_true", help="time the imports, skip reading back")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    source = args.workdir / f"posters-{args.count}"
    print(f"generating {args.count} JPEGs of 1000x1500 in {source} (cached between runs)...", flush=True)
    make_posters(source, args.count)
    size_mb = sum(p.stat().st_size for p in source.rglob("*.jpg")) / 1e6

    rows: list[tuple[str, str, float, float]] = []  # (group, what, seconds, images/s)
    n = args.count
    runs = [
        ("import", "resize to 320, 1 worker (baseline)", ["--workers", "1"], "ds-1"),
        ("import", f"resize to 320, {cores} workers", [], "ds-n"),
        ("import", f"--no-resize, {cores} workers", ["--no-resize"], "ds-full"),
    ]
    for group, label, extra, name in runs:
        seconds = time_import(source, args.workdir / name, *extra)
        rows.append((group, label, seconds, n / seconds))
    if not args.import_only:
        folder_s, folder_n = time_folder_read(source)
        rows.append(("read", "original folder, PIL (baseline)", folder_s, folder_n / folder_s))
        shard_s, shard_n = time_shard_read(args.workdir / "ds-n")
        rows.append(("read", "packed shards (320 px)", shard_s, shard_n / shard_s))
        full_s, full_n = time_shard_read(args.workdir / "ds-full")
        rows.append(("read", "packed shards (--no-resize)", full_s, full_n / full_s))

    print(f"\n{n} JPEGs, 1000x1500, {size_mb:,.0f} MB; {cores} cores; torch threads 1 for reads\n")
    print(f"| {'step':<6} | {'configuration':<36} | {'seconds':>8} | {'images/s':>9} | {'vs baseline':>11} |")
    print(f"|{'-' * 8}|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 13}|")
    baseline: dict[str, float] = {}
    for group, label, seconds, rate in rows:
        baseline.setdefault(group, rate)
        print(f"| {group:<6} | {label:<36} | {seconds:8.1f} | {rate:9.1f} | {rate / baseline[group]:10.2f}x |")


if __name__ == "__main__":
    main()
