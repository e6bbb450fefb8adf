"""Per-batch results written into one tensor allocated before the loop.

Why not a list of per-batch tensors joined by ``torch.cat`` at the end: each batch's
results are small blocks that live to the end of the pass, allocated between that
batch's large activations, which are freed. glibc's heap can then neither hand the
gaps back nor fit the next batch's activations into them, and grows by about a batch's
worth of activations per batch. Predicting the 25,068 validation images of
bench/scale_data.py's 250k set grew the trainer's heap from 157 to 1,347 MB that way,
for 18 MB of results; written into one tensor allocated up front, to 185 MB.

``extract_features`` (torchrun ranks, remote run directories) keeps its per-batch
pieces: a rank's share of a split is known only roughly there, and the pieces are
freed one by one as they are put in key order.
"""

from __future__ import annotations

import torch


class Rows:
    """Rows (a batch's first dimension) appended into one tensor of ``capacity`` rows,
    allocated at the first batch with its dtype and row shape. ``capacity`` should be
    the most rows the pass can give; past it the tensor doubles (one copy)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._data: torch.Tensor | None = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        if self._data is None:
            self._data = torch.empty((self._capacity, *rows.shape[1:]), dtype=rows.dtype)
        end = self.count + len(rows)
        if end > len(self._data):
            grown = torch.empty((max(end, 2 * len(self._data)), *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self.count] = self._data[: self.count]
            self._data = grown
        self._data[self.count : end] = rows
        self.count = end

    def tensor(self) -> torch.Tensor:
        """The rows so far, (count, ...), holding no more memory than they need: the
        allocated tensor when it is full, else a copy of its first rows. A view would
        keep the whole allocation alive, and pickling one (``distributed.gather`` of a
        rank's validation share, allocated for the whole split) sends all of it."""
        if self._data is None:
            return torch.empty(0)
        if self.count == len(self._data):
            return self._data
        return self._data[: self.count].clone()
