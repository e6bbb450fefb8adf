"""Is one picture a copy of another? Small colour thumbnails compared after alignment.

Pooled features say *what* an image shows and a grey perceptual hash how it is laid
out; neither tells a recompressed copy from a different drawing of the same thing (a red
heart and a blue one, two flags with the same stripes; see ``duplicates.py``). The
pixels do, once the copy is aligned with its source: a copy may be resized (the
thumbnail absorbs that), recompressed (small errors everywhere) or cropped by a few
percent on each side (the thumbnail's content moves and grows).

Each image keeps a ``SIDE``×``SIDE`` RGB thumbnail (area averages). To compare two, crop
windows of one are resampled by exact area averages to ``COMPARED``×``COMPARED`` and
matched against the other's whole thumbnail: per axis, every pair of cuts in ``CROPS``,
then two finer searches around the best, the other axis held fixed; in both directions
(either image may be the cropped one). The verdict is the *largest* amount by which a
cell of the copy lies outside what the source's chosen window gives when shifted by up
to half a cell (see ``_outside_envelope``): a copy differs a little everywhere, a
different picture a lot somewhere (the other colour, the other symbol, the words on a
sign), even when its mean difference is as small as a copy's. ``compare`` also returns
how far the grey layout of the one picture lies from the other's chosen window (the
perceptual hash's low DCT coefficients, compared as numbers: a crop moves the whole
picture's hash, on dev Fashion-MNIST planted 3–6% crops by 4–24 bits, their windows' by
0–12) and the share of the area that window keeps.

On the dev sets of ``bench/doctor.py``, colour emoji (5 planted copies, 1,942 look-alike
pairs): planted copies scored at most 9.2 and look-alikes at least 17.4 at 48→12; the
mean difference could not separate them (copies 3.8–5.7, look-alikes from 5.3). A
32-cell thumbnail compared at 16 separated the emoji as well but not a 5% crop of a
detailed photo (29.8: too few stored cells per compared cell), and 32→8 no longer told
a small white square from a large one. *Known limit*: thin black outlines on white
(OpenMoji's outline set) defeat it both ways: resized or cropped copies of 1-px lines
scored up to 56 (the lines' share of a cell changes with the resampling), and the set
holds hundreds of distinct symbols drawn identically (every flag is one rectangle),
which the pixels cannot tell apart.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: side of the stored thumbnail (RGB, uint8: 6.75 KiB per image, 1.7 GB for 250,000)
SIDE = 48
#: side at which thumbnails are compared: a quarter of the stored side, so that a crop
#: window resampled from the stored thumbnail averages 4×4 of its cells (see above)
COMPARED = 12
#: the share of each side a copy's crop may have cut off (tried for every side)
CROPS = (0.0, 0.025, 0.05, 0.075, 0.1)
#: pairs compared at once: bounds memory (each holds len(CROPS)² candidate windows)
CHUNK = 256


def _area_matrix(n: int) -> np.ndarray:
    """(SIDE, n) exact area averages of ``n`` equal pixels onto ``SIDE`` equal cells (each
    cell weighs the pixels it overlaps by the overlap), shrinking or enlarging."""
    steps = np.arange(SIDE + 1) / SIDE
    pixels = np.arange(n + 1) / n
    overlap = np.minimum(steps[1:, None], pixels[None, 1:]) - np.maximum(steps[:-1, None], pixels[None, :-1])
    overlap = overlap.clip(min=0)
    return overlap / overlap.sum(axis=1, keepdims=True)


#: rows of a picture resampled at once: bounds the float copy of a large photo (256 rows
#: of a 6,000-px-wide picture are 37 MB in float64)
ROWS_AT_ONCE = 256


def thumbnail(image: Image.Image) -> bytes:
    """The ``SIDE``×``SIDE`` RGB thumbnail of an RGB image, as bytes: each cell the exact
    area average of the pixels it overlaps, whatever the picture's size.

    Pillow's BOX filter is not that. When it enlarges, its support (half an input pixel)
    takes the one pixel nearest each cell's centre; when it shrinks by a factor that is
    not a whole number (72→48, 52→48) it gives each cell the pixels whose *centres* fall
    in it, at full weight. Either way an edge lands in one cell or the next depending on
    the picture's size, which is what a resize or a crop changes: on dev Fashion-MNIST
    (28 px, enlarged) planted crops differed by up to 46 once aligned and resizes by up to
    24 (``duplicates.MAX_DIFFERENCE`` is 15), and on dev OpenMoji colour (72 px, shrunk)
    the thumbnail witnesses passed 57 of 100 resizes and 56 of 100 crops. With exact area
    averages every dev Fashion-MNIST copy stayed within 13, and the colour resizes and
    crops passing rose to 82 and 78 (see bench/README.md)."""
    pixels = np.asarray(image)  # (H, W, 3) uint8
    across = _area_matrix(image.width).T  # (W, SIDE)
    # columns first, a band of rows at a time: (H, 3, SIDE)
    columns = np.concatenate([pixels[top : top + ROWS_AT_ONCE].astype(np.float64).transpose(0, 2, 1) @ across
                              for top in range(0, image.height, ROWS_AT_ONCE)])
    cells = np.tensordot(_area_matrix(image.height), columns, axes=1)  # (SIDE, 3, SIDE)
    return np.rint(cells.transpose(0, 2, 1)).clip(0, 255).astype(np.uint8).tobytes()


def as_tensor(thumbnails: list[bytes]) -> Tensor:
    """(N, 3, SIDE, SIDE) float32 in 0–255 from ``thumbnail`` bytes."""
    return as_pictures(stacked(thumbnails))


def stacked(thumbnails: list[bytes]) -> Tensor:
    """(N, SIDE, SIDE, 3) uint8: ``thumbnail`` bytes as they are stored, in one tensor (a
    quarter of ``as_tensor``'s memory: 1.7 GB for 250,000 images)."""
    joined = bytearray().join(thumbnails)  # writable, so numpy and torch share it: no second copy
    return torch.from_numpy(np.frombuffer(joined, dtype=np.uint8).reshape(len(thumbnails), SIDE, SIDE, 3))


def as_pictures(stored: Tensor) -> Tensor:
    """(N, 3, SIDE, SIDE) float32 in 0–255 from :func:`stacked` rows."""
    return stored.permute(0, 3, 1, 2).float()


def _area_matrices(low: Tensor, high: Tensor, parts: int = COMPARED) -> Tensor:
    """(..., parts, SIDE) from windows [low, high] (fractions of the side, any batch
    shape): row j averages the stored cells over the j-th of ``parts`` equal parts of
    the window, each cell weighted by its overlap with that part (exact area resampling
    of a picture that is constant within each stored cell)."""
    steps = torch.arange(parts + 1, dtype=torch.float64) / parts
    out = low.double()[..., None] + (high - low).double()[..., None] * steps  # (..., C+1)
    cells = torch.arange(SIDE + 1, dtype=torch.float64) / SIDE
    overlap = (torch.minimum(out[..., 1:, None], cells[1:]) - torch.maximum(out[..., :-1, None], cells[:-1])).clamp_min(0)
    # a window's part always overlaps some cell (windows stay within half a cell of the
    # picture); the floor only keeps a degenerate one from dividing by zero
    return (overlap / overlap.sum(dim=-1, keepdim=True).clamp_min(1e-12)).float()


#: the window search, per axis: a coarse pass over every (cut at the start, cut at the
#: end) pair of CROPS, then two finer passes around the best (steps of a quarter and a
#: sixteenth of the coarse step), since the coarse step (2.5% of the side) is wider
#: than a stored cell (1/48) and the crop a copy had is anywhere in between. Every cut
#: the search can reach is a whole number of those sixteenths (``_STEP``, 1/640 of the
#: side), so cuts are counted in steps and every window's resampling matrix is computed
#: once (``_lattice``) and looked up: built per pair and window, the matrices were three
#: quarters of the search's time
_STEP = (CROPS[1] - CROPS[0]) / 16
_TOP = round(max(CROPS) / _STEP)  #: the deepest cut, in steps
_COARSE = torch.tensor([round(c / _STEP) for c in CROPS])
_REFINE = (torch.tensor([-2, -1, 0, 1, 2]) * 4, torch.tensor([-2, -1, 0, 1, 2]))


@functools.cache
def _lattice() -> Tensor:
    """(_TOP + 1, _TOP + 1, C, SIDE): ``_area_matrices`` of the window cut by i steps at
    its start and j at its end (10 MB)."""
    cuts = torch.arange(_TOP + 1, dtype=torch.float64) * _STEP
    return _area_matrices(cuts[:, None].expand(-1, _TOP + 1), 1.0 - cuts[None, :].expand(_TOP + 1, -1))


def _candidates(best: tuple[Tensor, Tensor], offsets: Tensor, refine: bool) -> tuple[Tensor, Tensor]:
    """(P, K) cuts at the start and at the end of each window tried, in steps: every pair
    of ``offsets``, added to the ``best`` cuts so far ((P,) each) when refining."""
    cut_start, cut_end = torch.meshgrid(offsets, offsets, indexing="ij")
    cut_start, cut_end = cut_start.flatten()[None], cut_end.flatten()[None]  # (1, K)
    base = best if refine else (torch.zeros_like(best[0]), torch.zeros_like(best[1]))
    cut_start, cut_end = cut_start + base[0][:, None], cut_end + base[1][:, None]  # (P, K)
    return cut_start.clamp(0, _TOP), cut_end.clamp(0, _TOP)


Window = dict[str, tuple[Tensor, Tensor]]  #: per axis ("across", "down"): (cut at start, cut at end), (P,) each


def _aligned(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Window]:
    """Align each ``target`` (P, 3, C, C: whole thumbnails, resampled) with a crop window
    of ``source`` (P, 3, SIDE, SIDE): that window's mean and largest cell differences,
    and the window."""
    p = len(source)
    rows = torch.arange(p)
    lattice = _lattice()
    # per axis: the window chosen so far, as (cut at start, cut at end) in steps, (P,) each
    chosen = {axis: (torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)) for axis in ("across", "down")}
    for offsets, refine in ((_COARSE, False), *((o, True) for o in _REFINE)):
        for axis in ("across", "down"):
            starts, ends = _candidates(chosen[axis], offsets, refine)  # (P, K)
            trying = lattice[starts, ends]  # (P, K, C, SIDE)
            k = trying.shape[1]
            other = "down" if axis == "across" else "across"
            fixed = lattice[chosen[other]]  # (P, C, SIDE)
            # one (3C × SIDE) @ (SIDE × KC) product per pair (broadcasting the K windows
            # against the 3 channels copied both operands K- and 3-fold), compared with
            # the target in the product's own layout (a permuted copy cost as much again)
            if axis == "across":  # rows resampled by the fixed window, columns by each tried one
                half = (fixed[:, None] @ source).reshape(p, 3 * COMPARED, SIDE)  # (P, 3C, SIDE)
                tried = half @ trying.reshape(p, k * COMPARED, SIDE).transpose(1, 2)  # (P, 3C, KC)
                tried = tried.view(p, 3 * COMPARED, k, COMPARED)  # [p, (channel, row), window, column]
                error = tried.sub_(target.reshape(p, 3 * COMPARED, 1, COMPARED)).abs_().sum(dim=(1, 3))  # (P, K)
            else:
                half = (source @ fixed[:, None].transpose(-1, -2)).transpose(1, 2)  # (P, SIDE, 3, C)
                tried = trying.reshape(p, k * COMPARED, SIDE) @ half.reshape(p, SIDE, 3 * COMPARED)  # (P, KC, 3C)
                tried = tried.view(p, k, COMPARED, 3, COMPARED)  # [p, window, row, channel, column]
                error = tried.sub_(target.transpose(1, 2)[:, None]).abs_().sum(dim=(2, 3, 4))  # (P, K)
            best = error.argmin(dim=1)  # (P,)
            chosen[axis] = (starts[rows, best], ends[rows, best])
    mean = error[rows, best] / (3 * COMPARED * COMPARED)
    window = {axis: (start * _STEP, end * _STEP) for axis, (start, end) in chosen.items()}  # shares of the side
    return mean, _outside_envelope(source, target, window), window


