"""How the feature map becomes the head's input: the backbone's average, or avg+max."""

import pytest
import torch

from tagmill.errors import InputError
from tagmill.models import create_classifier, forward_features_pooled, pooling_kwargs, pooling_of, supports_avgmax


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
    for pooling in ("avg", "avgmax"):
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
