"""Nearest neighbours by cosine similarity of pooled features, in bounded memory.

Duplicates, train/val leakage and outliers all ask the same question of the feature
cache: which images are most alike. Brute force is exact and, on the features tagmill
keeps (a few thousand dimensions), fast enough as chunked matrix products: each chunk of
queries is multiplied with every row and only its top-k survive, so memory is
``chunk × N`` similarities at a time, never N × N. For 250,000 images × 4,000 features
that is 250k²·4k ≈ 2.5·10^14 multiply-adds, minutes on a CPU and well within the
budget the issue sets; an approximate index (FAISS) would add a dependency to save time
only beyond that scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tagmill.errors import InputError

#: query rows per matrix product: chunk × N float32 similarities live at once
#: (1,024 × 250,000 × 4 bytes = 1 GB at the largest scale planned; less below)
DEFAULT_CHUNK = 1024


@dataclass
class Neighbours:
    similarity: Tensor  #: (N, k) cosine similarity to each neighbour, highest first
    index: Tensor  #: (N, k) row of each neighbour (never the row itself)


def _normalised(features: Tensor) -> Tensor:
    features = features.to(torch.float32)
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbours(features: Tensor, k: int = 1, *, chunk: int = DEFAULT_CHUNK) -> Neighbours:
    """The ``k`` most similar other rows of ``features`` (N, D) for every row."""
    n = features.shape[0]
    if features.dim() != 2:
        raise InputError(f"features must be (N, D), not {tuple(features.shape)}")
    if not 1 <= k < n:
        raise InputError(f"k must be between 1 and N-1 = {n - 1}, not {k}")
    unit = _normalised(features)
    sims, rows = [], []
    for start in range(0, n, chunk):
        block = unit[start : start + chunk] @ unit.T  # (c, N)
        own = torch.arange(start, start + block.shape[0])
        block[torch.arange(block.shape[0]), own] = -float("inf")  # a row is not its own neighbour
        top = block.topk(k, dim=1)
        sims.append(top.values)
        rows.append(top.indices)
    return Neighbours(torch.cat(sims), torch.cat(rows))


def similar_pairs(features: Tensor, threshold: float, *, chunk: int = DEFAULT_CHUNK) -> list[tuple[int, int, float]]:
    """Every pair (i < j) whose cosine similarity is at least ``threshold``, most similar first."""
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"a cosine similarity threshold must be in [-1, 1], not {threshold}")
    unit = _normalised(features)
    n = unit.shape[0]
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, n, chunk):
        block = unit[start : start + chunk] @ unit.T  # (c, N)
        rows, cols = (block >= threshold).nonzero(as_tuple=True)
        rows = rows + start
        keep = rows < cols  # each pair once, never a row with itself
        for i, j in zip(rows[keep].tolist(), cols[keep].tolist(), strict=True):
            pairs.append((i, j, float(block[i - start, j])))
    pairs.sort(key=lambda pair: -pair[2])
    return pairs


__all__ = ["DEFAULT_CHUNK", "Neighbours", "nearest_neighbours", "similar_pairs"]
