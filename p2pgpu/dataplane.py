"""``/p2pgpu/data/1``: sealed blobs by content hash, served only to peers the ledger entitles.

One exchange per stream (framing and transport errors are :mod:`p2pgpu.net`'s)::

    client -> DATA  DataRequest(blob_hash, offset, max_bytes, requester)   END
    server -> DATA  DataReply(status, size, offset)
              DATA  raw bytes …  (only when status is OK, from ``offset`` to ``size``)
              END

Who may fetch. The requester is authenticated by the connection itself:
Noise proves the peer holds the Ed25519 key its peer id embeds (an identity
multihash), and that key is the peer's account key, so the server reads the
public key out of the peer id and derives the ledger address from it. No
signature travels in the request: it would prove nothing Noise has not, and a
signed token could be replayed by whoever saw it. The request still names the
address the client believes it is (``requester``), so a mismatch is refused
with its own status instead of as a silent "not entitled". The node's
entitlement callback ``(peer_id, address, blob_hash) -> bool`` answers from the
ledger (client, assigned provider, drawn verifiers); it runs before the store
is consulted, so a peer that may not have a blob cannot learn whether we hold it.

Denials are statuses, not ERROR frames, so the client raises a specific
exception (:class:`NotEntitled`, :class:`NotFound`, :class:`Oversized`, …)
and the server counts each reason in :class:`DataPlaneMetrics`.

Integrity and resume. The client writes frames straight into a
:class:`~p2pgpu.blobstore.PartialBlob` and checks the SHA-256 once the last byte
is in; a mismatch discards the bytes, penalises the peer through the network's
peer scores, and raises :class:`IntegrityError`. A peer that goes away
mid-transfer raises :class:`Truncated`; the bytes received so far stay on disk,
so the next ``fetch`` of that hash (from the same peer or another one) asks
only for the rest (``offset``). Partial data cannot be verified until the
end, so a resume from a lying peer is caught by the final hash like any other
bad byte.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio
from libp2p.crypto.keys import KeyType
from libp2p.peer.id import ID

from ledger.codec import U8, U64, Address, DecodeError, Hash32, Record, decode, encode, record
from ledger.keys import address_of

from .blobstore import BlobNotFound, BlobStore, CorruptBlob, PartialBlob
from .net import FramedStream, Network, PeerUnreachable, ProtocolError, RequestTimeout
from .net.log import log

__all__ = [
    "DATA_PROTOCOL",
    "DataPlane",
    "DataPlaneConfig",
    "DataPlaneError",
    "DataPlaneMetrics",
    "DataProtocolError",
    "DataReply",
    "DataRequest",
    "Entitlement",
    "IntegrityError",
    "NotEntitled",
    "NotFound",
    "Oversized",
    "Progress",
    "Status",
    "Truncated",
    "account_address_of_peer",
]

logger = logging.getLogger(__name__)

DATA_PROTOCOL: Final = "/p2pgpu/data/1"

Entitlement = Callable[[str, bytes, bytes], bool]
"""``(peer_id, account_address, blob_hash) -> may this peer have this blob?``"""

Progress = Callable[[int, int], None]
"""``(bytes_received_so_far, total_size)``, called after every frame (resumed bytes included)."""


# -- errors ----------------------------------------------------------------------


class DataPlaneError(Exception):
    """Base of the data plane's own failures (transport failures are :mod:`p2pgpu.net` errors)."""


class NotEntitled(DataPlaneError):
    """The peer refused: the ledger does not let us have this blob (or our identity did not match)."""


class NotFound(DataPlaneError):
    """The peer does not hold this blob (or its copy was damaged)."""


class Oversized(DataPlaneError):
    """The blob is larger than the caller's ``max_bytes`` or the server's limit."""


class IntegrityError(DataPlaneError):
    """The bytes received do not hash to the blob's address, or overran the announced size."""


class DataProtocolError(DataPlaneError, ProtocolError):
    """The peer's reply broke ``/p2pgpu/data/1`` (undecodable, wrong offset, …)."""


class Truncated(DataPlaneError, PeerUnreachable):
    """The transfer stopped before the last byte; the bytes so far are kept for a resume."""

    def __init__(self, message: str, *, received: int, size: int) -> None:
        super().__init__(message)
        self.received = received
        self.size = size


# -- wire records ------------------------------------------------------------------


class Status(enum.IntEnum):
    OK = 0
    NOT_ENTITLED = 1
    NOT_FOUND = 2
    TOO_LARGE = 3
    BAD_RANGE = 4
    IDENTITY_MISMATCH = 5
    UNAVAILABLE = 6
    """The server holds the blob but its copy failed verification (now quarantined)."""


