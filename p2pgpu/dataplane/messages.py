"""``/p2pgpu/data/1`` wire records: the request, the reply and its statuses."""

from __future__ import annotations

import enum
from typing import Annotated, Final

from ledger.codec import U8, U64, Address, FixedBytes, Hash32, Maybe, Nested, Record, record

from ..sealed import SealedHeader

__all__ = ["DATA_PROTOCOL", "DENIAL_REASON", "DataReply", "DataRequest", "SealedAsk", "Status"]

DATA_PROTOCOL: Final = "/p2pgpu/data/1"


class Status(enum.IntEnum):
    OK = 0
    NOT_ENTITLED = 1
    NOT_FOUND = 2
    TOO_LARGE = 3
    BAD_RANGE = 4
    IDENTITY_MISMATCH = 5
    UNAVAILABLE = 6
    """The server holds the blob but its copy failed verification (now quarantined)."""
    BAD_KEY = 7
    """A sealed request's recipient key cannot be wrapped for."""


DENIAL_REASON: Final = {
    Status.NOT_ENTITLED: "not_entitled",
    Status.NOT_FOUND: "not_found",
    Status.TOO_LARGE: "too_large",
    Status.BAD_RANGE: "bad_range",
    Status.IDENTITY_MISMATCH: "identity_mismatch",
    Status.UNAVAILABLE: "unavailable",
    Status.BAD_KEY: "bad_key",
}
"""The label a server counts each refusal under (:attr:`DataPlaneMetrics.denied`)."""


@record
class SealedAsk(Record):
    """The sealed part of a request: which task context, and whom to wrap the key for."""

    context_id: Hash32
    recipient: Annotated[bytes, FixedBytes(32)]
    """The fetcher's X25519 public key (:attr:`p2pgpu.sealed.EncryptionKey.public_key`)."""


@record
class DataRequest(Record):
    MAX_BYTES = 256
    blob_hash: Hash32
    """A public blob's content hash, or a sealed blob's name (SHA-256 of its plaintext)."""
    offset: U64
    max_bytes: U64
    """Largest body the client accepts: the server refuses bigger ones before sending a byte."""
    requester: Address
    """The account the client believes it is; must match the one its peer id derives."""
    sealed: Annotated[SealedAsk | None, Maybe(Nested(SealedAsk))] = None


@record
class DataReply(Record):
    MAX_BYTES = 512
    status: U8
    size: U64
    offset: U64
    header: Annotated[SealedHeader | None, Maybe(Nested(SealedHeader))] = None
    """For a sealed request answered OK: the body's content hash and one key wrap, for the requester."""
