"""Request/response and streaming exchanges over libp2p streams.

Framing is :mod:`p2pgpu.net.framing` (pure); this module is the Trio shell:
it opens and accepts libp2p streams, maps transport failures to
:mod:`p2pgpu.net.errors` where they enter, and keeps a failing handler from
touching anything but its own stream.

Two patterns:

* unary -- ``request(peer, protocol, data) -> bytes``: the client sends one
  DATA frame and END; the server answers one DATA frame and END, or an
  ERROR frame.
* streaming -- ``open_stream(peer, protocol)`` gives a :class:`FramedStream`
  on which both sides send any number of DATA frames and finish with END
  (block sync, streaming inference sessions).

Inbound streams are admitted by :class:`~p2pgpu.net.quota.InboundQuota` (per
peer, per protocol, node-wide, banned peers refused) and must say something
within ``idle_timeout``; the policy is pure and lives there, this shell only
counts, charges, refuses and resets. A refused stream gets an ERROR frame
``busy: <reason>`` (a banned peer only a reset), which the client raises as
:class:`PeerBusy`. Outbound, we keep at most ``outbound_per_peer`` streams
open to one peer (more wait), below the quota peers apply to us.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .errors import NetError, PeerBusy, PeerUnreachable, ProtocolError, RemoteError, RequestTimeout, StreamIdle
from .framing import Frame, FrameDecoder, Kind, encode_error, encode_frame
from .log import log
from .metrics import NetMetrics
from .muxer import release_stream_slot
from .quota import Admitted, InboundQuota, Refusal, Refused, Slot, StreamLimits

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
CLEANUP_SECONDS = 1.0
BUSY_PREFIX = "busy: "
"""Start of the ERROR text of a stream refused by the quotas; no handler error starts this way
("bad request: ...", "handler error: ...", "timeout"), so clients can tell "later" from "failed"."""
IDLE = "idle"
"""Metric and charge reason of an inbound stream that sent no request in time."""


@dataclass(frozen=True, slots=True)
class RequestContext:
    peer: str
    """Base58 id of the requesting peer (authenticated by Noise)."""
    protocol: str


UnaryHandler = Callable[[RequestContext, bytes], Awaitable[bytes]]
StreamHandler = Callable[["FramedStream"], Awaitable[None]]


class FramedStream:
    """Frames over one libp2p stream, with errors that name peer and protocol."""

    def __init__(self, stream: INetStream, peer: str, protocol: str, max_frame_size: int) -> None:
        self._stream = stream
        self.peer = peer
        self.protocol = protocol
        self._where = f"peer {peer} on {protocol}"
        self._decoder = FrameDecoder(max_frame_size, self._where)
        self._frames: list[Frame] = []
        self._remote_ended = False
        self._local_ended = False

    @property
    def context(self) -> RequestContext:
        return RequestContext(self.peer, self.protocol)

    async def send(self, data: bytes) -> None:
        if self._local_ended:
            raise ProtocolError(f"send after END on stream to {self._where}")
        if len(data) > self._decoder.max_frame_size:
            raise ProtocolError(
                f"frame of {len(data)} bytes to {self._where} exceeds the limit of {self._decoder.max_frame_size}"
            )
        await self._write(encode_frame(Kind.DATA, data))

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Several DATA frames in one write: one muxer frame and one encryption for them all, not one each
        (what a writer with a queue behind it sends; the reader sees the frames one by one, as ever)."""
        if self._local_ended:
            raise ProtocolError(f"send after END on stream to {self._where}")
        for data in payloads:
            if len(data) > self._decoder.max_frame_size:
                raise ProtocolError(
                    f"frame of {len(data)} bytes to {self._where} exceeds the limit of {self._decoder.max_frame_size}"
                )
        await self._write(b"".join(encode_frame(Kind.DATA, data) for data in payloads))

    async def send_end(self) -> None:
        """Say we will send nothing more; the peer may still answer."""
        if self._local_ended:
            return
        self._local_ended = True
        await self._write(encode_frame(Kind.END))

    async def send_error(self, reason: str) -> None:
        self._local_ended = True
        await self._write(encode_error(reason))

    async def receive(self) -> bytes | None:
        """Next DATA payload, or None once the peer sent END.

        Raises :class:`RemoteError` if the peer sent an ERROR frame,
        :class:`ProtocolError` on bad framing, :class:`PeerUnreachable` if the
        stream ends without END (reset, crash, disconnect).
        """
        if self._remote_ended:
            return None
        await self.wait_frame()
        frame = self._frames.pop(0)
        if frame.kind is Kind.DATA:
            return frame.payload
        self._remote_ended = True
        if frame.kind is Kind.END:
            if self._frames:
                raise ProtocolError(f"frames after END from {self._where}")
            return None
        reason = frame.payload.decode("utf-8", "replace")
        if reason.startswith(BUSY_PREFIX):
            raise PeerBusy(f"{self._where} refused the stream: {reason}")
        raise RemoteError(f"{self._where} failed: {reason}")

    async def wait_frame(self) -> None:
        """Read until at least one whole frame is buffered (``receive`` then returns without reading).

        Raises what :meth:`receive` raises for a dead stream or bad framing.
        """
        while not self._frames:
            try:
                chunk = await self._stream.read(READ_CHUNK)
            except NetError:
                raise
            except Exception as exc:  # libp2p raises many unrelated types on a dead stream
                raise PeerUnreachable(f"stream to {self._where} lost before END: {exc!r}") from exc
            if not chunk:
                raise PeerUnreachable(f"stream to {self._where} closed before END")
            self._frames.extend(self._decoder.feed(chunk))

    async def receive_exactly_one(self) -> bytes:
        """One DATA frame followed by END (the unary pattern)."""
        data = await self.receive()
        if data is None:
            raise ProtocolError(f"{self._where} sent END without a message")
        if await self.receive() is not None:
            raise ProtocolError(f"{self._where} sent more than one message")
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (data := await self.receive()) is not None:
            yield data

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except Exception as exc:
            raise PeerUnreachable(f"cannot write to {self._where}: {exc!r}") from exc

    async def close(self) -> None:
        """Graceful close; never raises, never blocks for long."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_SECONDS) as scope:
            try:
                await self._stream.close()
            except Exception as exc:
                log(logger, logging.DEBUG, "stream_close_failed", where=self._where, error=repr(exc))
        self._release_slot(scope.cancelled_caught, "close")

    async def reset(self) -> None:
        """Abort the stream (the peer sees a reset); never raises."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_SECONDS) as scope:
            try:
                await self._stream.reset()
            except Exception as exc:
                log(logger, logging.DEBUG, "stream_reset_failed", where=self._where, error=repr(exc))
        self._release_slot(scope.cancelled_caught, "reset")

    def _release_slot(self, cut_short: bool, what: str) -> None:
        """A close or reset cut short must not keep the connection's stream slot (see net/muxer.py)."""
        if release_stream_slot(self._stream) or cut_short:
            log(logger, logging.INFO, "stream_cleanup_cut_short", where=self._where, step=what,
                seconds=CLEANUP_SECONDS)


