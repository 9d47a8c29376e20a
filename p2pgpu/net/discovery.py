"""Bootstrap dialing and peer exchange (``/p2pgpu/peers/1``).

Why peer exchange rather than py-libp2p's Kademlia DHT: the node needs only
"find a few more peers of this devnet", and a tiny request/response that
returns the ids and listen addresses of a peer's connections does that in
one round trip, with our framing, limits and errors. The DHT would add a
routing table, periodic refreshes and record validation to maintain for no
gain at this network size.

The requester sends its own listen addresses with the request. The
responder remembers them, so it can tell others how to reach a peer that
connected *to* it (whose remote address is an ephemeral port), without
waiting for libp2p's identify exchange.

The pure part (:func:`choose_dials`, :func:`build_reply`) decides; the
:class:`Discovery` shell dials and asks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from ledger.codec import DecodeError, ListOf, Nested, Record, Text, U8, decode, encode, record

from .config import NetConfig
from .errors import NetError, PeerUnreachable, ProtocolError
from .log import log
from .reqresp import RequestContext, RequestResponse
from .scoring import PeerScores

logger = logging.getLogger(__name__)

PEERS_PROTOCOL = "/p2pgpu/peers/1"
PEERS_STREAMS = 16
"""Inbound stream budget of peer exchange (rounds are seconds apart per peer; a flood must not crowd out data)."""
MAX_ADDRS = 8
MAX_PEERS = 64


@record
class PeerEntry(Record):
    peer_id: Annotated[str, Text(128, min_len=1)]
    addrs: Annotated[tuple[str, ...], ListOf(Text(256, min_len=1), max_items=MAX_ADDRS)]


@record
class PeersRequest(Record):
    MAX_BYTES = 8192
    listen_addrs: Annotated[tuple[str, ...], ListOf(Text(256, min_len=1), max_items=MAX_ADDRS)]
    limit: U8


@record
class PeersReply(Record):
    MAX_BYTES = 256 << 10
    peers: Annotated[tuple[PeerEntry, ...], ListOf(Nested(PeerEntry), max_items=MAX_PEERS)]


# -- pure decisions ------------------------------------------------------------


def dialable_addrs(addrs: Iterable[str]) -> tuple[str, ...]:
    """TCP addresses without a ``/p2p`` suffix, deduplicated, order kept, at most MAX_ADDRS."""
    out: list[str] = []
    for text in addrs:
        try:
            addr = multiaddr.Multiaddr(text)
        except Exception:
            continue
        names = [p.name for p in addr.protocols()]
        if "tcp" not in names:
            continue
        if "p2p" in names:
            addr = addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{addr.get_peer_id()}"))
        plain = str(addr)
        if plain not in out:
            out.append(plain)
    return tuple(out[:MAX_ADDRS])


def build_reply(
    connected: Iterable[str],
    addrs_of: Callable[[str], Sequence[str]],
    requester: str,
    limit: int,
    rng: random.Random,
) -> PeersReply:
    """Up to ``limit`` connected peers with known addresses, the requester excluded."""
    entries = []
    for peer in connected:
        if peer == requester:
            continue
        addrs = dialable_addrs(addrs_of(peer))
        if addrs:
            entries.append(PeerEntry(peer, addrs))
    rng.shuffle(entries)
    return PeersReply(tuple(entries[: min(limit, MAX_PEERS)]))


def choose_dials(
    offered: Iterable[PeerEntry],
    *,
    self_id: str,
    connected: set[str],
    excluded: set[str],
    want: int,
) -> list[PeerEntry]:
    """New peers worth dialing: not us, not connected, not banned or cooling down."""
    chosen: dict[str, PeerEntry] = {}
    for entry in offered:
        if want <= len(chosen):
            break
        peer = entry.peer_id
        if peer == self_id or peer in connected or peer in excluded or peer in chosen:
            continue
        chosen[peer] = entry
    return list(chosen.values())


def next_exchange_wait(wait: float, *, dialed: int, lost_peer: bool, base: float, ceiling: float) -> float:
    """How long the exchange loop idles before its next round (a change of connections may end it sooner).

    A round that found someone to dial, or a peer lost since the last round,
    brings the wait back to ``base``: there may be more to find or a gap to
    fill. A round that dialed nobody doubles it, up to ``ceiling``: the peers
    we have know no one else, which is the steady state of a network smaller
    than ``target_peers``. Without this every node of such a network opened
    three ``/p2pgpu/peers/1`` streams every ``base`` seconds for ever.
    """
    if dialed > 0 or lost_peer:
        return base
    return min(max(wait, base) * 2, max(ceiling, base))


# -- shell ---------------------------------------------------------------------


class Discovery:
    """Keeps bootstrap peers connected and tops the peer count up via exchange."""

    def __init__(
        self,
        host: IHost,
        reqresp: RequestResponse,
        config: NetConfig,
        scores: PeerScores,
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self._reqresp = reqresp
        self._config = config
        self._scores = scores
        self._rng = rng or random.Random()
        self._self_id = host.get_id().to_base58()
        self._advertised: dict[str, tuple[str, ...]] = {}
        self._cooldown: dict[str, float] = {}
        self._changed = trio.Event()
        reqresp.set_handler(PEERS_PROTOCOL, self._serve_peers, max_streams=PEERS_STREAMS)

    # state shared with the notifee ------------------------------------------

    def on_connection_change(self) -> None:
        """Wake the loops: a connection opened or closed."""
        self._changed.set()
        self._changed = trio.Event()

    def connected(self) -> set[str]:
        return {p.to_base58() for p in self._host.get_connected_peers()}

    def _listen_addrs(self) -> tuple[str, ...]:
        return dialable_addrs(str(a) for a in self._host.get_addrs())

    def _addrs_of(self, peer: str) -> tuple[str, ...]:
        known = list(self._advertised.get(peer, ()))
        try:
            known.extend(str(a) for a in self._host.get_peerstore().addrs(ID.from_base58(peer)))
        except Exception:
            pass  # no stored addresses (PeerStoreError) is normal for new peers
        return dialable_addrs(known)

    # dialing -----------------------------------------------------------------

    async def dial(self, info: PeerInfo) -> None:
        """Connect within ``dial_timeout``; any failure becomes PeerUnreachable."""
        peer = info.peer_id.to_base58()
        # The swarm refuses for 60 s any peer whose addresses all failed once
        # (its "negative cache"); our callers keep their own backoff, so a
        # deliberate dial clears that entry first.
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(info.peer_id)
        with trio.move_on_after(self._config.dial_timeout) as scope:
            try:
                await self._host.connect(info)
            except Exception as exc:
                raise PeerUnreachable(f"cannot dial peer {peer} at {[str(a) for a in info.addrs]}: {exc!r}") from exc
        if scope.cancelled_caught:
            raise PeerUnreachable(f"dialing peer {peer} timed out after {self._config.dial_timeout} s")

    async def keep_bootstrap(self, addr: str) -> None:
        """Dial one bootstrap peer with capped exponential backoff, forever.

        A bootstrap peer that is down never stops the node: we log and retry,
        and redial after it disconnects.
        """
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        peer = info.peer_id.to_base58()
        backoff = self._config.bootstrap_backoff_initial
        attempt = 0
        while True:
            now = trio.current_time()
            if peer in self.connected() or self._scores.is_banned(peer, now):
                backoff, attempt = self._config.bootstrap_backoff_initial, 0
                with trio.move_on_after(self._config.discovery_interval):
                    await self._changed.wait()
                continue
            attempt += 1
            try:
                await self.dial(info)
            except PeerUnreachable as exc:
                level = logging.WARNING if attempt == 1 else logging.INFO
                log(logger, level, "bootstrap_dial_failed", peer=peer, addr=addr, attempt=attempt,
                    retry_in=round(backoff, 3), error=str(exc))
                await trio.sleep(backoff * (0.75 + 0.5 * self._rng.random()))
                backoff = min(backoff * 2, self._config.bootstrap_backoff_max)
            else:
                log(logger, logging.INFO, "bootstrap_connected", peer=peer, addr=addr, attempts=attempt)

    async def exchange_forever(self) -> None:
        """Ask connected peers for theirs while below ``target_peers``.

        Rounds are at least ``discovery_interval`` apart, even when
        connections change faster than that: each new connection wakes this
        loop on both of its ends, and at start-up (every node dialing every
        other) back-to-back rounds turned each connection into three more
        streams per node, a storm that starved an overloaded host of the CPU
        its stream negotiations needed. Fruitless rounds back off (see
        :func:`next_exchange_wait`), up to ``discovery_interval_max``.
        """
        base = self._config.discovery_interval
        wait = base
        previous: set[str] = set()
        last_round = -float("inf")
        while True:
            with trio.move_on_after(wait):
                await self._changed.wait()
            await trio.sleep_until(last_round + base)
            last_round = trio.current_time()
            now = self.connected()
            lost = bool(previous - now)
            dialed = await self.exchange_once()
            previous = self.connected()
            wait = next_exchange_wait(wait, dialed=dialed, lost_peer=lost, base=base,
                                      ceiling=self._config.discovery_interval_max)

    async def exchange_once(self) -> int:
        """One round of peer exchange; returns how many new peers were dialed."""
        connected = self.connected()
        want = self._config.target_peers - len(connected)
        if want <= 0 or not connected:
            return 0
        now = trio.current_time()
        self._cooldown = {p: t for p, t in self._cooldown.items() if t > now}
        excluded = set(self._cooldown) | set(self._scores.banned(now))
        offered: list[PeerEntry] = []
        for peer in self._rng.sample(sorted(connected), k=min(3, len(connected))):
            try:
                reply = await self.ask(peer)
            except NetError as exc:
                log(logger, logging.DEBUG, "px_failed", peer=peer, error=str(exc))
                continue
            offered.extend(reply.peers)
        dials = choose_dials(offered, self_id=self._self_id, connected=self.connected(), excluded=excluded, want=want)
        async with trio.open_nursery() as nursery:
            for entry in dials:
                nursery.start_soon(self._dial_entry, entry)
        return len(dials)

    async def _dial_entry(self, entry: PeerEntry) -> None:
        info = PeerInfo(ID.from_base58(entry.peer_id), [multiaddr.Multiaddr(a) for a in entry.addrs])
        try:
            await self.dial(info)
        except PeerUnreachable as exc:
            self._cooldown[entry.peer_id] = trio.current_time() + self._config.bootstrap_backoff_max
            log(logger, logging.INFO, "px_dial_failed", peer=entry.peer_id, error=str(exc))
        else:
            log(logger, logging.INFO, "px_connected", peer=entry.peer_id)

    async def ask(self, peer: str) -> PeersReply:
        request = PeersRequest(self._listen_addrs(), min(self._config.px_max_peers, 255))
        raw = await self._reqresp.request(peer, PEERS_PROTOCOL, encode(request))
        try:
            return decode(PeersReply, raw)
        except DecodeError as exc:
            raise ProtocolError(f"peer {peer} sent a bad {PEERS_PROTOCOL} reply: {exc}") from exc

    async def _serve_peers(self, ctx: RequestContext, raw: bytes) -> bytes:
        try:
            request = decode(PeersRequest, raw)
        except DecodeError as exc:
            raise ProtocolError(f"peer {ctx.peer} sent a bad {PEERS_PROTOCOL} request: {exc}") from exc
        advertised = dialable_addrs(request.listen_addrs)
        if advertised:
            self._advertised[ctx.peer] = advertised
        limit = min(request.limit, self._config.px_max_peers)
        reply = build_reply(self.connected(), self._addrs_of, ctx.peer, limit, self._rng)
        await trio.lowlevel.checkpoint()
        return encode(reply)

    def forget(self, peer: str) -> None:
        self._advertised.pop(peer, None)
