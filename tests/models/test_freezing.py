"""Freezing, frozen BatchNorm and discriminative learning rates on tiny timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tagmill.errors import InputError
from tagmill.models import (
    classifier_parameters,
    create_classifier,
    freeze_backbone,
    freeze_to,
    layer_groups,
    param_groups,
    set_frozen_bn_eval,
    unfreeze,
)


def tiny(architecture: str = "test_efficientnet", num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_classifier(architecture, num_classes, pretrained=False)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trainable(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_backbone_trains_only_the_head_and_keeps_bn_statistics() -> None:
    model = tiny()
    freeze_backbone(model)
    assert trainable(model) == {id(p) for p in classifier_parameters(model)}
    model.train()  # what a training loop does each epoch...
    assert set_frozen_bn_eval(model) == len(batchnorms(model))  # ...then this
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_freeze_to_freezes_the_first_groups_and_unfreeze_undoes_it() -> None:
    model = tiny()
    groups = layer_groups(model, 3)
    assert len(groups) == 3 and groups[-1] == list(model.get_classifier().named_parameters(prefix="classifier"))
    freeze_to(model, 1)
    assert trainable(model) == {id(p) for group in groups[1:] for _, p in group}
    freeze_to(model, -1)  # fastai: all but the last group
    assert trainable(model) == {id(p) for p in classifier_parameters(model)}
    model.train()
    set_frozen_bn_eval(model)
    unfreeze(model)
    assert trainable(model) == {id(p) for p in model.parameters()}
    assert all(bn.training for bn in batchnorms(model))  # the model is in train mode, so are they


def test_learning_rates_rise_geometrically_towards_the_head() -> None:
    model = tiny()
    groups = param_groups(model, 1e-3, lr_mult=100.0, n_groups=3, weight_decay=0.05)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-5, 1e-4, 1e-3])
    expected = {"group0": 1e-5, "group1": 1e-4, "group2": 1e-3}  # stem/early, late blocks, head
    head_ids = {id(p) for p in classifier_parameters(model)}
    for group in groups:
        index = group["name"].split("/")[0]
        assert group["lr"] == pytest.approx(expected[index])
        assert {id(p) in head_ids for p in group["params"]} == {index == "group2"}


def test_no_weight_decay_on_biases_norms_and_position_embeddings() -> None:
    model = tiny("test_vit")
    groups = param_groups(model, 1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm.weight", "blocks.0.norm1.weight"} <= undecayed
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= decayed
    assert not undecayed & decayed


def test_param_groups_drive_adamw_and_cover_frozen_parameters_too() -> None:
    model = tiny("test_resnet")
    freeze_backbone(model)
    groups = param_groups(model, 1e-2, weight_decay=0.01)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # unfreezing needs no new optimizer
    optimizer = torch.optim.AdamW(groups)
    frozen = model.conv1[0].weight.detach().clone()
    head = model.fc.weight.detach().clone()
    model.train()
    set_frozen_bn_eval(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert torch.equal(model.conv1[0].weight, frozen)
    assert not torch.equal(model.fc.weight, head)


def test_one_group_trains_everything_at_lr() -> None:
    model = tiny("test_resnet")
    groups = param_groups(model, 3e-4, n_groups=1, weight_decay=0.0)
    assert {g["lr"] for g in groups} == {3e-4}


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": 1e-3, "lr_mult": 0.5}, {"lr": 1e-3, "n_groups": 0}, {"lr": 1e-3, "weight_decay": -1}]
)
def test_bad_optimiser_settings_are_input_errors(kwargs: dict) -> None:
    settings = {"weight_decay": 0.01, **kwargs}
    with pytest.raises(InputError):
        param_groups(tiny("test_resnet"), **settings)
