"""Does the cost per image stay flat from 10k to 250k images, and memory with it?

    .venv/bin/python bench/scale_data.py [--sizes 10000,50000,250000] [--work /tmp/tagmill-scale]
                                         [--torchrun-at 50000] [--out bench/results/scale_data.json]
    make bench-scale

Data: a procedurally generated multi-label set shaped like a film-stills tagging job: 183 tags, each image
showing 1-4 of them. Every tag is a fixed random 8x8 colour pattern placed at a random
spot of a 64x64 canvas with noise, saved as a small JPEG, so that decoding and the
model stay cheap and what grows with the data is tagmill's own bookkeeping. The first
N images of one seeded stream make the set of size N (the sets nest), listed in a CSV
``id,tags`` (tags separated by spaces). Built once per size into --work.

Steps, each the real command in a subprocess (start-up included), timed with
time.perf_counter, its whole process tree's memory sampled every 0.2 s (peak of the
sum, workers included; RSS, and PSS, which counts a page shared by several processes
once in all — the RSS sum counts it once per process; and anonymous PSS, the processes'
own data without library or feature-cache file pages, which neither other processes on
the machine nor the cache's size move: see ``anon_pss``):

  import    ``tagmill import CSV --images DIR --out DS`` (64-px images stay as they are)
  train     ``tagmill train DS --backbone test_efficientnet --image-size 64 --epochs 1``
            (timm's tiny test network, its seeded random weights filed as pretrained ones
            in a Hugging Face cache made here): caching features, the converged head, one
            whole-network epoch and the final evaluation; the stages' own seconds come from
            metrics.jsonl (the head row counts caching and the head fit, the unfrozen row
            one epoch with its validation) and the final evaluation is the rest
  export    ``tagmill export RUN --out BUNDLE``
  predict   ``tagmill predict BUNDLE DS --split val --jsonl F``

Per size: seconds and ms per image for each step (per image for import, per training
image for the train stages, the final evaluation included: multi-label threshold tuning
makes it a pass over train; per validation image for predict), peak RSS (the sum over
the process tree: pages that data-loader workers share with their parent count once per
process), the train run's feature cache
size on disk (RSS of train minus it is what must not grow), and the shard bytes each
rank read in the fine-tuning epoch against the train split's size on disk. Then the
growth ratio of every per-image cost and of RSS from the smallest size to the largest.

``--torchrun-at N`` repeats the train step at size N with ``--nproc 2`` (gloo, 1
thread each) and prints each rank's bytes read: about half the data each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TAGMILL = [sys.executable, "-m", "tagmill"]
TAGS = 183
SIDE = 64  #: image side in pixels
PATCH = 8  #: a tag's pattern side
SEED = 0
DEFAULT_WORK = Path("/tmp/tagmill-scale")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


# --- data ---------------------------------------------------------------------------------------


def build(size: int, work: Path) -> tuple[Path, Path]:
    """The CSV and image folder of the first ``size`` images (built once, reused)."""
    root = work / f"data-{size}"
    csv_path, images = root / "tags.csv", root / "images"
    if csv_path.exists():
        return csv_path, images
    if root.exists():
        shutil.rmtree(root)
    images.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    patterns = rng.integers(0, 256, size=(TAGS, PATCH, PATCH, 3)).astype(np.int16)  # one per tag
    names = [f"tag{t:03d}" for t in range(TAGS)]
    rows = []
    for i in range(size):
        count = int(rng.integers(1, 5))
        tags = sorted(rng.choice(TAGS, size=count, replace=False).tolist())
        canvas = rng.integers(90, 166, size=(SIDE, SIDE, 3)).astype(np.int16)  # grey noise
        for t in tags:
            y, x = rng.integers(0, SIDE - PATCH, size=2)
            canvas[y:y + PATCH, x:x + PATCH] = patterns[t]
        name = f"{i // 10000:03d}/{i:07d}.jpg"  # 10k files per folder
        (images / name).parent.mkdir(exist_ok=True)
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(images / name, quality=90)
        rows.append((name, " ".join(names[t] for t in tags)))
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "tags"])
        writer.writerows(rows)
    tmp.rename(csv_path)
    return csv_path, images


def pretend_pretrained(work: Path) -> None:
    """Seeded random weights for the tiny backbone, filed in a Hugging Face cache as its
    pretrained ones: training then takes the path a pretrained backbone takes (feature
    cache, converged head). What the weights know does not matter here; the cost does."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    cache = work / "hf" / "hub"
    ENV["HF_HUB_CACHE"] = str(cache)
    repo = cache / "models--timm--test_efficientnet.r160_in1k"
    if (repo / "refs" / "main").exists():
        return
    torch.manual_seed(SEED)
    save_for_hf(timm.create_model("test_efficientnet", pretrained=False), str(repo / "snapshots" / "bench"),
                safe_serialization=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("bench")


# --- measuring ----------------------------------------------------------------------------------


def run_measured(args: list[str], log: Path) -> dict[str, Any]:
    """Run ``args``; wall seconds and the peak RSS of its process tree (sampled)."""
    import psutil

    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        peak = peak_pss = peak_anon = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_pss, peak_anon
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                try:
                    tree = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
                    peak = max(peak, sum(p.memory_info().rss for p in tree))
                    # PSS shares each page among the processes mapping it: forked loader
                    # workers no longer count their parent's pages (or the mapped cache) again
                    peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
                    peak_anon = max(peak_anon, sum(anon_pss(p.pid) for p in tree))
                except (psutil.Error, OSError):
                    pass
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({code}); see {log}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "peak_pss_mb": peak_pss / 2**20,
            "peak_anon_pss_mb": peak_anon / 2**20}


