"""How the doctor's similarity search scales: time and memory at 20k to 250k images.

    .venv/bin/python bench/doctor_scale.py [--sizes 20000,50000,250000] [--dim 3968]

Features are synthetic (the cost of these steps depends on N and D, not on what the
images show): non-negative clustered vectors of tagmill's multi-level feature size
(3,968 for EfficientNet-Lite0), 1% of them planted near copies of another row, with
random 64-bit perceptual hashes (copies keep theirs) and random colour thumbnails
(copies keep theirs, a few levels off). Timed, each in this process, with
the library's own functions on 2 threads: the neighbour search (exact up to
``EXACT_UP_TO`` images, projected beyond), the duplicate check and the feature outlier
tests. Feature extraction and label fitting are not included (``bench/doctor.py``
times the whole command on real data). Peak memory is this process's max RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tagmill.doctor import thumbnails
from tagmill.doctor.duplicates import find_duplicates
from tagmill.doctor.neighbours import EXACT_UP_TO, nearest_neighbours
from tagmill.doctor.outliers import feature_outliers
from tagmill.doctor.scan import ImageFacts


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, list[ImageFacts], torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    clusters = max(10, n // 500)
    centres = torch.randn(clusters, dim, generator=g).relu_() * 2
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = centres[labels]
    x += torch.randn(n, dim, generator=g).relu_()
    copies = n // 100
    originals = torch.randperm(n, generator=g)[:copies]
    targets = torch.randperm(n, generator=g)[:copies]
    targets = targets[~torch.isin(targets, originals)]
    originals = originals[: len(targets)]
    x[targets] = x[originals] + 0.1 * torch.randn(len(targets), dim, generator=g)
    hashes = torch.randint(0, 2**62, (n,), generator=g)
    hashes[targets] = hashes[originals]
    # colour thumbnails as the scan stores them: random pictures, copies their source's
    # recompressed (a few levels off)
    cells = (thumbnails.SIDE, thumbnails.SIDE, 3)
    pictures = torch.randint(0, 256, (n, *cells), generator=g, dtype=torch.uint8)
    noise = torch.randint(-3, 4, (len(targets), *cells), generator=g, dtype=torch.int16)
    pictures[targets] = (pictures[originals].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    facts = [ImageFacts(f"train-{i:07d}", str(i), "train", (), 64, 64, f"d{i}", int(h), 30.0,
                        thumbnail=pictures[i].numpy().tobytes()) for i, h in enumerate(hashes.tolist())]
    return x, facts, labels % 10, len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,50000,250000")
    parser.add_argument("--dim", type=int, default=3968)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"exact search up to {EXACT_UP_TO:,} images; D = {args.dim}; 2 threads")
    print("| images | neighbours (s) | duplicates (s) | outliers (s) | planted copies found | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        x, facts, classes, planted = synthetic(n, args.dim)
        start = time.perf_counter()
        neighbours = nearest_neighbours(x, 20)
        t_nn = time.perf_counter() - start
        start = time.perf_counter()
        pairs = find_duplicates(facts, x, neighbours)
        t_dup = time.perf_counter() - start
        start = time.perf_counter()
        feature_outliers(x, neighbours, classes)
        t_out = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"| {n:,} | {t_nn:.1f} | {t_dup:.1f} | {t_out:.1f} | {len(pairs)}/{planted} | {rss:.1f} |", flush=True)
        del x, facts, neighbours, pairs


if __name__ == "__main__":
    main()
