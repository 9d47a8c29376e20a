"""The fetching half of ``/p2pgpu/data/1`` as sans-I/O checks: reply and body frames in, verdicts out.

The Trio shell (:mod:`.service`) sends the request, hands :func:`read_reply`
the first frame and a :class:`BodyReceiver` each body frame's length, and
writes the bytes to disk. A peer that breaks the protocol raises
:class:`~.errors.DataProtocolError` (the shell charges it ``bad_reply``), one
that sends more than it announced :class:`~.errors.SizeOverrun`, and a refusal
the exception its status names.
"""

from __future__ import annotations

from ledger.codec import DecodeError, decode

from ..net.errors import PeerUnreachable
from .errors import DataPlaneError, DataProtocolError, NotEntitled, NotFound, Oversized, SizeOverrun
from .messages import DATA_PROTOCOL, DataReply, DataRequest, Status

__all__ = ["BodyReceiver", "read_reply"]


def read_reply(request: DataRequest, raw: bytes | None, peer: str) -> DataReply:
    """The peer's reply to ``request``, checked against it; raises what a refusal or a violation means."""
    blob = request.blob_hash.hex()
    if raw is None:
        raise DataProtocolError(f"peer {peer} ended {DATA_PROTOCOL} without a reply for blob {blob}")
    try:
        reply = decode(DataReply, raw)
        status = Status(reply.status)
    except (DecodeError, ValueError) as exc:
        raise DataProtocolError(f"peer {peer} sent a bad {DATA_PROTOCOL} reply: {exc}") from exc
    if status is Status.NOT_ENTITLED:
        raise NotEntitled(f"peer {peer} refused blob {blob}: not entitled")
    if status is Status.IDENTITY_MISMATCH:
        raise NotEntitled(f"peer {peer} refused blob {blob}: our peer id does not match our account address")
    if status in (Status.NOT_FOUND, Status.UNAVAILABLE):
        raise NotFound(f"peer {peer} has no usable copy of blob {blob} ({status.name.lower()})")
    if status is Status.TOO_LARGE:
        raise Oversized(
            f"peer {peer} refused blob {blob} of {reply.size} bytes: over our max_bytes {request.max_bytes} "
            "or its serving limit"
        )
    if status is Status.BAD_KEY:
        raise DataPlaneError(f"peer {peer} cannot wrap blob {blob} for our X25519 key")
    if status is Status.BAD_RANGE:
        raise DataProtocolError(
            f"peer {peer} says offset {request.offset} is outside blob {blob} of {reply.size} bytes"
        )
    if reply.offset != request.offset or reply.size < request.offset:
        raise DataProtocolError(
            f"peer {peer} answered offset {reply.offset} / size {reply.size} to a request from {request.offset}"
        )
    if reply.size > request.max_bytes:
        raise DataProtocolError(
            f"peer {peer} announced {reply.size} bytes for blob {blob}, over the requested max {request.max_bytes}"
        )
    if request.sealed is not None and reply.header is None:
        raise DataProtocolError(f"peer {peer} served sealed blob {blob} without a key wrap")
    if request.sealed is None and reply.header is not None:
        raise DataProtocolError(f"peer {peer} sent a key wrap with public blob {blob}")
    return reply


class BodyReceiver:
    """Counts a body's frames against the size the reply announced; says when a durable flush is due."""

    def __init__(self, *, peer: str, blob_hash: bytes, size: int, received: int, flush_every: int) -> None:
        self.peer = peer
        self.blob_hash = blob_hash
        self.size = size
        self.received = received
        """Bytes of the body held so far (from the resume offset on)."""
        self._flush_every = flush_every
        self._unflushed = 0

    def receive_chunk(self, length: int) -> bool:
        """Take a frame of ``length`` bytes; True when the bytes so far should be made durable now."""
        if self.received + length > self.size:
            raise SizeOverrun(f"peer {self.peer} sent more than the {self.size} bytes it announced "
                              f"for blob {self.blob_hash.hex()}")
        self.received += length
        self._unflushed += length
        if self._unflushed >= self._flush_every:
            self._unflushed = 0
            return True
        return False

    def receive_end(self) -> None:
        """The peer's END: a body short of its size means the peer went away mid-transfer."""
        if self.received < self.size:
            raise PeerUnreachable(f"peer {self.peer} ended the transfer at {self.received} of {self.size} bytes")