def anon_pss(pid: int) -> int:
    """Bytes of the process's PSS that are its own data: anonymous pages (heap, tensors)
    and shared memory (loader batches), split among the processes sharing them. Unlike
    the whole PSS it leaves out file pages: the libraries, whose share depends on how many
    other processes on the machine map them (three concurrent torch processes moved a
    run's PSS: the same code's head fit peaked at 1,308 MB alone, 1,019 MB beside two
    other torch runs), and the memory-mapped feature cache (read-only pages of
    its file), which then needs no subtracting. Linux >= 4.14 (smaps_rollup), 5.x fields."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("Pss_Anon", "Pss_Shmem"):
                fields[name] = int(value.split()[0]) * 1024  # kB
    return sum(fields.values())


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def bench_size(size: int, work: Path, torchrun: bool) -> dict[str, Any]:
    csv_path, images = build(size, work)
    root = work / f"runs-{size}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ds, run, bundle = root / "ds", root / "run", root / "bundle"
    steps: dict[str, Any] = {}
    print(f"[{size:,}] import", flush=True)
    steps["import"] = run_measured([*TAGMILL, "import", str(csv_path), "--images", str(images), "--out", str(ds),
                                    "--val-fraction", "0.1", "--multi-label", "--tag-sep", " "], root / "import.log")
    manifest = json.loads((ds / "dataset.json").read_text())
    train_n, val_n = manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]
    train_bytes = dir_bytes(ds, "train-*.tar")
    shards = len(list(ds.glob("train-*.tar")))
    train_args = ["--backbone", "test_efficientnet", "--image-size", str(SIDE), "--epochs", "1", "--batch-size", "64"]
    print(f"[{size:,}] train", flush=True)
    steps["train"] = run_measured([*TAGMILL, "train", str(ds), "--out", str(run), *train_args], root / "train.log")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    head = next(r for r in rows if r["stage"] == "head")
    epoch = next(r for r in rows if r["stage"] == "unfrozen")
    stages = {"cache+head": head["seconds"], "epoch": epoch["seconds"]}
    stages["final eval + start"] = steps["train"]["seconds"] - sum(stages.values())
    print(f"[{size:,}] export, predict", flush=True)
    steps["export"] = run_measured([*TAGMILL, "export", str(run), "--out", str(bundle)], root / "export.log")
    steps["predict"] = run_measured([*TAGMILL, "predict", str(bundle), str(ds), "--split", "val", "--device", "cpu",
                                     "--jsonl", str(root / "val.jsonl")], root / "predict.log")
    entry: dict[str, Any] = {
        "size": size, "train_images": train_n, "val_images": val_n, "train_shards": shards,
        "train_split_bytes": train_bytes, "feature_cache_bytes": (run / "features.safetensors").stat().st_size,
        "steps": steps, "train_stages": stages, "epoch_read_bytes": epoch.get("train_read_bytes"),
    }
    if torchrun:
        print(f"[{size:,}] train with torchrun, 2 processes", flush=True)
        two = root / "run-2"
        entry["torchrun"] = run_measured([*TAGMILL, "train", str(ds), "--out", str(two), "--nproc", "2", *train_args],
                                         root / "train-2.log")
        rows2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
        entry["torchrun"]["epoch_read_bytes"] = next(r for r in rows2 if r["stage"] == "unfrozen").get("train_read_bytes")
    shutil.rmtree(ds)  # the next size needs the disk
    return entry


# --- reporting ----------------------------------------------------------------------------------


def per_image_ms(entry: dict[str, Any]) -> dict[str, float]:
    n, v = entry["train_images"], entry["val_images"]
    steps, stages = entry["steps"], entry["train_stages"]
    return {
        "import": 1000 * steps["import"]["seconds"] / (n + v),
        "cache+head": 1000 * stages["cache+head"] / n,
        "epoch": 1000 * stages["epoch"] / n,
        # the final report's own cost is a pass over train (features for threshold tuning)
        "final eval + start": 1000 * stages["final eval + start"] / n,
        "predict": 1000 * steps["predict"]["seconds"] / v,
    }


def print_report(report: dict[str, Any]) -> None:
    entries = [report["sizes"][k] for k in sorted(report["sizes"], key=int)]
    print("\n| size | step | seconds | ms / image | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for e in entries:
        ms = per_image_ms(e)
        rss = {"import": e["steps"]["import"]["peak_rss_mb"], "predict": e["steps"]["predict"]["peak_rss_mb"]}
        secs = {"import": e["steps"]["import"]["seconds"], "predict": e["steps"]["predict"]["seconds"], **e["train_stages"]}
        for step in ms:
            shown_rss = f"{rss[step]:,.0f}" if step in rss else (f"{e['steps']['train']['peak_rss_mb']:,.0f} (train)"
                                                                 if step == "epoch" else "")
            print(f"| {e['size']:,} | {step} | {secs[step]:.1f} | {ms[step]:.3f} | {shown_rss} |")
    print("\n| size | train shards | train split MB | read in the epoch, per rank (MB) | read / split | feature cache MB | train RSS minus cache (MB) |")
    print("|---|---|---|---|---|---|---|")
    for e in entries:
        read = e["epoch_read_bytes"] or [0]
        cache_mb = e["feature_cache_bytes"] / 2**20
        print(f"| {e['size']:,} | {e['train_shards']} | {e['train_split_bytes'] / 2**20:,.1f} | "
              f"{', '.join(f'{b / 2**20:,.1f}' for b in read)} | {sum(read) / e['train_split_bytes']:.3f} | "
              f"{cache_mb:,.1f} | {e['steps']['train']['peak_rss_mb'] - cache_mb:,.0f} |")
        if "torchrun" in e:
            two = e["torchrun"]["epoch_read_bytes"] or [0]
            print(f"| {e['size']:,} torchrun ×2 | {e['train_shards']} | {e['train_split_bytes'] / 2**20:,.1f} | "
                  f"{', '.join(f'{b / 2**20:,.1f}' for b in two)} | {sum(two) / e['train_split_bytes']:.3f} | | |")
    if len(entries) > 1:
        small, large = entries[0], entries[-1]
        a, b = per_image_ms(small), per_image_ms(large)
        print(f"\ngrowth {small['size']:,} -> {large['size']:,} ({large['size'] / small['size']:.0f}x the data):")
        for step in a:
            print(f"  {step:<20} per-image time x{b[step] / a[step]:.2f}")
        rss_a = small["steps"]["train"]["peak_rss_mb"] - small["feature_cache_bytes"] / 2**20
        rss_b = large["steps"]["train"]["peak_rss_mb"] - large["feature_cache_bytes"] / 2**20
        print(f"  {'train RSS - cache':<20} x{rss_b / rss_a:.2f}")
        anon = [e["steps"]["train"].get("peak_anon_pss_mb") for e in (small, large)]
        if all(anon):  # results written before the bench recorded it lack it
            print(f"  {'train anon PSS':<20} x{anon[1] / anon[0]:.2f} ({anon[0]:,.0f} -> {anon[1]:,.0f} MB)")
        for step in ("import", "predict"):
            print(f"  {step + ' RSS':<20} x{large['steps'][step]['peak_rss_mb'] / small['steps'][step]['peak_rss_mb']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,250000")
    parser.add_argument("--work", default=str(DEFAULT_WORK))
    parser.add_argument("--torchrun-at", type=int, default=50000, help="size at which to also train with 2 processes (0: none)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale_data.json"))
    parser.add_argument("--print-only", action="store_true", help="print the tables of --out and stop")
    parser.add_argument("--add", action="store_true",
                        help="keep the sizes already in --out (same machine, earlier run) and add these")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.print_only:
        print_report(json.loads(out.read_text()))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    random.seed(SEED)
    pretend_pretrained(work)
    report: dict[str, Any] = {"cores": os.cpu_count(), "sizes": {}}
    if args.add and out.exists():
        report = json.loads(out.read_text())
    for size in sorted(int(s) for s in args.sizes.split(",")):
        report["sizes"][str(size)] = bench_size(size, work, torchrun=size == args.torchrun_at)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))  # after every size: a killed run keeps what it has
    print_report(report)
    print(f"\nresults in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
