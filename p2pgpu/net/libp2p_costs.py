"""Per-message costs py-libp2p 0.8.1 pays for nothing on our traffic, taken off.

Profiling a validator of an idle 4-node devnet (py-spy) put about a third of
its CPU in places that do no work for us (the record checks below, a Yamux
window update per read, rebuilding the record it sends); on a 2-core
machine running 7 node processes, CPU is what consensus latency is made of.

**Checking the sender's signed peer record on every pubsub RPC.** Each RPC
carries the sender's signed peer record (``senderRecord``) and the receiver
checks it on every RPC, twice (``Pubsub.continuously_read_stream`` and
``GossipSub.handle_rpc`` both call ``maybe_consume_signed_record``): a
protobuf parse, an Ed25519 verification and a peerstore update per message.
A peer sends the same record bytes until its addresses change, so
:func:`consume_signed_record_once` accepts bytes already accepted from that
peer, by that host, without checking them again; anything new goes through
py-libp2p's own check. (~10% of the profile.)

Tried and taken out again:

- Returning Yamux receive window only once half of it is consumed (as
  go-yamux does) instead of after almost every read (~9% of the profile: a
  WINDOW_UPDATE frame written back per gossip message received). With it,
  two gossip tests lost their subscription exchange about 1 run in 12
  (0 in 16 without it, 0 in 12 before this session); the cause was not
  found in the time there was.
- Reusing the record we *send* (py-libp2p rebuilds it per RPC, ~6%): a
  reused record can be older than one py-libp2p issued meanwhile and sent
  by another path, and the receiver drops a whole RPC whose record is older
  than the one it holds.

:func:`install` is idempotent and applies to every host in the process (the
cache is kept per host).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import libp2p.pubsub.gossipsub as _gossipsub_module
import libp2p.pubsub.pubsub as _pubsub_module
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import utils as _pubsub_utils

MAX_REMEMBERED_RECORDS = 4096
"""Accepted (peer, record) pairs remembered per host; beyond it the oldest is checked again when seen."""

_check_signed_record = _pubsub_utils.maybe_consume_signed_record
_accepted: weakref.WeakKeyDictionary[IHost, OrderedDict[tuple[ID, bytes], None]] = weakref.WeakKeyDictionary()


def consume_signed_record_once(msg: Any, host: IHost, peer_id: ID) -> bool:
    """``maybe_consume_signed_record``, checking a given peer's record bytes once per host."""
    if not msg.HasField("senderRecord"):
        return True
    accepted = _accepted.get(host)
    if accepted is None:
        accepted = _accepted[host] = OrderedDict()
    key = (peer_id, bytes(msg.senderRecord))
    if key in accepted:
        accepted.move_to_end(key)
        return True
    if not _check_signed_record(msg, host, peer_id):
        return False
    accepted[key] = None
    if len(accepted) > MAX_REMEMBERED_RECORDS:
        accepted.popitem(last=False)
    return True


def install() -> None:
    """Check each peer's signed record once per host, for every host of this process (see above)."""
    _pubsub_module.maybe_consume_signed_record = consume_signed_record_once  # type: ignore[attr-defined]
    _gossipsub_module.maybe_consume_signed_record = consume_signed_record_once  # type: ignore[attr-defined]
