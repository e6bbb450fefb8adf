"""Everything ``tagmill serve`` can be told, as one typed object.

The CLI maps its flags 1:1 onto these fields; multi-worker servers hand the same
object to every worker process as JSON (see ``server.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from tagmill.errors import InputError

# the predictor's values (bundle/predictor.py), repeated so that reading a config
# imports neither torch nor onnxruntime (tests/serve check the two agree)
BACKENDS: tuple[str, ...] = ("torch", "onnx")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8")
#: uvicorn's exit status for a server that cannot start (a worker's; the supervisor
#: does not restart one that ends with it)
STARTUP_FAILURE = 3
LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug", "trace")
#: max_batch when none is given (why these: ServeConfig.max_batch)
AUTO_MAX_BATCH: dict[str, int] = {"torch": 1, "onnx": 4}
#: decoding threads per worker where a pool is picked (ServeConfig.decode_threads): the
#: default since the first server; one served no faster on 2 cores (bench/README.md)
DECODE_THREADS = 2


@dataclass(frozen=True)
class ServeConfig:
    """How to serve one model bundle."""

    bundle: str  #: a bundle directory or URL (model.json + model.safetensors [+ model.onnx])
    #: loopback by default: opening the port to the network is a decision (--host 0.0.0.0)
    host: str = "127.0.0.1"
    port: int = 8080  #: SageMaker's container port
    #: server processes; each loads the model once. On CPUs, processes with one thread
    #: each beat one process with many threads (2 × 1 beat 1 × 2 by 1.6-1.8× on 2 cores, measured).
    workers: int = 1
    threads: int = 1  #: torch / onnxruntime intra-op threads in each worker
    backend: str = "torch"  #: "torch" or "onnx" (the bundle must carry model.onnx)
    #: the ONNX graph: "auto" (INT8 when the bundle has one and it runs on the CPU), "fp32", "int8"
    precision: str = "auto"
    #: auto (a GPU when there is one) | cpu | cuda | cuda:N; onnx uses onnxruntime's CUDA
    #: provider for a GPU when its GPU build is installed
    device: str = "auto"
    #: None: no authentication. Otherwise the prediction routes need ``X-Api-Key: KEY``
    #: or ``Authorization: Bearer KEY``; health, metrics and the web page stay open.
    api_key: str | None = None
    max_body_mb: float = 10.0  #: larger request bodies are refused with 413
    #: images per forward pass; 1 turns batching off. None picks per backend (see
    #: AUTO_MAX_BATCH): measured on a 2-core CPU, onnxruntime's cost per image is flat
    #: from batch 1 to 16, while torch eager's rises with the batch (27 ms at 1, 48 ms
    #: at 16 per image), so batching there costs 30-40% of the throughput. onnx batches
    #: 4, not 16: the same images/s at concurrency 32, but its memory arena holds a
    #: forward pass's activations, so 2 workers peaked at 2.25 GB of RSS with 16 and
    #: 1.82 GB with 4 (Lite0 at 224 px; bench/README.md, "ONNX batches of 4").
    max_batch: int | None = None
    max_wait_ms: float = 5.0  #: longest a batch waits for requests still being decoded
    queue_size: int = 64  #: requests admitted but not yet in a forward pass; more get 503
    #: per worker: threads that decode and resize request images beside the model thread.
    #: 0: the model thread decodes each batch's images itself, just before its forward
    #: pass. None picks (``serve.service.decode_threads``): 0 where the workers' inference
    #: threads already keep every CPU busy and the model runs on the CPU (then a decoding
    #: pool only adds hand-offs between threads: INT8 ONNX served 5% more images per second
    #: on 2 cores with 2 workers without it; bench/README.md), else DECODE_THREADS.
    decode_threads: int | None = None
    #: open connections per worker, idle ones included; beyond, new requests get 503. Half
    #: of the usual 1,024 open-file limit: the rest is for the model, logs and metrics files
    max_connections: int = 512
    #: seconds a connection may take to send a request's line and headers before it is
    #: closed (slow-loris clients); a real client sends them in one packet
    header_timeout_s: float = 10.0
    log_level: str = "info"
    access_log: bool = False  #: one log line per request (the metrics count them anyway)
    #: the name the Open Inference Protocol routes (``/v2/models/{name}``) answer to.
    #: Default: the bundle directory's name at start-up, kept when the model is swapped
    #: (clients address the endpoint, not the bundle that serves it)
    model_name: str | None = None
    #: explanations (``POST /predict?explain=true``) running at once in each worker: each
    #: is a backward pass per class, several predictions' worth of CPU, so they get their
    #: own budget and cannot starve plain predictions
    explain_concurrency: int = 1
    #: seconds an explanation waits for a slot before it is answered 503 + Retry-After:
    #: about ten Lite0 explanations on a CPU, enough to absorb a click burst, short enough
    #: that a client learns quickly that the server is busy
    explain_wait_s: float = 1.0

    #: capture from traffic (capture.py): a folder or URL where request images the model
    #: was unsure of are stored, with their predictions, for labelling; None: off
    capture: str | None = None
    #: capture an image when the model's confidence is below this (single-label: the top
    #: probability; multi-label: the least sure tag's, 0.5 at its threshold; capture.py)
    capture_below: float = 0.6
    capture_sample: float = 0.0  #: also capture this random fraction of all images
    capture_max_gb: float = 5.0  #: stop capturing when the folder holds this much (GiB)
    #: images waiting for the capture writer; beyond, they are dropped (and counted). 256:
    #: several seconds of this machine's full throughput, so a slow write rarely drops any
    capture_queue: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.bundle, str) or not self.bundle:
            raise InputError("a bundle location is needed")
        if self.model_name is None:
            object.__setattr__(self, "model_name", bundle_name(self.bundle))
        if not isinstance(self.model_name, str) or not self.model_name.strip() or "/" in self.model_name:
            raise InputError(f"the model name must be a non-empty name without '/', not {self.model_name!r}")
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}; choose {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.backend != "onnx":
            raise InputError("the INT8 graph runs on the onnx backend", hint="add --backend onnx")
        if self.log_level not in LOG_LEVELS:
            raise InputError(f"unknown log level {self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key must not be empty", hint="leave it out to serve without authentication")
        _positive_int("port", self.port, upper=65535, allow_zero=True)  # 0: any free port
        for name in ("workers", "threads", "queue_size", "max_connections", "explain_concurrency"):
            _positive_int(name, getattr(self, name))
        if self.decode_threads is not None:
            _positive_int("decode_threads", self.decode_threads, allow_zero=True)  # 0: in the model thread
        if self.max_batch is not None:
            _positive_int("max_batch", self.max_batch)
        if not 0 < self.max_body_mb <= 4096:
            raise InputError(f"max_body_mb must be in (0, 4096], not {self.max_body_mb!r}")
        if not 0 < self.header_timeout_s <= 3600:
            raise InputError(f"header_timeout_s must be in (0, 3600], not {self.header_timeout_s!r}")
        if not 0 <= self.explain_wait_s <= 60:
            raise InputError(f"explain_wait_s must be in [0, 60], not {self.explain_wait_s!r}")
        _check_capture(self)
        if not 0 <= self.max_wait_ms <= 10_000:
            raise InputError(f"max_wait_ms must be in [0, 10000], not {self.max_wait_ms!r}")

    @property
    def batch_limit(self) -> int:
        """max_batch, or the backend's default."""
        return self.max_batch if self.max_batch is not None else AUTO_MAX_BATCH[self.backend]

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def bundle_name(location: str) -> str:
    """A bundle's name: the last part of its path or URL."""
    return os.path.basename(location.rstrip("/")) or location


def _check_capture(config: ServeConfig) -> None:
    if config.capture is not None and not (isinstance(config.capture, str) and config.capture.strip()):
        raise InputError("the capture location must be a folder or URL", hint="leave --capture out to capture nothing")
    if not 0 <= config.capture_below <= 1:
        raise InputError(f"capture_below must be in [0, 1], not {config.capture_below!r}")
    if not 0 <= config.capture_sample <= 1:
        raise InputError(f"capture_sample must be in [0, 1], not {config.capture_sample!r}")
    if not 0 < config.capture_max_gb <= 1_000_000:
        raise InputError(f"capture_max_gb must be in (0, 1000000], not {config.capture_max_gb!r}")
    _positive_int("capture_queue", config.capture_queue)


def _positive_int(name: str, value: object, *, upper: int | None = None, allow_zero: bool = False) -> None:
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest or (upper is not None and value > upper):
        limit = f" and <= {upper}" if upper is not None else ""
        raise InputError(f"{name} must be an integer >= {lowest}{limit}, not {value!r}")
