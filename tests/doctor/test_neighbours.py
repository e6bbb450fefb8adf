"""Nearest neighbours in bounded memory: the same answer as brute force, any chunk size."""

import pytest
import torch

from tagmill.doctor import nearest_neighbours, similar_pairs
from tagmill.errors import InputError


def test_chunked_neighbours_match_brute_force_and_never_name_the_row_itself():
    features = torch.randn(150, 16, generator=torch.Generator().manual_seed(0))
    unit = features / features.norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-float("inf"))
    want = full.topk(3, dim=1)
    got = nearest_neighbours(features, 3, chunk=7)  # chunks that do not divide N
    assert torch.equal(got.index, want.indices)
    assert torch.allclose(got.similarity, want.values, atol=1e-6)
    assert not (got.index == torch.arange(150)[:, None]).any()


def test_near_copies_are_the_pairs_above_the_threshold():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(100, 32, generator=g)
    copies = {(5, 100), (17, 101), (60, 102)}  # rows 100..102: slightly changed copies
    extra = torch.stack([features[i] + 0.01 * torch.randn(32, generator=g) for i, _ in sorted(copies)])
    pairs = similar_pairs(torch.cat([features, extra]), 0.99, chunk=16)
    assert {(i, j) for i, j, _ in pairs} == copies
    assert all(s >= 0.99 for _, _, s in pairs) and [s for *_, s in pairs] == sorted((s for *_, s in pairs), reverse=True)


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="k must be"):
        nearest_neighbours(torch.randn(3, 4), 3)
    with pytest.raises(InputError, match="threshold"):
        similar_pairs(torch.randn(3, 4), 1.5)


def test_projected_search_still_pairs_near_copies_and_stays_within_kind():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 1024, generator=g).relu() * 2  # non-negative, like pooled activations
    rows = centres.repeat_interleave(25, dim=0) + torch.randn(1000, 1024, generator=g).relu()
    originals = torch.randperm(1000, generator=g)[:20]
    copies = rows[originals] + 0.1 * torch.randn(20, 1024, generator=g)  # recompressed / resized, say
    fast = nearest_neighbours(torch.cat([rows, copies]), 5, exact_up_to=100)  # 1,020 > 100: projected to 256 dims
    assert torch.equal(fast.index[1000:, 0], originals)  # every copy's nearest image is its original
    assert (fast.index[originals, 0] == torch.arange(1000, 1020)).all()
    kind = torch.cat([torch.arange(1000) // 25, originals // 25])
    assert (kind[fast.index] == kind[:, None]).float().mean() >= 0.99  # neighbours are of the image's own kind
