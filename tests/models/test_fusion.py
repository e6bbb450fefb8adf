"""Folding batch norms into convolutions: the same outputs, fewer operations, never a wrong model."""

import torch
from torch import nn

from tagmill.models import create_classifier, forward_features_pooled
from tagmill.models.fusion import fused_for_inference


def test_a_pretrained_backbone_folds_every_norm_and_keeps_its_features():
    model = create_classifier("efficientnet_lite0", 3, pretrained=True, pooling="levels").eval()
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    fused = fused_for_inference(model, x[:2], forward_features_pooled)
    assert fused is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.inference_mode():
        want, got = forward_features_pooled(model, x), forward_features_pooled(fused, x)
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class TwoReaders(nn.Module):
    """A convolution whose output feeds its norm *and* a skip path: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_read_twice_is_not_folded():
    model = TwoReaders().eval()
    x = torch.randn(2, 3, 8, 8)
    assert fused_for_inference(model, x, lambda m, t: m(t)) is model


def test_the_fused_copy_is_reused_until_a_weight_changes():
    model = create_classifier("efficientnet_lite0", 3, pretrained=False, pooling="avg").eval()
    x = torch.randn(2, 3, 64, 64)
    first = fused_for_inference(model, x, forward_features_pooled)
    assert fused_for_inference(model, x, forward_features_pooled) is first
    with torch.no_grad():
        model.conv_stem.weight.mul_(2.0)  # what an optimizer step or load_state_dict does
    second = fused_for_inference(model, x, forward_features_pooled)
    assert second is not first
    with torch.inference_mode():
        assert torch.allclose(forward_features_pooled(second, x), forward_features_pooled(model, x), rtol=1e-4, atol=1e-4)
