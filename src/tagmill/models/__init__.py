"""Backbones for transfer learning: names, pretrained weights, freezing, heads.

A classifier is a timm model with ``num_classes`` outputs (with multi-level pooling, the
same model with a wider head: ``levels.py``); tagmill picks the architecture, finds and
loads the weights (a file, a package, or the Hugging Face hub cache: ``pretrained``)
and decides which layers train at which learning rate.
"""

from tagmill.models.factory import (
    POOLINGS,
    check_image_size,
    create_classifier,
    default_pooling,
    pooling_kwargs,
    pooling_of,
    supports_avgmax,
)
from tagmill.models.levels import build
from tagmill.models.features import forward_features_pooled, head
from tagmill.models.freezing import (
    classifier_parameters,
    freeze_backbone,
    freeze_to,
    layer_groups,
    param_groups,
    set_frozen_bn_eval,
    unfreeze,
)
from tagmill.models.pretrained import (
    OFFLINE_WEIGHTS,
    PretrainedConfig,
    WeightsSource,
    has_offline_weights,
    load_pretrained_weights,
    offline_weights_path,
    pretrained_config,
    resolve_weights,
)
from tagmill.models.registry import (
    ALIASES,
    DEFAULT_ARCHITECTURE,
    TEST_ARCHITECTURES,
    registered_architectures,
    resolve_architecture,
)
from tagmill.models.weights import LoadReport, fit_state_dict, load_weights, read_state_dict

__all__ = [
    "ALIASES",
    "DEFAULT_ARCHITECTURE",
    "LoadReport",
    "OFFLINE_WEIGHTS",
    "POOLINGS",
    "PretrainedConfig",
    "TEST_ARCHITECTURES",
    "build",
    "check_image_size",
    "classifier_parameters",
    "create_classifier",
    "default_pooling",
    "fit_state_dict",
    "forward_features_pooled",
    "freeze_backbone",
    "freeze_to",
    "has_offline_weights",
    "head",
    "layer_groups",
    "load_pretrained_weights",
    "load_weights",
    "offline_weights_path",
    "param_groups",
    "pooling_kwargs",
    "pooling_of",
    "pretrained_config",
    "resolve_weights",
    "WeightsSource",
    "read_state_dict",
    "registered_architectures",
    "resolve_architecture",
    "set_frozen_bn_eval",
    "supports_avgmax",
    "unfreeze",
]