class RequestResponse:
    """Registers framed protocol handlers on a host, admits inbound streams, and makes requests.

    ``penalize(peer, where, reason, detail)`` is the shell's one scoring path
    (:meth:`Network.penalize`); ``is_banned(peer)`` answers from the same
    scores; ``on_banned_stream(peer)`` is told when a banned peer still
    opened a stream, so the shell can disconnect it again.
    """

    def __init__(
        self,
        host: IHost,
        metrics: NetMetrics,
        *,
        max_frame_size: int,
        request_timeout: float,
        limits: StreamLimits | None = None,
        penalize: Callable[[str, str, str, str], None] | None = None,
        is_banned: Callable[[str], bool] | None = None,
        on_banned_stream: Callable[[str], None] | None = None,
    ) -> None:
        self._host = host
        self._metrics = metrics
        self._penalize = penalize
        self._is_banned = is_banned or (lambda peer: False)
        self._on_banned_stream = on_banned_stream
        self.max_frame_size = max_frame_size
        self.request_timeout = request_timeout
        self.limits = limits or StreamLimits()
        self.quota = InboundQuota(self.limits)
        self._serving: dict[str, set[trio.CancelScope]] = {}
        """Cancel scopes of the handlers serving each peer, so a ban ends them at once."""
        self._outbound = _PeerSlots(self.limits.outbound_per_peer)

    # -- server side ---------------------------------------------------------

    def set_handler(
        self,
        protocol: str,
        handler: UnaryHandler,
        *,
        penalize_bad_requests: bool = False,
        max_streams: int | None = None,
    ) -> None:
        """Serve ``protocol`` with a unary handler ``(ctx, request) -> response``.

        The whole request (DATA and END) must arrive within the idle timeout
        (else the stream is reset as ``idle`` and its peer charged); the whole
        exchange is bounded by ``request_timeout``; a handler that raises
        sends the client an ERROR frame naming only the exception type.
        ``penalize_bad_requests``, ``max_streams``: see :meth:`set_stream_handler`.
        """

        async def serve(stream: FramedStream) -> None:
            with trio.fail_after(self.request_timeout):
                with trio.move_on_after(self.limits.idle_timeout) as waited:
                    request = await stream.receive_exactly_one()
                if waited.cancelled_caught:
                    raise StreamIdle(f"peer {stream.peer} sent no whole {protocol} request "
                                     f"within {self.limits.idle_timeout} s")
                response = await handler(stream.context, request)
                await stream.send(response)
                await stream.send_end()

        self.set_stream_handler(protocol, serve, penalize_bad_requests=penalize_bad_requests, max_streams=max_streams)

    def set_stream_handler(
        self,
        protocol: str,
        handler: StreamHandler,
        *,
        penalize_bad_requests: bool = False,
        max_streams: int | None = None,
    ) -> None:
        """Serve ``protocol`` with a handler that owns the :class:`FramedStream`.

        The handler runs once the stream is admitted (:class:`InboundQuota`)
        and its first frame has arrived; a stream silent for ``idle_timeout``
        never reaches it (reset, counted ``idle``, peer charged).
        ``max_streams`` is the protocol's budget over all peers (default
        ``limits.per_protocol``).

        With ``penalize_bad_requests``, a request that breaks the protocol (any
        :class:`ProtocolError`: bad framing, an oversized frame, a payload the
        handler cannot decode) also costs its sender score, like a rejected
        gossip message. Off by default: a protocol whose handler raises
        ProtocolError for refusals that are no offence (or scores peers
        itself) must not be charged twice. A client that hangs up, or stalls
        after its first frame, is counted but not charged: that is what a
        slow or crashed honest peer does too. A stream that never says
        anything is different: an honest peer writes its request as soon as
        the stream is open, so silence only holds a slot.
        """
        self.quota.set_budget(protocol, max_streams)

        async def on_stream(raw: INetStream) -> None:
            peer = raw.muxed_conn.peer_id.to_base58()
            stream = FramedStream(raw, peer, protocol, self.max_frame_size)
            decision = self.quota.admit(peer, protocol, trio.current_time(), banned=self._is_banned(peer))
            if isinstance(decision, Refused):
                await self._refuse(stream, decision)
                return
            await self._serve_admitted(stream, decision, handler, penalize_bad_requests)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve_admitted(
        self, stream: FramedStream, admitted: Admitted, handler: StreamHandler, penalize_bad_requests: bool
    ) -> None:
        """Run the handler in a scope a ban can cancel; the slot comes back as soon as the handler is done.

        The slot is released *before* the stream's cleanup (close or reset,
        up to :data:`CLEANUP_SECONDS` on a loaded connection): the peer
        already counts the exchange as over once it has our END, and a slot
        still held here would make its next stream look like one over quota.
        """
        slot = admitted.slot
        peer, protocol = slot.peer, slot.protocol
        self._metrics.inbound_active[protocol] = self.quota.of_protocol(protocol)
        scope = trio.CancelScope()
        self._serving.setdefault(peer, set()).add(scope)
        try:
            with scope:
                cleanup = await self._serve(stream, handler, penalize_bad_requests)
        finally:
            self._release(slot, scope)
        if scope.cancelled_caught:  # banned meanwhile (drop_peer)
            self._metrics.inbound_refused[(protocol, Refusal.BANNED.value)] += 1
            cleanup = stream.reset
        await cleanup()

    def _release(self, slot: Slot, scope: trio.CancelScope) -> None:
        self.quota.release(slot)
        self._metrics.inbound_active[slot.protocol] = self.quota.of_protocol(slot.protocol)
        scopes = self._serving.get(slot.peer)
        if scopes is not None:
            scopes.discard(scope)
            if not scopes:
                del self._serving[slot.peer]

    async def _refuse(self, stream: FramedStream, refused: Refused) -> None:
        protocol, peer = stream.protocol, stream.peer
        reason = refused.reason.value
        self._metrics.inbound_refused[(protocol, reason)] += 1
        log(logger, logging.WARNING if refused.charge else logging.INFO, "inbound_stream_refused",
            protocol=protocol, peer=peer, reason=reason, detail=refused.detail)
        if refused.reason is Refusal.BANNED:
            if self._on_banned_stream is not None:
                self._on_banned_stream(peer)
            await stream.reset()  # a banned peer learns nothing
            return
        if refused.charge and self._penalize is not None:
            self._penalize(peer, protocol, reason, refused.detail)
        await self._try_send_error(stream, f"{BUSY_PREFIX}{reason}")
        await stream.reset()

    def drop_peer(self, peer: str) -> int:
        """End every handler serving ``peer`` now (it was just banned); returns how many."""
        scopes = self._serving.get(peer, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def _serve(
        self, stream: FramedStream, handler: StreamHandler, penalize_bad_requests: bool
    ) -> Callable[[], Awaitable[None]]:
        """Run one exchange; returns the cleanup to do once the slot is given back (close or reset)."""
        protocol, peer = stream.protocol, stream.peer
        try:
            with trio.move_on_after(self.limits.idle_timeout) as waited:
                await stream.wait_frame()
            if waited.cancelled_caught:
                raise StreamIdle(f"peer {peer} sent nothing on {protocol} within {self.limits.idle_timeout} s")
            await handler(stream)
        except StreamIdle as exc:
            self._count_failure(protocol, peer, IDLE, exc)
            self._metrics.inbound_refused[(protocol, IDLE)] += 1
            if self._penalize is not None:
                self._penalize(peer, protocol, IDLE, str(exc))
            return stream.reset
        except PeerUnreachable as exc:
            self._count_failure(protocol, peer, "PeerUnreachable", exc)
            return stream.reset
        except ProtocolError as exc:
            # The client sent something we cannot accept: tell it why.
            kind = type(exc).__name__
            self._count_failure(protocol, peer, kind, exc)
            if penalize_bad_requests and self._penalize is not None:
                self._penalize(peer, protocol, kind, str(exc))
            await self._try_send_error(stream, f"bad request: {exc}")
            return stream.close
        except trio.TooSlowError as exc:
            self._count_failure(protocol, peer, "timeout", exc)
            await self._try_send_error(stream, "timeout")
            return stream.reset
        except Exception as exc:
            kind = type(exc).__name__
            self._metrics.request_errors[(protocol, "handler_error")] += 1
            logger.exception("%s", f"event=handler_crashed protocol={protocol} peer={peer} error={kind}")
            await self._try_send_error(stream, f"handler error: {kind}")
            return stream.close
        self._metrics.requests_served[protocol] += 1
        return stream.close

    def _count_failure(self, protocol: str, peer: str, kind: str, exc: BaseException) -> None:
        self._metrics.request_errors[(protocol, kind)] += 1
        log(logger, logging.INFO, "inbound_stream_failed", protocol=protocol, peer=peer, error=kind, detail=str(exc))

    @staticmethod
    async def _try_send_error(stream: FramedStream, reason: str) -> None:
        with trio.move_on_after(CLEANUP_SECONDS):
            try:
                await stream.send_error(reason)
            except NetError:
                pass  # the stream is already gone; the reset/close that follows is enough

    # -- client side ---------------------------------------------------------

    @asynccontextmanager
    async def open_stream(self, peer: str, protocol: str) -> AsyncIterator[FramedStream]:
        """A :class:`FramedStream` to ``peer``; reset on error, closed otherwise.

        The caller bounds the exchange (``trio.fail_after``); opening itself
        is bounded by ``request_timeout``.
        """
        try:
            peer_id = ID.from_base58(peer)
        except Exception as exc:
            raise PeerUnreachable(f"invalid peer id {peer!r} for {protocol}: {exc}") from exc
        # The swarm refuses for a minute any peer whose addresses all failed once (its "negative cache"). Our
        # callers retry on their own schedule (a provider fetching inputs until its deadline, a client probing
        # its provider), so a peer that was briefly down must be dialled again when they ask, not a minute later.
        network = self._host.get_network()
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None and not network.get_connections(peer_id):
            unblock(peer_id)
        async with self._outbound.hold(peer, self.request_timeout, protocol):
            with trio.move_on_after(self.request_timeout) as scope:
                try:
                    raw = await self._host.new_stream(peer_id, [TProtocol(protocol)])
                except Exception as exc:
                    raise PeerUnreachable(f"cannot open {protocol} stream to peer {peer}: {exc!r}") from exc
            if scope.cancelled_caught:
                raise PeerUnreachable(f"timed out opening {protocol} stream to peer {peer}")
            stream = FramedStream(raw, peer, protocol, self.max_frame_size)
            try:
                yield stream
            except BaseException:
                await stream.reset()
                raise
            else:
                await stream.close()

    def outbound_open(self, peer: str) -> int:
        """Streams we hold open (or are opening) to ``peer`` right now."""
        return self._outbound.held(peer)

    async def request(self, peer: str, protocol: str, data: bytes, *, timeout: float | None = None) -> bytes:
        """One request, one response, within ``timeout`` (default ``request_timeout``)."""
        limit = self.request_timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            try:
                async with self.open_stream(peer, protocol) as stream:
                    await stream.send(data)
                    await stream.send_end()
                    return await stream.receive_exactly_one()
            except NetError as exc:
                self._metrics.request_errors[(protocol, type(exc).__name__)] += 1
                raise
        # Only a timeout leaves the block without returning or raising.
        self._metrics.request_errors[(protocol, "timeout")] += 1
        raise RequestTimeout(f"peer {peer} did not answer {protocol} within {limit} s")


class _PeerSlots:
    """At most ``limit`` outbound streams per peer; more wait (bounded) for one to close.

    Entries exist only while a peer has streams held or waiting, so the map
    never grows with every peer ever contacted.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, trio.Semaphore] = {}
        self._users: dict[str, int] = {}

    def held(self, peer: str) -> int:
        sem = self._slots.get(peer)
        return 0 if sem is None else self.limit - sem.value

    @asynccontextmanager
    async def hold(self, peer: str, timeout: float, protocol: str) -> AsyncIterator[None]:
        sem = self._slots.setdefault(peer, trio.Semaphore(self.limit))
        self._users[peer] = self._users.get(peer, 0) + 1
        try:
            with trio.move_on_after(timeout) as waited:
                await sem.acquire()
            if waited.cancelled_caught:
                raise PeerBusy(f"all {self.limit} of our stream slots to peer {peer} stayed taken for {timeout} s "
                               f"(opening {protocol})")
            try:
                yield
            finally:
                sem.release()
        finally:
            left = self._users[peer] - 1
            if left:
                self._users[peer] = left
            else:
                del self._users[peer]
                del self._slots[peer]
