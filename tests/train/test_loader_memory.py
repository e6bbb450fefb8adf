"""Memory that must not grow with the data: what data-loader workers share with the trainer,
and what cross-validating the head keeps alive (bench/README.md, scale_data.py)."""

import gc

import torch

from tagmill.dataset.torch_data import ShardDataset, shard_loader
from tagmill.objective import objective
from tagmill.train import head_fit


def _freeze_count_per_sample(image) -> torch.Tensor:
    """A transform that reports, from the process decoding the sample, how many objects
    the collector has frozen there (a worker's count is what it inherited at the fork)."""
    return torch.tensor(float(gc.get_freeze_count()))


def test_workers_never_scan_the_trainers_objects_and_the_trainer_thaws_after(colour_dataset):
    before = gc.get_freeze_count()
    data = ShardDataset(colour_dataset, "train", _freeze_count_per_sample, shuffle=False)
    counts = []
    for images, _, _ in shard_loader(data, batch_size=8, workers=2):
        counts.extend(images.tolist())
        # while workers run, the trainer's own full collections would copy shared pages too
        assert gc.get_freeze_count() > 0
    assert len(counts) == len(data)
    # every worker forked with the trainer's objects frozen: its collections skip them
    assert min(counts) > 1000
    assert gc.get_freeze_count() == before


def test_an_abandoned_pass_thaws_the_heap_too(colour_dataset):
    before = gc.get_freeze_count()
    data = ShardDataset(colour_dataset, "train", _freeze_count_per_sample, shuffle=False)
    batches = iter(shard_loader(data, batch_size=4, workers=2))
    next(batches)
    assert gc.get_freeze_count() > 0
    del batches  # a caller that stops early (extract_sample on foreign keys) drops the pass
    assert gc.get_freeze_count() == before
    unstarted = iter(shard_loader(data, batch_size=4, workers=2))
    assert gc.get_freeze_count() > 0
    del unstarted
    assert gc.get_freeze_count() == before


def test_a_pass_without_workers_freezes_nothing(colour_dataset):
    data = ShardDataset(colour_dataset, "train", _freeze_count_per_sample, shuffle=False)
    counts = [c for images, _, _ in shard_loader(data, batch_size=8, workers=0) for c in images.tolist()]
    assert counts == [float(gc.get_freeze_count())] * len(data)


def _folds_outer(views, targets, task, num_classes, fold_of, k, grid):
    """Cross-validation as it was written before strengths moved outside the folds: every
    strength's out-of-fold table alive at once."""
    in_cv = (fold_of >= 0).nonzero().flatten()
    position = torch.full_like(fold_of, -1)
    position[in_cv] = torch.arange(len(in_cv))
    oof = {g: torch.zeros(len(in_cv), num_classes) for g in grid}
    models = {}
    for fold in range(k):
        held = (fold_of == fold).nonzero().flatten()
        kept = ((fold_of >= 0) & (fold_of != fold)).nonzero().flatten()
        previous = None
        for l2 in sorted(grid, reverse=True):
            previous = head_fit._fit(views, targets[kept], task, num_classes, l2, init=previous,
                                     max_iter=head_fit.CV_MAX_ITER, rows_of=kept)
            oof[l2][position[held]] = task.probabilities(views[0][held] @ previous[0].T + previous[1])
            models[l2] = previous
    truth = targets[in_cv]
    return {g: task.selection_score(oof[g], truth) for g in grid}, oof, models


def test_cross_validation_keeps_one_table_and_gives_what_every_table_gave():
    torch.manual_seed(0)
    x = torch.randn(300, 24)
    targets = ((x @ torch.randn(24, 5) + torch.randn(300, 5)) > 0.8).float()
    views = [x, x + 0.3 * torch.randn_like(x)]
    task = objective("multi")
    fold_of = head_fit._assign_folds(targets, task, 4, seed=1, limit=240)  # 60 rows left out of CV
    grid = (1e-2, 1e-1, 1.0)
    scores, (l2, table), models = head_fit._cross_validate(views, targets, task, 5, fold_of, 4, grid)
    want_scores, want_oof, want_models = _folds_outer(views, targets, task, 5, fold_of, 4, grid)
    assert list(scores) == list(grid) and scores == want_scores
    assert l2 == max(grid, key=lambda g: (want_scores[g], g)) and torch.equal(table, want_oof[l2])
    assert all(torch.equal(models[g][0], want_models[g][0]) and torch.equal(models[g][1], want_models[g][1])
               for g in grid)
