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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InputError(f"--device {name}: no CUDA GPU {device.index} on this machine (it has {count}: "
                         f"cuda:0 to cuda:{count - 1})", hint="use --device cuda or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: Apple MPS is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (AVX-512 BF16 CPUs and modern GPUs); a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: On a CPU, per-image inference cost rises with batch size once a batch's activations
#: outgrow the caches (EfficientNet-Lite0 here: 280 img/s in chunks of 16 at 128 px,
#: 157 img/s at batch 64; 89 vs 34 img/s at 224 px). About 256k input pixels a chunk
#: is the sweet spot measured on this class of machine; see bench/README.md.
CPU_CHUNK_PIXELS = 256 * 1024


def inference_chunk(device: torch.device, input_size: int) -> int | None:
    """How many images to run at once for inference, or None for "the whole batch"."""
    if device.type != "cpu":
        return None
    return max(1, CPU_CHUNK_PIXELS // (input_size * input_size))


def run_chunked(fn, images: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``fn`` over ``images`` (B, ...) in chunks of ``chunk``, outputs concatenated."""
    if chunk is None or len(images) <= chunk:
        return fn(images)
    return torch.cat([fn(part) for part in images.split(chunk)])
