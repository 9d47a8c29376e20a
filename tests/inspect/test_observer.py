"""The shell's Observer without a network: validator verdicts, deliveries and snapshot diffs become events."""

from __future__ import annotations

import hashlib
import itertools

from p2pgpu.inspect import EventType
from p2pgpu.inspect.decode import MessageDecoder, TopicKind
from p2pgpu.inspect.shell import Observer
from p2pgpu.net import GossipMessage, Outcome
from p2pgpu.topics import Topics

from .helpers import dev_network, transfer

E = EventType


def observer():
    net = dev_network()
    events = []
    clock = itertools.count(100.0, 0.5)
    obs = Observer(MessageDecoder(net.genesis), Topics.for_chain(net.chain_id), events.append, lambda: next(clock))
    return net, obs, events


def test_invalid_message_is_recorded_as_reject_but_only_ignored_on_the_wire():
    _, obs, events = observer()
    verdict = obs.validator(TopicKind.TX)("peerB", b"junk")
    assert verdict.outcome is Outcome.IGNORE and verdict.reason == "malformed"
    (ev,) = events
    assert (ev.event, ev.topic, ev.peer, ev.reason, ev.size) == (E.REJECT, "tx", "peerB", "malformed", 4)
    assert ev.msg_id == hashlib.sha256(b"junk").hexdigest()


def test_valid_message_is_accepted_then_delivered_with_its_forwarder_and_summary():
    net, obs, events = observer()
    data = transfer(net).encode()
    assert obs.validator(TopicKind.TX)("peerB", data).outcome is Outcome.ACCEPT
    assert events == []  # nothing until the router actually delivers it
    msg_id = hashlib.sha256(data).digest()
    obs.deliver(TopicKind.TX, GossipMessage(topic=obs.topics.tx, data=data, origin="peerA", msg_id=msg_id, local=False))
    (ev,) = events
    assert (ev.event, ev.peer, ev.kind, ev.fields["origin"], ev.fields["nonce"]) == (E.DELIVER, "peerB", "Transfer",
                                                                                     "peerA", 0)


def test_snapshot_diffs_become_peer_topic_and_mesh_events():
    _, obs, events = observer()
    obs.snapshot({"A", "B"}, {"tx": {"A", "B"}}, {"tx": {"A"}})
    assert [(e.event, e.topic, e.peer) for e in events] == [
        (E.ADD_PEER, "", "A"), (E.ADD_PEER, "", "B"),
        (E.JOIN, "tx", "A"), (E.JOIN, "tx", "B"), (E.GRAFT, "tx", "A"),
    ]
    events.clear()
    obs.snapshot({"A", "B"}, {"tx": {"A", "B"}}, {"tx": {"A"}})
    assert events == []  # nothing changed, nothing said
    obs.snapshot({"A"}, {"tx": {"A"}}, {"tx": set()})
    assert [(e.event, e.topic, e.peer) for e in events] == [
        (E.PRUNE, "tx", "A"), (E.LEAVE, "tx", "B"), (E.REMOVE_PEER, "", "B"),
    ]


def test_duplicates_on_foreign_topics_are_not_reported():
    _, obs, events = observer()
    obs.duplicate("/p2pgpu/ffffffffffffffff/tx", "peerA", b"\x01" * 32, 10)
    obs.duplicate(obs.topics.block, "peerA", b"\x01" * 32, 10)
    assert [(e.event, e.topic) for e in events] == [(E.DUPLICATE, "block")]
