"""The node's network shell: one libp2p host, gossip, request/response, discovery.

``open_network(config, seed)`` starts everything inside an async context and
tears it all down on exit (tasks cancelled, listeners closed, ports freed).

Transport choices are explicit rather than inherited from ``new_host``'s
defaults, which in py-libp2p 0.8.1 offer Noise, TLS, SECIO *and plaintext*
security and Yamux plus Mplex: we offer exactly TCP + Noise + Yamux, so a
peer cannot negotiate us down to an insecure or legacy stack.

Identity: the 32-byte Ed25519 seed of the node's account key is also its
libp2p identity, so the peer id a message arrives from is bound to the same
key that signs ledger transactions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service

from ledger.codec import DecodeError, MapOf, Record, Scalar, decode, encode, record

from .config import NetConfig
from .discovery import Discovery
from .errors import ConfigError, ListenFailed, PeerUnreachable, ProtocolError
from .listener import ListenFailures, install as install_exclusive_listener
from .gossip import GossipMessage, GossipRouter
from .log import log
from .metrics import NetMetrics
from .muxer import ReadLoopSafeYamux, install as install_muxer
from .libp2p_costs import install as install_message_cost_cuts
from .reqresp import FramedStream, RequestContext, RequestResponse, StreamHandler, UnaryHandler
from .scoring import PeerScores, ScoreSummary
from .verdict import R, Verdict

logger = logging.getLogger(__name__)

STATUS_PROTOCOL = "/p2pgpu/status/1"
SEED_BYTES = 32
SMALL_PROTOCOL_STREAMS = 16
"""Inbound stream budget of the status and peer-exchange protocols (one short exchange per peer now and then)."""

StatusValue = int | float | bool | str
StatusProvider = Callable[[], Mapping[str, StatusValue]]


@record
class StatusReply(Record):
    MAX_BYTES = 32 << 10
    fields: Annotated[tuple[tuple[str, StatusValue], ...], MapOf(Scalar(), max_items=64)]


def key_pair_from_seed(seed: bytes) -> KeyPair:
    """The libp2p Ed25519 key pair whose private key is ``seed``."""
    if type(seed) is not bytes or len(seed) != SEED_BYTES:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise ConfigError(f"node seed must be exactly {SEED_BYTES} bytes, got {got}")
    return create_new_key_pair(seed)


def peer_id_from_seed(seed: bytes) -> str:
    """Base58 peer id of the node whose key seed is ``seed`` (no host needed)."""
    return ID.from_pubkey(key_pair_from_seed(seed).public_key).to_base58()


async def _no_auto_connect() -> None:
    await trio.lowlevel.checkpoint()


def _make_host(key_pair: KeyPair) -> tuple[IHost, ListenFailures]:
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): ReadLoopSafeYamux},
        enable_mDNS=False,
        enable_upnp=False,
    )
    # Stock Yamux can deadlock a connection under two-way bulk traffic
    # (its read loop waits on the writer): see net/muxer.py.
    install_muxer(host)
    # Listeners that own their port (no SO_REUSEPORT): a second node on our port fails (net/listener.py)
    failures = install_exclusive_listener(host)
    # Per-message work py-libp2p does for nothing (record checks, address recomputation, window updates):
    # net/libp2p_costs.py
    install_message_cost_cuts()
    # The swarm's AutoConnector dials every peerstore entry until ~150
    # connections (go-libp2p watermarks), banned peers included, whenever a
    # connection drops. The peer-count policy is ours (bootstrap + peer
    # exchange up to target_peers), so switch it off for this swarm only.
    auto_connector = getattr(host.get_network(), "auto_connector", None)
    if auto_connector is not None:
        auto_connector.maybe_connect = _no_auto_connect
    return host, failures


class _ConnectionWatch(INotifee):
    """Swarm notifee: keeps the peer gauge, wakes discovery, refuses banned peers."""

    def __init__(self, network: Network) -> None:
        self._network = network

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._network._on_connection(conn, opened=True)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._network._on_connection(conn, opened=False)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class Network:
    """What the node sees of the network. Built by :func:`open_network`."""

    def __init__(self, host: IHost, config: NetConfig, status: StatusProvider | None) -> None:
        self.config = config
        self.metrics = NetMetrics()
        self.scores = PeerScores(config.score)
        self._host = host
        self._status = status or (lambda: {})
        self._disconnect_send, self._disconnect_receive = trio.open_memory_channel[str](256)
        self.reqresp = RequestResponse(
            host,
            self.metrics,
            max_frame_size=config.max_frame_size,
            request_timeout=config.request_timeout,
            limits=config.streams,
            penalize=self.penalize,
            is_banned=self.is_banned,
            on_banned_stream=self._disconnect_soon,
        )
        self.gossip = GossipRouter(host, config.gossip, self.metrics, self.scores, self.penalize)
        self.discovery = Discovery(host, self.reqresp, config, self.scores, random.Random())
        # Tiny answers, but a flood of them must not take the room of data fetches and stream sessions.
        self.reqresp.set_handler(STATUS_PROTOCOL, self._serve_status, penalize_bad_requests=True,
                                 max_streams=SMALL_PROTOCOL_STREAMS)
        host.get_network().register_notifee(_ConnectionWatch(self))

    # -- identity and peers ----------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Listen multiaddrs including ``/p2p/<our id>``, ready to give to peers."""
        return [str(a) for a in self._host.get_addrs()]

    def connected_peers(self) -> set[str]:
        return self.discovery.connected()

    async def connect(self, addr: str) -> str:
        """Dial a ``/.../p2p/<id>`` multiaddr; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise PeerUnreachable(f"cannot dial {addr!r}: not a multiaddr with /p2p/<peer id>: {exc}") from exc
        peer = info.peer_id.to_base58()
        if self.scores.is_banned(peer, trio.current_time()):
            raise PeerUnreachable(f"peer {peer} is banned")
        await self.discovery.dial(info)
        return peer

    async def disconnect(self, peer: str) -> None:
        try:
            await self._host.disconnect(ID.from_base58(peer))
        except Exception as exc:
            log(logger, logging.DEBUG, "disconnect_failed", peer=peer, error=repr(exc))

    # -- gossip ----------------------------------------------------------------

    async def subscribe(
        self, topic: str, validator: Callable[[str, bytes], Verdict[R]], *, max_message_size: int | None = None
    ) -> trio.MemoryReceiveChannel[GossipMessage[R]]:
        """Join ``topic``: each delivered message carries the record its validator accepted it with."""
        return await self.gossip.subscribe(topic, validator, max_message_size=max_message_size)

    async def publish(self, topic: str, data: bytes) -> None:
        await self.gossip.publish(topic, data)

    def report_rejection(self, topic: str, peer: str, reason: str, detail: str = "") -> None:
        """A ``topic`` message from ``peer`` found invalid after delivery: counted, scored, banned as usual."""
        self.gossip.report_rejection(topic, peer, reason, detail)

    def penalize(self, peer: str, where: str, reason: str, detail: str = "") -> None:
        """Charge ``peer`` one offence (``reason``) on ``where`` (a topic or protocol id).

        The one path by which any bad input lowers a peer's score: past the
        threshold the peer is banned, which is counted, blacklisted in pubsub,
        forgotten by discovery and disconnected. Gossip validators, engine
        rejections (:meth:`report_rejection`), malformed requests and bad
        sync answers all come here; callers count their own reasons.
        """
        now = trio.current_time()
        self.metrics.charges[(where, reason)] += 1
        if self.scores.on_rejection(peer, now):
            self.metrics.bans += 1
            log(logger, logging.WARNING, "peer_banned", peer=peer, score=self.scores.score(peer, now), where=where,
                reason=reason, **({"detail": detail} if detail else {}))
            self._ban(peer)

    def refuse(self, peer: str, seconds: float, reason: str) -> None:
        """Keep ``peer`` out for ``seconds`` without a score (not an offence: e.g. a peer of another chain).

        The same machinery as a ban: blacklisted in pubsub, forgotten by
        discovery, disconnected now and on every reconnection, never dialled.
        """
        if self.scores.ban(peer, trio.current_time(), seconds):
            log(logger, logging.INFO, "peer_refused", peer=peer, reason=reason, seconds=seconds)
            self._ban(peer)

    # -- request/response ------------------------------------------------------

    def set_handler(self, protocol: str, handler: UnaryHandler, *, penalize_bad_requests: bool = False,
                    max_streams: int | None = None) -> None:
        """Serve ``protocol``; the options: see :meth:`RequestResponse.set_stream_handler`."""
        self.reqresp.set_handler(protocol, handler, penalize_bad_requests=penalize_bad_requests,
                                 max_streams=max_streams)

    def set_stream_handler(self, protocol: str, handler: StreamHandler, *, penalize_bad_requests: bool = False,
                           max_streams: int | None = None) -> None:
        self.reqresp.set_stream_handler(protocol, handler, penalize_bad_requests=penalize_bad_requests,
                                        max_streams=max_streams)

    async def request(self, peer: str, protocol: str, data: bytes, *, timeout: float | None = None) -> bytes:
        return await self.reqresp.request(peer, protocol, data, timeout=timeout)

    def open_stream(self, peer: str, protocol: str) -> Any:
        """``async with net.open_stream(peer, proto) as stream:`` -- a :class:`FramedStream`."""
        return self.reqresp.open_stream(peer, protocol)

    async def request_status(self, peer: str, *, timeout: float | None = None) -> dict[str, StatusValue]:
        raw = await self.request(peer, STATUS_PROTOCOL, b"", timeout=timeout)
        try:
            return dict(decode(StatusReply, raw).fields)
        except DecodeError as exc:
            raise ProtocolError(f"peer {peer} sent a bad {STATUS_PROTOCOL} reply: {exc}") from exc

    async def _serve_status(self, ctx: RequestContext, request: bytes) -> bytes:
        if request:
            raise ProtocolError(f"{STATUS_PROTOCOL} takes an empty request, got {len(request)} bytes")
        await trio.lowlevel.checkpoint()
        return encode(StatusReply(tuple(sorted(self._status().items()))))

    # -- bans and connection events -------------------------------------------

    def is_banned(self, peer: str) -> bool:
        return self.scores.is_banned(peer, trio.current_time())

    def score_summary(self) -> ScoreSummary:
        """Bans and scores as ``/metrics`` shows them: counts, and the lowest score among connected peers."""
        return self.scores.summary(trio.current_time(), self.connected_peers())

    def _ban(self, peer: str) -> None:
        """Called synchronously when a peer's score crosses the ban threshold.

        Besides the disconnect (asynchronous), the handlers still serving the
        peer end now: a ban must not wait for the socket to close before the
        peer stops being answered.
        """
        peer_id = ID.from_base58(peer)
        self.gossip.pubsub.add_to_blacklist(peer_id)
        self._host.get_peerstore().clear_addrs(peer_id)
        self.discovery.forget(peer)
        self.reqresp.drop_peer(peer)
        self._disconnect_soon(peer)

    def _disconnect_soon(self, peer: str) -> None:
        try:
            self._disconnect_send.send_nowait(peer)
        except trio.WouldBlock:
            pass  # the maintenance loop disconnects banned peers anyway

    def _on_connection(self, conn: INetConn, *, opened: bool) -> None:
        self.metrics.peers_connected = len(self._host.get_connected_peers())
        self.discovery.on_connection_change()
        if not opened:
            return
        peer_id = getattr(conn.muxed_conn, "peer_id", None)
        if peer_id is not None and self.is_banned(peer_id.to_base58()):
            self._disconnect_soon(peer_id.to_base58())

    async def _disconnect_worker(self) -> None:
        async for peer in self._disconnect_receive:
            log(logger, logging.INFO, "peer_disconnected", peer=peer, reason="banned")
            await self.disconnect(peer)

    async def _maintenance(self) -> None:
        """Lift expired bans and drop banned peers that got back in."""
        while True:
            await trio.sleep(self.config.discovery_interval)
            now = trio.current_time()
            for peer in self.scores.expire(now):
                self.gossip.pubsub.remove_from_blacklist(ID.from_base58(peer))
                log(logger, logging.INFO, "peer_unbanned", peer=peer)
            self.reqresp.quota.expire(now)
            for peer in self.connected_peers() & set(self.scores.banned(now)):
                await self.disconnect(peer)
            self.metrics.peers_connected = len(self._host.get_connected_peers())

    async def _run(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._disconnect_worker)
        nursery.start_soon(self._maintenance)
        nursery.start_soon(self.discovery.exchange_forever)
        for addr in self.config.bootstrap_peers:
            nursery.start_soon(self.discovery.keep_bootstrap, addr)


def _unbound(host: IHost, listen: list[multiaddr.Multiaddr], failures: ListenFailures) -> ListenFailed | None:
    """The first listen address that is not bound, as the error to raise (None: all are).

    py-libp2p only logs a listener that failed (at debug) and runs on without it: a node on a taken port
    would join the network unreachable. Every listen address must be bound, or nothing starts.
    """
    listening = host.get_network().listeners  # type: ignore[attr-defined]
    for addr in listen:
        if str(addr) not in listening:
            return ListenFailed(str(addr), failures.get(str(addr)))
    return None


@asynccontextmanager
async def open_network(
    config: NetConfig, seed: bytes, *, status: StatusProvider | None = None
) -> AsyncIterator[Network]:
    """Start the host and everything on it; stop all of it on exit."""
    key_pair = key_pair_from_seed(seed)
    host, listen_failures = _make_host(key_pair)
    network = Network(host, config, status)
    listen = [multiaddr.Multiaddr(a) for a in config.listen_addrs]
    async with host.run(listen_addrs=listen):
        failed = _unbound(host, listen, listen_failures)
        if failed is None:
            pubsub, router = network.gossip.pubsub, network.gossip.router
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                log(logger, logging.INFO, "network_started", peer=network.peer_id, addrs=",".join(network.addrs))
                try:
                    async with trio.open_nursery() as nursery:
                        await network._run(nursery)
                        try:
                            yield network
                        finally:
                            nursery.cancel_scope.cancel()
                finally:
                    await network.gossip.aclose()
        with trio.CancelScope(shield=True):
            await host.close()
    if failed is not None:  # raised here, not inside host.run: the caller gets it bare, not in libp2p's groups
        raise failed
    log(logger, logging.INFO, "network_stopped", peer=network.peer_id)


__all__ = [
    "Network",
    "FramedStream",
    "STATUS_PROTOCOL",
    "StatusReply",
    "key_pair_from_seed",
    "open_network",
    "peer_id_from_seed",
]
