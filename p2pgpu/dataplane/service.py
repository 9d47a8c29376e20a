"""The Trio shell of ``/p2pgpu/data/1``: streams, threads, timeouts and disk for the protocol cores.

What a peer gets and what a reply means is decided in :mod:`.server_core`
and :mod:`.client_core`; this module opens and accepts libp2p streams, runs
store and sealing work in worker threads, writes bodies into
:class:`~p2pgpu.blobstore.PartialBlob`, counts, logs and charges peers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import trio

from ledger.codec import encode

from ..blobstore import BlobNotFound, BlobStore, BlobStoreError, CorruptBlob, PartialBlob
from ..boundedmap import BoundedBytesMap
from ..net import FramedStream, Network, PeerUnreachable, RequestTimeout
from ..net.log import log
from ..sealed import SealedError, SealedHeader, context_id
from ..sealedstore import BadRecipientKey, SealedRef, SealedStore, rejection_reason
from .client_core import BodyReceiver, read_reply
from .config import DataPlaneConfig, DataPlaneMetrics, Entitlement, Progress, Served
from .errors import (
    BadRequest,
    DataPlaneError,
    DataProtocolError,
    IntegrityError,
    Oversized,
    SizeOverrun,
    Truncated,
)
from .identity import PeerKeys, account_address_of_peer
from .messages import DATA_PROTOCOL, DENIAL_REASON, DataReply, DataRequest, SealedAsk, Status
from .server_core import Admission, admit, decode_request, denial_reply, ok_reply

__all__ = ["DataPlane"]

logger = logging.getLogger(__name__)

RECIPIENT_KEYS_KEPT = 4096
"""Peers whose X25519 key (named in their sealed requests) is remembered for pushes, most recent first."""
PUSHED_PLAINTEXTS_KEPT = 128
"""Accepted pushes whose plaintext is held for the fetch that follows each (see ``DataPlane._keep_pushed``)."""
PUSHED_PLAINTEXT_BYTES = 16 << 20
"""... and at most this many bytes of them (a push is at most 256 KiB, ``bidlink.MAX_PUSH_BYTES``)."""


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
        self._recipient_keys = PeerKeys(RECIPIENT_KEYS_KEPT)
        """Peer -> the X25519 key its last entitled sealed request named (:meth:`recipient_key_of`)."""
        self._pushes_in_flight: dict[tuple[bytes, bytes], trio.Event] = {}
        """(name, context id) -> set once a push of it announced by :meth:`expect_push` has been accepted or
        refused: a fetch of it waits for that first instead of going to the network."""
        self._pushed_plaintexts: BoundedBytesMap[tuple[bytes, bytes], tuple[bytes, int]] = BoundedBytesMap(
            PUSHED_PLAINTEXTS_KEPT, PUSHED_PLAINTEXT_BYTES)
        """(name, context id) -> (plaintext, sealed body size) of a push just accepted, for the one fetch that
        follows it (the client's hint, the provider's assignment): opened once, not again from the store."""

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
            request = decode_request(raw, stream.peer)
        except BadRequest:
            self.metrics.denied["bad_request"] += 1
            raise
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
            await self._deny(stream, request, Admission(Status.UNAVAILABLE))
            return
        with reader:
            await stream.send(ok_reply(request, admission, header))
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

    def _admit(self, peer: str, request: DataRequest) -> Admission:
        """Decide a request (:func:`.server_core.admit`) with this node's ledger, sealed index and store."""
        entitled = self._entitled
        sealed = self.sealed

        def size_of(body_hash: bytes) -> int | None:
            try:
                return self.store.size(body_hash)
            except BlobNotFound:
                return None

        return admit(
            request,
            account_address_of_peer(peer),
            entitled=lambda address: entitled is not None and entitled(peer, address, request.blob_hash),
            lookup_sealed=lambda name, cid: sealed.lookup(name, cid) if sealed is not None else None,
            size_of=size_of,
            max_serve_bytes=self.config.max_serve_bytes,
        )

    async def _wrap(self, stream: FramedStream, request: DataRequest, admission: Admission) -> SealedHeader | None:
        """The one-wrap header for the requester, or None after denying the request."""
        assert self.sealed is not None and admission.ref is not None and request.sealed is not None
        try:
            header = await trio.to_thread.run_sync(self.sealed.wrap_for, admission.ref, request.sealed.recipient)
        except BadRecipientKey as exc:
            log(logger, logging.INFO, "data_bad_recipient_key", peer=stream.peer, error=str(exc))
            await self._deny(stream, request, Admission(Status.BAD_KEY))
            return None
        except SealedError as exc:  # our own header does not open: the copy is useless to everyone
            log(logger, logging.ERROR, "data_sealed_copy_unusable", blob=request.blob_hash.hex(),
                body=admission.body_hash.hex(), error=f"{type(exc).__name__}: {exc}")
            await self._deny(stream, request, Admission(Status.UNAVAILABLE))
            return None
        self.metrics.wraps += 1
        self._recipient_keys.note(stream.peer, request.sealed.recipient)
        return header

    def recipient_key_of(self, peer: str) -> bytes | None:
        """The X25519 key ``peer`` had its last sealed blob from us wrapped for, if it fetched one lately.

        Nobody publishes these keys (:mod:`p2pgpu.sealed`); a peer names its
        own in every sealed request, over a connection Noise authenticates, so
        this is what it asked for itself. Sealing to it for a push
        (:mod:`p2pgpu.bidlink`) gives the peer nothing it could not fetch.
        """
        return self._recipient_keys.get(peer)

    def expect_push(self, name: bytes, context: bytes) -> None:
        """A push of ``name`` in ``context`` came and :meth:`accept_pushed_sealed` is about to check it (in a
        task of its own): a :meth:`fetch_sealed` of it that starts meanwhile waits for that instead of fetching.
        Lets a link's reader go on reading (a bid, the next result) while a pushed body is checked and stored."""
        self._pushes_in_flight.setdefault((name, context_id(context)), trio.Event())

    def push_settled(self, name: bytes, context: bytes) -> None:
        """The push :meth:`expect_push` announced was kept, refused, or will never be checked (it did not parse):
        a fetch waiting for it goes on. :meth:`accept_pushed_sealed` calls it on every way out."""
        waiting = self._pushes_in_flight.pop((name, context_id(context)), None)
        if waiting is not None:
            waiting.set()

    async def accept_pushed_sealed(self, peer: str, name: bytes, *, context: bytes, header: SealedHeader,
                                   body: bytes) -> bool:
        """Keep a sealed blob ``peer`` pushed to us unasked, as if we had fetched it; True if it is stored now.

        It is checked as a fetched body is: stored by its content hash (bytes
        that hash to anything else are refused), opened with our key in
        ``context`` to plaintext that must hash to ``name``; a body that fails
        is counted, deleted and charged to ``peer``, and the ``SealedError``
        (or :class:`IntegrityError`) raised. A later :meth:`fetch_sealed` of
        the blob needs no fetch: the first takes the plaintext held from the
        push, any other opens the stored copy. False when a copy was here
        already (a push never replaces one).
        """
        sealed = self._require_sealed()
        cid = context_id(context)
        try:
            return await self._accept_pushed(sealed, peer, name, cid, context, header, body)
        finally:
            self.push_settled(name, context)

    async def _accept_pushed(self, sealed: SealedStore, peer: str, name: bytes, cid: bytes, context: bytes,
                             header: SealedHeader, body: bytes) -> bool:
        def accept() -> bytes | SealedError | None:
            """In one worker thread (each hop waits on a loaded event loop): None if a copy was here already."""
            if sealed.lookup(name, cid) is not None:
                return None
            self.store.put_stream([body], expected_hash=header.content_hash)
            return _open_and_record(sealed, name, cid, context, header)

        async with self._fetch_lock(("sealed", name, cid)):
            try:
                opened = await trio.to_thread.run_sync(accept)
            except CorruptBlob as exc:
                self.metrics.pushed["refused"] += 1
                self.metrics.integrity_failures += 1
                await self._penalize(peer, "pushed_integrity")
                raise IntegrityError(f"pushed body of blob {name.hex()} does not hash to its header's "
                                     f"content hash: {exc}") from None
            except DataPlaneError:
                self.metrics.pushed["refused"] += 1
                raise
            if opened is None:
                self.metrics.pushed["had"] += 1
                return False
            if isinstance(opened, SealedError):
                self.metrics.pushed["refused"] += 1
                await self._rejected(peer, name, header, opened)
            self.metrics.opened += 1
            self.metrics.pushed["stored"] += 1
            self._keep_pushed(name, cid, opened, len(body))
        return True

    def _keep_pushed(self, name: bytes, cid: bytes, plaintext: bytes, body_size: int) -> None:
        """Hold a just-accepted push's plaintext for its fetch, within :data:`PUSHED_PLAINTEXTS_KEPT` entries
        and :data:`PUSHED_PLAINTEXT_BYTES` (the oldest go first; their fetch opens the stored copy)."""
        self._pushed_plaintexts.put((name, cid), (plaintext, body_size), len(plaintext))

    def _take_pushed(self, name: bytes, cid: bytes, max_bytes: int) -> bytes | None:
        """The held plaintext of a push of (name, context), once; None if none is held (or it is over
        ``max_bytes``, as its stored copy would be)."""
        held = self._pushed_plaintexts.pop((name, cid))
        if held is None:
            return None
        plaintext, body_size = held
        _check_stored_size(name, body_size, max_bytes)
        self.metrics.opened += 1
        return plaintext

    async def _deny(self, stream: FramedStream, request: DataRequest, admission: Admission) -> None:
        reason = DENIAL_REASON[admission.status]
        self.metrics.denied[reason] += 1
        log(logger, logging.INFO, "data_denied", peer=stream.peer, blob=request.blob_hash.hex(), reason=reason)
        await stream.send(denial_reply(request, admission.status, admission.size))
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
        _check_stored_size(blob_hash, size, max_bytes)
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
        pushing = self._pushes_in_flight.get((name, cid))
        if pushing is not None:  # a push of it is being checked: its outcome first (its plaintext, or a fetch)
            with trio.move_on_after(timeout):
                await pushing.wait()
        async with self._fetch_lock(("sealed", name, cid)):
            pushed = self._take_pushed(name, cid, max_bytes)
            if pushed is not None:
                return pushed
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

        def open_copy() -> tuple[SealedRef | None, bytes | SealedError | BlobStoreError | None]:
            """In one worker thread: the ref and its plaintext, or why it did not open (the copy then dropped)."""
            ref = sealed.lookup(name, cid)
            if ref is None:
                return None, None
            self._stored_size(ref.content_hash, max_bytes)
            try:
                return ref, sealed.open_ref(ref, context=context)
            except (SealedError, BlobStoreError) as exc:
                sealed.forget(name, cid)
                sealed.discard_body(ref.content_hash)
                return ref, exc

        ref, opened = await trio.to_thread.run_sync(open_copy)
        if ref is None:
            return None
        if isinstance(opened, (SealedError, BlobStoreError)):
            reason = rejection_reason(opened) if isinstance(opened, SealedError) else "unreadable"
            self.metrics.sealed_rejected[f"local_{reason}"] += 1
            log(logger, logging.WARNING, "sealed_local_copy_dropped", blob=name.hex(), reason=reason,
                error=str(opened))
            return None
        assert opened is not None
        self.metrics.opened += 1
        return opened

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
        opened = await trio.to_thread.run_sync(lambda: _open_and_record(sealed, name, cid, context, header))
        if isinstance(opened, SealedError):
            await self._rejected(peer, name, header, opened)
        self.metrics.opened += 1
        return opened

    async def _rejected(self, peer: str, name: bytes, header: SealedHeader, exc: SealedError) -> NoReturn:
        """A received body that did not open (already discarded): counted, logged, its peer charged, raised."""
        reason = rejection_reason(exc)
        self.metrics.sealed_rejected[reason] += 1
        log(logger, logging.WARNING, "sealed_blob_rejected", peer=peer, blob=name.hex(),
            body=header.content_hash.hex(), reason=reason, error=str(exc))
        await self._penalize(peer, f"sealed_{reason}")
        raise exc

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
        try:
            return read_reply(request, await stream.receive(), stream.peer)
        except DataProtocolError:
            await self._penalize(stream.peer, "bad_reply")
            raise

    async def _receive_body(
        self, stream: FramedStream, partial: PartialBlob, size: int, progress: Progress | None
    ) -> None:
        body = BodyReceiver(peer=stream.peer, blob_hash=partial.blob_hash, size=size, received=partial.offset,
                            flush_every=self.config.flush_every)
        while (chunk := await stream.receive()) is not None:
            try:
                flush_due = body.receive_chunk(len(chunk))
            except SizeOverrun:
                partial.discard()
                await self._penalize(stream.peer, "overran_size")
                self.metrics.integrity_failures += 1
                raise
            partial.append(chunk)
            self.metrics.fetched_bytes += len(chunk)
            if flush_due:
                partial.flush()
            if progress is not None:
                progress(partial.offset, size)
        body.receive_end()

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


def _check_stored_size(blob: bytes, size: int, max_bytes: int) -> None:
    """A copy we hold (stored, or a push's held plaintext) still obeys a fetch's ``max_bytes``."""
    if size > max_bytes:
        raise Oversized(f"blob {blob.hex()} of {size} bytes (already stored) is over max_bytes {max_bytes}")


def _open_and_record(
    sealed: SealedStore, name: bytes, cid: bytes, context: bytes, header: SealedHeader
) -> bytes | SealedError:
    """A received body's plaintext, its header kept so it opens again without a fetch (for a worker thread).

    A body that does not open is discarded and the ``SealedError`` returned, not raised: the caller counts it
    and charges its peer on the event loop. A body gone from the store raises :class:`DataPlaneError`.
    """
    try:
        plaintext = sealed.open_stored(name, header, context=context)
    except SealedError as exc:
        sealed.discard_body(header.content_hash)
        return exc
    except BlobStoreError as exc:  # evicted or damaged on disk between commit and open
        raise DataPlaneError(f"received body of blob {name.hex()} could not be read back: {exc}") from exc
    sealed.record(name, cid, header)
    return plaintext


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
