"""Which device and precision a run uses, checked before any work starts."""

from __future__ import annotations

import contextlib

import torch

from tagmill.errors import InputError


def resolve_device(name: str) -> torch.device:
    """"auto" picks a GPU when there is one; asking for one that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available on this machine", hint="use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: Apple MPS is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (AVX-512 BF16 CPUs and modern GPUs); a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
