"""Cached backbone features plus the head give the model's own logits."""

from __future__ import annotations

import pytest
import torch

from tagmill.models import create_classifier, forward_features_pooled, head


@pytest.mark.parametrize("architecture", ["test_efficientnet", "test_resnet", "test_vit"])
def test_head_on_pooled_features_equals_the_model(architecture: str) -> None:
    torch.manual_seed(0)
    model = create_classifier(architecture, 4, pretrained=False, drop_rate=0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = forward_features_pooled(model, x)  # (B, C)
        logits = head(model)(features)  # (B, 4)
        expected = model(x)
    assert features.shape == (2, model.num_features)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_head_is_the_models_own_classifier() -> None:
    model = create_classifier("test_resnet", 4, pretrained=False)
    assert head(model) is model.get_classifier()
    with torch.no_grad():
        head(model).bias.fill_(7.0)
    assert torch.all(model.state_dict()["fc.bias"] == 7.0)
