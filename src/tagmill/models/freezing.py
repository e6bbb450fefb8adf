"""Freezing and discriminative learning rates, fastai style, for any timm model.

Layer groups come from timm itself: ``group_matcher()`` orders a model's parameters
stem -> blocks -> final norm, and ``get_classifier()`` names the head. tagmill cuts
that ordered body into ``n_groups - 1`` contiguous groups and puts the classifier
last, so "earliest group", "late blocks" and "head" mean the same for a ResNet, an
EfficientNet or a ViT.

BatchNorm in frozen layers must stay in eval mode, or its running statistics drift
toward the new data while its weights cannot follow. ``model.train()`` puts every
layer back in train mode, so a training loop calls::

    model.train()
    set_frozen_bn_eval(model)

at the start of every epoch (the freeze functions also call it once themselves).
"""

from __future__ import annotations

import math

from timm.models import group_parameters
from torch import nn

from tagmill.errors import InputError

NamedParams = list[tuple[str, nn.Parameter]]


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classifier head (timm's ``get_classifier()``)."""
    return list(model.get_classifier().parameters())


def layer_groups(model: nn.Module, n_groups: int = 3) -> list[NamedParams]:
    """Every parameter, once, in ``n_groups`` groups: early body ... late body, head.

    Fewer groups come back when the body has fewer timm groups than asked for.
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise InputError(f"n_groups must be a positive integer, not {n_groups!r}")
    named = list(model.named_parameters())
    if n_groups == 1:
        return [named]
    head_ids = {id(p) for p in classifier_parameters(model)}
    body = [group for group in _ordered_groups(model, named) if group]
    body = [[(n, p) for n, p in group if id(p) not in head_ids] for group in body]
    body = [group for group in body if group]
    head = [(n, p) for n, p in named if id(p) in head_ids]
    groups = [_flatten(chunk) for chunk in _split_even(body, n_groups - 1)]
    return groups + [head] if head else groups


def freeze_backbone(model: nn.Module) -> None:
    """Train only the classifier head; BatchNorm in the frozen part goes to eval mode."""
    head_ids = {id(p) for p in classifier_parameters(model)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in head_ids)
    set_frozen_bn_eval(model)


def freeze_to(model: nn.Module, n: int, *, n_groups: int = 3) -> None:
    """Freeze the first ``n`` of the model's ``n_groups`` layer groups, train the rest.

    As in fastai, a negative ``n`` counts from the end: ``freeze_to(model, -1)``
    trains only the last group (the head).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"freeze_to needs a whole number of groups, not {n!r}")
    groups = layer_groups(model, n_groups)
    frozen = {id(p) for group in groups[:n] for _, p in group}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    set_frozen_bn_eval(model)


def unfreeze(model: nn.Module) -> None:
    """Train every parameter; BatchNorm layers follow the model's train/eval mode again."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(model.training)


def set_frozen_bn_eval(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen in eval mode; returns how many.

    Call after every ``model.train()``. ``_BatchNorm`` covers BatchNorm1d/2d/3d,
    SyncBatchNorm and timm's BatchNormAct2d. Norms without running statistics
    (LayerNorm, GroupNorm) behave the same in both modes and are left alone.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        parameters = list(module.parameters(recurse=False))
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()
            count += 1
    return count


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    lr_mult: float = 10.0,
    n_groups: int = 3,
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups with discriminative learning rates.

    Layer group ``i`` of ``k`` gets ``lr / lr_mult ** ((k - 1 - i) / (k - 1))``: the
    head trains at ``lr``, the earliest group at ``lr / lr_mult``, and the rates rise
    geometrically in between. Within each layer group, biases, norm weights (every
    tensor with ndim <= 1) and the model's ``no_weight_decay()`` names (ViT position
    embeddings, class token) get no weight decay. Frozen parameters are included:
    optimizers skip tensors without gradients, so unfreezing later needs no new
    optimizer. Each dict carries a ``name`` ("group0/decay") for logs.
    """
    if not lr > 0 or not lr_mult >= 1:
        raise InputError(f"need lr > 0 and lr_mult >= 1, got lr={lr!r}, lr_mult={lr_mult!r}")
    if weight_decay < 0:
        raise InputError(f"weight_decay must be >= 0, not {weight_decay!r}")
    groups = layer_groups(model, n_groups)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    result: list[dict] = []
    for index, (group, group_lr) in enumerate(zip(groups, _discriminative_lrs(lr, lr_mult, len(groups)))):
        decay = [p for name, p in group if not _no_decay(name, p, skip)]
        no_decay = [p for name, p in group if _no_decay(name, p, skip)]
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                result.append({"params": params, "lr": group_lr, "weight_decay": wd, "name": f"group{index}/{suffix}"})
    return result


def _discriminative_lrs(lr: float, lr_mult: float, k: int) -> list[float]:
    if k == 1:
        return [lr]
    return [lr / lr_mult ** ((k - 1 - i) / (k - 1)) for i in range(k)]


def _no_decay(name: str, parameter: nn.Parameter, skip: set[str]) -> bool:
    # timm's optimizer factory rule: decaying a bias or a norm scale only fights the fit
    return parameter.ndim <= 1 or name.endswith(".bias") or name in skip


def _ordered_groups(model: nn.Module, named: NamedParams) -> list[NamedParams]:
    """timm's fine groups (stem, each block, ...) in input-to-output order."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return [[item] for item in named]  # not a timm model: registration order is the best guess
    params = dict(named)
    fine = group_parameters(model, matcher(coarse=False))  # {ordinal: [names]}
    return [[(name, params[name]) for name in fine[key]] for key in sorted(fine)]


def _split_even(items: list, k: int) -> list[list]:
    """``k`` contiguous chunks of near-equal length (fewer when there are fewer items)."""
    k = min(k, len(items))
    if k == 0:
        return []
    size = len(items) / k
    return [items[math.floor(i * size): math.floor((i + 1) * size)] for i in range(k)]


def _flatten(chunk: list[NamedParams]) -> NamedParams:
    return [item for group in chunk for item in group]


__all__ = [
    "classifier_parameters",
    "freeze_backbone",
    "freeze_to",
    "layer_groups",
    "param_groups",
    "set_frozen_bn_eval",
    "unfreeze",
]
