"""The same picture twice: exact copies and near-copies (resized, recompressed, cropped).

*Exact* copies decode to the same pixels (``scan.ImageFacts.digest``), whatever their
file bytes. *Near* copies are found in two steps:

- **candidates**: each image's nearest neighbours by pooled features
  (``neighbours.nearest_neighbours``, chunked, never N×N) and images whose grey
  perceptual hashes agree exactly on one of four 16-bit quarters (a pair within 3 bits
  always does).
- **three witnesses**, all required: feature cosine at least ``MIN_COSINE`` (the same
  kind of picture), the grey layout (the perceptual hash's low DCT coefficients
  themselves, not their bits) within ``LAYOUT`` (the same layout), and the colour
  thumbnails, aligned, differing nowhere by more than ``MAX_DIFFERENCE``
  (``thumbnails.compare``: the same colours and details). The layout is compared where
  the two pictures overlap: between one and the crop window of the other that the
  thumbnails aligned with (a 3–6% crop moved the whole picture's hash by up to 24 bits on
  dev Fashion-MNIST, and by up to 35 on dev colour icons). Only pairs whose whole-picture hashes
  are within ``CANDIDATE_HASH_BITS`` are aligned at all (the alignment is the cost). Features alone pass distinct
  neighbours up to cosine 0.99; features and hash together passed colour variants of one
  icon (a red and a blue heart hash alike); features and pixels together passed
  overlapping crops of one smooth photo (a rocket against the sky, shifted by a tenth),
  which the aligned hash rejected. *Known limit*: on line art (the bench's outline drawings)
  the pixels reject many resized and cropped copies of 1-px lines. Thumbnails are exact
  area averages at every size (``thumbnails.thumbnail``): with Pillow's BOX filter,
  resized and 1–2 px cropped copies of 28-px Fashion-MNIST differed by up to 46 in some
  cell, as much as distinct garments do, and 72-px colour icons lost their resizes and
  crops the same way (see bench/README.md).

The cost grows with N·k candidate pairs, not N².
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from tagmill.doctor import thumbnails
from tagmill.doctor.neighbours import Neighbours, normalised
from tagmill.doctor.scan import ImageFacts

#: smallest feature cosine of a near copy: planted copies on the dev sets of
#: bench/doctor.py scored 0.94 and more
MIN_COSINE = 0.80
#: largest layout distance of a near copy (``thumbnails._window_layout_distance``: the
#: low DCT coefficients of one picture and of the window of the other it aligns with,
#: their distance relative to their size; 0 the same, about 1.4 unrelated). It replaced
#: a limit of 10 bits on the hash of those coefficients, whose bits flip on icons when a
#: grey level moves by one or two. Chosen on the dev sets of bench/doctor.py with exact
#: area thumbnails: the largest planted copies whose pixels pass were at 0.065 (dev
#: Fashion-MNIST), 0.071 (dev colour OpenMoji, but for two at 0.13 and 0.16) and 0.085
#: (dev outlines); 0.08 keeps all 60 Fashion-MNIST copies (0.06 lost one) and, against 10
#: bits on the same thumbnails, finds 278 of 300 colour copies (245) with as many pairs (12) of a copy and a
#: look-alike, and on Fashion-MNIST 2 such pairs (5) and 51 pairs of two originals (317)
#: (see bench/README.md)
LAYOUT = 0.08
#: largest whole-picture hash distance of a pair that is aligned and judged: planted 3–6%
#: crops on the dev sets of bench/doctor.py moved it by up to 24 bits (Fashion-MNIST) and
#: 25 (outline drawings, which the pixels reject anyway); the aligned pairs, and with
#: them the time, grow with it (on dev Fashion-MNIST 10.8k pairs pass 12 bits, 47k pass 24)
CANDIDATE_HASH_BITS = 24
#: smallest share of a picture's area that the aligned window of a near copy keeps: the
#: bench plants crops of 3–6% per side (77–88% kept; the alignment measured 75–87% on dev
#: Fashion-MNIST), and ``thumbnails.CROPS`` searches up to 10% per side (64%): a window
#: that deep is a different framing of the scene, not a copy
MIN_KEPT = 0.70
#: largest difference (0–255) of a thumbnail cell between a near copy and its source,
#: aligned (``thumbnails.difference``): on the colour emoji dev set of bench/doctor.py,
#: planted copies (JPEG at quality 50, 70–90% resizes, 3–6% crops) scored at most 9.2
#: and distinct look-alikes at least 17.4; on line art no value separates them (see
#: ``thumbnails``), and this one keeps the emoji's margin on both sides
MAX_DIFFERENCE = 15.0
#: a hash quarter shared by more images than this says "plain background", not "copy":
#: such buckets add no candidates (their members still get their feature neighbours)
MAX_BUCKET = 64
#: candidate pairs measured at once: their two sides' features (4,096 rows of ~4,000 of
#: them: 130 MB) or float thumbnails (110 MB) are gathered a chunk at a time (all the
#: 41,590 pairs aligned at 50,000 images of bench/doctor_scale.py took 2.3 GB at once);
#: a multiple of ``thumbnails.CHUNK``, so the alignment's own chunks are unchanged
PAIRS_AT_ONCE = 4096
#: exact-copy groups up to this size list every pair; bigger ones pair each member with
#: the group's first image in every split (enough to see each copy and each leak)
ALL_PAIRS_UP_TO = 20


@dataclass(frozen=True)
class DuplicatePair:
    a: int  #: row of the first image (a < b)
    b: int
    kind: str  #: "exact" or "near"
    similarity: float  #: cosine of the two images' features
    hash_bits: int  #: perceptual-hash distance in bits, whole pictures
    difference: float = 0.0  #: largest aligned thumbnail cell difference (0 for exact copies)
    layout: float = 0.0  #: layout distance between one and the aligned window of the other (0 for exact copies)
    kept: float = 1.0  #: share of the other's area in that window


def hash_distances(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between ``codes[a]`` and ``codes[b]`` (uint64 hashes)."""
    x = np.bitwise_xor(codes[a], codes[b]).astype(">u8")
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def _exact_pairs(facts: list[ImageFacts]) -> set[tuple[int, int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for row, fact in enumerate(facts):
        if fact.digest:
            groups[fact.digest].append(row)
    pairs: set[tuple[int, int]] = set()
    for rows in groups.values():
        if len(rows) < 2:
            continue
        if len(rows) <= ALL_PAIRS_UP_TO:
            pairs.update(combinations(rows, 2))
            continue
        first_in: dict[str, int] = {}
        for row in rows:
            first_in.setdefault(facts[row].split, row)
        for row in rows:
            pairs.update((min(row, other), max(row, other)) for other in first_in.values() if other != row)
    return pairs


def _bucket_pairs(codes: np.ndarray) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for quarter in range(4):
        buckets: dict[int, list[int]] = defaultdict(list)
        for row, part in enumerate(((codes >> np.uint64(16 * quarter)) & np.uint64(0xFFFF)).tolist()):
            buckets[part].append(row)
        for rows in buckets.values():
            if 1 < len(rows) <= MAX_BUCKET:
                pairs.update(combinations(rows, 2))
    return pairs


def pixel_differences(facts: list[ImageFacts], pairs: list[tuple[int, int]]) -> Tensor:
    """(P,) ``thumbnails.difference`` of each pair of rows of ``facts``."""
    return aligned_comparison(facts, pairs)[0]


def aligned_comparison(facts: list[ImageFacts], pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(P,) ``thumbnails.compare`` of each pair of rows of ``facts``: the largest aligned
    cell difference, the layout distance between one and the aligned window of the other,
    and the share of the other's area that window keeps."""
    if not pairs:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    rows = sorted({r for pair in pairs for r in pair})
    at = {r: n for n, r in enumerate(rows)}
    stored = thumbnails.stacked([facts[r].thumbnail for r in rows])  # (R, SIDE, SIDE, 3) uint8
    a = torch.tensor([at[i] for i, _ in pairs])
    b = torch.tensor([at[j] for _, j in pairs])
    parts = [thumbnails.compare(thumbnails.as_pictures(stored[a[start:start + PAIRS_AT_ONCE]]),
                                thumbnails.as_pictures(stored[b[start:start + PAIRS_AT_ONCE]]))
             for start in range(0, len(pairs), PAIRS_AT_ONCE)]
    worst, layout, kept = (torch.cat(column) for column in zip(*parts, strict=True))
    return worst, layout, kept


def measure_pairs(facts: list[ImageFacts], features: Tensor, neighbours: Neighbours, *,
                  hash_bits: int = CANDIDATE_HASH_BITS,
                  min_cosine: float = MIN_COSINE) -> tuple[list[DuplicatePair], list[DuplicatePair]]:
    """The exact copies among ``facts`` (rows aligned with ``features`` (N, D) and
    ``neighbours``), and the candidate pairs whose feature cosine is at least
    ``min_cosine`` and whole-picture hashes within ``hash_bits``, each aligned and
    measured (kind "near"; not yet judged by the layout or the pixels)."""
    codes = np.array([f.phash for f in facts], dtype=np.uint64)
    exact = _exact_pairs(facts)
    candidates = _bucket_pairs(codes)
    rows = torch.arange(len(facts)).repeat_interleave(neighbours.index.shape[1]).tolist()
    candidates.update((min(i, j), max(i, j)) for i, j in zip(rows, neighbours.index.flatten().tolist(), strict=True))
    candidates -= exact
    candidates = {(i, j) for i, j in candidates if facts[i].digest and facts[j].digest}

    def measured(pairs: list[tuple[int, int]]) -> tuple[list[float], list[int]]:
        if not pairs:
            return [], []
        a, b = (torch.from_numpy(np.array(side)) for side in zip(*pairs, strict=True))
        # both sides' rows are gathered and scaled to unit length a chunk of pairs at a
        # time: all at once, the 5 million candidates of 250,000 images would copy 80 GB
        # of features per side, and a unit-length copy of all the features is 4 GB more
        cosine = torch.cat([(normalised(features[a[start:start + PAIRS_AT_ONCE]])
                             * normalised(features[b[start:start + PAIRS_AT_ONCE]])).sum(dim=1)
                            for start in range(0, len(a), PAIRS_AT_ONCE)])
        return cosine.tolist(), hash_distances(codes, a.numpy(), b.numpy()).tolist()

    exact_list = sorted(exact)
    exact_pairs = [DuplicatePair(i, j, "exact", cos, bits) for (i, j), cos, bits in
                   zip(exact_list, *measured(exact_list), strict=True)]
    candidate_list = sorted(candidates)
    close = [(pair, cos, bits) for pair, cos, bits in zip(candidate_list, *measured(candidate_list), strict=True)
             if cos >= min_cosine and bits <= hash_bits]
    differences, layouts, kept = (t.tolist() for t in aligned_comparison(facts, [pair for pair, _, _ in close]))
    near = [DuplicatePair(i, j, "near", cos, bits, diff, layout, share)
            for ((i, j), cos, bits), diff, layout, share in zip(close, differences, layouts, kept, strict=True)]
    return exact_pairs, near


def find_duplicates(facts: list[ImageFacts], features: Tensor, neighbours: Neighbours, *, max_layout: float = LAYOUT,
                    min_cosine: float = MIN_COSINE, max_difference: float = MAX_DIFFERENCE) -> list[DuplicatePair]:
    """Exact and near copies among ``facts`` (see :func:`measure_pairs`; near: the aligned
    layout within ``max_layout``, the aligned pixels within ``max_difference``, the window
    keeping at least ``MIN_KEPT``), exact first, then by similarity."""
    exact, candidates = measure_pairs(facts, features, neighbours, min_cosine=min_cosine)
    found = exact + [p for p in candidates if p.layout <= max_layout and p.difference <= max_difference and p.kept >= MIN_KEPT]
    found.sort(key=lambda p: (p.kind != "exact", -p.similarity, p.a, p.b))
    return found


__all__ = ["ALL_PAIRS_UP_TO", "CANDIDATE_HASH_BITS", "LAYOUT", "MAX_BUCKET", "MAX_DIFFERENCE", "MIN_COSINE", "MIN_KEPT", "DuplicatePair", "find_duplicates",
           "aligned_comparison", "hash_distances", "measure_pairs", "pixel_differences"]
