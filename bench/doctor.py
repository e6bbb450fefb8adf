"""Does ``tagmill doctor`` find faults planted in real data, and does it beat sorting by loss?

    .venv/bin/python bench/doctor.py [--datasets B,C,A] [--out bench/results/doctor.json]
                                     [--work /tmp/tagmill-doctor-bench] [--dev] [--wait-idle MIN]
                                     [--limit N] [--plant-only] [--print-only] [--skip-loss]
    make bench-doctor                       # installs .[dev,bench], then runs the reported sets

Data: the datasets of ``bench/quality.py`` (imported from it, built once into its cache
/tmp/tagmill-quality-bench): B (Apple emoji, single-label, 240 images), C (Fashion-MNIST
test set, single-label, 3,000 images, 10 classes; from the Debian package
``dataset-fashion-mnist``) and A (OpenMoji, multi-label, 2,000 images, 52% untagged),
with quality.py's train/val membership. ``--dev`` uses their dev variants (Google emoji,
Fashion-MNIST's train set, OpenMoji black outlines): thresholds and ranking rules are
tuned there, the other sets are only reported.

Planting (``random.Random(0)``; ground truth in WORK/<set>/planted/truth.json):

  labels   single-label: 5% of the rows (all splits) get another class, drawn uniformly.
           Multi-label: on 5% of the rows, half lose one of their tags (drawn among tagged
           rows), half gain one tag they lack (drawn among all others).
  copies   round(2% of N) images, drawn from train and val in proportion to their sizes,
           are copied into the *other* split under new ids (copy-000, ...), keeping the
           source's labels after the label faults, each transformed by one of, in turn:
           JPEG at quality 50-75; resized to 70-90% then JPEG 85; 3-6% cropped off each
           side then JPEG 85.

The planted source (an images folder and a CSV with a split column) and the clean one
(no faults, no copies) are packed by the real ``tagmill import``; ``tagmill doctor`` runs
on both as a subprocess (the planted run's wall time is the one printed; the clean run
says which pairs of original images the data already had: OpenMoji holds identical
pictures). Scores come from the CSVs the doctor writes:

  label errors  k = the rows whose given labels differ from the truth (the planted edits,
                plus copies of edited images, which carry the same wrong labels).
                precision@k and recall@k of the images in the order they first appear in
                label_issues.csv (rows past its end count as not found; with k = the
                number of faulty rows the two are equal unless the CSV is shorter, so
                the recall over the whole CSV and its length are printed too).
  duplicates    recall: planted pairs in duplicates.csv (either order); leakage recall:
                those marked leakage=1; precision: planted pairs / (reported pairs minus
                those the clean run also reported), and planted / all reported pairs; per
                transform: recall. "With twins" also counts a copy paired not with its
                source but with a twin of it (an image the clean run paired with the
                source: many pictures are drawn alike, e.g. OpenMoji's black flags are one
                rectangle). Reported pairs that are neither planted nor pre-existing are
                false alarms, except a copy paired with a twin of its source ("implied",
                counted apart); up to 10 false alarms and 10 pre-existing pairs (most hash
                bits apart first) are listed by id for a person to look at. The clean
                run's pairs are not known to be real copies (on these icon sets most of
                those looked at were distinct pictures drawn alike), so "precision" is
                the generous number and "planted / all reported pairs" the strict one.

The alternative a user already has (fastai's ``plot_top_losses``): ``tagmill train`` with
its defaults on the planted dataset (subprocess, timed), then the trained model's loss
on every image of train and val (``train.evaluation.predict_split``; multi-label: the
mean BCE over tags), highest first, precision@k at the same k.

``--dev`` adds what the near-copy rule in ``src/tagmill/doctor/duplicates.py`` is tuned
from, computed in-process with the doctor's own functions on the planted dataset (the
same features, hashes and thumbnails it uses): each planted pair's hash bits, cosine
and aligned thumbnail difference, the same for each copied image's nearest non-copy
neighbour (neither its planted partner nor an image with identical pixels) by cosine and
by hash, their percentiles, and ``find_duplicates`` over a grid of (MAX_DIFFERENCE,
MIN_COSINE): planted pairs found, other
pairs with a copy, and pairs of two original images (copies in the data, or false alarms).

Timings are wall times of the subprocesses (start-up included) on a 2-core machine;
"others' load" says how many cores other processes kept busy meanwhile.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: the datasets, the environment, the load meter)

REPO = quality.REPO
TAGMILL = REPO / ".venv" / "bin" / "tagmill"
DEFAULT_WORK = Path("/tmp/tagmill-doctor-bench")
SEED = 0
LABEL_FAULTS = 0.05
COPIES = 0.02
TRANSFORMS = ("jpeg", "resize", "crop")
THREADS = quality.THREADS
#: false alarms listed by id
SHOW_FALSE = 10


# --- planting -------------------------------------------------------------------------


def _transform(image: Image.Image, kind: str, rng: random.Random) -> tuple[bytes, dict[str, Any]]:
    """JPEG bytes of a near copy of ``image`` and the parameters drawn."""
    image = image.convert("RGB")
    params: dict[str, Any] = {}
    if kind == "jpeg":
        params["quality"] = rng.randint(50, 75)
    elif kind == "resize":
        factor = rng.uniform(0.70, 0.90)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        params |= {"factor": round(factor, 3), "size": list(size), "quality": 85}
    else:
        w, h = image.size
        left, top, right, bottom = (rng.uniform(0.03, 0.06) for _ in range(4))
        box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
        image = image.crop(box)
        params |= {"box": list(box), "quality": 85}
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=params["quality"])
    return buffer.getvalue(), params


def plant(ds: quality.Dataset, root: Path, limit: int | None) -> dict[str, Any]:
    """Write ``root``/clean.csv and ``root``/planted/{images/, labels.csv, truth.json}."""
    rng = random.Random(SEED)
    n = min(limit or len(ds.ids), len(ds.ids))
    ids, labels = ds.ids[:n], [tuple(lab) for lab in ds.labels[:n]]
    split = ["val" if v else "train" for v in ds.is_valid[:n]]
    multi = ds.task == "multi"
    root.mkdir(parents=True, exist_ok=True)

    def write_csv(path: Path, rows: list[tuple[str, tuple[str, ...], str]]) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", "split"])
            writer.writerows([i, "|".join(lab), s] for i, lab, s in rows)

    write_csv(root / "clean.csv", list(zip(ids, labels, split, strict=True)))

    # label faults
    given = list(labels)
    faults = round(LABEL_FAULTS * n)
    flips: list[dict[str, Any]] = []
    edits: list[dict[str, Any]] = []
    if not multi:
        for r in sorted(rng.sample(range(n), faults)):
            new = rng.choice([c for c in ds.classes if c != labels[r][0]])
            given[r] = (new,)
            flips.append({"id": ids[r], "split": split[r], "true": labels[r][0], "given": new})
    else:
        tagged = [r for r in range(n) if labels[r]]
        drops = rng.sample(tagged, min(faults // 2, len(tagged)))
        adds = rng.sample(sorted(set(range(n)) - set(drops)), faults - len(drops))
        for r, kind in sorted([(r, "drop") for r in drops] + [(r, "add") for r in adds]):
            present = set(labels[r])
            if kind == "drop":
                tag = rng.choice(sorted(present))
                given[r] = tuple(t for t in labels[r] if t != tag)
            else:
                tag = rng.choice([t for t in ds.classes if t not in present])
                given[r] = tuple(sorted(present | {tag}))
            edits.append({"id": ids[r], "split": split[r], "edit": kind, "tag": tag,
                          "true": list(labels[r]), "given": list(given[r])})

    # copies into the other split, in proportion to the splits' sizes
    count = round(COPIES * n)
    train_rows = [r for r in range(n) if split[r] == "train"]
    val_rows = [r for r in range(n) if split[r] == "val"]
    from_train = min(round(count * len(train_rows) / n), len(train_rows))
    sources = rng.sample(train_rows, from_train) + rng.sample(val_rows, min(count - from_train, len(val_rows)))
    rng.shuffle(sources)
    planted = root / "planted"
    shutil.rmtree(planted, ignore_errors=True)
    images = planted / "images"
    images.mkdir(parents=True)
    for image_id in ids:
        shutil.copyfile(ds.image_path(image_id), images / f"{image_id}.png")
    copies: list[dict[str, Any]] = []
    rows = list(zip(ids, given, split, strict=True))
    for i, r in enumerate(sources):
        kind = TRANSFORMS[i % len(TRANSFORMS)]
        copy_id = f"copy-{i:03d}"
        with Image.open(ds.image_path(ids[r])) as img:
            data, params = _transform(img, kind, rng)
        (images / f"{copy_id}.jpg").write_bytes(data)
        other = "val" if split[r] == "train" else "train"
        rows.append((copy_id, given[r], other))
        copies.append({"copy": copy_id, "source": ids[r], "copy_split": other, "source_split": split[r],
                       "transform": kind, "params": params, "labels": list(given[r])})
    write_csv(planted / "labels.csv", rows)

    # the truth of every row: copies have their source's true labels
    truth_of = {image_id: lab for image_id, lab in zip(ids, labels, strict=True)}
    truth_of |= {c["copy"]: truth_of[c["source"]] for c in copies}
    faulty = sorted(i for i, lab, _ in rows if set(lab) != set(truth_of[i]))
    truth = {"seed": SEED, "task": ds.task, "images": n, "train": len(train_rows), "val": len(val_rows),
             "flips": flips, "tag_edits": edits, "copies": copies, "faulty_rows": faulty,
             "true_labels": {i: list(lab) for i, lab in truth_of.items()}}
    (planted / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


# --- the real CLI -----------------------------------------------------------------------


def run_cli(args: list[str], log: Path) -> float:
    """Run ``tagmill ARGS`` (output to ``log``); its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([str(TAGMILL), *args], stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"tagmill {' '.join(args)} exited {done.returncode}:\n{tail}")
    return seconds


