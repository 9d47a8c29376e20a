"""p2pgpu's network layer on py-libp2p (Trio): host, gossip, request/response, discovery.

No ledger knowledge lives here: gossip messages are opaque bytes checked by
validators the node plugs in, and request/response payloads are opaque
frames. See :mod:`p2pgpu.net.host` for the entry point :func:`open_network`.
"""

from .config import GossipConfig, NetConfig
from .errors import (
    ConfigError,
    FrameTooLarge,
    ListenFailed,
    MessageTooLarge,
    NetError,
    PeerUnreachable,
    ProtocolError,
    PublishRejected,
    RemoteError,
    RequestTimeout,
)
from .gossip import GossipMessage
from .host import STATUS_PROTOCOL, Network, key_pair_from_seed, open_network, peer_id_from_seed
from .metrics import NetMetrics
from .reqresp import FramedStream, RequestContext
from .scoring import PeerScores, ScoreConfig, ScoreSummary
from .verdict import Outcome, Validator, Verdict, accept, ignore, reject

__all__ = [
    "ConfigError",
    "FrameTooLarge",
    "FramedStream",
    "GossipConfig",
    "GossipMessage",
    "ListenFailed",
    "MessageTooLarge",
    "NetConfig",
    "NetError",
    "NetMetrics",
    "Network",
    "Outcome",
    "PeerScores",
    "ScoreSummary",
    "PeerUnreachable",
    "ProtocolError",
    "PublishRejected",
    "RemoteError",
    "RequestContext",
    "RequestTimeout",
    "STATUS_PROTOCOL",
    "ScoreConfig",
    "Validator",
    "Verdict",
    "accept",
    "ignore",
    "key_pair_from_seed",
    "open_network",
    "peer_id_from_seed",
    "reject",
]
