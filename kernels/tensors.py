"""Tensors on the wire: a MessagePack ext type (code 1) and raw blobs.

Payload layout (all little-endian), one canonical form per tensor::

    u8 dtype code | u8 ndim | ndim x u32 dims | element bytes (C order)

The dtype list is an allowlist (no object, string or structured dtypes, so no
pickles can ride in); element counts are bounded before any allocation; the
byte count must match dtype x shape exactly, so a truncated or padded payload
is refused. Input blobs referenced by a job spec are the element bytes alone
(``tensor_bytes``): their dtype and shape live in the spec's ``BlobRef``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels.errors import DisallowedDtype, TensorTooLarge, TruncatedTensor
from ledger.codec import Ext

__all__ = [
    "DTYPES",
    "EXT_CODE",
    "MAX_ELEMENTS",
    "MAX_NDIM",
    "Tensor",
    "array_from_bytes",
    "array_hash",
    "blob_hash",
    "canonical_array",
    "check_dtype",
    "check_shape",
    "decode_tensor",
    "encode_tensor",
    "tensor_bytes",
]

EXT_CODE = 1
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 27  # 512 MiB of float32

# name -> wire code. Codes are part of the protocol: never renumber.
DTYPES: dict[str, int] = {
    "bool": 1,
    "uint8": 2,
    "int8": 3,
    "int16": 4,
    "uint16": 5,
    "int32": 6,
    "uint32": 7,
    "int64": 8,
    "float16": 9,
    "float32": 10,
    "float64": 11,
}
_NAME_BY_CODE = {code: name for name, code in DTYPES.items()}


def check_dtype(name: object) -> np.dtype:
    """The little-endian numpy dtype for an allowlisted name."""
    if type(name) is not str or name not in DTYPES:
        raise DisallowedDtype(f"dtype {name!r} is not allowed (allowed: {', '.join(DTYPES)})")
    return np.dtype(name).newbyteorder("<")


def check_shape(shape: Sequence[int], max_elements: int = MAX_ELEMENTS) -> int:
    """Validate a shape and return its element count.

    The limit applies to the dimensions other than 0 as well: a zero
    dimension makes the count 0 whatever the others are, and numpy cannot lay
    out an empty array whose other dimensions multiply past its address space
    (``(0, 2**32 - 1, 2**32 - 1)`` made numpy raise a bare ValueError).
    No real tensor needs such dimensions, so they are refused like a count
    over the limit.
    """
    if len(shape) > MAX_NDIM:
        raise TensorTooLarge(f"tensor has {len(shape)} dimensions, limit is {MAX_NDIM}")
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > 0xFFFFFFFF:
            raise TensorTooLarge(f"bad dimension {dim!r} in shape {tuple(shape)}")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorTooLarge(f"tensor of shape {tuple(shape)} has {count} elements, limit is {max_elements}")
    span = math.prod(dim for dim in shape if dim)
    if span > max_elements:
        raise TensorTooLarge(
            f"empty tensor of shape {tuple(shape)}: its dimensions other than 0 span {span} elements, "
            f"limit is {max_elements}"
        )
    return count


def canonical_array(value: Any, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """``value`` as a C-contiguous little-endian array of an allowed dtype."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(value).__name__}")
    name = value.dtype.name
    check_dtype(name)
    check_shape(value.shape, max_elements)
    want = np.dtype(name).newbyteorder("<")
    array: np.ndarray = value
    if array.dtype != want or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=want)
    return array


def tensor_bytes(arr: np.ndarray) -> bytes:
    """The element bytes of an array: little-endian, C order."""
    return canonical_array(arr).tobytes()


def blob_hash(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of a blob: the content address used in ``BlobRef.hash``."""
    return hashlib.sha256(data).digest()


def array_hash(arr: np.ndarray) -> bytes:
    """``blob_hash(tensor_bytes(arr))`` without copying a contiguous array."""
    arr = canonical_array(arr)
    return hashlib.sha256(arr.data.cast("B")).digest() if arr.size else blob_hash(b"")


def array_from_bytes(dtype: str, shape: Sequence[int], data: bytes | bytearray | memoryview,
                     max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A read-only array over blob bytes, refusing any length mismatch."""
    dt = check_dtype(dtype)
    count = check_shape(shape, max_elements)
    want = count * dt.itemsize
    if len(data) != want:
        kind = "truncated" if len(data) < want else "oversized"
        raise TruncatedTensor(f"{kind} tensor data: {dtype}{list(shape)} needs {want} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=dt, count=count).reshape(tuple(shape))
    if dt.kind == "b" and count and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise TruncatedTensor("bool tensor holds bytes other than 0 and 1 (non-canonical)")
    return arr


def encode_tensor(arr: np.ndarray) -> bytes:
    """The ext payload for an array."""
    arr = canonical_array(arr)
    header = struct.pack(f"<BB{arr.ndim}I", DTYPES[arr.dtype.name], arr.ndim, *arr.shape)
    return header + arr.tobytes()


def decode_tensor(payload: bytes, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """An array from an ext payload; every malformation is a specific TensorError."""
    if len(payload) < 2:
        raise TruncatedTensor(f"tensor payload of {len(payload)} bytes is shorter than its header")
    code, ndim = payload[0], payload[1]
    name = _NAME_BY_CODE.get(code)
    if name is None:
        raise DisallowedDtype(f"unknown tensor dtype code {code}")
    if ndim > MAX_NDIM:
        raise TensorTooLarge(f"tensor has {ndim} dimensions, limit is {MAX_NDIM}")
    head = 2 + 4 * ndim
    if len(payload) < head:
        raise TruncatedTensor(f"tensor header needs {head} bytes, got {len(payload)}")
    shape = struct.unpack_from(f"<{ndim}I", payload, 2)
    return array_from_bytes(name, shape, memoryview(payload)[head:], max_elements)


def Tensor(max_elements: int = MAX_ELEMENTS) -> Ext:  # noqa: N802 - reads as a type
    """Codec field type: ``Annotated[np.ndarray, Tensor()]``."""
    max_bytes = 2 + 4 * MAX_NDIM + max_elements * 8

    def unpack(payload: bytes) -> np.ndarray:
        return decode_tensor(payload, max_elements)

    def pack(value: Any) -> bytes:
        canonical_array(value, max_elements)
        return encode_tensor(value)

    return Ext(code=EXT_CODE, pack=pack, unpack=unpack, max_len=max_bytes)
