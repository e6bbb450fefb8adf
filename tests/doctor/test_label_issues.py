"""Label issues from out-of-fold probabilities: planted mistakes come out on top."""

import pytest
import torch

from tagmill.doctor import multi_label_issues, single_label_issues, with_tag_context
from tagmill.errors import InputError
from tagmill.objective import objective
from tagmill.train.head_fit import fit_head


def clusters(n_per_class: int, classes: int, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_flipped_labels_are_the_top_suspects_with_the_true_class_suggested():
    features, truth = clusters(60, 4)
    g = torch.Generator().manual_seed(1)
    flipped = torch.randperm(len(truth), generator=g)[:12]  # 5%
    given = truth.clone()
    given[flipped] = (truth[flipped] + 1 + torch.randint(0, 3, (12,), generator=g)) % 4
    fit = fit_head([features], given, objective("single"))
    assert fit.oof_probs is not None and fit.oof_probs.shape == (240, 4)

    issues = single_label_issues(fit.oof_probs, given)
    assert sorted(i.index for i in issues) == list(range(240))  # every image ranked once
    top = issues[: len(flipped)]
    found = {i.index for i in top} & set(flipped.tolist())
    assert len(found) >= 11  # precision at k = number planted
    for issue in top:
        if issue.index in found:
            assert issue.flagged and issue.suggested == int(truth[issue.index]) and issue.given != issue.suggested
    assert sum(i.flagged for i in issues) <= 2 * len(flipped)  # clean images are rarely flagged


def test_a_label_the_models_all_but_rule_out_outranks_one_they_merely_doubt():
    # image 0: 2% for its given class, the rest split between two others (the models
    # cannot say which is right, but the given one is not); image 1: 20% against a clear
    # favourite; image 2: the given class ahead; image 3: a tie, not flagged
    probs = torch.tensor([[0.02, 0.49, 0.49], [0.20, 0.80, 0.00], [0.70, 0.20, 0.10], [0.45, 0.45, 0.10]])
    issues = single_label_issues(probs, torch.tensor([0, 0, 0, 0]))
    assert [i.index for i in issues] == [0, 1, 3, 2]
    by_index = {i.index: i for i in issues}
    assert by_index[0].score == pytest.approx(0.49 / 0.51) and by_index[1].score == pytest.approx(0.8)
    assert by_index[1].suggested == 1 and by_index[0].suggested in (1, 2)
    assert by_index[3].score == pytest.approx(0.5) and not by_index[3].flagged
    assert by_index[2].score == pytest.approx(0.2 / 0.9)


def test_the_score_is_above_one_half_exactly_when_flagged():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(300, 5, generator=g) ** 3
    probs = probs / probs.sum(dim=1, keepdim=True)
    labels = torch.randint(0, 5, (300,), generator=g)
    issues = single_label_issues(probs, labels)
    assert all(0.0 <= i.score <= 1.0 for i in issues)
    assert all(i.flagged == (i.score > 0.5) for i in issues)
    scores = [i.score for i in issues]
    assert scores == sorted(scores, reverse=True)  # flagged first is then plain score order
    assert any(i.flagged for i in issues) and not all(i.flagged for i in issues)


def test_missing_and_wrong_tags_are_found_per_image_and_tag():
    features, groups = clusters(50, 3, seed=2)
    targets = torch.nn.functional.one_hot(groups, 3).float()  # tag k on group k's images
    g = torch.Generator().manual_seed(3)
    dropped = torch.randperm(150, generator=g)[:6]
    added = torch.randperm(150, generator=g)[:6]
    given = targets.clone()
    given[dropped, groups[dropped]] = 0.0  # a tag left off
    wrong_tag = (groups[added] + 1) % 3
    given[added, wrong_tag] = 1.0  # a tag that does not belong
    fit = fit_head([features], given, objective("multi"))
    assert fit.oof_probs is not None

    issues = multi_label_issues(fit.oof_probs, given)
    found = {(i.index, i.given, i.kind) for i in issues}
    planted_missing = {(int(i), int(groups[i]), "missing_tag") for i in dropped}
    planted_wrong = {(int(i), int(t), "wrong_tag") for i, t in zip(added, wrong_tag, strict=True)}
    assert len(planted_missing & found) >= 5 and len(planted_wrong & found) >= 5
    assert len(issues) <= 3 * 12  # flagged pairs stay few: 450 (image, tag) pairs in all


def test_bad_shapes_are_input_errors():
    with pytest.raises(InputError, match="probabilities"):
        single_label_issues(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="differ in shape"):
        multi_label_issues(torch.rand(3, 2), torch.zeros(3, 3))
    with pytest.raises(InputError, match="finite"):
        single_label_issues(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))


def test_other_tags_give_context_the_pixels_lack():
    """Tag 1 ("person") comes with every tag 0 ("man"); the held-out heads saw only noise,
    so their probabilities cannot tell which images lost "person". The context can."""
    g = torch.Generator().manual_seed(5)
    n = 400
    man = torch.rand(n, generator=g) < 0.3
    person = man | (torch.rand(n, generator=g) < 0.2)
    other = torch.rand(n, generator=g) < 0.4  # a tag unrelated to both
    given = torch.stack([man, person, other], dim=1).float()
    lost = torch.nonzero(man).flatten()[:8]
    given[lost, 1] = 0.0  # "person" left off 8 of the men
    probs = given.mean(dim=0).expand(n, 3) + 0.01 * torch.rand(n, 3, generator=g)  # uninformative heads

    before = {(i.index, i.given) for i in multi_label_issues(probs, given) if i.kind == "missing_tag"}
    in_context = with_tag_context(probs, given)
    after = multi_label_issues(in_context, given)
    missing = [(i.index, i.given) for i in after if i.kind == "missing_tag"]
    planted = {(int(i), 1) for i in lost}
    assert len(planted & before) < 4  # the heads alone: noise
    assert set(missing[:8]) == planted  # in context: the 8 lost tags rank first
    assert in_context[lost, 1].min() > 0.5 > in_context[~man & ~person, 1].max()
    assert in_context.shape == probs.shape and torch.isfinite(in_context).all()


def test_context_leaves_what_it_cannot_judge():
    probs = torch.rand(50, 3)
    always = torch.stack([torch.ones(50), (torch.arange(50) % 2).float(), torch.zeros(50)], dim=1)
    out = with_tag_context(probs, always)
    assert torch.equal(out[:, 0], probs[:, 0]) and torch.equal(out[:, 2], probs[:, 2])  # always / never given
    assert not torch.equal(out[:, 1], probs[:, 1])
    few = torch.rand(6, 3)
    assert torch.equal(with_tag_context(few, (few > 0.5).float()), few)  # too few images to fold
