"""Start a training run from an existing bundle (SageMaker's incremental training).

The backbone comes over whole. The head is matched by class name: classes the bundle
knows keep their rows, new classes start fresh, classes the new data lacks are dropped.
That is what a monthly retrain on a grown tag list needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tagmill.dataset.transforms import Preprocess
from tagmill.errors import InputError


@dataclass(frozen=True)
class HeadTransfer:
    kept: list[str]
    added: list[str]
    removed: list[str]

    def describe(self) -> str:
        parts = [f"{len(self.kept)} classes kept their head rows"]
        if self.added:
            parts.append(f"{len(self.added)} new ({_preview(self.added)})")
        if self.removed:
            parts.append(f"{len(self.removed)} dropped ({_preview(self.removed)})")
        return "; ".join(parts)


def _preview(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")


@dataclass(frozen=True)
class StartingPoint:
    """What a run starting from an earlier model needs of it (read by the caller, who
    knows bundles: training sits upstream of them)."""

    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    architecture: str
    pooling: str  #: the new run pools the same way: the head's rows are carried over
    #: how the bundle's model was fed (its weights' mean/std and resampling carry over)
    preprocess: Preprocess | None = None


def transfer_weights(model: torch.nn.Module, start: StartingPoint, classes: list[str]) -> HeadTransfer:
    """Load ``start``'s weights into ``model`` (built for ``classes``), matching the head by name."""
    old_state = start.state_dict
    state = model.state_dict()
    head = model.get_classifier()
    head_keys = {name for name, p in model.named_parameters() if any(p is q for q in head.parameters())}
    body = {k: v for k, v in old_state.items() if k not in head_keys}
    mismatched = [k for k, v in body.items() if k not in state or state[k].shape != v.shape]
    if mismatched or len(body) != len(state) - len(head_keys):
        raise InputError(
            f"the bundle's {start.architecture} does not fit this run's backbone (first mismatch: {(mismatched or ['?'])[0]})",
            hint="leave --backbone out with --init-from: the bundle's architecture is used",
        )
    # the head's weight (C, D): D is what the pooling gives
    widths = [(old_state[k].shape[-1], state[k].shape[-1]) for k in head_keys if state[k].ndim == 2]
    if mismatch := next(((old, new) for old, new in widths if old != new), None):
        old, new = mismatch
        raise InputError(
            f"the bundle's head takes {old} features and this run's {new}: they pool the feature map differently",
            hint="train with the bundle's pooling: leave --pooling out with --init-from (the command line then takes the bundle's)",
        )
    state.update(body)
    old_index = {name: i for i, name in enumerate(start.classes)}
    for key in head_keys:  # weight (C, D) and bias (C,): copy rows of classes both know
        new, old = state[key].clone(), old_state[key]
        for i, name in enumerate(classes):
            if name in old_index:
                new[i] = old[old_index[name]]
        state[key] = new
    model.load_state_dict(state)
    known = set(classes)
    return HeadTransfer(
        kept=[c for c in classes if c in old_index],
        added=[c for c in classes if c not in old_index],
        removed=[c for c in start.classes if c not in known],
    )