@record
class DataRequest(Record):
    MAX_BYTES = 128
    blob_hash: Hash32
    offset: U64
    max_bytes: U64
    """Largest blob the client accepts: the server refuses bigger ones before sending a byte."""
    requester: Address
    """The account the client believes it is; must match the one its peer id derives."""


@record
class DataReply(Record):
    MAX_BYTES = 64
    status: U8
    size: U64
    offset: U64


def account_address_of_peer(peer_id: str) -> bytes | None:
    """The ledger address behind a base58 peer id, or None if the id does not embed an Ed25519 key."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # base58 / multihash / protobuf decoding raise unrelated types
        return None
    if key is None or key.get_type() != KeyType.Ed25519:
        return None
    raw = key.to_bytes()
    return address_of(raw) if len(raw) == 32 else None


# -- configuration and metrics ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    frame_size: int = 256 << 10
    """Payload bytes per DATA frame (must fit the network's ``max_frame_size``)."""
    max_serve_bytes: int = 1 << 30
    """Largest blob this node serves."""
    send_timeout: float = 30.0
    """A client that takes longer than this to accept one frame is cut off."""
    flush_every: int = 8 << 20
    """Make a partial download durable after this many new bytes (and whenever a transfer stops)."""

    def __post_init__(self) -> None:
        for name in ("frame_size", "max_serve_bytes", "flush_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {self.send_timeout}")


@dataclass(slots=True)
class DataPlaneMetrics:
    served: int = 0
    """Transfers completed as a server."""
    served_bytes: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    """Requests refused, per reason (``not_entitled``, ``not_found``, ``too_large`` …)."""
    fetched: int = 0
    fetched_bytes: int = 0
    resumed: int = 0
    """Fetches that continued a partial download."""
    truncated: int = 0
    integrity_failures: int = 0
    penalties: int = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "served": self.served,
            "served_bytes": self.served_bytes,
            "denied": dict(self.denied),
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "resumed": self.resumed,
            "truncated": self.truncated,
            "integrity_failures": self.integrity_failures,
            "penalties": self.penalties,
        }


_DENIAL_REASON: Final = {
    Status.NOT_ENTITLED: "not_entitled",
    Status.NOT_FOUND: "not_found",
    Status.TOO_LARGE: "too_large",
    Status.BAD_RANGE: "bad_range",
    Status.IDENTITY_MISMATCH: "identity_mismatch",
    Status.UNAVAILABLE: "unavailable",
}


# -- the service -------------------------------------------------------------------


