"""Active learning: does labelling what ``tagmill suggest`` picks beat labelling at random?

    .venv/bin/python bench/active.py [--dataset C-fashion-t10k] [--seeds 5] [--start 20]
                                     [--batch 20] [--rounds 14] [--pool-factors 10]
                                     [--out bench/results/active.json] [--plot bench/results/active.png]

A real labelled dataset plays the unlabelled pool: its training split's labels are
hidden until a strategy asks for them, and its validation split is the yardstick. Each
seed starts from the same ``--start`` images drawn at random; each round, every
strategy adds ``--batch`` images from what it has not labelled yet, and the head is
fitted again on the labelled images' frozen features with the training code's own
``fit_head`` (L-BFGS to convergence, L2 by k-fold cross-validation on the labelled
images only). Strategies:

  random    a uniform draw (seeded);
  margin    the most uncertain by margin alone (``choose`` with pool factor 1);
  suggest   ``tagmill suggest``'s ranking (``bundle.suggest.choose``): the most uncertain
            POOL_FACTOR x batch, clustered in feature space, one per cluster.

Features: the pretrained backbone training would start from (EfficientNet-Lite0, its
default pooling and the input size training chooses for the data), computed once per
dataset and kept in ``--cache``. The datasets are bench/quality.py's (``--cache`` of that
script, default /tmp/tagmill-quality-bench: build them with ``bench/quality.py`` and
``bench/quality.py --dev``); knobs are chosen on ``dev-C-fashion-train`` (Fashion-MNIST
train images) and reported on ``C-fashion-t10k`` (its test images).

Prints a table (mean accuracy over seeds against labels used) and, per strategy, the
labels needed to reach random's final accuracy; writes the JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tagmill.bundle.suggest import POOL_FACTOR, choose  # noqa: E402
from tagmill.dataset.manifest import load_manifest  # noqa: E402
from tagmill.objective import objective  # noqa: E402
from tagmill.train.head_fit import fit_head  # noqa: E402


def features(dataset: str, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features (N, D), class indices (N,))}, computed once and cached."""
    path = cache / f"active-features-{Path(dataset).parent.name}.npz"
    if path.exists():
        data = np.load(path)
        return {split: (data[f"{split}_x"], data[f"{split}_y"]) for split in ("train", "val")}
    from tagmill.models import create_classifier
    from tagmill.train.config import TrainConfig
    from tagmill.train.features import plain_features
    from tagmill.train.loop import choose_open_settings, preprocess_for

    manifest = load_manifest(dataset)
    config = choose_open_settings(dataset, manifest, TrainConfig(workers=0), lambda line: print(line, file=sys.stderr))
    preprocess = preprocess_for(config)
    model = create_classifier(config.backbone, len(manifest.classes), pooling=config.model_pooling).eval()
    found = {}
    for split in ("train", "val"):
        fs = plain_features(dataset, manifest, split, model, preprocess, config, torch.device("cpu"))
        found[split] = (fs.features.numpy(), fs.targets.numpy())
    np.savez(path, **{f"{s}_x": x for s, (x, _) in found.items()}, **{f"{s}_y": y for s, (_, y) in found.items()})
    return found


def fit_and_score(x: np.ndarray, y: np.ndarray, labelled: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                  seed: int) -> tuple[float, np.ndarray]:
    """Validation accuracy of a head fitted on the labelled rows, and its pool probabilities (N, C)."""
    task = objective("single")
    classes = int(max(y.max(), val_y.max())) + 1
    targets = torch.from_numpy(y[labelled]).long()
    # fit_head learns as many outputs as the labels show: pad with the class count
    fit = fit_head([torch.from_numpy(x[labelled])], targets, task, seed=seed) if len(np.unique(y[labelled])) > 1 else None
    if fit is None:
        return 1.0 / classes, np.full((len(x), classes), 1.0 / classes)
    weight, bias = fit.weight, fit.bias
    if weight.shape[0] < classes:  # a class not seen yet: never predicted
        weight = torch.cat([weight, torch.zeros(classes - weight.shape[0], weight.shape[1])])
        bias = torch.cat([bias, torch.full((classes - bias.shape[0],), -1e4)])
    val_logits = torch.from_numpy(val_x) @ weight.T + bias
    accuracy = float((val_logits.argmax(1).numpy() == val_y).mean())
    probs = torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1).numpy()
    return accuracy, probs


