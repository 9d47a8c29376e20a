"""Open Inference Protocol v2 with the binary tensor data extension: request bytes out, arrays in. No I/O.

A request is a JSON header followed by the tensor's raw bytes
(little-endian, row-major, no padding; BOOL one byte per element); the
header's length travels in ``Inference-Header-Content-Length`` and the
input says its byte count in ``parameters.binary_data_size``. We ask for
the output as binary too (``binary_data`` on the output and
``binary_data_output`` on the request), so neither direction JSON-encodes a
large array. A server that answers in plain JSON (no length header, the
output's ``data`` a flat row-major list) is read as well.

Everything the answer claims is checked before an array is built over it:
the declared datatype is one of :data:`DATATYPES`, the shape is a list of
non-negative integers, the byte count is exactly elements x item size, and
the binary parts add up to the body; a mismatch is :class:`BadResponse`
naming it, never an array of the wrong size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import numpy as np

from p2pgpu.client.errors import BadResponse, InvalidInput

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "EncodedInfer",
    "datatype_of",
    "decode_infer_response",
    "encode_infer_request",
    "model_path",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"

DATATYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("|b1"),
    "INT8": np.dtype("|i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("|u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
"""The v2 datatypes this SDK maps, each to its wire dtype (little-endian). BYTES is not a tensor of numbers."""
_BY_KIND: Final = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a NumPy dtype; InvalidInput naming the ones that map for any other."""
    name = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise InvalidInput(f"dtype {dtype} has no v2 datatype; use one of bool, int8-64, uint8-64, float16, "
                           f"float32, float64")
    return name


def model_path(model: str, version: str | None) -> str:
    """``/v2/models/{model}[/versions/{version}]``, each part percent-encoded (a name cannot escape its segment)."""
    if not model:
        raise InvalidInput("the model name is empty")
    if version is not None and not version:
        raise InvalidInput("the model version is empty; pass version=None for the model's default")
    path = f"/v2/models/{quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{quote(version, safe='')}"


@dataclass(frozen=True, slots=True)
class EncodedInfer:
    """A request ready to send: ``chunks`` are the JSON header then the tensor bytes (sent without joining)."""

    headers: dict[str, str]
    chunks: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


def encode_infer_request(array: np.ndarray, *, input_name: str, output: str) -> EncodedInfer:
    """The body and headers of ``POST .../infer`` for one input tensor, asking for ``output`` in binary."""
    if isinstance(array, np.generic):  # a NumPy scalar: a 0-d tensor
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"infer takes a numpy array, got {type(array).__name__} (np.asarray it first)")
    if not input_name or not output:
        raise InvalidInput("input_name and output must be non-empty tensor names")
    datatype = datatype_of(array.dtype)
    wire = np.ascontiguousarray(array, dtype=DATATYPES[datatype])  # no copy when already C-ordered little-endian
    data = wire.tobytes()
    header = {
        "inputs": [{"name": input_name, "shape": list(array.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH.lower(): str(len(head)),
               "content-length": str(len(head) + len(data))}
    return EncodedInfer(headers, (head, data))


def _header_length(headers: Mapping[str, str], body_size: int) -> int | None:
    raw = headers.get(HEADER_LENGTH.lower())
    if raw is None:
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or int(raw) > body_size:
        raise BadResponse(f"{HEADER_LENGTH} {raw!r} is not a length within the body of {body_size} bytes")
    return int(raw)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise BadResponse(f"{where}.shape {value!r} is not a list of non-negative integers")
    return tuple(value)


def decode_infer_response(headers: Mapping[str, str], body: bytes, *, output: str) -> np.ndarray:
    """The array named ``output`` in an infer answer (binary or JSON); ``headers`` with lower-case names.

    The array is a fresh, writable one in native byte order, of the declared datatype and shape.
    """
    header_size = _header_length(headers, len(body))
    head = body if header_size is None else body[:header_size]
    try:
        doc = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadResponse(f"the infer answer's header is not JSON: {exc}") from None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadResponse("the infer answer has no 'outputs' list of objects")
    offset = len(head) if header_size is not None else 0
    found: tuple[dict[str, Any], int] | None = None
    for i, out in enumerate(outputs):  # binary parts follow the header in the order of the outputs that have one
        size = (out.get("parameters") or {}).get("binary_data_size") if isinstance(out.get("parameters"), dict) \
            else None
        if out.get("name") == output:
            found = (out, offset)
        if size is not None:
            if header_size is None:
                raise BadResponse(f"outputs[{i}] is binary but the answer has no {HEADER_LENGTH} header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadResponse(f"outputs[{i}].parameters.binary_data_size {size!r} is not a byte count")
            offset += size
    if header_size is not None and offset != len(body):
        raise BadResponse(f"the outputs' binary_data_size add up to {offset - header_size} bytes but "
                          f"{len(body) - header_size} follow the header")
    if found is None:
        names = [o.get("name") for o in outputs]
        raise BadResponse(f"the answer has no output {output!r} (it has {names}); pass output=NAME")
    out, start = found
    where = f"output {output!r}"
    datatype = out.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadResponse(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    wire = DATATYPES[datatype]
    shape = _shape(out.get("shape"), where)
    count = math.prod(shape)
    native = wire.newbyteorder("=")
    params = out.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if size != count * wire.itemsize:
            raise BadResponse(f"{where}: {size} bytes for shape {list(shape)} of {datatype} "
                              f"({count * wire.itemsize} expected)")
        return np.frombuffer(body, dtype=wire, count=count, offset=start).reshape(shape).astype(native)
    data = out.get("data")
    if not isinstance(data, list):
        raise BadResponse(f"{where} has neither binary data nor a 'data' list")
    try:
        arr = np.array(data, dtype=native)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadResponse(f"{where}: data does not fit {datatype}: {exc}") from None
    if arr.size != count:
        raise BadResponse(f"{where}: {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)
