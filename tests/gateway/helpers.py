"""Request builders and a reference decoder for the gateway codec tests, written from the specs, not the codecs."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt

OIP_TYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_OF = {v: k for k, v in OIP_TYPES.items()}
SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def binary_request(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, int]:
    """A binary-extension body (JSON header then chunks) and its Inference-Header-Content-Length."""
    head = json.dumps(header).encode()
    return head + b"".join(chunks), len(head)


def le_bytes(array: npt.NDArray[Any]) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def reference_values(values: list[Any], dtype: str) -> npt.NDArray[Any]:
    return np.array([SPECIAL[v] if isinstance(v, str) else v for v in values], dtype=dtype)


def decode_oip_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """Decode an OIP response as a client would: the JSON, and every output as an array."""
    length = headers.get("Inference-Header-Content-Length")
    split = len(body) if length is None else int(length)
    head = json.loads(body[:split])
    rest = body[split:]
    arrays: dict[str, npt.NDArray[Any]] = {}
    for out in head["outputs"]:
        dtype = np.dtype(NUMPY_OF[out["datatype"]])
        if "data" in out:
            arrays[out["name"]] = reference_values(out["data"], dtype.name).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            raw, rest = rest[:size], rest[size:]
            arrays[out["name"]] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(out["shape"])
    assert rest == b"", "trailing binary bytes in the response"
    return head, arrays


def json_list(array: npt.NDArray[Any]) -> list[Any]:
    """A flat row-major JSON list of ``array`` (non-finite floats as proto3 strings)."""
    out: list[Any] = []
    for v in array.reshape(-1).tolist():
        if isinstance(v, float) and not math.isfinite(v):
            out.append("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
        else:
            out.append(v)
    return out


def same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    """Equal dtype, shape and bytes (NaN payloads aside for JSON, which has only one NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