class DataPlane:
    """Serves and fetches blobs of one :class:`BlobStore` over one :class:`Network`."""

    def __init__(self, network: Network, store: BlobStore, config: DataPlaneConfig | None = None) -> None:
        self.network = network
        self.store = store
        self.config = config or DataPlaneConfig()
        if self.config.frame_size > network.config.max_frame_size:
            raise ValueError(
                f"frame_size {self.config.frame_size} exceeds the network's "
                f"max_frame_size {network.config.max_frame_size}"
            )
        self.metrics = DataPlaneMetrics()
        self._entitled: Entitlement | None = None
        self._fetching: dict[bytes, trio.Lock] = {}

    # -- server ---------------------------------------------------------------------

    def serve(self, entitled: Entitlement) -> None:
        """Start answering ``/p2pgpu/data/1``, giving a blob only to peers ``entitled`` approves."""
        self._entitled = entitled
        self.network.set_stream_handler(DATA_PROTOCOL, self._serve)

    async def _serve(self, stream: FramedStream) -> None:
        with trio.fail_after(self.network.config.request_timeout):
            raw = await stream.receive_exactly_one()
        try:
            request = decode(DataRequest, raw)
        except DecodeError as exc:
            self.metrics.denied["bad_request"] += 1
            raise ProtocolError(f"undecodable {DATA_PROTOCOL} request from {stream.peer}: {exc}") from exc
        status, size, reader_offset = self._admit(stream.peer, request)
        if status is not Status.OK:
            await self._deny(stream, request, status)
            return
        try:
            reader = await trio.to_thread.run_sync(self.store.open_read, request.blob_hash, reader_offset)
        except (BlobNotFound, CorruptBlob) as exc:  # evicted meanwhile, truncated, or failed verification
            log(logger, logging.WARNING, "data_blob_unavailable", blob=request.blob_hash.hex(), error=str(exc))
            await self._deny(stream, request, Status.UNAVAILABLE)
            return
        with reader:
            await stream.send(encode(DataReply(Status.OK, size, request.offset)))
            sent = 0
            while reader.position < size:
                chunk = reader.read(self.config.frame_size)
                with trio.fail_after(self.config.send_timeout):
                    await stream.send(chunk)
                sent += len(chunk)
                self.metrics.served_bytes += len(chunk)
            await stream.send_end()
        self.metrics.served += 1
        log(
            logger,
            logging.DEBUG,
            "data_served",
            peer=stream.peer,
            blob=request.blob_hash.hex(),
            offset=request.offset,
            bytes=sent,
        )

    def _admit(self, peer: str, request: DataRequest) -> tuple[Status, int, int]:
        """Decide a request: (status, blob size, offset). Pure apart from the store lookup."""
        address = account_address_of_peer(peer)
        if address is None or address != request.requester:
            return Status.IDENTITY_MISMATCH, 0, 0
        if self._entitled is None or not self._entitled(peer, address, request.blob_hash):
            return Status.NOT_ENTITLED, 0, 0
        try:
            size = self.store.size(request.blob_hash)
        except BlobNotFound:
            return Status.NOT_FOUND, 0, 0
        if size > request.max_bytes or size > self.config.max_serve_bytes:
            return Status.TOO_LARGE, size, 0
        if request.offset > size:
            return Status.BAD_RANGE, size, 0
        return Status.OK, size, request.offset

    async def _deny(self, stream: FramedStream, request: DataRequest, status: Status) -> None:
        reason = _DENIAL_REASON[status]
        self.metrics.denied[reason] += 1
        log(logger, logging.INFO, "data_denied", peer=stream.peer, blob=request.blob_hash.hex(), reason=reason)
        size = self.store.size(request.blob_hash) if status is Status.TOO_LARGE else 0
        await stream.send(encode(DataReply(status, size, request.offset)))
        await stream.send_end()

    # -- client ---------------------------------------------------------------------

    async def fetch(
        self,
        peer: str,
        blob_hash: bytes,
        *,
        max_bytes: int,
        timeout: float,
        progress: Progress | None = None,
    ) -> bytes:
        """The blob's bytes, fetched from ``peer`` into the store (or read from it if already there)."""
        await self.fetch_to_store(peer, blob_hash, max_bytes=max_bytes, timeout=timeout, progress=progress)
        return await trio.to_thread.run_sync(self.store.get, blob_hash)

    async def fetch_to_store(
        self,
        peer: str,
        blob_hash: bytes,
        *,
        max_bytes: int,
        timeout: float,
        progress: Progress | None = None,
    ) -> int:
        """Fetch ``blob_hash`` from ``peer`` into the store, resuming a partial download; returns its size.

        Raises :class:`NotEntitled`, :class:`NotFound`, :class:`Oversized`,
        :class:`IntegrityError`, :class:`Truncated`, :class:`DataProtocolError`,
        or the network's :class:`~p2pgpu.net.PeerUnreachable` /
        :class:`~p2pgpu.net.RequestTimeout` (the whole call is bounded by ``timeout``).
        """
        if self.store.has(blob_hash):
            return self._stored_size(blob_hash, max_bytes)
        lock = self._fetching.setdefault(blob_hash, trio.Lock())
        try:
            async with lock:
                if self.store.has(blob_hash):  # another task fetched it while we waited
                    return self._stored_size(blob_hash, max_bytes)
                partial = self.store.partial(blob_hash)
                if partial.offset > max_bytes:  # left over from a fetch with a larger limit
                    partial.discard()
                    partial = self.store.partial(blob_hash)
                try:
                    return await self._fetch_into(partial, peer, blob_hash, max_bytes, timeout, progress)
                finally:
                    partial.close()
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._fetching.pop(blob_hash, None)

    def _stored_size(self, blob_hash: bytes, max_bytes: int) -> int:
        size = self.store.size(blob_hash)
        if size > max_bytes:
            raise Oversized(f"blob {blob_hash.hex()} of {size} bytes (already stored) is over max_bytes {max_bytes}")
        return size

    async def _fetch_into(
        self,
        partial: PartialBlob,
        peer: str,
        blob_hash: bytes,
        max_bytes: int,
        timeout: float,
        progress: Progress | None,
    ) -> int:
        start = partial.offset
        size = -1
        with trio.move_on_after(timeout):
            try:
                async with self.network.open_stream(peer, DATA_PROTOCOL) as stream:
                    request = DataRequest(blob_hash, start, max_bytes, self._own_address())
                    await stream.send(encode(request))
                    await stream.send_end()
                    size = await self._receive_reply(stream, request)
                    if start:
                        self.metrics.resumed += 1
                    await self._receive_body(stream, partial, size, progress)
            except PeerUnreachable as exc:
                if size < 0:
                    raise
                self._stop(partial)
                self.metrics.truncated += 1
                raise Truncated(
                    f"peer {peer} went away after {partial.offset} of {size} bytes of blob {blob_hash.hex()}; "
                    "the bytes so far are kept for a resume",
                    received=partial.offset,
                    size=size,
                ) from exc
            return await self._commit(partial, peer, size)
        self._stop(partial)
        received = f" ({partial.offset} of {size} bytes kept for a resume)" if size >= 0 else ""
        raise RequestTimeout(f"peer {peer} did not deliver blob {blob_hash.hex()} within {timeout} s{received}")

    async def _receive_reply(self, stream: FramedStream, request: DataRequest) -> int:
        peer, blob = stream.peer, request.blob_hash.hex()
        raw = await stream.receive()
        if raw is None:
            raise await self._protocol_violation(
                peer, f"peer {peer} ended {DATA_PROTOCOL} without a reply for blob {blob}"
            )
        try:
            reply = decode(DataReply, raw)
            status = Status(reply.status)
        except (DecodeError, ValueError) as exc:
            raise await self._protocol_violation(peer, f"peer {peer} sent a bad {DATA_PROTOCOL} reply: {exc}") from exc
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
        if status is Status.BAD_RANGE:
            raise await self._protocol_violation(
                peer, f"peer {peer} says offset {request.offset} is outside blob {blob} of {reply.size} bytes"
            )
        if reply.offset != request.offset or reply.size < request.offset:
            raise await self._protocol_violation(
                peer,
                f"peer {peer} answered offset {reply.offset} / size {reply.size} to a request from {request.offset}",
            )
        if reply.size > request.max_bytes:
            raise await self._protocol_violation(
                peer,
                f"peer {peer} announced {reply.size} bytes for blob {blob}, over the requested max {request.max_bytes}",
            )
        return reply.size

    async def _receive_body(
        self, stream: FramedStream, partial: PartialBlob, size: int, progress: Progress | None
    ) -> None:
        unflushed = 0
        while (chunk := await stream.receive()) is not None:
            if partial.offset + len(chunk) > size:
                partial.discard()
                await self._penalize(stream.peer, "overran_size")
                self.metrics.integrity_failures += 1
                raise IntegrityError(
                    f"peer {stream.peer} sent more than the {size} bytes it announced "
                    f"for blob {partial.blob_hash.hex()}"
                )
            partial.append(chunk)
            self.metrics.fetched_bytes += len(chunk)
            unflushed += len(chunk)
            if unflushed >= self.config.flush_every:
                partial.flush()
                unflushed = 0
            if progress is not None:
                progress(partial.offset, size)
        if partial.offset < size:
            raise PeerUnreachable(f"peer {stream.peer} ended the transfer at {partial.offset} of {size} bytes")

    async def _commit(self, partial: PartialBlob, peer: str, size: int) -> int:
        if await trio.to_thread.run_sync(partial.commit):
            self.metrics.fetched += 1
            return size
        self.metrics.integrity_failures += 1
        await self._penalize(peer, "hash_mismatch")
        raise IntegrityError(
            f"the {size} bytes from peer {peer} do not hash to blob {partial.blob_hash.hex()}; discarded"
        )

    def _stop(self, partial: PartialBlob) -> None:
        """Keep what arrived, durably, for the next attempt."""
        try:
            partial.flush()
        except (OSError, ValueError) as exc:  # already closed or discarded
            log(logger, logging.DEBUG, "partial_flush_failed", blob=partial.blob_hash.hex(), error=repr(exc))

    async def _protocol_violation(self, peer: str, message: str) -> DataProtocolError:
        await self._penalize(peer, "bad_reply")
        return DataProtocolError(message)

    async def _penalize(self, peer: str, reason: str) -> None:
        """Charge ``peer`` one rejection in the network's peer scores; disconnect it if that bans it."""
        self.metrics.penalties += 1
        now = trio.current_time()
        banned = self.network.scores.on_rejection(peer, now)
        log(logger, logging.WARNING, "data_peer_penalized", peer=peer, reason=reason, banned=banned)
        if banned:
            self.network.metrics.bans += 1
            await self.network.disconnect(peer)

    def _own_address(self) -> bytes:
        address = account_address_of_peer(self.network.peer_id)
        if address is None:  # open_network only builds Ed25519 identities
            raise DataPlaneError(f"our own peer id {self.network.peer_id} does not embed an Ed25519 key")
        return address
