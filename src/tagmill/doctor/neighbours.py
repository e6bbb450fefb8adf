"""Nearest neighbours by cosine similarity of pooled features, in bounded memory.

Duplicates, train/val leakage and outliers all ask the same question of the features:
which images are most alike. Brute force is exact and runs as chunked matrix products:
each chunk of queries is multiplied with every row and only its top-k survive, so
memory is ``chunk × N`` similarities at a time, never N × N.

Time is N²·D multiply-adds. tagmill's multi-level features have ~4,000 dimensions: for
250,000 images that is 2.5·10^14, over an hour on two cores. Beyond ``EXACT_UP_TO``
images the search therefore runs on the features projected onto their top
``PROJECTED_DIMS`` singular directions (uncentred, so dot products, and with them
cosines, are what the projection preserves best): 16× less work. The doctor measures
the similarity of every candidate pair it reports on the full features again, so the
projection only decides which pairs are looked at. An approximate index (FAISS) would
add a compiled dependency to save time only beyond that scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tagmill.errors import InputError

#: query rows per matrix product: chunk × N float32 similarities live at once
#: (1,024 × 250,000 × 4 bytes = 1 GB at the largest scale planned; less below)
DEFAULT_CHUNK = 1024
#: up to this many images the search is exact on the full features (20k² × 4k
#: multiply-adds: well under a minute on two cores); beyond, it is projected
EXACT_UP_TO = 20_000
#: dimensions kept by the projection: 16× less work than 4,000 (tests/doctor/
#: test_neighbours.py checks that near copies stay each other's nearest neighbour)
PROJECTED_DIMS = 256


@dataclass
class Neighbours:
    similarity: Tensor  #: (N, k) cosine similarity to each neighbour, highest first
    index: Tensor  #: (N, k) row of each neighbour (never the row itself)


def normalised(features: Tensor) -> Tensor:
    """Rows scaled to unit length (float32): their dot products are cosines."""
    features = features.to(torch.float32)
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def projected(features: Tensor, dims: int = PROJECTED_DIMS, seed: int = 0) -> Tensor:
    """``features`` (N, D) on their top ``dims`` right singular directions (uncentred)."""
    if features.shape[1] <= dims:
        return features.to(torch.float32)
    x = features.to(torch.float32)
    torch.manual_seed(seed)  # pca_lowrank's randomised range finder
    _, _, v = torch.pca_lowrank(x, q=dims, center=False, niter=4)  # v: (D, dims)
    return x @ v


def nearest_neighbours(features: Tensor, k: int = 1, *, chunk: int = DEFAULT_CHUNK,
                       exact_up_to: int = EXACT_UP_TO) -> Neighbours:
    """The ``k`` most similar other rows of ``features`` (N, D) for every row (on the
    projected features when N > ``exact_up_to``: see the module docstring)."""
    n = features.shape[0]
    if features.dim() != 2:
        raise InputError(f"features must be (N, D), not {tuple(features.shape)}")
    if not 1 <= k < n:
        raise InputError(f"k must be between 1 and N-1 = {n - 1}, not {k}")
    unit = normalised(features if n <= exact_up_to else projected(features))
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
    unit = normalised(features)
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


__all__ = ["DEFAULT_CHUNK", "EXACT_UP_TO", "PROJECTED_DIMS", "Neighbours", "nearest_neighbours", "normalised", "projected",
           "similar_pairs"]
