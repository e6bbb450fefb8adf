import pytest
import torch

from tagmill.train.rows import Rows


def test_rows_are_the_batches_concatenated():
    batches = [torch.randn(4, 3, 2), torch.randn(1, 3, 2), torch.randn(4, 3, 2)]
    rows = Rows(9)
    for batch in batches:
        rows.add(batch)
    assert rows.count == 9
    assert torch.equal(rows.tensor(), torch.cat(batches))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bool])
def test_rows_keep_the_batches_dtype(dtype):
    rows = Rows(5)
    rows.add(torch.ones(2, 7).to(dtype))
    assert rows.tensor().dtype == dtype and rows.tensor().shape == (2, 7)


def test_rows_past_the_capacity_grow_and_keep_what_came_before():
    batches = [torch.arange(6).view(3, 2) + 10 * i for i in range(5)]
    rows = Rows(4)  # too small: 15 rows come
    for batch in batches:
        rows.add(batch)
    assert torch.equal(rows.tensor(), torch.cat(batches))


def test_no_rows_is_an_empty_tensor():
    assert Rows(3).tensor().numel() == 0
    assert Rows(0).tensor().numel() == 0


def test_fewer_rows_than_allocated_hold_only_their_own_memory():
    rows = Rows(1000)  # e.g. one rank's share of a split allocated for all of it
    rows.add(torch.ones(3, 4))
    part = rows.tensor()
    assert part.shape == (3, 4)
    assert part.untyped_storage().nbytes() == 3 * 4 * 4
    full = Rows(3)
    full.add(torch.ones(3, 4))
    assert full.tensor().untyped_storage().nbytes() == 3 * 4 * 4
