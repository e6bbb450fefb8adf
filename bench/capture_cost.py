"""What ``serve --capture`` costs per captured image, in the server's process: this tree's
writer against an earlier commit's, same images, same run.

    .venv/bin/python bench/capture_cost.py [--against 4cad881] [--images 400] [--rounds 2]

Each writer (``serve.capture.Capture``, the earlier one loaded from ``git show
COMMIT:src/tagmill/serve/capture.py``) takes ``--images`` offers of 640x480 JPEGs with a
257-class prediction, every one captured (the worst case), into a local folder and into
S3 (a moto server started here, on loopback), then drains. Reported per image: the
process's CPU time (every thread: what capture takes from the model's process), the
writer process's (the writer stores from a process of its own now: CPU the model
still shares on a CPU-bound server, but not its interpreter lock; less its start-up, once per
server process, measured by starting and stopping one with nothing to store), the S3
endpoint's CPU time (moto's, which ``serve_load.py --capture`` runs on the
server's own cores) and the wall time until the writer has stored
everything (how many images a second one writer keeps up with). CPU time is the measure
that a shared machine blurs least; the rounds alternate the two writers.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tagmill.bundle.format import BundleMeta
from tagmill.bundle.predictor import Prediction
from tagmill.dataset.transforms import Preprocess
from tagmill.serve import capture as current
from tagmill.serve.metrics import ServeMetrics

from serve_load import MotoS3  # this folder, first on the path of a script run from it

ROOT = Path(__file__).resolve().parents[1]
#: offers per call, as the batching server hands them over (and a short pause between calls,
#: so the writer runs beside the offers as it does beside requests)
OFFER_BATCH, PAUSE_S = 8, 0.001


def earlier_writer(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:src/tagmill/serve/capture.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    # earlier writers took the layout's names from bundle/suggest.py, then from
    # bundle/captures.py; formats/captures.py holds them now
    source = source.replace("from tagmill.bundle.suggest import CAPTURE_MARKER as MARKER",
                            "from tagmill.formats.captures import MARKER")
    source = source.replace("tagmill.bundle.captures", "tagmill.formats.captures")
    source = source.replace("from tagmill.bundle import captures", "from tagmill.formats import captures")
    path = Path(tempfile.mkdtemp(prefix="capture-cost-")) / "capture_earlier.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("capture_earlier", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_earlier"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for (the
    writer process, once stop() has joined it; not moto, which runs to the end)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup_cpu(module, target: str) -> float:
    """CPU seconds of a writer started and stopped with nothing to store: the writer
    process's start-up (its interpreter and imports, once per server process), which
    :func:`cost` takes off so that its per-image numbers are the per-image cost."""
    writer = module.Capture(target, ServeMetrics(), below=1.0)
    children = children_cpu()
    writer.start()
    writer.stop(drain_s=600)
    return children_cpu() - children


def cost(module, target: str, count: int, sent: list[bytes]) -> tuple[float, float, float]:
    meta = BundleMeta(architecture="x", task="single", classes=tuple(f"c{i}" for i in range(257)),
                      preprocess=Preprocess(input_size=16))
    prediction = Prediction(probabilities=[1 / 257] * 257, labels=["c0"])
    writer = module.Capture(target, ServeMetrics(), below=1.0, queue_items=count + OFFER_BATCH)
    children = children_cpu()
    writer.start()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(0, count, OFFER_BATCH):
        writer.offer(sent[: OFFER_BATCH], [prediction] * OFFER_BATCH, "v", meta)
        time.sleep(PAUSE_S)
    writer.stop(drain_s=600)
    children = children_cpu() - children - startup_cpu(module, target)
    return ((time.process_time() - cpu) / count * 1e3, max(children, 0.0) / count * 1e3,
            (time.perf_counter() - wall) / count * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="4cad881", help="the earlier commit whose writer is measured too")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    writers = [(f"{args.against} (earlier)", earlier_writer(args.against)), ("this tree", current)]
    sent = photos(OFFER_BATCH)
    print(f"{args.images} captured images of {sum(map(len, sent)) / len(sent) / 1024:.0f} KB each; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with MotoS3() as s3:
        os.environ.update(s3.env)  # the writer under test runs in this process (and its child)
        bucket = f"s3://{s3.bucket('capture-cost')}"
        for where in ("local folder", "S3 (moto)"):
            for round_ in range(args.rounds):
                for name, module in writers:
                    target = (tempfile.mkdtemp(prefix="capture-cost-") if where == "local folder"
                              else f"{bucket}/{name.split()[0]}-{round_}")
                    endpoint_cpu = s3.cpu_seconds()
                    cpu, writer_cpu, wall = cost(module, target, args.images, sent)
                    endpoint_ms = (s3.cpu_seconds() - endpoint_cpu) / args.images * 1e3
                    rows.append((where, name, cpu, writer_cpu, wall, endpoint_ms if where != "local folder" else None))
                    print(rows[-1], flush=True)
    print("\n| target | writer | server process CPU ms / image | writer process CPU ms / image "
          "| writer wall ms / image | S3 endpoint's CPU ms / image |\n|---|---|---|---|---|---|")
    for where, name, cpu, writer_cpu, wall, endpoint in rows:
        print(f"| {where} | {name} | {cpu:.2f} | {writer_cpu:.2f} | {wall:.2f} "
              f"| {'-' if endpoint is None else f'{endpoint:.2f}'} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
