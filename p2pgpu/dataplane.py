"""``/p2pgpu/data/1``: blobs by hash, served only to peers the ledger entitles; task data sealed end to end.

One exchange per stream (framing and transport errors are :mod:`p2pgpu.net`'s)::

    client -> DATA  DataRequest(blob_hash, offset, max_bytes, requester, sealed)   END
    server -> DATA  DataReply(status, size, offset, header)
              DATA  raw bytes …  (only when status is OK, from ``offset`` to ``size``)
              END

Two kinds of blob travel here:

* **Sealed task data** (inputs, results): ``sealed = SealedAsk(context_id,
  recipient)``. ``blob_hash`` is the *name* the ledger knows -- SHA-256 of the
  plaintext, as in the spec's input refs or ``CommitResult`` -- and
  ``context_id`` the task context (:func:`p2pgpu.sealed.context_id` of
  ``task_context(chain, task, purpose)``). The holder keeps only the sealed
  body (:mod:`p2pgpu.sealedstore`); after the entitlement check it wraps the
  body's content key for ``recipient`` (the fetcher's X25519 key) and sends
  that one-wrap header in the reply, then the body. The fetcher stores the
  body by its content hash (``header.content_hash``, checked once the last
  byte is in), opens it with its own key and the context it expects, and
  checks that the plaintext hashes to the name; any failure is the specific
  :class:`~p2pgpu.sealed.SealedError` (``WrongContext``, ``Tampered``,
  ``NotARecipient``, ``Truncated``, ``MalformedEnvelope``,
  :class:`~p2pgpu.sealedstore.PlaintextMismatch`), counted per reason in
  :attr:`DataPlaneMetrics.sealed_rejected`; the body is deleted and the peer
  penalised. So confidentiality and integrity of task data hold end to end,
  whatever carries or stores the bytes.
* **Public blobs** (task specs, announced to everyone anyway): ``sealed`` is
  absent, ``blob_hash`` is the content hash of the bytes served as they are.

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
The recipient key needs no proof either: a peer the ledger entitles can pass
the plaintext on anyway, so wrapping for whichever key it names gives nothing away.

Denials are statuses, not ERROR frames, so the client raises a specific
exception (:class:`NotEntitled`, :class:`NotFound`, :class:`Oversized`, …)
and the server counts each reason in :class:`DataPlaneMetrics`.

Integrity and resume. The client writes frames straight into a
:class:`~p2pgpu.blobstore.PartialBlob` and checks the SHA-256 once the last byte
is in; a mismatch discards the bytes, penalises the peer through the network's
peer scores, and raises :class:`IntegrityError`. A peer that goes away
mid-transfer raises :class:`Truncated`; the bytes received so far stay on disk,
so the next fetch of that blob (from the same peer or another one) asks
only for the rest (``offset``). A sealed fetch learns the body's content hash
from the first reply and remembers it (in memory) to resume; should a holder
answer a resume with another body, the partial bytes are dropped and the
fetch fails with :class:`DataProtocolError` (the next attempt starts afresh).
Partial data cannot be verified until the end, so a resume from a lying peer
is caught by the final hash like any other bad byte.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Final

import trio
from libp2p.crypto.keys import KeyType
from libp2p.peer.id import ID

from ledger.codec import (
    U8,
    U64,
    Address,
    DecodeError,
    FixedBytes,
    Hash32,
    Maybe,
    Nested,
    Record,
    decode,
    encode,
    record,
)
from ledger.keys import address_of

from .blobstore import BlobNotFound, BlobStore, BlobStoreError, CorruptBlob, PartialBlob
from .net import FramedStream, Network, PeerUnreachable, ProtocolError, RequestTimeout
from .net.log import log
from .sealed import SealedError, SealedHeader, context_id
from .sealedstore import BadRecipientKey, SealedRef, SealedStore, rejection_reason

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
    "SealedAsk",
    "Status",
    "Truncated",
    "account_address_of_peer",
    "peer_id_of_account_key",
]

logger = logging.getLogger(__name__)

DATA_PROTOCOL: Final = "/p2pgpu/data/1"

Entitlement = Callable[[str, bytes, bytes], bool]
Served = Callable[[str, bytes, bytes], None]
"""``(peer_id, account_address, blob_hash) -> may this peer have this blob?``

