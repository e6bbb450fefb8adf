"""A copy of a model for frozen inference with every batch norm folded into its convolution.

In eval mode a batch norm is a per-channel affine map, so the convolution that feeds it
can absorb it (``torch.nn.utils.fusion.fuse_conv_bn_weights``) and the norm's own pass
over the activations disappears. In EfficientNet-Lite0 at 128 px that pass was a quarter
of the feature-cache time on two cores (profiled: batch_norm 57 s beside conv2d 106 s),
and the cache is most of a default training run.

Which norm follows which convolution is read off one forward pass (hooks record each
convolution's output tensor and each norm's input): a norm is folded only when its
input is exactly a convolution's output. The fused copy is then checked against the
original on the same batch and refused (the original is used) if they disagree, so an
architecture where a convolution's output also feeds something else cannot be fused
wrongly. timm's ``BatchNormAct2d`` keeps its activation (and dropout) after folding.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

#: largest difference from the unfused model accepted, relative to the largest output
#: value: float32 rounding of the folded weights stays around 1e-6
TOLERANCE = 1e-4

#: model → (its weights' versions, its fused copy): a run caches several views with one
#: frozen backbone, and folding (a copy and two small forward passes) is paid once
_FUSED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module | None]] = weakref.WeakKeyDictionary()


class _ActOnly(nn.Module):
    """What remains of timm's BatchNormAct2d once its norm is folded away."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def _pairs(model: nn.Module, example: Tensor, forward) -> tuple[list[tuple[str, str]], Tensor]:  # type: ignore[no-untyped-def]
    """The (convolution, norm) pairs where the norm reads exactly the convolution's
    output, and the model's output on ``example``."""
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, nn.Conv2d] = {}
    alive: list[Tensor] = []  # outputs kept referenced, so no id is reused within the pass
    pairs: list[tuple[str, str]] = []
    handles = []

    def after_conv(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        produced[id(output)] = module
        alive.append(output)

    def before_norm(module: nn.Module, inputs: tuple) -> None:
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs.append((names[conv], names[module]))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            output = forward(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return pairs, output


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _versions(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever a weight or buffer is written in place (an optimizer step, a
    ``load_state_dict``), or replaced."""
    return tuple(v for t in (*model.parameters(), *model.buffers()) for v in (id(t), t._version))


def fused_for_inference(model: nn.Module, example: Tensor, forward) -> nn.Module:  # type: ignore[no-untyped-def]
    """A copy of ``model`` (in eval mode) with its conv→batch-norm pairs folded, checked
    on ``example`` (a small batch) through ``forward(model, x)``; ``model`` itself when
    nothing folds or the check fails. ``model`` is never modified. The copy is reused
    while ``model``'s weights stay as they were."""
    versions = _versions(model)
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1] or model
    fused = _fuse(model, example, forward)
    # None for "the model itself": a value holding its own key would keep it alive for ever
    _FUSED[model] = (versions, None if fused is model else fused)
    return fused


def _fuse(model: nn.Module, example: Tensor, forward) -> nn.Module:  # type: ignore[no-untyped-def]
    fused = copy.deepcopy(model).eval()
    pairs, want = _pairs(fused, example, forward)  # the copy, still unfused: the original's output
    if not pairs:
        return model
    norms = {norm for _, norm in pairs}
    if len(norms) != len(pairs) or len({conv for conv, _ in pairs}) != len(pairs):
        return model  # a module reached twice: shared weights, not a plain chain
    for conv_name, norm_name in pairs:
        conv, norm = fused.get_submodule(conv_name), fused.get_submodule(norm_name)
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                            norm.weight, norm.bias)
        conv.weight, conv.bias = weight, bias
        _set(fused, norm_name, _ActOnly(norm) if type(norm) is not nn.BatchNorm2d else nn.Identity())
    with torch.inference_mode():
        got = forward(fused, example)
    scale = want.abs().max().clamp_min(1e-6)
    if want.shape != got.shape or not bool(((want - got).abs().max() / scale) <= TOLERANCE):
        return model
    return fused


__all__ = ["TOLERANCE", "fused_for_inference"]
