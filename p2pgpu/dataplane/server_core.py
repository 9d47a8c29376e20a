"""The serving half of ``/p2pgpu/data/1`` as sans-I/O decisions: request bytes in, a verdict and reply bytes out.

The Trio shell (:mod:`.service`) reads the request frame, looks things up
through the ports it passes in (entitlement, sealed index, store sizes: plain
synchronous calls), and sends the reply and the body. Everything that decides
what a peer gets lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ledger.codec import DecodeError, decode, encode

from ..sealed import SealedHeader
from ..sealedstore import SealedRef
from .errors import BadRequest
from .messages import DATA_PROTOCOL, DataReply, DataRequest, Status

__all__ = ["Admission", "admit", "decode_request", "denial_reply", "ok_reply"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A decided request: what to send if ``status`` is OK."""

    status: Status
    size: int = 0
    """Size of the body (the sealed body for a sealed request)."""
    offset: int = 0
    body_hash: bytes = b""
    ref: SealedRef | None = None


def decode_request(raw: bytes, peer: str) -> DataRequest:
    """The request frame's record; an undecodable one raises :class:`~.errors.BadRequest` naming the field."""
    try:
        return decode(DataRequest, raw)
    except DecodeError as exc:
        raise BadRequest(f"undecodable {DATA_PROTOCOL} request from {peer}: {exc}") from exc


def admit(
    request: DataRequest,
    peer_address: bytes | None,
    *,
    entitled: Callable[[bytes], bool],
    lookup_sealed: Callable[[bytes, bytes], SealedRef | None],
    size_of: Callable[[bytes], int | None],
    max_serve_bytes: int,
) -> Admission:
    """Decide a request from the peer whose peer id derives ``peer_address``.

    The identity and entitlement checks come before any store lookup, so a
    peer that may not have a blob cannot learn whether we hold it.
    ``entitled(address)`` answers from the ledger; ``lookup_sealed(name,
    context_id)`` finds a sealed body (None: not held); ``size_of(hash)`` is
    a stored blob's size (None: not held).
    """
    if peer_address is None or peer_address != request.requester:
        return Admission(Status.IDENTITY_MISMATCH)
    if not entitled(peer_address):
        return Admission(Status.NOT_ENTITLED)
    ref: SealedRef | None = None
    if request.sealed is None:
        body_hash = request.blob_hash
    else:
        ref = lookup_sealed(request.blob_hash, request.sealed.context_id)
        if ref is None:
            return Admission(Status.NOT_FOUND)
        body_hash = ref.content_hash
    size = size_of(body_hash)
    if size is None:
        return Admission(Status.NOT_FOUND)
    if size > request.max_bytes or size > max_serve_bytes:
        return Admission(Status.TOO_LARGE, size)
    if request.offset > size:
        return Admission(Status.BAD_RANGE, size)
    return Admission(Status.OK, size, request.offset, body_hash, ref)


def denial_reply(request: DataRequest, status: Status, size: int = 0) -> bytes:
    """The reply refusing ``request``; only TOO_LARGE tells the size (so the client learns why)."""
    if status is Status.OK:
        raise ValueError("denial_reply() needs a refusing status, got OK")
    return encode(DataReply(status, size if status is Status.TOO_LARGE else 0, request.offset))


def ok_reply(request: DataRequest, admission: Admission, header: SealedHeader | None) -> bytes:
    """The reply that precedes the body: its size, the offset it starts at, and for sealed data the key wrap."""
    return encode(DataReply(Status.OK, admission.size, request.offset, header))
