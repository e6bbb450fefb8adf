"""The same picture twice: exact copies and near-copies (resized, recompressed, cropped).

*Exact* copies decode to the same pixels (``scan.ImageFacts.digest``), whatever their
file bytes. *Near* copies need two witnesses, because neither alone separates them:

- pooled backbone features are built to say *what* an image shows, so two different
  photos of one kind of thing can be as alike as an image and its recompressed copy
  (on the dev sets, copies scored cosine 0.82–0.97 and distinct nearest neighbours up
  to 0.99);
- a perceptual hash says how the picture is laid out; it survives resizing and
  recompression, but small, simple pictures on a plain background (icons, clothes on
  black) can hash alike without being the same picture.

A pair is a near copy when both agree: hash distance at most ``HASH_BITS`` and feature
cosine at least ``MIN_COSINE``. These values were set before ``bench/doctor.py`` existed;
its dev sets show they do not separate copies from look-alikes on icons and line art
(the hash is computed on the grey image, so colour variants hash alike, and small crops
of line art move it 20+ bits): see ``bench/README.md``. A colour- and position-aware
check of the candidates is the known next step.

Candidates come from the feature neighbours (``neighbours.nearest_neighbours``,
chunked, never N×N) and from images whose hashes agree exactly on one of four 16-bit
quarters (a pair within 3 bits always does); candidates are then checked one by one,
so the cost grows with N·k, not N².
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from tagmill.doctor.neighbours import Neighbours, normalised
from tagmill.doctor.scan import ImageFacts

#: largest perceptual-hash distance (bits of 64) of a near copy; see the module docstring
HASH_BITS = 12
#: smallest feature cosine of a near copy; see the module docstring
MIN_COSINE = 0.80
#: a hash quarter shared by more images than this says "plain background", not "copy":
#: such buckets add no candidates (their members still get their feature neighbours)
MAX_BUCKET = 64
#: exact-copy groups up to this size list every pair; bigger ones pair each member with
#: the group's first image in every split (enough to see each copy and each leak)
ALL_PAIRS_UP_TO = 20


@dataclass(frozen=True)
class DuplicatePair:
    a: int  #: row of the first image (a < b)
    b: int
    kind: str  #: "exact" or "near"
    similarity: float  #: cosine of the two images' features
    hash_bits: int  #: perceptual-hash distance in bits


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


def find_duplicates(facts: list[ImageFacts], features: Tensor, neighbours: Neighbours, *,
                    hash_bits: int = HASH_BITS, min_cosine: float = MIN_COSINE) -> list[DuplicatePair]:
    """Exact and near copies among ``facts`` (rows aligned with ``features`` (N, D) and
    ``neighbours``), exact first, then by similarity."""
    codes = np.array([f.phash for f in facts], dtype=np.uint64)
    exact = _exact_pairs(facts)
    candidates = _bucket_pairs(codes)
    rows = torch.arange(len(facts)).repeat_interleave(neighbours.index.shape[1]).tolist()
    candidates.update((min(i, j), max(i, j)) for i, j in zip(rows, neighbours.index.flatten().tolist(), strict=True))
    candidates -= exact
    candidates = {(i, j) for i, j in candidates if facts[i].digest and facts[j].digest}
    unit = normalised(features)

    def measured(pairs: list[tuple[int, int]]) -> tuple[list[float], list[int]]:
        if not pairs:
            return [], []
        a, b = (np.array(side) for side in zip(*pairs, strict=True))
        cosine = (unit[torch.from_numpy(a)] * unit[torch.from_numpy(b)]).sum(dim=1)
        return cosine.tolist(), hash_distances(codes, a, b).tolist()

    found = []
    exact_list = sorted(exact)
    for (i, j), cos, bits in zip(exact_list, *measured(exact_list), strict=True):
        found.append(DuplicatePair(i, j, "exact", cos, bits))
    candidate_list = sorted(candidates)
    for (i, j), cos, bits in zip(candidate_list, *measured(candidate_list), strict=True):
        if bits <= hash_bits and cos >= min_cosine:
            found.append(DuplicatePair(i, j, "near", cos, bits))
    found.sort(key=lambda p: (p.kind != "exact", -p.similarity, p.a, p.b))
    return found


__all__ = ["ALL_PAIRS_UP_TO", "HASH_BITS", "MAX_BUCKET", "MIN_COSINE", "DuplicatePair", "find_duplicates", "hash_distances"]
