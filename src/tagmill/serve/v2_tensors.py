"""Open Inference Protocol (v2) request and answer bodies: tensors in JSON, or in the
binary tensor data extension.

What a client sends (checked against ``tritonclient.http``, the protocol's reference
client):

* JSON only — ``{"inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...],
  "parameters": {...}}``. A BYTES tensor's ``data`` holds strings, and JSON strings
  are text: tritonclient refuses (``binary_data=False``) bytes that are not UTF-8. An
  image is never UTF-8, so in JSON each image is its **base64** text.
* Binary (``binary_data=True``, tritonclient's default) — the JSON header, then each
  input's raw bytes in input order; the header's length is the HTTP header
  ``Inference-Header-Content-Length`` and each input says its size in
  ``parameters.binary_data_size``. A BYTES tensor's bytes are its elements in row-major
  order, each a 4-byte little-endian length followed by the element's bytes.

A body may come compressed (``Content-Encoding: gzip`` or ``deflate``); the header
length counts the inflated bytes. Answers are JSON, or binary in the same layout for every output the client asked so
(``parameters.binary_data`` on a requested output, or ``binary_data_output`` on the
request: what tritonclient sends when it names no outputs).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tagmill.bundle.predictor import Prediction
from tagmill.errors import InputError
from tagmill.serve.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from tagmill.serve.payloads import MAX_INSTANCES

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
#: output name -> (datatype, whether its second dimension is the classes (else top-k))
OUTPUTS: dict[str, tuple[str, bool]] = {
    "scores": ("FP32", True),  # every class's probability, in class order
    "labels": ("BYTES", False),  # the top-k class names, most probable first
    "top_scores": ("FP32", False),  # their probabilities
    "predicted": ("BOOL", True),  # the model's verdict per class: the top class, or tags at their thresholds
}
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass
class InferRequest:
    """A parsed ``/infer`` body."""

    images: list[bytes]
    id: str | None = None
    top_k: int | None = None
    #: output name -> answer it as binary data; all outputs when the client names none
    outputs: dict[str, bool] = field(default_factory=dict)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent with ``Content-Encoding`` gzip or deflate (tritonclient's
    ``request_compression_algorithm``), never more than ``limit`` bytes once inflated:
    a small compressed body must not expand into gigabytes."""
    kind = (encoding or "identity").strip().lower()
    if kind == "identity":
        return body
    if kind not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(f"cannot read a body with Content-Encoding {kind!r}; send gzip, deflate "
                                        "or none")
    # wbits: gzip's header and trailer, or zlib's (HTTP's "deflate" is the zlib format)
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"the {kind} body does not inflate: {exc}") from exc
    if len(data) > limit:
        raise PayloadTooLargeError(f"the request body inflates to more than {limit / 1024 / 1024:g} MB",
                                   hint="send a smaller request, or start the server with a larger --max-body-mb")
    if not inflater.eof:
        raise InputError(f"the {kind} body is truncated")
    return data


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """The request body (JSON, or the JSON header and binary data) → images and options."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise InputError(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
        header, binary = body[:header_length], body[header_length:]
    try:
        data = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the inference request is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError("the inference request must be a JSON object with 'inputs'")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(f"expected 'inputs' with exactly one tensor, {INPUT_NAME!r} (BYTES: the encoded images)")
    images, used = _images(inputs[0], binary)
    if used != len(binary):
        raise InputError(f"the body has {len(binary) - used} bytes of binary data beyond what the inputs declare")
    parameters = _mapping(data.get("parameters"), "the request's parameters")
    top_k = parameters.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise InputError(f"parameter top_k must be an integer, not {top_k!r}")
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError("the request's id must be a string")
    return InferRequest(images, request_id, top_k, _requested_outputs(data.get("outputs"), parameters))


def _images(tensor: dict[str, Any], binary: bytes) -> tuple[list[bytes], int]:
    """The images of the input tensor, and how many bytes of the binary data it used."""
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if name != INPUT_NAME:
        raise InputError(f"unknown input {name!r}; the model takes one BYTES input named {INPUT_NAME!r}")
    if datatype != "BYTES":
        raise InputError(f"input {INPUT_NAME!r} must be BYTES (encoded images), not {datatype!r}")
    count = _count(tensor.get("shape"))
    if count > MAX_INSTANCES:
        raise PayloadTooLargeError(f"{count} images in one request; at most {MAX_INSTANCES} are accepted",
                                   hint="split them over several requests")
    parameters = _mapping(tensor.get("parameters"), f"input {INPUT_NAME!r}'s parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise InputError(f"binary_data_size {size!r} does not fit the {len(binary)} bytes after the JSON header")
        images, used = split_bytes(binary[:size]), size
    elif "data" in tensor:
        images, used = [_from_base64(index, text) for index, text in enumerate(_flat(tensor["data"]))], 0
    else:
        raise InputError(f"input {INPUT_NAME!r} has neither 'data' nor parameters.binary_data_size")
    if len(images) != count:
        raise InputError(f"input {INPUT_NAME!r} has shape {tensor.get('shape')} but holds {len(images)} elements")
    if not images:
        raise InputError("the request holds no image")
    return images, used


def _count(shape: Any) -> int:
    """Elements in a tensor of ``shape``: [n] or [n, 1] (one encoded image per row)."""
    valid = (isinstance(shape, list) and len(shape) in (1, 2)
             and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
             and (len(shape) == 1 or shape[1] == 1))
    if not valid:
        raise InputError(f"input {INPUT_NAME!r} must have shape [n] or [n, 1], not {shape!r}")
    return math.prod(shape)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object")
    return value


def _flat(data: Any) -> list[Any]:
    """Row-major elements of JSON tensor data, nested or flat."""
    if not isinstance(data, list):
        raise InputError(f"input {INPUT_NAME!r}'s data must be a list of base64 strings")
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def _from_base64(index: int, text: Any) -> bytes:
    if not isinstance(text, str):
        raise InputError(f"element {index} of input {INPUT_NAME!r} must be a base64 string (JSON carries images "
                         f"as base64), not {type(text).__name__}",
                         hint="or send raw bytes with the binary tensor extension (tritonclient: binary_data=True)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"element {index} of input {INPUT_NAME!r} is not base64: {exc}",
                         hint="or send raw bytes with the binary tensor extension (tritonclient: binary_data=True)") from exc


def split_bytes(data: bytes) -> list[bytes]:
    """A serialized BYTES tensor → its elements."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise InputError("the BYTES tensor's binary data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise InputError(f"a BYTES element of {length} bytes runs past the end of the binary data")
        elements.append(data[offset:offset + length])
        offset += length
    return elements


