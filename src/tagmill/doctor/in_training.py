"""The "data issues" section of a training run's ``report.md``, from what training computed.

A run already holds, at no extra cost, the two things the doctor's main checks need:
out-of-fold probabilities over the training images (the head's k-fold fit) and the
cached features of train and validation. This section reads them; it decodes no
image and fits nothing. What it cannot see without the pixels (resized or
recompressed copies, blank images) is left to ``tagmill doctor``, which the section
points to.

Leakage here means a validation image whose features are those of a training image
(cosine ≥ ``SAME_IMAGE_COSINE``): identical pixels give identical features, while
resized or recompressed copies scored 0.82–0.97 on the dev sets, too close to distinct
neighbours to call from features alone.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch
from torch import Tensor

from tagmill import storage
from tagmill.dataset.manifest import Manifest
from tagmill.dataset.shards import iter_shard
from tagmill.doctor.label_issues import multi_label_issues, single_label_issues, with_tag_context
from tagmill.doctor.neighbours import normalised
from tagmill.evaluate.markdown import table, text

#: feature cosine above which a validation image counts as a copy of a training image
#: (float rounding keeps identical images a little under 1)
SAME_IMAGE_COSINE = 0.995
#: suspects listed in the section (the doctor's report lists them all, with thumbnails)
SHOWN = 5


def ids_of(dataset: str, manifest: Manifest, keys: list[str]) -> dict[str, str]:
    """The user's ids of sample ``keys`` ("train-0000042"), reading only the shards that
    hold them: import writes a split's samples in key order, shard after shard."""
    found: dict[str, str] = {}
    wanted: dict[tuple[str, int], set[str]] = {}
    for key in keys:
        split, _, index = key.rpartition("-")
        shards = manifest.split(split).shards
        ends = list(itertools.accumulate(s.count for s in shards))
        wanted.setdefault((split, bisect.bisect_right(ends, int(index))), set()).add(key)
    for (split, shard), names in wanted.items():
        for sample in iter_shard(storage.join(dataset, manifest.split(split).shards[shard].name)):
            if sample.key in names:
                found[sample.key] = str(sample.meta.get("id", sample.key))
    return found


#: bytes of temporaries ``leaked_val`` may hold at once (normalised blocks of train and
#: validation rows, and their cosines), whatever the split sizes. A budget rather than
#: row counts: a whole normalised train split plus 1,024 validation rows' cosines against
#: it grew ~7 KB per training image (848 features, bench/scale_data.py: ~1.6 GB at 225k),
#: and a wider feature vector would scale fixed rows too. 64 MB still gives blocks of a
#: few thousand rows a side (~1,700 at 4,000 features), products large enough to keep
#: the cores busy.
LEAK_BUDGET_BYTES = 64 << 20


def leaked_val(train: Tensor, val: Tensor, budget: int = LEAK_BUDGET_BYTES) -> int:
    """Validation rows with a training row at cosine ≥ ``SAME_IMAGE_COSINE``.

    Streams over both: a block of training rows is normalised once and compared with
    every block of validation rows (normalised again for each: validation is the smaller
    split, and normalising costs 1/block of the product). Nothing is copied whole; the
    cached features (memory-mapped) are read a block at a time."""
    block = _block_rows(train.shape[1], budget // 4)  # float32
    found = torch.zeros(len(val), dtype=torch.bool)
    for t in range(0, len(train), block):
        unit_train = normalised(train[t : t + block])  # (b, D)
        for v in range(0, len(val), block):
            cosines = normalised(val[v : v + block]) @ unit_train.T  # (b', b)
            found[v : v + block] |= (cosines >= SAME_IMAGE_COSINE).any(dim=1)
    return int(found.sum())


def _block_rows(dim: int, elements: int) -> int:
    """Rows b per block such that two (b, dim) blocks and their (b, b) cosines fit in
    ``elements``: b² + 2·b·dim ≤ elements."""
    return max(1, int(math.sqrt(dim * dim + elements)) - dim)


def data_issues_section(dataset: str, manifest: Manifest, train_keys: list[str], oof: tuple[Tensor, Tensor] | None,
                        features: tuple[Tensor, Tensor] | None) -> str:
    """Markdown for report.md. ``oof``: (probs, targets) aligned with ``train_keys``;
    ``features``: (train, val) cached features. Either may be None (not computed)."""
    lines = ["## Data issues", "",
             f"From what this run already computed. `tagmill doctor {dataset}` checks more "
             "(resized or recompressed copies, outliers, scarce classes) and shows thumbnails."]
    if oof is not None and len(oof[0]) == len(train_keys):
        probs, targets = oof
        classes = manifest.classes
        if manifest.task == "single":
            issues = [i for i in single_label_issues(probs, targets) if i.flagged]
            rows = [(train_keys[i.index], classes[i.given], classes[i.suggested], i.score) for i in issues[:SHOWN]]
            count = len(issues)
        else:
            issues = multi_label_issues(with_tag_context(probs, targets), targets)  # judged in context, as the doctor does
            per_image: dict[int, list[str]] = {}
            for issue in issues:
                sign = "+" if issue.kind == "missing_tag" else "−"
                per_image.setdefault(issue.index, []).append(f"{sign}{classes[issue.given]}")
            first = list(dict.fromkeys(i.index for i in issues))[:SHOWN]
            score = {i.index: i.score for i in reversed(issues)}
            rows = [(train_keys[r], "", " ".join(per_image[r]), score[r]) for r in first]
            count = len(per_image)
        ids = ids_of(dataset, manifest, [row[0] for row in rows])
        lines += ["", f"- **Label suspects**: {count:,} training image(s) whose given labels the held-out heads "
                      "(k-fold, each image judged by heads that did not see it) find unlikely."]
        if rows:
            header = ["id", "given", "suggested", "score"] if manifest.task == "single" else ["id", "tags to add (+) or remove (−)", "score"]
            body = [[text(ids.get(key, key)), text(given), text(suggested), f"{score:.3f}"] if manifest.task == "single"
                    else [text(ids.get(key, key)), text(suggested), f"{score:.3f}"] for key, given, suggested, score in rows]
            lines += ["", table(header, body)]
    else:
        lines += ["", "- **Label suspects**: not computed for this run (the kept model is not the k-fold-fitted head, or cross-validation sampled the images)."]
    if features is not None and len(features[1]):
        leaks = leaked_val(*features)
        lines += ["", f"- **Leakage**: {leaks:,} of {len(features[1]):,} validation image(s) have an identical or "
                      "near-identical copy in train" + (": the validation score above is flattered by them." if leaks else ".")]
    return "\n".join(lines)


__all__ = ["LEAK_BUDGET_BYTES", "SAME_IMAGE_COSINE", "data_issues_section", "ids_of", "leaked_val"]