def import_source(csv_path: Path, images: Path, packed: Path, task: str, expect: dict[str, int], log: Path) -> float:
    from tagmill.dataset.manifest import load_manifest

    args = ["import", str(csv_path), "--out", str(packed), "--images", str(images), "--id-column", "id",
            "--label-column", "label", "--split-column", "split", "--workers", str(THREADS), "--overwrite"]
    args += ["--multi-label", "--tag-sep", "|"] if task == "multi" else ["--single-label"]
    seconds = run_cli(args, log)
    counts = {name: info.count for name, info in load_manifest(str(packed)).splits.items()}
    if counts != expect:
        raise RuntimeError(f"{packed}: tagmill import made splits {counts}, the CSV has {expect} (see {log})")
    return seconds


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_doctor(packed: Path, out: Path, log: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    with quality.OtherLoad() as load:
        seconds = run_cli(["doctor", str(packed), "--out", str(out), "--workers", str(THREADS)], log)
    summary = json.loads((out / "doctor.json").read_text())
    return {"seconds": seconds, "other_load_cores": load.cores, "stages": summary.get("seconds", {}),
            "counts": summary.get("counts", {}), "features_from": summary.get("features_from"),
            "settings": summary.get("settings", {}), "leakage": summary.get("leakage", {})}


# --- scoring --------------------------------------------------------------------------------


def at_k(ranking: list[str], faulty: set[str], k: int) -> dict[str, Any]:
    """precision@k and recall@k of the first ``k`` distinct ids of ``ranking``."""
    top: list[str] = []
    for image_id in ranking:
        if image_id not in top:
            top.append(image_id)
        if len(top) == k:
            break
    hits = sum(i in faulty for i in top)
    return {"k": k, "found": hits, "precision": hits / k if k else None,
            "recall": hits / len(faulty) if faulty else None}


def score_labels(issues: list[dict[str, str]], truth: dict[str, Any]) -> dict[str, Any]:
    faulty = set(truth["faulty_rows"])
    ranking = [r["id"] for r in issues]
    flagged = set(ranking)
    out = at_k(ranking, faulty, len(faulty))
    out |= {"flagged_images": len(flagged), "found_anywhere": len(flagged & faulty),
            "recall_all_flagged": len(flagged & faulty) / len(faulty) if faulty else None,
            "precision_all_flagged": len(flagged & faulty) / len(flagged) if flagged else None}
    if truth["task"] == "single":  # is the class the doctor suggests the true one?
        true = truth["true_labels"]
        suggested = {r["id"]: r["suggested"] for r in issues}
        found = [i for i in faulty if i in suggested]
        out["suggestion_right"] = sum(suggested[i] == true[i][0] for i in found)
        out["suggestion_checked"] = len(found)
    else:  # which kind of edit the doctor finds
        by_id = {e["id"]: e["edit"] for e in truth["tag_edits"]}
        out["found_by_edit"] = {kind: sum(1 for i in flagged & faulty if by_id.get(i) == kind)
                                for kind in ("drop", "add")}
        out["planted_by_edit"] = {kind: sum(1 for e in truth["tag_edits"] if e["edit"] == kind) for kind in ("drop", "add")}
    return out


def pair_set(rows: list[dict[str, str]]) -> dict[frozenset[str], dict[str, str]]:
    return {frozenset((r["id_a"], r["id_b"])): r for r in rows}


def score_duplicates(planted_rows: list[dict[str, str]], clean_rows: list[dict[str, str]],
                     truth: dict[str, Any]) -> dict[str, Any]:
    reported, before = pair_set(planted_rows), pair_set(clean_rows)
    source = {c["copy"]: c["source"] for c in truth["copies"]}
    planted = {frozenset((c["copy"], c["source"])): c for c in truth["copies"]}
    # identical pictures in the clean data, closed over (the doctor lists a big exact group
    # as pairs with its first image only)
    parent: dict[str, str] = {}

    def root(i: str) -> str:
        while parent.get(i, i) != i:
            i = parent[i]
        return i

    for r in before.values():
        if r["kind"] == "exact":
            parent[root(r["id_a"])] = root(r["id_b"])

    def twins(a: str, b: str) -> bool:
        """Whether the clean run said ``a`` and ``b`` (original ids) are copies of each other."""
        return frozenset((a, b)) in before or root(a) == root(b)

    found = [p for p in planted if p in reported]
    # a copy paired with its source, or else with an image the clean run paired with its source
    partners: dict[str, list[str]] = {}
    for pair in reported:
        a, b = sorted(pair)
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    via_twin: dict[str, str] = {}
    for pair, c in planted.items():
        twin = next((o for o in partners.get(c["copy"], []) if o not in source and twins(c["source"], o)), None)
        if pair not in reported and twin is not None:
            via_twin[c["copy"]] = twin
    pre_existing = [p for p in reported if p in before]
    implied, false = [], []
    for pair in reported:
        if pair in planted or pair in before:
            continue
        a, b = sorted(pair)
        if twins(source.get(a, a), source.get(b, b)):
            implied.append(pair)  # a copy with a twin of its source, or copies of two twins
        else:
            false.append(pair)
    denominator = len(reported) - len(pre_existing)
    per_transform = {}
    for kind in TRANSFORMS:
        mine = [c for c in planted.values() if c["transform"] == kind]
        hit = [c for p, c in planted.items() if c["transform"] == kind and p in reported]
        twin = [c for c in mine if c["copy"] in via_twin]
        per_transform[kind] = {"planted": len(mine), "found": len(hit), "recall": len(hit) / len(mine) if mine else None,
                               "found_with_twins": len(hit) + len(twin)}

    def describe(pair: frozenset[str]) -> dict[str, Any]:
        r = reported[pair]
        name = {i: f"{i} (copy of {source[i]})" if i in source else i for i in pair}
        return {"a": name[r["id_a"]], "b": name[r["id_b"]], "kind": r["kind"], "similarity": float(r["similarity"]),
                "hash_bits": int(r["hash_bits"]), "splits": f"{r['split_a']}/{r['split_b']}",
                "labels": f"{r['labels_a'] or '-'} / {r['labels_b'] or '-'}"}

    false.sort(key=lambda p: -float(reported[p]["similarity"]))
    # the clean run's pairs, most doubtful first (most hash bits apart), for a person to look at
    doubtful = sorted(pre_existing, key=lambda p: (-int(reported[p]["hash_bits"]), float(reported[p]["similarity"])))
    leaks = sum(reported[p]["leakage"] == "1" for p in found)
    return {
        "planted": len(planted), "found": len(found), "recall": len(found) / len(planted) if planted else None,
        "found_as": {kind: sum(reported[p]["kind"] == kind for p in found) for kind in ("exact", "near")},
        "found_with_twins": len(found) + len(via_twin),
        "recall_with_twins": (len(found) + len(via_twin)) / len(planted) if planted else None,
        "leak_flagged": leaks, "leakage_recall": leaks / len(planted) if planted else None,
        "reported": len(reported), "pre_existing_reported": len(pre_existing), "clean_run_pairs": len(before),
        "clean_run_kinds": {kind: sum(r["kind"] == kind for r in before.values()) for kind in ("exact", "near")},
        "clean_run_conflicting": sum(r["conflict"] == "1" for r in before.values()),  # true labels differ
        "implied": len(implied), "false_alarms": len(false),
        "precision": len(found) / denominator if denominator else None,
        "precision_all_pairs": len(found) / len(reported) if reported else None,  # pre-existing ones counted as wrong
        "precision_without_implied": len(found) / (denominator - len(implied)) if denominator - len(implied) else None,
        "per_transform": per_transform,
        "missed": [{"copy": c["copy"], "source": c["source"], "transform": c["transform"], "params": c["params"],
                    "paired_with_twin": via_twin.get(c["copy"])} for p, c in planted.items() if p not in reported],
        "false_alarm_examples": [describe(p) for p in false[:SHOW_FALSE]],
        "pre_existing_examples": [describe(p) for p in doubtful[:SHOW_FALSE]],
    }


# --- the alternative: sort by the trained model's loss ------------------------------------------


def loss_ranking(packed: Path, run: Path) -> tuple[list[str], float]:
    """Every image's id, highest loss of the trained model first; and the seconds it took."""
    from tagmill import storage
    from tagmill.bundle.evaluate_model import load_model
    from tagmill.dataset.manifest import load_manifest
    from tagmill.dataset.shards import iter_shard
    from tagmill.train.evaluation import predict_split

    start = time.perf_counter()
    model, _info, preprocess, _ = load_model(str(run))
    manifest = load_manifest(str(packed))
    scored: list[tuple[float, str]] = []
    for split in manifest.splits:
        ids = {s.key: s.meta["id"] for shard in manifest.split(split).shards
               for s in iter_shard(storage.join(str(packed), shard.name))}
        preds = predict_split(model, str(packed), manifest, split, preprocess, device=torch.device("cpu"))
        scored += [(float(loss), ids[key]) for loss, key in zip(preds.losses.tolist(), preds.keys, strict=True)]
    scored.sort(key=lambda t: -t[0])
    return [i for _, i in scored], time.perf_counter() - start


# --- --dev: what the near-copy rule is tuned from ------------------------------------------------

PERCENTILES = (0, 5, 10, 25, 50, 75, 90, 95, 100)
GRID_DIFFERENCE = (10, 15, 20, 25, 28, 31, 35, 40, 50)
GRID_COSINE = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)


