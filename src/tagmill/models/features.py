"""Split a classifier into backbone and head, so training can cache backbone features.

With the backbone frozen its output never changes, so a training loop computes the
pooled features once and trains only ``head(model)`` on them:
``head(model)(forward_features_pooled(model, x)) == model(x)`` in eval mode.

Dropout before the classifier (``drop_rate``) runs inside ``forward_head`` in train
mode; features cached in eval mode have none, so a loop that wants it applies it
to the cached features itself.
"""

from __future__ import annotations

from torch import Tensor, nn


def forward_features_pooled(model: nn.Module, x: Tensor) -> Tensor:
    """Pooled pre-logits features: (B, 3, H, W) -> (B, C), C = ``model.num_features``."""
    features = model.forward_features(x)  # (B, C', h, w) for CNNs, (B, tokens, C') for ViTs
    return model.forward_head(features, pre_logits=True)  # (B, C)


def head(model: nn.Module) -> nn.Module:
    """The classifier that turns pooled features (B, C) into logits (B, num_classes).

    The same module object as in ``model``: training it trains the model's head.
    """
    return model.get_classifier()


__all__ = ["forward_features_pooled", "head"]
