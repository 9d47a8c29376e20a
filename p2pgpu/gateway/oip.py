"""Open Inference Protocol v2 (KServe / Triton REST): metadata bodies, infer request parsing, response encoding.

Sans-I/O: a route hands over the body bytes and two headers (``Content-Type``
and ``Inference-Header-Content-Length``) and gets back an ``InferRequest``
whose ``batch`` is the model input as ``[n, *item_shape]`` in the model's
dtype, or a ``GatewayError`` with the status to answer.

Decisions:

- **Datatypes are strict.** A request input's ``datatype`` must be the
  model's (the protocol gives the server no conversion rule, and Triton
  refuses a mismatch too); values convert only losslessly (see
  ``tensorjson``). ``BYTES`` is refused for these tensor models: their
  inputs are numeric, and a string tensor has no meaning for them.
- **Data layout.** ``data`` may be flat row-major or nested exactly as
  ``shape`` (the spec allows both); a nesting that is regular but differs
  from ``shape`` is refused rather than silently flattened.
- **Binary tensor data extension.** With ``Inference-Header-Content-Length``
  the body is that many bytes of JSON, then each binary input's
  ``parameters.binary_data_size`` bytes in input order, little-endian
  row-major, BOOL one byte 0/1. The sizes must add up to the body exactly
  and match ``shape`` x item size. Binary inputs are taken as raw bits
  (NaN/Inf included: the extension exists to carry them).
- **Batch.** Every input's ``shape`` is ``[n, *item]``; ``n`` is at least 1
  and at most ``max_batch`` (400, as Triton answers), and all inputs agree
  on it.
- **Responses** echo ``id``, name the model and version, and carry each
  output as JSON (flat row-major ``data``; non-finite floats as "NaN",
  "Infinity", "-Infinity" strings) or, when ``binary_data`` asks (per
  output, else the request's ``binary_data_output``), as binary after the
  JSON with ``Inference-Header-Content-Length`` set and content type
  ``application/octet-stream``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pgpu.gateway.errors import BadModelOutput, InvalidRequest, RequestTooLarge, UnsupportedMediaType
from p2pgpu.gateway.signature import MAX_ITEM_NDIM, ModelSignature, TensorSpec, shape_text
from p2pgpu.gateway.tensorjson import (
    DEFAULT_MAX_BODY_BYTES,
    array_from_values,
    dumps,
    flatten_nested,
    loads_bounded,
    to_json_values,
)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "DATATYPES",
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "PLATFORM",
    "InferRequest",
    "RequestedOutput",
    "checked_output",
    "datatype_of",
    "dtype_of",
    "encode_infer_response",
    "model_metadata",
    "parse_infer_request",
    "server_metadata",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
PLATFORM = "tensorflow_keras"

# OIP datatype -> numpy dtype name. BYTES maps to None: the protocol has it, these models cannot take it.
DATATYPES: Mapping[str, str | None] = MappingProxyType({
    "BOOL": "bool",
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
    "BYTES": None,
})
_BY_DTYPE = {dtype: datatype for datatype, dtype in DATATYPES.items() if dtype is not None}

_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})


def datatype_of(dtype: str) -> str:
    """The OIP datatype of a numpy dtype name (``float32`` -> ``FP32``)."""
    return _BY_DTYPE[dtype]


def dtype_of(datatype: str) -> str | None:
    """The numpy dtype name of an OIP datatype; None for ``BYTES``; ``KeyError`` for an unknown one."""
    return DATATYPES[datatype]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An entry of the request's ``outputs``: the output, and its ``binary_data`` parameter (None = unset)."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed, checked inference request.

    ``inputs`` maps every model input to its ``[n, *item]`` array in the
    model's dtype; ``batch`` is the first (the registry's models have one,
    ``x``). ``outputs`` is empty when the request named none (then all are
    returned). ``binary_default`` is the ``binary_data_output`` parameter.
    ``parameters`` holds the request's other parameters, unread.
    """

    id: str | None
    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: tuple[RequestedOutput, ...] = ()
    binary_default: bool = False
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def batch(self) -> npt.NDArray[Any]:
        return next(iter(self.inputs.values()))

    @property
    def batch_size(self) -> int:
        return int(self.batch.shape[0])