def copy_geometry(packed: Path, truth: dict[str, Any]) -> dict[str, Any]:
    """Planted pairs and nearest non-copies in the doctor's own terms (feature cosine,
    aligned thumbnail difference; hash bits for the candidate search)."""
    from tagmill.dataset.manifest import load_manifest
    from tagmill.doctor.diagnose import NEIGHBOURS, _aligned, _features
    from tagmill.doctor.duplicates import (LAYOUT, MAX_DIFFERENCE, MIN_COSINE, MIN_KEPT, measure_pairs,
                                          pixel_differences)
    from tagmill.doctor.neighbours import nearest_neighbours
    from tagmill.doctor.scan import scan_dataset
    from tagmill.progress import SILENT
    from tagmill.train.config import TrainConfig

    manifest = load_manifest(str(packed))
    # the doctor's default route: no --model, TrainConfig's defaults (what `tagmill doctor` builds)
    features, source = _features(str(packed), manifest, None, TrainConfig(workers=THREADS), SILENT, lambda line: None)
    facts = scan_dataset(str(packed), manifest, workers=THREADS)
    x, _ = _aligned(facts, features)
    n = len(facts)
    row = {f.id: r for r, f in enumerate(facts)}
    unit = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (unit @ unit.T).numpy()
    codes = np.array([f.phash for f in facts], dtype=np.uint64)
    bits = np.bitwise_count(codes[:, None] ^ codes[None, :]).astype(np.int64)

    # copy groups: planted pairs and identical pixels (the clean run's near pairs are not
    # counted as copies: whether they are is what is being tuned)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    planted = [(row[c["source"]], row[c["copy"]], c["transform"]) for c in truth["copies"]]
    for a, b, _ in planted:
        union(a, b)
    by_digest: dict[str, int] = {}
    for r, f in enumerate(facts):
        if f.digest:
            union(r, by_digest.setdefault(f.digest, r))
    group = np.array([find(i) for i in range(n)])

    planted_diff = pixel_differences(facts, [(a, b) for a, b, _ in planted]).tolist()
    pairs = [{"transform": t, "hash_bits": int(bits[a, b]), "cosine": float(cosine[a, b]), "difference": d}
             for (a, b, t), d in zip(planted, planted_diff, strict=True)]
    nearest, looked_at = [], []
    for a, b, _ in planted:
        for r in (a, b):
            other = group != group[r]
            by_cos = int(np.argmax(np.where(other, cosine[r], -np.inf)))
            # nearest by hash; among equally near ones, the most alike in features
            key = np.where(other, bits[r] * 10.0 - cosine[r], np.inf)
            by_hash = int(np.argmin(key))
            nearest.append({"id": facts[r].id, **{
                name: {"hash_bits": int(bits[r, o]), "cosine": float(cosine[r, o]), "id": facts[o].id}
                for name, o in (("by_cosine", by_cos), ("by_hash", by_hash))}})
            looked_at += [(r, by_cos), (r, by_hash)]
    for m, d in zip((x for m in nearest for x in (m["by_cosine"], m["by_hash"])),
                    pixel_differences(facts, looked_at).tolist(), strict=True):
        m["difference"] = d

    # the library's own rule over a grid, with its own candidate search
    neighbours = nearest_neighbours(x, min(NEIGHBOURS, n - 1))
    planted_set = {frozenset((a, b)) for a, b, _ in planted}
    copy_rows = {row[c["copy"]] for c in truth["copies"]}
    grid = []
    # the pixel differences are measured once, for every candidate the loosest cosine passes
    exact, candidates = measure_pairs(facts, x, neighbours, min_cosine=min(GRID_COSINE))
    for h in GRID_DIFFERENCE:
        for c in GRID_COSINE:
            found = exact + [p for p in candidates if p.similarity >= c and p.difference <= h and p.layout <= LAYOUT
                             and p.kept >= MIN_KEPT]
            keys = [frozenset((p.a, p.b)) for p in found]
            with_copy = [k for k in keys if k & copy_rows and k not in planted_set]
            implied = sum(bool(group[min(k)] == group[max(k)]) for k in with_copy)
            grid.append({"max_difference": h, "min_cosine": c, "planted_found": sum(k in planted_set for k in keys),
                         "copy_false": len(with_copy) - implied, "copy_implied": implied,
                         "original_pairs": sum(not k & copy_rows for k in keys)})
    return {"features_from": source, "images": n, "current": {"max_difference": MAX_DIFFERENCE, "min_cosine": MIN_COSINE, "layout": LAYOUT},
            "pairs": pairs, "nearest_non_copy": nearest, "grid": grid}


