"""The training report's leakage count: streamed in blocks, the same answer as all at once."""

from __future__ import annotations

import torch

from tagmill.doctor.in_training import SAME_IMAGE_COSINE, _block_rows, leaked_val


def _reference(train: torch.Tensor, val: torch.Tensor) -> int:
    unit_train = train / train.norm(dim=1, keepdim=True)
    unit_val = val / val.norm(dim=1, keepdim=True)
    return int(((unit_val @ unit_train.T).max(dim=1).values >= SAME_IMAGE_COSINE).sum())


def test_leaked_val_counts_copies_whatever_the_blocks():
    torch.manual_seed(0)
    train = torch.randn(500, 16)
    val = torch.randn(70, 16)
    val[3] = train[0]  # identical
    val[10] = train[499] * 2.5  # same direction: cosine 1
    val[11] = train[499] * 2.5  # two validation copies of one training row count twice
    val[40] = train[250] + 1e-4 * torch.randn(16)  # a hair away: still a copy
    val[69] = train[123] + 0.5 * torch.randn(16)  # a different image
    expected = _reference(train, val)
    assert expected == 4
    # budgets from blocks of one row to one block holding everything
    for budget in (4 * (1 + 2 * 16), 4 * 1000, 4 * 20_000, 1 << 26):
        assert leaked_val(train, val, budget=budget) == expected


def test_leaked_val_reads_no_more_than_its_budget_at_once():
    for dim in (1, 16, 848, 4096):
        for elements in (1, 100, 1 << 20, 1 << 24):
            b = _block_rows(dim, elements)
            assert b >= 1
            assert b == 1 or b * b + 2 * b * dim <= elements
            assert (b + 1) ** 2 + 2 * (b + 1) * dim > elements  # and uses it


def test_leaked_val_empty_train():
    assert leaked_val(torch.zeros(0, 8), torch.randn(5, 8)) == 0