def server_metadata(name: str, version: str, extensions: Iterable[str]) -> dict[str, Any]:
    """The body of ``GET /v2``."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype_of(spec.dtype),
            "shape": [-1, *(-1 if dim is None else dim for dim in spec.shape)]}


def model_metadata(sig: ModelSignature, versions: Iterable[str], *, platform: str = PLATFORM) -> dict[str, Any]:
    """The body of ``GET /v2/models/<name>[/versions/<v>]``: shapes lead with the batch dimension, ``-1``."""
    return {
        "name": sig.name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [_tensor_metadata(spec) for spec in sig.inputs],
        "outputs": [_tensor_metadata(spec) for spec in sig.outputs],
    }


CURL_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
"""What ``curl -d`` sends unless told otherwise. The body is read as JSON all the same, as Triton and TF
Serving do: a form-encoded body is never valid JSON, so nothing is misread, and a quick ``curl`` works."""


def _media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    return media or None


def _header_length(value: int | str | None, body_size: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
        length = int(text)
    elif type(value) is int:
        length = value
    else:
        raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    if length < 0:
        raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {length}")
    if length > body_size:
        raise InvalidRequest(f"{HEADER_LENGTH} is {length} but the body has only {body_size} bytes")
    return length


def _object(value: Any, what: str, allowed: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict:
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise InvalidRequest(f"{what} has unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise InvalidRequest(f"{what}.parameters must be a JSON object")
    for key, item in value.items():
        if type(item) not in (bool, int, float, str):
            raise InvalidRequest(f"{what}.parameters.{key} must be a boolean, number or string")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is not list or any(type(dim) is not int or dim < 0 for dim in value):
        raise InvalidRequest(f"{what}.shape must be a list of non-negative integers, got {value!r}"[:300])
    if len(value) > 1 + MAX_ITEM_NDIM:
        raise InvalidRequest(f"{what}.shape has {len(value)} dimensions, limit is {1 + MAX_ITEM_NDIM}")
    return tuple(value)


def _check_batch(n: int, what: str, max_batch: int) -> None:
    if n < 1:
        raise InvalidRequest(f"{what}: empty batch (the first dimension is the batch size and must be at least 1)")
    if n > max_batch:
        raise InvalidRequest(f"{what}: batch of {n} is above this model's limit of {max_batch}; split the request")


def _check_datatype(datatype: Any, spec: TensorSpec, what: str) -> np.dtype[Any]:
    if type(datatype) is not str or datatype not in DATATYPES:
        raise InvalidRequest(f"{what}.datatype {datatype!r} is not an OIP datatype (one of {', '.join(DATATYPES)})")
    want = datatype_of(spec.dtype)
    if DATATYPES[datatype] is None:
        raise InvalidRequest(f"{what}: datatype BYTES is not supported for tensor models; this input is {want}")
    if datatype != want:
        raise InvalidRequest(f"{what}: datatype {datatype} does not match the model's {want} (no conversion is done)")
    return spec.np_dtype


def _decode_binary(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], what: str) -> npt.NDArray[Any]:
    if dtype.kind == "b":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise InvalidRequest(f"{what}: BOOL binary data must be bytes 0 or 1")
        return octets.astype(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def _decode_json_data(data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], what: str) -> npt.NDArray[Any]:
    if type(data) is not list:
        raise InvalidRequest(f"{what}.data must be a JSON array")
    count = math.prod(shape)
    got_shape, values = flatten_nested(data, what=f"{what}.data", max_ndim=len(shape))
    # Nested JSON cannot show the dimensions after a zero-size one ([[]] is [1, 0] whatever follows): a prefix
    # ending in 0 is as exact as it can be.
    empty_prefix = got_shape[-1:] == (0,) and shape[:len(got_shape)] == got_shape
    if len(got_shape) > 1 and got_shape != shape and not empty_prefix:
        raise InvalidRequest(f"{what}.data is nested as {list(got_shape)} but shape is {list(shape)}")
    if len(values) != count:
        raise InvalidRequest(f"{what}.data has {len(values)} elements but shape {list(shape)} needs {count}")
    array = array_from_values(values, dtype, what=f"{what}.data", wire_name=datatype_of(dtype.name))
    return array.reshape(shape)


def parse_infer_request(
    body: bytes,
    *,
    content_type: str | None,
    header_length: int | str | None,
    sig: ModelSignature,
    max_batch: int,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> InferRequest:
    """Parse and check ``POST /v2/models/<name>[/versions/<v>]/infer`` against ``sig``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header, raw
    (a string, checked here) or already an int; None when absent (then the
    whole body is JSON). Raises ``RequestTooLarge`` over ``max_body_bytes``,
    ``UnsupportedMediaType`` for a content type other than JSON or
    octet-stream, ``InvalidRequest`` for everything else.
    """
    if len(body) > max_body_bytes:
        raise RequestTooLarge(f"request body is {len(body)} bytes, limit is {max_body_bytes}")
    media = _media_type(content_type)
    if media not in (None, JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE, CURL_FORM_CONTENT_TYPE):
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not accepted; send {JSON_CONTENT_TYPE}, or {BINARY_CONTENT_TYPE} "
            f"with {HEADER_LENGTH} for binary tensor data")
    split = _header_length(header_length, len(body))
    head, binary = (body, b"") if split is None else (body[:split], body[split:])
    request = _object(loads_bounded(head, what="inference request JSON", max_bytes=max_body_bytes),
                      "inference request", _REQUEST_KEYS)

    request_id = request.get("id")
    if request_id is not None and type(request_id) is not str:
        raise InvalidRequest(f"id must be a string, got {type(request_id).__name__}")
    params = _parameters(request.get("parameters"), "request")
    binary_default = params.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InvalidRequest("parameters.binary_data_output must be true or false")

    raw_inputs = request.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise InvalidRequest("inputs must be a non-empty list of tensors")
    arrays: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    batch_sizes: dict[str, int] = {}
    for index, raw in enumerate(raw_inputs):
        tensor = _object(raw, f"inputs[{index}]", _INPUT_KEYS)
        name = tensor.get("name")
        if type(name) is not str:
            raise InvalidRequest(f"inputs[{index}].name must be a string")
        what = f"input {name!r}"
        if name in arrays:
            raise InvalidRequest(f"{what} appears twice in inputs")
        spec = sig.input(name)
        if spec is None:
            raise InvalidRequest(f"{what} is not an input of model {sig.name}; its inputs: "
                                 f"{[s.name for s in sig.inputs]}")
        if "shape" not in tensor or "datatype" not in tensor:
            raise InvalidRequest(f"{what} needs shape and datatype")
        dtype = _check_datatype(tensor["datatype"], spec, what)
        shape = _shape(tensor["shape"], what)
        if len(shape) != 1 + len(spec.shape):
            raise InvalidRequest(f"{what}: shape {list(shape)} has {len(shape)} dimensions; the model wants the batch "
                                 f"size then {shape_text(spec.shape)}")
        _check_batch(shape[0], what, max_batch)
        spec.check_item_shape(shape[1:], what)
        tensor_params = _parameters(tensor.get("parameters"), what)
        size = tensor_params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidRequest(f"{what}: parameters.binary_data_size must be a non-negative integer")
            if "data" in tensor:
                raise InvalidRequest(f"{what} has both data and binary_data_size; send one")
            need = math.prod(shape) * dtype.itemsize
            if size != need:
                raise InvalidRequest(f"{what}: binary_data_size is {size} but {datatype_of(dtype.name)}"
                                     f"{list(shape)} is {need} bytes")
            if offset + size > len(binary):
                raise InvalidRequest(f"{what}: binary_data_size {size} runs past the body: {len(binary) - offset} "
                                     f"binary bytes left (is {HEADER_LENGTH} right?)")
            arrays[name] = _decode_binary(binary[offset:offset + size], dtype, shape, what)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidRequest(f"{what} has neither data nor parameters.binary_data_size")
            arrays[name] = _decode_json_data(tensor["data"], dtype, shape, what)
        batch_sizes[name] = shape[0]
    if offset != len(binary):
        raise InvalidRequest(f"binary sizes do not add up: inputs declare {offset} bytes of binary data but the body "
                             f"has {len(binary)} after the {split}-byte JSON header")
    missing = [spec.name for spec in sig.inputs if spec.name not in arrays]
    if missing:
        raise InvalidRequest(f"missing input(s) {missing} of model {sig.name}")
    if len(set(batch_sizes.values())) > 1:
        raise InvalidRequest(f"inputs disagree on the batch size: {batch_sizes}")
    ordered = {spec.name: arrays[spec.name] for spec in sig.inputs}

    outputs = _requested_outputs(request.get("outputs"), sig)
    return InferRequest(
        id=request_id,
        inputs=MappingProxyType(ordered),
        outputs=outputs,
        binary_default=binary_default,
        parameters=MappingProxyType({k: v for k, v in params.items() if k != "binary_data_output"}),
    )


def _requested_outputs(value: Any, sig: ModelSignature) -> tuple[RequestedOutput, ...]:
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidRequest("outputs must be a list")
    result: list[RequestedOutput] = []
    for index, raw in enumerate(value):
        entry = _object(raw, f"outputs[{index}]", _OUTPUT_KEYS)
        name = entry.get("name")
        if type(name) is not str:
            raise InvalidRequest(f"outputs[{index}].name must be a string")
        if sig.output(name) is None:
            raise InvalidRequest(f"requested output {name!r} is not an output of model {sig.name}; its outputs: "
                                 f"{[s.name for s in sig.outputs]}")
        if any(r.name == name for r in result):
            raise InvalidRequest(f"output {name!r} is requested twice")
        params = _parameters(entry.get("parameters"), f"output {name!r}")
        binary = params.get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise InvalidRequest(f"output {name!r}: parameters.binary_data must be true or false")
        result.append(RequestedOutput(name, binary))
    return tuple(result)


def checked_output(spec: TensorSpec, array: Any, batch_size: int) -> npt.NDArray[Any]:
    """``array`` if it is ``spec``'s dtype and ``[batch_size, *item]`` shape, else ``BadModelOutput``."""
    if not isinstance(array, np.ndarray):
        raise BadModelOutput(f"output {spec.name!r} is a {type(array).__name__}, not an array")
    if array.dtype != spec.np_dtype:
        raise BadModelOutput(f"output {spec.name!r} is {array.dtype}, the model declares {spec.dtype}")
    if array.ndim != 1 + len(spec.shape) or array.shape[0] != batch_size or not spec.matches(array.shape[1:]):
        raise BadModelOutput(f"output {spec.name!r} has shape {list(array.shape)}; the request's batch is "
                             f"{batch_size} and the model declares {shape_text(spec.shape)} per item")
    return array


def encode_infer_response(
    sig: ModelSignature,
    request: InferRequest,
    outputs: Mapping[str, npt.NDArray[Any]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``request`` given the model's ``outputs`` (``[n, *item]`` each).

    Raises ``BadModelOutput`` (502) when an output is missing or does not fit
    the signature: the provider, not the client, is at fault.
    """
    wanted = request.outputs or tuple(RequestedOutput(spec.name) for spec in sig.outputs)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for requested in wanted:
        spec = sig.output(requested.name)
        if spec is None:
            raise BadModelOutput(f"output {requested.name!r} is not in model {sig.name}'s signature")
        if requested.name not in outputs:
            raise BadModelOutput(f"the model returned no output {requested.name!r}")
        array = checked_output(spec, outputs[requested.name], request.batch_size)
        entry: dict[str, Any] = {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": list(array.shape)}
        binary = request.binary_default if requested.binary is None else requested.binary
        if binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json_values(array, flat=True)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": sig.name, "model_version": sig.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = entries
    head = dumps(response)
    if not chunks:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    return head + b"".join(chunks), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