def _percentiles(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    values = np.percentile(np.array(values, dtype=np.float64), PERCENTILES, method="nearest")
    return " ".join(format(float(v), fmt) for v in values)


def print_geometry(g: dict[str, Any]) -> None:
    print(f"\nnear-copy geometry ({g['images']} images; features: {g['features_from']}); "
          f"now MAX_DIFFERENCE={g['current']['max_difference']}, MIN_COSINE={g['current']['min_cosine']}, "
          f"LAYOUT={g['current'].get('layout')} (the grid below holds it)")
    print(f"percentiles {', '.join(f'p{p}' for p in PERCENTILES)}:")
    rows = []
    for kind in (*TRANSFORMS, "all"):
        mine = [p for p in g["pairs"] if kind in ("all", p["transform"])]
        rows.append([f"planted pairs, {kind} ({len(mine)})", _percentiles([p["hash_bits"] for p in mine], ".0f"),
                     _percentiles([p["cosine"] for p in mine], ".3f"), _percentiles([p["difference"] for p in mine], ".1f")])
    near = g["nearest_non_copy"]
    for name in ("by_cosine", "by_hash"):
        rows.append([f"nearest non-copy {name.replace('_', ' ')} ({len(near)})",
                     _percentiles([m[name]["hash_bits"] for m in near], ".0f"),
                     _percentiles([m[name]["cosine"] for m in near], ".3f"),
                     _percentiles([m[name]["difference"] for m in near], ".1f")])
    quality.print_rows(["", "hash bits", "cosine", "aligned difference"], rows)
    worst = sorted(g["pairs"], key=lambda p: -p["difference"])[:5]
    print("hardest planted pairs (largest difference): "
          + ", ".join(f"{p['transform']} {p['difference']:.1f}/{p['cosine']:.3f}" for p in worst))
    print(f"\nfind_duplicates over a grid: planted pairs found (of {len(g['pairs'])}) / false pairs with a copy / "
          "pairs of two original images (the data's own copies, or false alarms)")
    header = ["difference \\ cosine", *[f"{c:.2f}" for c in GRID_COSINE]]
    table_rows = []
    for h in GRID_DIFFERENCE:
        cells = [str(h)]
        for c in GRID_COSINE:
            e = next(e for e in g["grid"] if e["max_difference"] == h and e["min_cosine"] == c)
            cells.append(f"{e['planted_found']}/{e['copy_false']}/{e['original_pairs']}")
        table_rows.append(cells)
    quality.print_rows(header, table_rows)


# --- the report ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_table(key: str, entry: dict[str, Any]) -> None:
    spec, p = entry["spec"], entry["planted"]
    multi = spec["task"] == "multi"
    print(f"\n### {key}: {spec['name']} — {spec['description']}")
    if "error" in entry:
        print(f"error: {entry['error']}")
        return
    edits = (f"{p['tag_edits']} tag edits ({p['tag_drops']} dropped, {p['tag_adds']} added)" if multi
             else f"{p['flips']} labels flipped")
    print(f"{p['images']} images ({p['train']} train / {p['val']} val) + {p['copies']} copies into the other split; "
          f"{edits}; {p['faulty_rows']} rows with wrong labels (k), copies of edited images included")
    d, loss, dup = entry["doctor"], entry.get("loss_ranking", {}), entry["duplicates"]
    lab = entry["labels"]
    rows = [
        [f"label errors: precision@k (k={lab['k']})", _pct(lab["precision"]), _pct(loss.get("precision"))],
        ["label errors: recall@k", _pct(lab["recall"]), _pct(loss.get("recall"))],
        ["images flagged (label_issues.csv rows)", lab["flagged_images"], "-"],
        ["faulty rows anywhere in the CSV (recall)", f"{lab['found_anywhere']} ({_pct(lab['recall_all_flagged'])})", "-"],
        ["precision of the whole CSV", _pct(lab["precision_all_flagged"]), "-"],
    ]
    if not multi:
        rows.append(["suggested class = true class (of those found)",
                     f"{lab['suggestion_right']}/{lab['suggestion_checked']}", "-"])
    else:
        fb, pb = lab["found_by_edit"], lab["planted_by_edit"]
        rows.append(["found anywhere: dropped tag / added tag", f"{fb['drop']}/{pb['drop']} / {fb['add']}/{pb['add']}", "-"])
    rows += [
        [f"copies: recall ({dup['found']}/{dup['planted']}; exact {dup['found_as']['exact']}, near {dup['found_as']['near']})",
         _pct(dup["recall"]), "-"],
        [f"copies: recall, or paired with a twin of the source ({dup['found_with_twins']}/{dup['planted']})",
         _pct(dup["recall_with_twins"]), "-"],
        ["copies: leakage recall", _pct(dup["leakage_recall"]), "-"],
        [f"copies: precision ({dup['reported']} reported − {dup['pre_existing_reported']} pre-existing)",
         _pct(dup["precision"]), "-"],
        ["copies: planted / all reported pairs", _pct(dup["precision_all_pairs"]), "-"],
    ]
    for kind, t in dup["per_transform"].items():
        rows.append([f"copies: recall, {kind} ({t['found']}/{t['planted']}; with twins {t['found_with_twins']})",
                     _pct(t["recall"]), "-"])
    rows += [
        ["wall seconds (doctor / train)", f"{d['seconds']:.1f}", f"{loss['train_seconds']:.1f}" if loss else "-"],
        ["seconds predicting every image (loss)", "-", f"{loss['predict_seconds']:.1f}" if loss else "-"],
        ["others' load (cores)", f"{d['other_load_cores']:.2f}", f"{loss['other_load_cores']:.2f}" if loss else "-"],
    ]
    quality.print_rows(["", "doctor", "loss ranking"], rows)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in d["stages"].items())
    print(f"doctor stages (s): {stages}; features: {d['features_from']}")
    print(f"pairs in the clean run: {dup['clean_run_pairs']} (exact {dup['clean_run_kinds']['exact']}, "
          f"near {dup['clean_run_kinds']['near']}; {dup['clean_run_conflicting']} with different true labels); "
          f"reported on the planted set: {dup['reported']} = "
          f"{dup['found']} planted + {dup['pre_existing_reported']} pre-existing + {dup['implied']} implied "
          f"(a copy and its source's twin) + {dup['false_alarms']} false alarms; "
          f"precision without the implied: {_pct(dup['precision_without_implied'])}")
    for f in dup.get("pre_existing_examples", []):
        print(f"  pre-existing: {f['a']} ~ {f['b']}: {f['kind']}, cosine {f['similarity']:.3f}, {f['hash_bits']} bits, "
              f"{f['splits']}, labels {f['labels']}")
    for f in dup["false_alarm_examples"]:
        print(f"  false alarm: {f['a']} ~ {f['b']}: {f['kind']}, cosine {f['similarity']:.3f}, {f['hash_bits']} bits, "
              f"{f['splits']}, labels {f['labels']}")
    for m in dup["missed"]:
        twin = f"; paired with {m['paired_with_twin']}, a twin of its source" if m.get("paired_with_twin") else ""
        print(f"  missed copy: {m['copy']} of {m['source']} ({m['transform']} {json.dumps(m['params'])}{twin})")
    if "loss_error" in entry:
        print(f"loss ranking failed: {entry['loss_error']}")
    if "geometry" in entry:
        print_geometry(entry["geometry"])
    sys.stdout.flush()


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    dirty = " + uncommitted src changes" if env.get("git_dirty_src") else ""
    print(f"\n## doctor: planted faults found by `tagmill doctor` vs ranking by a trained model's loss "
          f"({report['variant']} datasets{', --limit ' + str(report['limit']) if report.get('limit') else ''})")
    print(f"torch {env['torch']}, {THREADS} cores, seed {SEED}, commit {env['git_commit'][:10]}{dirty}")
    for key, entry in report["datasets"].items():
        print_table(key, entry)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --- one dataset ---------------------------------------------------------------------------------


