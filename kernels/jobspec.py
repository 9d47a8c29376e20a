"""Job specs as records: what a client asks for, and its canonical wire form.

A spec names a kernel and version, carries scalar params, references each
input by content (SHA-256 of its little-endian C-order bytes, plus dtype and
shape), and states requirements and limits. Its canonical encoding is the
ledger codec's, so ``spec_hash`` is stable across nodes.

This module knows no kernel: it sits below ``kernels/ops/`` and the
registry, which read specs. Checking a spec against its kernel is
:mod:`kernels.spec`'s job, one layer up.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import numpy as np

from kernels.errors import BlobHashMismatch, MalformedSpec
from kernels.tensors import MAX_NDIM, array_from_bytes, array_hash, blob_hash, canonical_array
from ledger.codec import (
    U16,
    U64,
    DecodeError,
    EncodeError,
    Float,
    Hash32,
    Int,
    ListOf,
    MapOf,
    Nested,
    Record,
    Scalar,
    Text,
    decode,
    encode,
    record,
)

__all__ = [
    "DEVICE_KINDS",
    "MAX_INPUTS",
    "MAX_PARAMS",
    "BlobRef",
    "JobSpec",
    "Limits",
    "Requirements",
    "blob_ref",
    "decode_blob",
    "decode_spec",
    "encode_spec",
    "spec_hash",
]

DEVICE_KINDS = ("any", "cpu", "gpu")
MAX_INPUTS = 64
MAX_PARAMS = 64


@record
class BlobRef(Record):
    """A tensor by content: the hash of its element bytes, its dtype and shape."""

    hash: Hash32
    dtype: Annotated[str, Text(16, min_len=1)]
    shape: Annotated[tuple[int, ...], ListOf(Int(0, 2**32 - 1), MAX_NDIM)]


@record
class Requirements(Record):
    """What the executing device must offer; matched against a provider's probe."""

    device: Annotated[str, Text(8, min_len=1)]  # "any" | "cpu" | "gpu"
    memory_bytes: U64


@record
class Limits(Record):
    """Hard limits the runtime enforces: wall-clock seconds and output bytes."""

    seconds: Annotated[float, Float(0.001, 7 * 86400.0)]
    output_bytes: U64


@record
class JobSpec(Record):
    MAX_BYTES = 64 * 1024

    kernel: Annotated[str, Text(64, min_len=1)]
    version: U16
    params: Annotated[tuple[tuple[str, Any], ...], MapOf(Scalar(), MAX_PARAMS)]
    inputs: Annotated[tuple[tuple[str, BlobRef], ...], MapOf(Nested(BlobRef), MAX_INPUTS)]
    requirements: Requirements
    limits: Limits

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def input_dict(self) -> dict[str, BlobRef]:
        return dict(self.inputs)


def spec_hash(spec: JobSpec) -> bytes:
    """SHA-256 of the canonical encoding; what ``PostTask`` records."""
    return hashlib.sha256(encode_spec(spec)).digest()


def encode_spec(spec: JobSpec) -> bytes:
    try:
        return encode(spec)
    except EncodeError as exc:
        raise MalformedSpec(str(exc)) from exc


def decode_spec(data: bytes) -> JobSpec:
    try:
        return decode(JobSpec, data)
    except DecodeError as exc:
        raise MalformedSpec(str(exc)) from exc


def blob_ref(arr: np.ndarray) -> BlobRef:
    """The reference a spec uses for ``arr``."""
    arr = canonical_array(arr)
    return BlobRef(hash=array_hash(arr), dtype=arr.dtype.name, shape=tuple(int(d) for d in arr.shape))


def decode_blob(ref: BlobRef, data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array a fetched blob holds, refusing truncation and hash mismatch."""
    arr = array_from_bytes(ref.dtype, ref.shape, data)
    if blob_hash(data) != ref.hash:
        raise BlobHashMismatch(f"blob does not hash to {ref.hash.hex()}")
    return arr
