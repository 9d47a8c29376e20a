"""``/p2pgpu/stream/1`` wire records: the five messages, their union codec, and the submit-time items input.

Every frame is one record of :data:`STREAM_MESSAGES` (a codec
:class:`~ledger.codec.RecordUnion`, tensors as the kernels' ext type); the
exchange they make up is described in :mod:`p2pgpu.streams`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Final

import numpy as np

from kernels.tensors import Tensor
from ledger.codec import U32, U64, Hash32, Record, RecordUnion, record
from ledger.transactions import SignedReceipt, SignedStreamOutput

from ..api.types import MAX_STREAM_ITEM_ELEMENTS, STREAM_ITEMS_INPUT
from ..market import StreamError

__all__ = [
    "ITEMS_INPUT",
    "MAX_ITEM_ELEMENTS",
    "STREAM_MESSAGES",
    "StreamAck",
    "StreamHello",
    "StreamInput",
    "StreamReady",
    "StreamResult",
    "decode_message",
    "encode_message",
    "stream_items",
]

ITEMS_INPUT: Final = STREAM_ITEMS_INPUT
"""Name of the client's submit-time input holding the items to stream, one per row (never part of the spec)."""

MAX_ITEM_ELEMENTS: Final = MAX_STREAM_ITEM_ELEMENTS
"""Largest tensor a stream frame may carry (the transport's ``max_item_bytes`` is usually the tighter bound).
Defined with the API's submission checks, which refuse larger items before a task is posted."""


@record
class StreamHello(Record):
    """Client: open the session of ``task_id`` (our identity is the connection's)."""

    TYPE_ID = 1
    task_id: Hash32


@record
class StreamReady(Record):
    """Provider: the model is loaded; receipt every ``receipt_every`` answers; next item is ``next_index``."""

    TYPE_ID = 2
    task_id: Hash32
    receipt_every: U32
    units: U64
    next_index: U64


@record
class StreamInput(Record):
    """Client: item ``index`` (0-based, consecutive over the whole session)."""

    TYPE_ID = 3
    index: U64
    item: Annotated[np.ndarray, Tensor(MAX_ITEM_ELEMENTS)]


@record
class StreamResult(Record):
    """Provider: the output of item ``signed.output.index``, with the provider's signature over its hash."""

    TYPE_ID = 4
    output: Annotated[np.ndarray, Tensor(MAX_ITEM_ELEMENTS)]
    signed: SignedStreamOutput


@record
class StreamAck(Record):
    """Client: a signed cumulative receipt (what the provider claims with ``StreamClaim``)."""

    TYPE_ID = 5
    receipt: SignedReceipt


STREAM_MESSAGES: Final[RecordUnion[Record]] = RecordUnion(
    "StreamMessage", (StreamHello, StreamReady, StreamInput, StreamResult, StreamAck),
    max_bytes=8 * MAX_ITEM_ELEMENTS + 4096,
)


def encode_message(msg: Record) -> bytes:
    return STREAM_MESSAGES.encode(msg)


def decode_message(data: bytes) -> Record:
    """One frame's record; raises :class:`~ledger.codec.DecodeError` naming the bad field."""
    message: Record = STREAM_MESSAGES.decode(data)
    return message


def stream_items(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The items a client supplied at submit time: the rows of its ``items`` input (none if absent)."""
    items = inputs.get(ITEMS_INPUT)
    if items is None:
        return []
    arr = np.asarray(items)
    if arr.ndim < 1:
        raise StreamError(f"input {ITEMS_INPUT!r} must hold one item per row, got a scalar")
    return [arr[i] for i in range(arr.shape[0])]