def bench_one(ds: quality.Dataset, work: Path, limit: int | None, plant_only: bool, dev: bool,
              wait_idle: float, skip_loss: bool = False) -> dict[str, Any]:
    name = ds.spec.name + (f"-limit{limit}" if limit else "")
    root = work / name
    print(f"[{ds.spec.key}] planting into {root}", flush=True)
    truth = plant(ds, root, limit)
    planted = {"images": truth["images"], "train": truth["train"], "val": truth["val"],
               "copies": len(truth["copies"]), "flips": len(truth["flips"]), "tag_edits": len(truth["tag_edits"]),
               "tag_drops": sum(e["edit"] == "drop" for e in truth["tag_edits"]),
               "tag_adds": sum(e["edit"] == "add" for e in truth["tag_edits"]),
               "faulty_rows": len(truth["faulty_rows"]),
               "copies_by_transform": {k: sum(c["transform"] == k for c in truth["copies"]) for k in TRANSFORMS},
               "truth": str(root / "planted" / "truth.json")}
    entry: dict[str, Any] = {"spec": asdict(ds.spec), "planted": planted}
    print(f"[{ds.spec.key}] {json.dumps({k: v for k, v in planted.items() if k != 'truth'})}", flush=True)
    if plant_only:
        return entry

    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    copies_into = {s: sum(c["copy_split"] == s for c in truth["copies"]) for s in ("train", "val")}
    clean_packed, planted_packed = root / "clean-packed", root / "planted-packed"
    print(f"[{ds.spec.key}] tagmill import (clean, planted) ...", flush=True)
    import_source(root / "clean.csv", ds.images, clean_packed, ds.task,
                  {"train": truth["train"], "val": truth["val"]}, logs / "import-clean.txt")
    entry["import_seconds"] = import_source(
        root / "planted" / "labels.csv", root / "planted" / "images", planted_packed, ds.task,
        {"train": truth["train"] + copies_into["train"], "val": truth["val"] + copies_into["val"]},
        logs / "import-planted.txt")

    print(f"[{ds.spec.key}] tagmill doctor (clean) ...", flush=True)
    entry["doctor_clean"] = run_doctor(clean_packed, root / "doctor-clean", logs / "doctor-clean.txt")
    if wait_idle:
        quality.wait_until_idle(wait_idle)
    print(f"[{ds.spec.key}] tagmill doctor (planted) ...", flush=True)
    entry["doctor"] = run_doctor(planted_packed, root / "doctor-planted", logs / "doctor-planted.txt")
    print(f"[{ds.spec.key}] doctor: {entry['doctor']['seconds']:.1f} s, {json.dumps(entry['doctor']['counts'])}", flush=True)

    issues = read_csv(root / "doctor-planted" / "label_issues.csv")
    clean_rows = read_csv(root / "doctor-clean" / "duplicates.csv")
    entry["labels"] = score_labels(issues, truth)
    entry["duplicates"] = score_duplicates(read_csv(root / "doctor-planted" / "duplicates.csv"), clean_rows, truth)

    if skip_loss:
        entry["loss_error"] = "skipped (--skip-loss)"
        return entry
    print(f"[{ds.spec.key}] tagmill train (defaults) + loss of every image ...", flush=True)
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    if wait_idle:
        quality.wait_until_idle(wait_idle)
    try:
        with quality.OtherLoad() as load:
            train_seconds = run_cli(["train", str(planted_packed), "--out", str(run)], logs / "train.txt")
        ranking, predict_seconds = loss_ranking(planted_packed, run)
        faulty = set(truth["faulty_rows"])
        entry["loss_ranking"] = at_k(ranking, faulty, len(faulty)) | {
            "train_seconds": train_seconds, "predict_seconds": predict_seconds, "other_load_cores": load.cores}
    except Exception as exc:  # noqa: BLE001 - keep the doctor's numbers when the alternative fails
        entry["loss_error"] = f"{type(exc).__name__}: {exc}"

    if dev:
        print(f"[{ds.spec.key}] near-copy geometry (in-process) ...", flush=True)
        entry["geometry"] = copy_geometry(planted_packed, truth)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="B,C,A", help="comma list of quality.py's keys: B, C (single-label), A (multi-label); default all three")
    parser.add_argument("--out", default=None,
                        help="results as JSON (default bench/results/doctor.json; with --dev WORK/doctor-dev.json)")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="where planted sources, datasets and reports go")
    parser.add_argument("--cache", default=str(quality.DEFAULT_CACHE), help="quality.py's dataset cache")
    parser.add_argument("--dev", action="store_true", help="the dev variants (for tuning), with the near-copy geometry")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each set (smoke runs)")
    parser.add_argument("--plant-only", action="store_true", help="write the planted sources and stop")
    parser.add_argument("--skip-loss", action="store_true",
                        help="no training and loss ranking (the doctor's numbers only; without --dev)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MINUTES",
                        help="before each timed step, wait up to this long for other processes to leave the CPUs")
    parser.add_argument("--print-only", action="store_true", help="print the tables of the results in --out, stop")
    args = parser.parse_args(argv)
    work = Path(args.work)
    out = Path(args.out) if args.out else (work / "doctor-dev.json" if args.dev else REPO / "bench" / "results" / "doctor.json")
    if args.print_only:
        print_report(json.loads(out.read_text()))
        return 0
    specs = quality.DEV_SPECS if args.dev else quality.MAIN_SPECS
    keys = [k.strip().upper() for k in args.datasets.split(",") if k.strip()]
    if bad := [k for k in keys if k not in specs]:
        parser.error(f"unknown dataset(s): {', '.join(bad)}")
    if not TAGMILL.exists():
        sys.exit(f"{TAGMILL} is missing: make install")

    torch.set_num_threads(THREADS)
    if not args.plant_only:
        quality.load_all_tagmill_modules()  # the in-process parts use the code as it was at the start
    datasets = [quality.build_dataset(specs[k], Path(args.cache)) for k in keys]
    report: dict[str, Any] = {"environment": quality.environment(), "variant": "dev" if args.dev else "main",
                              "limit": args.limit, "seed": SEED, "datasets": {}}
    total = time.perf_counter()
    for ds in datasets:
        try:
            entry = bench_one(ds, work, args.limit, args.plant_only, args.dev, args.wait_idle, args.skip_loss)
        except Exception as exc:  # noqa: BLE001 - one failing set must not lose the other's numbers
            import traceback

            traceback.print_exc()
            entry = {"spec": asdict(ds.spec), "planted": {}, "error": f"{type(exc).__name__}: {exc}"}
        report["datasets"][ds.spec.key] = entry
        if not args.plant_only:
            write_json(out, report)  # after every set: a killed run keeps what it has
            print_table(ds.spec.key, entry)
    if args.plant_only:
        return 0
    report["total_seconds"] = time.perf_counter() - total
    write_json(out, report)
    print_report(report)
    print(f"\nall: {report['total_seconds'] / 60:.1f} min; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
