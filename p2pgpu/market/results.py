"""Result hashing: the one definition client, provider and verifiers agree on.

A batch result is a map ``output name -> tensor``. Its wire form is the
canonical codec encoding of :class:`ResultBundle` -- a MessagePack map with
keys in sorted order whose values are the kernels tensor ext type (dtype
code, shape, little-endian C-order bytes) -- and::

    result_hash(outputs) = SHA-256(encode_result(outputs))

No extra prefix: the committed hash is the name the data plane fetches the
(sealed) result by -- the hash on the ledger -- and anyone holding the
plaintext can check it against ``CommitResult`` without decoding. Because the encoding is canonical (sorted keys, one tensor
layout, strict re-encode check on decode), equal outputs always hash equal
and two different byte strings never decode to the same outputs.

A streamed item (input or output) is hashed as ``SHA-256`` of its tensor
ext payload (:func:`kernels.tensors.encode_tensor`), which binds dtype and
shape as well as the element bytes; :class:`ledger.transactions.StreamOutput`
carries these hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np

from kernels.errors import TensorError
from kernels.tensors import Tensor, encode_tensor
from ledger.codec import DecodeError, EncodeError, MapOf, Record, decode, encode, record

__all__ = [
    "MAX_OUTPUTS",
    "MAX_RESULT_BYTES",
    "ResultBundle",
    "ResultEncodingError",
    "decode_result",
    "encode_result",
    "item_hash",
    "result_hash",
    "result_hash_of_bytes",
]

MAX_OUTPUTS = 64
MAX_RESULT_BYTES = 1 << 31


class ResultEncodingError(ValueError):
    """Outputs that cannot be encoded, or bytes that are not a canonical result."""


@record
class ResultBundle(Record):
    MAX_BYTES = MAX_RESULT_BYTES
    outputs: Annotated[tuple[tuple[str, Any], ...], MapOf(Tensor(), MAX_OUTPUTS)]


def encode_result(outputs: Mapping[str, np.ndarray]) -> bytes:
    """The canonical bytes of a result (what is delivered and hashed)."""
    if not isinstance(outputs, Mapping):
        raise ResultEncodingError(f"outputs must be a mapping of name -> array, got {type(outputs).__name__}")
    try:
        return encode(ResultBundle(outputs=tuple(sorted(outputs.items()))))
    except (EncodeError, TensorError, TypeError) as exc:
        raise ResultEncodingError(f"cannot encode result: {exc}") from exc


def decode_result(data: bytes) -> dict[str, np.ndarray]:
    """The outputs held by canonical result bytes; refuses anything else by name."""
    try:
        return dict(decode(ResultBundle, data).outputs)
    except DecodeError as exc:
        raise ResultEncodingError(f"not a canonical result: {exc}") from exc


def result_hash_of_bytes(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def result_hash(outputs: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of :func:`encode_result`: what ``CommitResult.result_hash`` holds."""
    return result_hash_of_bytes(encode_result(outputs))


def item_hash(arr: np.ndarray) -> bytes:
    """Hash of one streamed tensor (dtype, shape and bytes): ``StreamOutput.input_hash``/``output_hash``."""
    try:
        return hashlib.sha256(encode_tensor(arr)).digest()
    except (TensorError, TypeError) as exc:
        raise ResultEncodingError(f"cannot hash stream item: {exc}") from exc
