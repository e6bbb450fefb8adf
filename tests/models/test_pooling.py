"""How the feature maps become the head's input: the backbone's average, avg+max, or avg+max of several levels."""

import pytest
import torch

from tagmill.errors import InputError
from tagmill.models import (
    build,
    create_classifier,
    default_pooling,
    forward_features_pooled,
    pooling_kwargs,
    pooling_of,
    supports_avgmax,
)


def test_avgmax_doubles_the_head_input_with_average_first():
    torch.manual_seed(0)
    avg = create_classifier("test_efficientnet", 3, pretrained=False).eval()
    both = create_classifier("test_efficientnet", 3, pretrained=False, pooling="avgmax").eval()
    both.load_state_dict({k: v for k, v in avg.state_dict().items() if not k.startswith("classifier")}, strict=False)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        pooled_avg, pooled_both = forward_features_pooled(avg, x), forward_features_pooled(both, x)
        feature_map = avg.forward_features(x)  # (B, C, h, w)
    assert both.get_classifier().in_features == 2 * avg.get_classifier().in_features
    assert torch.allclose(pooled_both, torch.cat([pooled_avg, feature_map.amax((2, 3))], 1), atol=1e-6)


def test_pooling_round_trips_through_model_kwargs():
    for pooling in ("avg", "avgmax", "levels"):
        assert pooling_of(pooling_kwargs("test_efficientnet", pooling)) == pooling
    assert pooling_of({}) == "avg"  # a bundle written before the option existed


def test_token_pooling_backbones_refuse_avgmax_clearly():
    assert supports_avgmax("test_efficientnet") and supports_avgmax("test_resnet")
    assert not supports_avgmax("test_vit")
    with pytest.raises(InputError, match="CNN backbones"):
        create_classifier("test_vit", 3, pretrained=False, pooling="avgmax")
    with pytest.raises(InputError, match="unknown pooling"):
        create_classifier("test_efficientnet", 3, pretrained=False, pooling="max")


def test_the_training_config_knows_the_same_poolings():
    from tagmill.models import POOLINGS
    from tagmill.train.config import POOLINGS as CONFIG_POOLINGS
    from tagmill.train.config import TrainConfig

    assert CONFIG_POOLINGS == POOLINGS  # kept apart so the config module needs no timm
    with pytest.raises(InputError, match="--pooling"):
        TrainConfig(pooling="max")


def _avgmax(feature_map: torch.Tensor) -> torch.Tensor:
    return torch.cat([feature_map.mean((2, 3)), feature_map.amax((2, 3))], 1)


def test_levels_pool_the_last_blocks_beside_the_final_map():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", 3, pretrained=False, pooling="levels").eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():  # the network by hand: stem, every block, final 1x1 conv
        h = model.bn1(model.conv_stem(x))
        outputs = []
        for block in model.blocks:
            h = block(h)
            outputs.append(h)
        final = model.bn2(model.conv_head(h))
        want = torch.cat([*(_avgmax(o) for o in outputs[-4:]), _avgmax(final)], 1)
        got = forward_features_pooled(model, x)
        logits = model(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert model.get_classifier().in_features == want.shape[1]
    assert torch.allclose(logits, model.get_classifier()(want), atol=1e-5)


def test_a_levels_model_rebuilds_from_its_kwargs_with_the_same_state_names():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", 3, pretrained=False, pooling="levels").eval()
    plain = create_classifier("test_efficientnet", 3, pretrained=False, pooling="avgmax")
    body = {k for k in plain.state_dict() if not k.startswith("classifier")}
    assert body <= set(model.state_dict())  # same parameters and names: weights, freezing, groups unchanged
    rebuilt = build("test_efficientnet", 3, pooling_kwargs("test_efficientnet", "levels")).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_levels_leave_out_a_stage_that_is_the_final_map():
    """A ResNet's last stage output is its final map: pooled once, not twice."""
    model = create_classifier("test_resnet", 3, pretrained=False, pooling="levels").eval()
    avgmax = create_classifier("test_resnet", 3, pretrained=False, pooling="avgmax")
    extra = model.get_classifier().in_features - avgmax.get_classifier().in_features
    widths = [f["num_chs"] for f in model.feature_info]
    assert extra == 2 * sum(widths[-3:-1])  # the two stages before the last


def test_the_default_pooling_is_the_richest_the_backbone_allows():
    assert default_pooling("test_efficientnet") == "levels"
    assert default_pooling("test_vit") == "avg"
    with pytest.raises(InputError, match="CNN backbones"):
        create_classifier("test_vit", 3, pretrained=False, pooling="levels")