#: how far (in compared cells) the chosen window may be off, per axis: the envelope of
#: the source's windows shifted by up to this much is what a copy's cells must lie in
SLACK = 0.5


def _outside_envelope(source: Tensor, target: Tensor, chosen: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """(P,) the largest amount by which a cell of ``target`` lies outside the range of
    values the same cell takes in ``source``'s chosen window shifted by up to ``SLACK``
    cells (mean over colours). Thumbnail cells straddle edges differently in a copy
    than in its source (the copy's grid is not the source's): a sharp edge a quarter
    of a cell away changes a cell by a quarter of the edge's contrast. A shifted
    window reproduces that; a different colour or symbol lies outside every shift."""
    low = torch.full_like(target, float("inf"))
    high = torch.full_like(target, float("-inf"))
    def shifted(axis: str) -> list[Tensor]:
        """(P, C, SIDE) resampling matrices of the chosen window on ``axis``, shifted by
        -SLACK, 0 and +SLACK compared cells."""
        start, end = chosen[axis]
        cell = ((1.0 - end) - start) / COMPARED  # (P,) a compared cell, as a fraction of the side
        return [_area_matrices(start + shift * cell, 1.0 - end + shift * cell) for shift in (-SLACK, 0.0, SLACK)]

    across = shifted("across")
    for my in shifted("down"):
        half = my[:, None] @ source  # (P, 3, C, SIDE)
        for mx in across:
            window = half @ mx[:, None].transpose(-1, -2)  # (P, 3, C, C)
            low, high = torch.minimum(low, window), torch.maximum(high, window)
    outside = (target - high).clamp_min(0) + (low - target).clamp_min(0)  # (P, 3, C, C)
    return outside.mean(dim=1).flatten(1).max(dim=1).values


#: the perceptual hash's grid: ``imagehash.phash`` (what ``scan`` stores) keeps the 8×8
#: lowest frequencies of the DCT of a 32×32 grey picture; the layout distance below
#: compares the same coefficients
HASH_GRID, HASH_KEPT = 32, 8


def _dct_rows() -> Tensor:
    """(HASH_KEPT, HASH_GRID) the lowest rows of the DCT-II (scale irrelevant: the
    layout distance is relative)."""
    k = torch.arange(HASH_KEPT, dtype=torch.float64)[:, None]
    n = torch.arange(HASH_GRID, dtype=torch.float64)[None]
    return torch.cos(torch.pi * k * (2 * n + 1) / (2 * HASH_GRID)).float()


def _low_frequencies(pictures: Tensor, down: Tensor, across: Tensor) -> Tensor:
    """(P, 63) the 8×8 lowest DCT coefficients but the mean (the perceptual hash's, before
    it keeps only their signs) of each picture (P, 3, SIDE, SIDE) in grey, in the window
    whose (P, HASH_GRID, SIDE) resampling matrices are ``down`` and ``across``."""
    grey = (pictures * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=1)  # ITU-R 601, as PIL's "L"
    small = down @ grey @ across.transpose(-1, -2)  # (P, HASH_GRID, HASH_GRID)
    dct = _dct_rows()
    return (dct @ small @ dct.T).flatten(1)[:, 1:]


def _window_layout_distance(source: Tensor, target: Tensor, chosen: Window) -> Tensor:
    """(P,) how far the layout of each ``target`` (whole) lies from that of the ``chosen``
    window of its ``source``: the distance between their low DCT coefficients (the mean
    left out: the pixels judge brightness) relative to the root mean square of their
    two norms (0: the same layout; about 1.4: unrelated ones).

    The perceptual hash keeps only each coefficient's side of the median, and an icon on
    white has most of its coefficients near their median: a grey level or two flips
    their bits. On the dev colour OpenMoji set JPEG copies whose pixels differed by 0–4
    were 12–30 bits from their source, and which copies passed depended on details of
    the thumbnail. The coefficients themselves move little (see ``duplicates.LAYOUT``)."""
    whole = _area_matrices(torch.zeros(len(target)), torch.ones(len(target)), HASH_GRID)
    window = {axis: _area_matrices(start, 1.0 - end, HASH_GRID) for axis, (start, end) in chosen.items()}
    mine = _low_frequencies(source, window["down"], window["across"])
    theirs = _low_frequencies(target, whole, whole)
    scale = ((mine.square().sum(dim=1) + theirs.square().sum(dim=1)) / 2).sqrt()
    # a blank picture has no layout: two of them are 0 apart, not 0/0
    return (mine - theirs).norm(dim=1) / scale.clamp_min(1e-6)


def _kept(chosen: Window) -> Tensor:
    """(P,) the share of the picture's area inside the ``chosen`` window."""
    return torch.stack([1.0 - start - end for start, end in chosen.values()]).prod(dim=0)


def compare(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """How far the thumbnails ``a`` and ``b`` (P, 3, SIDE, SIDE) differ once aligned: (P,)
    the largest amount (0–255) by which a cell of one lies outside what the best-aligned
    crop window of the other allows (``_outside_envelope``; mean over the colour
    channels), (P,) the layout distance between the one and that window of the other
    (``_window_layout_distance``: compared where the pictures overlap, since a crop moves
    the whole picture's layout, not the window's) and (P,) the share of the other's area
    that window keeps (1: no crop). Both directions are aligned; the one whose window
    differs less on average is kept."""
    if len(a) == 0:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    whole = _area_matrices(torch.tensor(0.0), torch.tensor(1.0))  # (C, SIDE)
    worst, layout, kept = [], [], []
    for start in range(0, len(a), CHUNK):
        x, y = a[start : start + CHUNK], b[start : start + CHUNK]
        mean_ab, worst_ab, window_ab = _aligned(x, whole @ y @ whole.T)
        mean_ba, worst_ba, window_ba = _aligned(y, whole @ x @ whole.T)
        ab = mean_ab <= mean_ba
        worst.append(torch.where(ab, worst_ab, worst_ba))
        # the layout and the area of the kept direction only: per row, its source, its
        # target and its window
        rows = ab[:, None, None, None]
        window = {axis: (torch.where(ab, window_ab[axis][0], window_ba[axis][0]),
                         torch.where(ab, window_ab[axis][1], window_ba[axis][1])) for axis in window_ab}
        layout.append(_window_layout_distance(torch.where(rows, x, y), torch.where(rows, y, x), window))
        kept.append(_kept(window))
    return torch.cat(worst), torch.cat(layout), torch.cat(kept)


def difference(a: Tensor, b: Tensor) -> Tensor:
    """(P,) the first of :func:`compare`: the largest aligned cell difference."""
    return compare(a, b)[0]


__all__ = ["COMPARED", "CROPS", "HASH_GRID", "HASH_KEPT", "SIDE", "as_pictures", "as_tensor", "compare", "difference", "stacked", "thumbnail"]
