"""Checkpoints: dicts of plain values and tensors, saved atomically, loaded with
``weights_only=True`` (a checkpoint can never run code)."""

from __future__ import annotations

import io
from typing import Any

import torch

from tagmill import storage
from tagmill.errors import CheckpointError, StorageError


def save_checkpoint(location: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(location, buffer.getvalue())


def load_checkpoint(location: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(location)
    except StorageError as exc:
        raise CheckpointError(f"no checkpoint at {location}", hint="start the run without --resume") from exc
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises bare RuntimeError/UnpicklingError for damaged files
        raise CheckpointError(f"checkpoint {location} cannot be read: {exc}") from exc