def run(x, y, val_x, val_y, *, seed: int, start: int, batch: int, rounds: int, strategy: str,
        pool_factor: int) -> list[tuple[int, float]]:
    rng = np.random.default_rng(seed)
    labelled = rng.choice(len(x), start, replace=False)
    curve = []
    for step in range(rounds + 1):
        accuracy, probs = fit_and_score(x, y, labelled, val_x, val_y, seed)
        curve.append((len(labelled), accuracy))
        if step == rounds:
            break
        rest = np.setdiff1d(np.arange(len(x)), labelled)
        if strategy == "random":
            new = rng.choice(rest, batch, replace=False)
        else:
            factor = 1 if strategy == "margin" else pool_factor
            picked, _ = choose(probs[rest], x[rest], batch, task="single", pool_factor=factor, seed=seed + step)
            new = rest[picked]
        labelled = np.concatenate([labelled, new])
    return curve


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="C-fashion-t10k")
    parser.add_argument("--cache", default="/tmp/tagmill-quality-bench")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--pool-factors", default=str(POOL_FACTOR), help="suggest's pool factors to run, comma-separated")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = Path(args.cache)
    data = features(str(cache / args.dataset / "packed"), cache)
    (x, y), (val_x, val_y) = data["train"], data["val"]
    strategies = [("random", 0), ("margin", 1)] + [("suggest", int(f)) for f in args.pool_factors.split(",")]
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    started = time.perf_counter()
    for name, factor in strategies:
        label = name if name != "suggest" or len(strategies) == 3 else f"suggest x{factor}"
        curves[label] = [run(x, y, val_x, val_y, seed=s, start=args.start, batch=args.batch, rounds=args.rounds,
                             strategy=name, pool_factor=factor) for s in range(args.seeds)]
        print(f"{label}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sizes = [n for n, _ in curves["random"][0]]
    mean = {k: np.mean([[a for _, a in c] for c in v], axis=0) for k, v in curves.items()}
    std = {k: np.std([[a for _, a in c] for c in v], axis=0) for k, v in curves.items()}
    print(f"\n{args.dataset}: {len(x)} pool images, {len(val_x)} validation; {args.seeds} seeds; accuracy (mean ± sd)\n")
    print("| labels | " + " | ".join(curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for i, n in enumerate(sizes):
        print(f"| {n} | " + " | ".join(f"{100 * mean[k][i]:.1f} ± {100 * std[k][i]:.1f}" for k in curves) + " |")
    target = mean["random"][-1]
    reach = {k: labels_to_reach(list(zip(sizes, mean[k])), target) for k in curves}
    print(f"\nlabels to reach random's final mean accuracy ({100 * target:.1f}% at {sizes[-1]} labels): "
          + ", ".join(f"{k} {v if v is not None else f'not within {sizes[-1]}'}" for k, v in reach.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"dataset": args.dataset, "args": vars(args), "sizes": sizes,
                                              "mean": {k: v.tolist() for k, v in mean.items()},
                                              "std": {k: v.tolist() for k, v in std.items()},
                                              "curves": curves, "labels_to_reach_random_final": reach}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in curves:
            ax.plot(sizes, 100 * mean[k], marker="o", markersize=3, label=k)
            ax.fill_between(sizes, 100 * (mean[k] - std[k]), 100 * (mean[k] + std[k]), alpha=0.15)
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label="random's final accuracy")
        ax.set_xlabel("labelled images")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{args.dataset}: head on frozen features, {args.seeds} seeds (mean ± sd)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
