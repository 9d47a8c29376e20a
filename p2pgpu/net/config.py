"""Configuration of the network layer: frozen dataclasses, checked on creation.

Defaults are tuned for p2pgpu's traffic on py-libp2p 0.8.1, whose own
defaults lose messages (DESIGN section 4): a 120 s heartbeat, 10 messages
per second per peer and topic, 32-slot outbound queues per peer, and a
32-slot subscription channel that drops when its reader lags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import multiaddr

from .errors import ConfigError
from .quota import StreamLimits
from .scoring import ScoreConfig

MAX_GOSSIP_MESSAGE = (1 << 20) - (16 << 10)
"""Largest gossip payload: libp2p's 1 MiB RPC cap minus room for the envelope
(signature, key, topic, sender record)."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    degree: int = 4
    """Mesh peers per topic. Lower than libp2p's 6 (low 4, high 12): every mesh peer forwards each message
    once, so a node receives about ``degree`` copies and drops all but one after decrypting and decoding
    them; small messages get no IDONTWANT. On the 8-node devnet at 6/4/12 (every peer in every mesh) a
    validator received ~4 duplicates per message and the market carried 4.9 tasks/s; at 4/3/6, 7.6."""
    degree_low: int = 3
    degree_high: int = 6
    fanout_degree: int = 2
    """Peers a message goes to on a topic this node publishes to but does not follow (a client's or provider's
    ``/tx``): its fanout. Each of them relays it through the topic's mesh, so every follower receives about
    ``fanout_degree`` copies; libp2p uses ``degree`` (4), and each of the four validators received every
    transaction four times. Two keep a message alive past one unresponsive fanout peer (and the sender resends
    its pending transactions, :class:`p2pgpu.txgossip.OwnTxWatch`)."""
    heartbeat_interval: float = 1.0
    """Seconds between mesh maintenance rounds (libp2p default 120 s)."""
    heartbeat_initial_delay: float = 0.1
    max_messages_per_topic_per_second: float = 5000.0
    """Per peer and topic spam limit (libp2p default 10, which drops bursts). It counts duplicates too, and what it
    drops is charged to nobody; ``peer_rate`` is ours, and charges."""
    peer_rate: float = 5000.0
    """Messages per second one peer may have accepted by our validators on one topic, on average beyond
    ``peer_burst``; over it, its messages are dropped and the peer charged (at most once a second). Generous: a
    relay forwards every message of every client and validator on the topic (libp2p validates only the first
    copy of a message, so no peer is counted for a message another peer brought first). The chain includes at
    most ~2,000 transactions a second (1,000 a block, two blocks a second), which a relay may forward all of;
    the market carried ~8 tasks/s (~25 transactions/s) on the 8-node devnet."""
    peer_burst: int = 50_000
    """Messages one peer may have accepted on one topic at once after a quiet spell (see ``peer_rate``)."""
    seen_ttl: int = 120
    """Seconds a message id stays in the duplicate filter."""
    outbound_queue_size: int = 2048
    """RPCs queued per peer before libp2p drops them (libp2p default 32)."""
    publish_high_water: int = 1024
    """Publishing waits while any peer's outbound queue holds this many RPCs."""
    publish_max_wait: float = 0.5
    """Longest a publish waits for a full peer queue to drain before going ahead (that peer then drops)."""
    coalesce_bytes: int = 64 << 10
    """RPCs queued for one peer are written as one while the merged RPC stays within this many bytes.

    Bounded well below libp2p's 1 MiB RPC limit, so one merged write never
    holds a peer's link for long; a larger message is sent on its own."""
    delivery_queue_size: int = 4096
    """Validated messages buffered per topic for the application."""
    max_message_size: int = 512 << 10
    """Default per-topic message size limit, checked before the validator.

    At most :data:`MAX_GOSSIP_MESSAGE`: libp2p refuses pubsub RPCs over 1 MiB
    (and silently drops oversized outbound ones), so bigger objects (blocks
    with many transactions, tensors) travel over request/response instead.
    """

    def __post_init__(self) -> None:
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ConfigError(
                f"gossip degrees must satisfy 0 < low <= degree <= high, got "
                f"{self.degree_low}, {self.degree}, {self.degree_high}"
            )
        if not 0 < self.fanout_degree <= self.degree_high:
            raise ConfigError(f"gossip fanout_degree must be in 1..degree_high ({self.degree_high}), "
                              f"got {self.fanout_degree}")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if not 0 < self.publish_high_water <= self.outbound_queue_size:
            raise ConfigError(
                f"publish_high_water must be in 1..outbound_queue_size ({self.outbound_queue_size}), "
                f"got {self.publish_high_water}"
            )
        for name in ("outbound_queue_size", "delivery_queue_size", "max_message_size", "seen_ttl", "coalesce_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.coalesce_bytes > MAX_GOSSIP_MESSAGE:
            raise ConfigError(f"coalesce_bytes {self.coalesce_bytes} exceeds {MAX_GOSSIP_MESSAGE} "
                              "(libp2p's 1 MiB RPC limit minus envelope room)")
        if self.max_message_size > MAX_GOSSIP_MESSAGE:
            raise ConfigError(
                f"max_message_size {self.max_message_size} exceeds {MAX_GOSSIP_MESSAGE} "
                "(libp2p's 1 MiB RPC limit minus envelope room)"
            )
        if self.max_messages_per_topic_per_second <= 0:
            raise ConfigError("max_messages_per_topic_per_second must be > 0")
        if not self.peer_rate > 0:
            raise ConfigError(f"peer_rate must be > 0 messages per second, got {self.peer_rate}")
        if self.peer_burst < 1:
            raise ConfigError(f"peer_burst must be >= 1, got {self.peer_burst}")


@dataclass(frozen=True, slots=True)
class NetConfig:
    listen_addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap_peers: tuple[str, ...] = ()
    """Multiaddrs ending in ``/p2p/<peer id>``."""
    target_peers: int = 8
    """Peer exchange dials new peers until this many are connected."""
    discovery_interval: float = 2.0
    discovery_interval_max: float = 60.0
    """Peer exchange rounds that find nobody new back off, doubling from ``discovery_interval`` up to this,
    until the set of connections changes (a small network stays below target_peers for good)."""
    px_max_peers: int = 16
    """Most peers returned in one peer-exchange answer."""
    dial_timeout: float = 5.0
    bootstrap_backoff_initial: float = 0.25
    bootstrap_backoff_max: float = 10.0
    request_timeout: float = 10.0
    max_frame_size: int = 4 << 20
    streams: StreamLimits = field(default_factory=StreamLimits)
    """Inbound stream quotas (per peer, per protocol, node-wide), the idle timeout, and our outbound limit per
    peer. One node-wide limit of 64 let a single peer holding idle streams starve everyone's fetches."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        if not self.listen_addrs:
            raise ConfigError("listen_addrs is empty: the node must listen somewhere")
        for addr in self.listen_addrs:
            parsed = _parse(addr, "listen address")
            if "tcp" not in [p.name for p in parsed.protocols()]:
                raise ConfigError(f"listen address {addr!r} is not a TCP address")
        for addr in self.bootstrap_peers:
            parsed = _parse(addr, "bootstrap peer")
            if parsed.get_peer_id() is None:
                raise ConfigError(f"bootstrap peer {addr!r} has no /p2p/<peer id> part")
        for name in ("discovery_interval", "dial_timeout", "bootstrap_backoff_initial", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.discovery_interval_max < self.discovery_interval:
            raise ConfigError("discovery_interval_max must be >= discovery_interval")
        if self.bootstrap_backoff_max < self.bootstrap_backoff_initial:
            raise ConfigError("bootstrap_backoff_max must be >= bootstrap_backoff_initial")
        for name in ("target_peers", "px_max_peers", "max_frame_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def _parse(addr: str, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ConfigError(f"{what} {addr!r} is not a valid multiaddr: {exc}") from exc