def join_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES tensor elements → their binary serialization."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _requested_outputs(outputs: Any, parameters: dict[str, Any]) -> dict[str, bool]:
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InputError("parameter binary_data_output must be true or false")
    if outputs is None:
        return {name: default for name in OUTPUTS}
    if not isinstance(outputs, list) or not outputs:
        raise InputError("'outputs' must be a non-empty list of {\"name\": ...} objects")
    chosen: dict[str, bool] = {}
    for entry in outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in OUTPUTS:
            raise InputError(f"unknown output {name!r}; the model has {', '.join(OUTPUTS)}")
        binary = _mapping(entry.get("parameters"), f"output {name!r}'s parameters").get("binary_data", default)
        if not isinstance(binary, bool):
            raise InputError(f"output {name!r}: binary_data must be true or false")
        if entry.get("parameters", {}).get("classification"):
            raise InputError("Triton's classification extension is not supported; ask for 'labels' and 'top_scores'")
        chosen[name] = binary
    return chosen


def output_tensors(predictions: Sequence[Prediction], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Every output, for ``predictions`` in request order."""
    index = {name: i for i, name in enumerate(classes)}
    predicted = np.zeros((len(predictions), len(classes)), dtype=np.bool_)  # (n, C)
    for row, prediction in enumerate(predictions):
        predicted[row, [index[label] for label in prediction.labels]] = True
    return {
        "scores": np.asarray([p.probabilities for p in predictions], dtype=np.float32).reshape(len(predictions), -1),
        "labels": np.asarray([[label.encode("utf-8") for label, _ in p.top] for p in predictions],
                             dtype=np.object_).reshape(len(predictions), -1),
        "top_scores": np.asarray([[score for _, score in p.top] for p in predictions],
                                 dtype=np.float32).reshape(len(predictions), -1),
        "predicted": predicted,
    }


def render_answer(tensors: dict[str, np.ndarray], wanted: dict[str, bool], *, model_name: str, version: str,
                  request_id: str | None) -> tuple[bytes, int | None]:
    """The answer body and, when it carries binary data, the JSON header's length."""
    outputs, blobs = [], []
    for name, binary in wanted.items():
        array = tensors[name]
        datatype = OUTPUTS[name][0]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = join_bytes(list(array.flat)) if datatype == "BYTES" else np.ascontiguousarray(array).astype(
                array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [element.decode("utf-8") for element in array.flat]
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


__all__ = ["HEADER_LENGTH", "INPUT_NAME", "OUTPUTS", "InferRequest", "decompress", "join_bytes", "output_tensors",
           "parse_request", "render_answer", "split_bytes"]