For a sealed request ``blob_hash`` is the blob's name (its plaintext hash)."""

Progress = Callable[[int, int], None]
"""``(bytes_received_so_far, total_size)``, called after every frame (resumed bytes included)."""


# -- errors ----------------------------------------------------------------------


class DataPlaneError(Exception):
    """Base of the data plane's own failures (transport failures are :mod:`p2pgpu.net` errors).

    A sealed blob that does not open raises the :class:`~p2pgpu.sealed.SealedError`
    subclass that names the problem instead (it is not a transfer failure).
    """


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
    BAD_KEY = 7
    """A sealed request's recipient key cannot be wrapped for."""


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


def peer_id_of_account_key(public_key: bytes) -> str:
    """The base58 peer id of the node whose account key is ``public_key`` (the key is its libp2p identity)."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


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
    wraps: int = 0
    """Key wraps made for entitled fetchers of sealed blobs."""
    denied: Counter[str] = field(default_factory=Counter)
    """Requests refused, per reason (``not_entitled``, ``not_found``, ``too_large`` …)."""
    fetched: int = 0
    fetched_bytes: int = 0
    opened: int = 0
    """Sealed blobs fetched (or found locally) that opened and matched their name."""
    resumed: int = 0
    """Fetches that continued a partial download."""
    truncated: int = 0
    integrity_failures: int = 0
    sealed_rejected: Counter[str] = field(default_factory=Counter)
    """Sealed blobs that did not open, per reason (``tampered``, ``wrong_context``, ``plaintext_mismatch`` …)."""
    penalties: int = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "served": self.served,
            "served_bytes": self.served_bytes,
            "wraps": self.wraps,
            "denied": dict(self.denied),
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "opened": self.opened,
            "resumed": self.resumed,
            "truncated": self.truncated,
            "integrity_failures": self.integrity_failures,
            "sealed_rejected": dict(self.sealed_rejected),
            "penalties": self.penalties,
        }


_DENIAL_REASON: Final = {
    Status.NOT_ENTITLED: "not_entitled",
    Status.NOT_FOUND: "not_found",
    Status.TOO_LARGE: "too_large",
    Status.BAD_RANGE: "bad_range",
    Status.IDENTITY_MISMATCH: "identity_mismatch",
    Status.UNAVAILABLE: "unavailable",
    Status.BAD_KEY: "bad_key",
}


@dataclass(frozen=True, slots=True)
class _Admission:
    """A decided request: what to send if ``status`` is OK."""

    status: Status
    size: int = 0
    """Size of the body (the sealed body for a sealed request)."""
    offset: int = 0
    body_hash: bytes = b""
    ref: SealedRef | None = None


# -- the service -------------------------------------------------------------------


class DataPlane:
    """Serves and fetches blobs of one :class:`BlobStore` over one :class:`Network`.

    ``sealed`` (the same store's sealed index and this node's key) is needed to
    serve and fetch sealed task data; without it sealed requests are answered
    ``NOT_FOUND`` and :meth:`fetch_sealed` raises :class:`DataPlaneError`.
    """

    def __init__(
        self,
        network: Network,
        store: BlobStore,
        config: DataPlaneConfig | None = None,
        *,
        sealed: SealedStore | None = None,
    ) -> None:
        self.network = network
        self.store = store
        self.config = config or DataPlaneConfig()
        if self.config.frame_size > network.config.max_frame_size:
            raise ValueError(
                f"frame_size {self.config.frame_size} exceeds the network's "
                f"max_frame_size {network.config.max_frame_size}"
            )
        if sealed is not None and sealed.store is not store:
            raise ValueError("the sealed index must belong to the data plane's blob store")
        self.sealed = sealed
        self.metrics = DataPlaneMetrics()
        self._entitled: Entitlement | None = None
        self._on_served: Served | None = None
        self._fetching: dict[object, trio.Lock] = {}
        self._resume_hints: dict[tuple[bytes, bytes], bytes] = {}
        """(name, context id) -> content hash of a sealed body partly received, to resume it."""

    # -- server ---------------------------------------------------------------------

    def serve(self, entitled: Entitlement, on_served: Served | None = None) -> None:
        """Start answering ``/p2pgpu/data/1``, giving a blob only to peers ``entitled`` approves.

        ``on_served(peer_id, address, blob_hash)`` runs once a blob's last
        byte went out to that peer (not when its request was admitted: a
        transfer can still fail after that).
        """
        self._entitled = entitled
        self._on_served = on_served
        self.network.set_stream_handler(DATA_PROTOCOL, self._serve)

    async def _serve(self, stream: FramedStream) -> None:
        with trio.fail_after(self.network.config.request_timeout):
            raw = await stream.receive_exactly_one()
        try:
            request = decode(DataRequest, raw)
        except DecodeError as exc:
            self.metrics.denied["bad_request"] += 1
            raise ProtocolError(f"undecodable {DATA_PROTOCOL} request from {stream.peer}: {exc}") from exc
        admission = self._admit(stream.peer, request)
        if admission.status is not Status.OK:
            await self._deny(stream, request, admission)
            return
        header: SealedHeader | None = None
        if request.sealed is not None:
            header = await self._wrap(stream, request, admission)
            if header is None:
                return
        try:
            reader = await trio.to_thread.run_sync(self.store.open_read, admission.body_hash, admission.offset)
        except (BlobNotFound, CorruptBlob) as exc:  # evicted meanwhile, truncated, or failed verification
            log(logger, logging.WARNING, "data_blob_unavailable", blob=admission.body_hash.hex(), error=str(exc))
            await self._deny(stream, request, _Admission(Status.UNAVAILABLE))
            return
        with reader:
            await stream.send(encode(DataReply(Status.OK, admission.size, request.offset, header)))
            sent = 0
            while reader.position < admission.size:
                chunk = reader.read(self.config.frame_size)
                with trio.fail_after(self.config.send_timeout):
                    await stream.send(chunk)
                sent += len(chunk)
                self.metrics.served_bytes += len(chunk)
            await stream.send_end()
        self.metrics.served += 1
        if self._on_served is not None:
            address = account_address_of_peer(stream.peer)
            if address is not None:
                self._on_served(stream.peer, address, request.blob_hash)
        log(
            logger,
            logging.DEBUG,
            "data_served",
            peer=stream.peer,
            blob=request.blob_hash.hex(),
            sealed=request.sealed is not None,
            offset=request.offset,
            bytes=sent,
        )

    def _admit(self, peer: str, request: DataRequest) -> _Admission:
        """Decide a request. Pure apart from the store and sealed-index lookups."""
        address = account_address_of_peer(peer)
        if address is None or address != request.requester:
            return _Admission(Status.IDENTITY_MISMATCH)
        if self._entitled is None or not self._entitled(peer, address, request.blob_hash):
            return _Admission(Status.NOT_ENTITLED)
        ref: SealedRef | None = None
        if request.sealed is None:
            body_hash = request.blob_hash
        else:
            ref = self.sealed.lookup(request.blob_hash, request.sealed.context_id) if self.sealed else None
            if ref is None:
                return _Admission(Status.NOT_FOUND)
            body_hash = ref.content_hash
        try:
            size = self.store.size(body_hash)
        except BlobNotFound:
            return _Admission(Status.NOT_FOUND)
        if size > request.max_bytes or size > self.config.max_serve_bytes:
            return _Admission(Status.TOO_LARGE, size)
        if request.offset > size:
            return _Admission(Status.BAD_RANGE, size)
        return _Admission(Status.OK, size, request.offset, body_hash, ref)

    async def _wrap(self, stream: FramedStream, request: DataRequest, admission: _Admission) -> SealedHeader | None:
        """The one-wrap header for the requester, or None after denying the request."""
        assert self.sealed is not None and admission.ref is not None and request.sealed is not None
        try:
            header = await trio.to_thread.run_sync(self.sealed.wrap_for, admission.ref, request.sealed.recipient)
        except BadRecipientKey as exc:
            log(logger, logging.INFO, "data_bad_recipient_key", peer=stream.peer, error=str(exc))
            await self._deny(stream, request, _Admission(Status.BAD_KEY))
            return None
        except SealedError as exc:  # our own header does not open: the copy is useless to everyone
            log(logger, logging.ERROR, "data_sealed_copy_unusable", blob=request.blob_hash.hex(),
                body=admission.body_hash.hex(), error=f"{type(exc).__name__}: {exc}")
            await self._deny(stream, request, _Admission(Status.UNAVAILABLE))
            return None
        self.metrics.wraps += 1
        return header

    async def _deny(self, stream: FramedStream, request: DataRequest, admission: _Admission) -> None:
        reason = _DENIAL_REASON[admission.status]
        self.metrics.denied[reason] += 1
        log(logger, logging.INFO, "data_denied", peer=stream.peer, blob=request.blob_hash.hex(), reason=reason)
        size = admission.size if admission.status is Status.TOO_LARGE else 0
        await stream.send(encode(DataReply(admission.status, size, request.offset)))
        await stream.send_end()

    # -- client: public blobs -------------------------------------------------------

    async def fetch(
        self,
        peer: str,
        blob_hash: bytes,
        *,
        max_bytes: int,
        timeout: float,
        progress: Progress | None = None,
    ) -> bytes:
        """The public blob's bytes, fetched from ``peer`` into the store (or read from it if already there)."""
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
        """Fetch public blob ``blob_hash`` from ``peer`` into the store, resuming a partial download; its size.

        Raises :class:`NotEntitled`, :class:`NotFound`, :class:`Oversized`,
        :class:`IntegrityError`, :class:`Truncated`, :class:`DataProtocolError`,
        or the network's :class:`~p2pgpu.net.PeerUnreachable` /
        :class:`~p2pgpu.net.RequestTimeout` (the whole call is bounded by ``timeout``).
        """
        if self.store.has(blob_hash):
            return self._stored_size(blob_hash, max_bytes)
        async with self._fetch_lock(blob_hash):
            if self.store.has(blob_hash):  # another task fetched it while we waited
                return self._stored_size(blob_hash, max_bytes)
            partial = self._fresh_partial(blob_hash, max_bytes)
            try:
                request = DataRequest(blob_hash, partial.offset, max_bytes, self._own_address())
                _, size = await self._transfer(peer, request, lambda reply: partial, timeout, progress)
            finally:
                partial.close()  # (no-op once committed or discarded)
            return size

    def _stored_size(self, blob_hash: bytes, max_bytes: int) -> int:
        size = self.store.size(blob_hash)
        if size > max_bytes:
            raise Oversized(f"blob {blob_hash.hex()} of {size} bytes (already stored) is over max_bytes {max_bytes}")
        return size

    def _fresh_partial(self, blob_hash: bytes, max_bytes: int) -> PartialBlob:
        partial = self.store.partial(blob_hash)
        if partial.offset > max_bytes:  # left over from a fetch with a larger limit
            partial.discard()
            partial = self.store.partial(blob_hash)
        return partial

    def _fetch_lock(self, key: object) -> _FetchLock:
        return _FetchLock(self._fetching, key)

    # -- client: sealed task data ---------------------------------------------------

    async def fetch_sealed(
        self,
        peer: str,
        name: bytes,
        *,
        context: bytes,
        max_bytes: int,
        timeout: float,
        progress: Progress | None = None,
    ) -> bytes:
        """The plaintext of sealed blob ``name`` (SHA-256 of the plaintext) in ``context``, fetched from ``peer``.

        A copy already in the store (fetched before, or our own) opens without
        a fetch. Raises what :meth:`fetch_to_store` raises, and, when the
        fetched body does not open, the :class:`~p2pgpu.sealed.SealedError`
        that says why (``WrongContext``, ``Tampered``, ``NotARecipient``,
        ``Truncated``, ``MalformedEnvelope``, ``PlaintextMismatch``): such a
        body is counted, deleted, its peer penalised, and never returned.
        ``max_bytes`` bounds the sealed body (a little over the plaintext).
        """
        sealed = self._require_sealed()
        cid = context_id(context)
        async with self._fetch_lock(("sealed", name, cid)):
            local = await self._open_local(sealed, name, cid, context, max_bytes)
            if local is not None:
                return local
            header = await self._fetch_sealed_body(sealed, peer, name, cid, max_bytes, timeout, progress)
            return await self._open_fetched(sealed, peer, name, cid, context, header)

    def _require_sealed(self) -> SealedStore:
        if self.sealed is None:
            raise DataPlaneError("this data plane has no sealed store (no key to open task data with)")
        return self.sealed

    async def _open_local(
        self, sealed: SealedStore, name: bytes, cid: bytes, context: bytes, max_bytes: int
    ) -> bytes | None:
        """Our stored copy's plaintext, or None when there is none (a copy that does not open is dropped)."""
        ref = await trio.to_thread.run_sync(sealed.lookup, name, cid)
        if ref is None:
            return None
        self._stored_size(ref.content_hash, max_bytes)
        try:
            plaintext = await trio.to_thread.run_sync(lambda: sealed.open_ref(ref, context=context))
        except (SealedError, BlobStoreError) as exc:
            reason = rejection_reason(exc) if isinstance(exc, SealedError) else "unreadable"
            self.metrics.sealed_rejected[f"local_{reason}"] += 1
            log(logger, logging.WARNING, "sealed_local_copy_dropped", blob=name.hex(), reason=reason, error=str(exc))

            def drop() -> None:
                sealed.forget(name, cid)
                sealed.discard_body(ref.content_hash)

            await trio.to_thread.run_sync(drop)
            return None
        self.metrics.opened += 1
        return plaintext

    async def _fetch_sealed_body(
        self,
        sealed: SealedStore,
        peer: str,
        name: bytes,
        cid: bytes,
        max_bytes: int,
        timeout: float,
        progress: Progress | None,
    ) -> SealedHeader:
        """Receive the body into the store by its content hash; the reply's header.

        The content hash learned from a reply is kept until the body is in, so a
        failed attempt (drop, timeout, unreachable peer) resumes where it stopped.
        """
        hinted = self._resume_hints.get((name, cid))
        resume = self._fresh_partial(hinted, max_bytes) if hinted is not None else None
        offset = resume.offset if resume is not None else 0
        if resume is not None and offset == 0:
            resume.close()
            resume = None
        request = DataRequest(name, offset, max_bytes, self._own_address(), SealedAsk(cid, sealed.public_key))

        def partial_for(reply: DataReply) -> PartialBlob:
            assert reply.header is not None  # _receive_reply checked it
            body_hash = reply.header.content_hash
            if resume is not None:
                if body_hash == hinted:
                    return resume
                resume.discard()
                self._resume_hints.pop((name, cid), None)
                raise DataProtocolError(
                    f"peer {peer} answered a resume of blob {name.hex()} at {offset} with another body "
                    f"({body_hash.hex()}); the partial download was dropped"
                )
            self._resume_hints[(name, cid)] = body_hash
            partial = self.store.partial(body_hash)
            if partial.offset:  # bytes from an earlier attempt we did not know how to resume: start over
                partial.discard()
                partial = self.store.partial(body_hash)
            return partial

        try:
            reply, _ = await self._transfer(peer, request, partial_for, timeout, progress)
        finally:
            if resume is not None:
                resume.close()  # (no-op when the transfer used, committed or dropped it)
        self._resume_hints.pop((name, cid), None)
        assert reply.header is not None
        return reply.header

    async def _open_fetched(
        self, sealed: SealedStore, peer: str, name: bytes, cid: bytes, context: bytes, header: SealedHeader
    ) -> bytes:
        try:
            plaintext = await trio.to_thread.run_sync(lambda: sealed.open_stored(name, header, context=context))
        except SealedError as exc:
            reason = rejection_reason(exc)
            self.metrics.sealed_rejected[reason] += 1
            await trio.to_thread.run_sync(sealed.discard_body, header.content_hash)
            log(logger, logging.WARNING, "sealed_blob_rejected", peer=peer, blob=name.hex(),
                body=header.content_hash.hex(), reason=reason, error=str(exc))
            await self._penalize(peer, f"sealed_{reason}")
            raise
        except BlobStoreError as exc:  # evicted or damaged on disk between commit and open
            raise DataPlaneError(f"fetched body of blob {name.hex()} could not be read back: {exc}") from exc
        await trio.to_thread.run_sync(sealed.record, name, cid, header)
        self.metrics.opened += 1
        return plaintext

    # -- client: one transfer -------------------------------------------------------

    async def _transfer(
        self,
        peer: str,
        request: DataRequest,
        partial_for: Callable[[DataReply], PartialBlob],
        timeout: float,
        progress: Progress | None,
    ) -> tuple[DataReply, int]:
        """Send ``request``, receive the body into the partial ``partial_for`` picks from the reply, commit it.

        The partial is closed (kept for a resume) or committed or discarded
        before this returns or raises.
        """
        partial: PartialBlob | None = None
        reply: DataReply | None = None
        try:
            with trio.move_on_after(timeout):
                try:
                    async with self.network.open_stream(peer, DATA_PROTOCOL) as stream:
                        await stream.send(encode(request))
                        await stream.send_end()
                        reply = await self._receive_reply(stream, request)
                        partial = partial_for(reply)
                        if request.offset:
                            self.metrics.resumed += 1
                        await self._receive_body(stream, partial, reply.size, progress)
                except PeerUnreachable as exc:
                    if reply is None or partial is None:
                        raise
                    self._stop(partial)
                    self.metrics.truncated += 1
                    raise Truncated(
                        f"peer {peer} went away after {partial.offset} of {reply.size} bytes of blob "
                        f"{request.blob_hash.hex()}; the bytes so far are kept for a resume",
                        received=partial.offset,
                        size=reply.size,
                    ) from exc
                return reply, await self._commit(partial, peer, reply.size)
            if partial is not None:
                self._stop(partial)
            kept = partial is not None and reply is not None
            received = f" ({partial.offset} of {reply.size} bytes kept for a resume)" if kept else ""
            raise RequestTimeout(
                f"peer {peer} did not deliver blob {request.blob_hash.hex()} within {timeout} s{received}"
            )
        finally:
            if partial is not None:
                partial.close()

    async def _receive_reply(self, stream: FramedStream, request: DataRequest) -> DataReply:
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
        if status is Status.BAD_KEY:
            raise DataPlaneError(f"peer {peer} cannot wrap blob {blob} for our X25519 key")
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
        if request.sealed is not None and reply.header is None:
            raise await self._protocol_violation(peer, f"peer {peer} served sealed blob {blob} without a key wrap")
        if request.sealed is None and reply.header is not None:
            raise await self._protocol_violation(peer, f"peer {peer} sent a key wrap with public blob {blob}")
        return reply

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
        """Charge ``peer`` one offence through the network's single path (score, ban, blacklist, disconnect)."""
        self.metrics.penalties += 1
        log(logger, logging.WARNING, "data_peer_penalized", peer=peer, reason=reason)
        self.network.penalize(peer, DATA_PROTOCOL, reason)
        await trio.lowlevel.checkpoint()

    def _own_address(self) -> bytes:
        address = account_address_of_peer(self.network.peer_id)
        if address is None:  # open_network only builds Ed25519 identities
            raise DataPlaneError(f"our own peer id {self.network.peer_id} does not embed an Ed25519 key")
        return address


class _FetchLock:
    """One fetch per key at a time; the lock is dropped from ``locks`` when nobody holds or waits for it."""

    def __init__(self, locks: dict[object, trio.Lock], key: object) -> None:
        self._locks = locks
        self._key = key
        self._lock = locks.setdefault(key, trio.Lock())

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        if not self._lock.locked() and self._lock.statistics().tasks_waiting == 0:
            self._locks.pop(self._key, None)
