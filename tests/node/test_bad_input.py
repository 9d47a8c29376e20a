"""Bad input against a real consensus node: gossip on ``/consensus`` and ``/block``, ``/p2pgpu/sync/1``, status.

One validator node (a one-validator genesis, so it finalizes alone) runs over
real py-libp2p on 127.0.0.1. Test peers are plain :class:`~p2pgpu.net.Network`
hosts dialled to it over TCP: an *attacker* that publishes what it likes
(``pubsub.publish`` skips our own publish-side checks) and a *witness*
connected only to the node, which shows what the node forwards. Every bad
input must end in a counted rejection under a stable reason (or a clear error
frame on request/response), a lower score for its sender, nothing forwarded,
and a node that keeps finalizing with its chain and balances untouched.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ledger.blocks import FinalizedBlock
from ledger.codec import decode, encode
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    Proposal,
    SignedProposal,
    SyncRequest,
    VoteMessage,
    proposal_signing_bytes,
)
from ledger.devtools import DevChain, DevNetwork, dev_validator_key, make_dev_network, sign_vote
from ledger.genesis import initial_state
from ledger.params import Params
from ledger.votes import Vote, VoteStep
from p2pgpu.blocksync import SyncFailed, fetch_blocks
from p2pgpu.net import STATUS_PROTOCOL, GossipConfig, NetConfig, Network, RemoteError, accept, open_network
from p2pgpu.net.config import MAX_GOSSIP_MESSAGE
from p2pgpu.net.framing import Kind, encode_frame
from p2pgpu.node import Node, NodeKeys
from p2pgpu.node_api import NodeService
from p2pgpu.topics import SYNC_PROTOCOL, Topics

from .test_node_consensus import node_config, wait_for

# A height stays current for about this long after each commit: long enough to aim a message at it.
BLOCK_INTERVAL = 1.0
REQUEST_TIMEOUT = 2.0
OVERSIZED = MAX_GOSSIP_MESSAGE + 4096  # over every topic's limit, under libp2p's 1 MiB RPC cap
# One long epoch: the node knows the committee of every height a test aims at.
PARAMS = Params(epoch_length=1000)
PEER_CONFIG = NetConfig(
    target_peers=1,  # the node only: attacker and witness must not find each other by peer exchange
    discovery_interval=0.2,
    bootstrap_backoff_initial=0.05,
    bootstrap_backoff_max=0.3,
    request_timeout=5.0,
    gossip=GossipConfig(max_message_size=MAX_GOSSIP_MESSAGE),
)


@dataclass
class Lab:
    dev: DevNetwork
    node: Node

    @property
    def topics(self) -> Topics:
        return self.node.topics

    @property
    def network(self) -> Network:
        assert self.node.network is not None
        return self.node.network

    def rejected(self, topic: str) -> dict[str, int]:
        """The node's rejection counts on ``topic``, by reason."""
        return {r: n for (t, r), n in self.network.metrics.rejected.items() if t == topic and n}

    def score(self, peer: Network) -> float:
        return self.network.scores.score(peer.peer_id, trio.current_time())


@dataclass
class Peer:
    network: Network
    received: dict[str, list[bytes]] = field(default_factory=dict)

    def got(self, topic: str, messages) -> bool:
        """Whether any of ``messages`` reached us on ``topic`` (delivered, or refused by our size check)."""
        return bool(set(messages) & set(self.received[topic])) or any(
            t == topic for t, _ in self.network.metrics.rejected)

    async def publish(self, topic: str, data: bytes) -> None:
        """Straight into libp2p: no size limit or validator of ours stands in the way."""
        await self.network.gossip.pubsub.publish(topic, data)


@asynccontextmanager
async def consensus_node(tmp_path, *, request_timeout: float = REQUEST_TIMEOUT) -> AsyncIterator[Lab]:
    """One validator finalizing alone, every ``BLOCK_INTERVAL`` seconds; waits for its first block."""
    dev = make_dev_network(validators=("v0",), providers=(), clients=("c0",), params=PARAMS)
    cfg = node_config(tmp_path, "v0", {"validator"}, block_interval=BLOCK_INTERVAL)
    cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, request_timeout=request_timeout))
    node = Node(cfg, NodeKeys(dev.key("v0"), dev.identities["v0"].bls), dev.genesis)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await wait_for(lambda: node.chain.height >= 1, 60, nodes=[node])
        try:
            yield Lab(dev, node)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def gossip_peer(lab: Lab, seed: bytes, topics: tuple[str, ...]) -> AsyncIterator[Peer]:
    """A host connected to the node only, in the node's mesh for ``topics``, recording what it receives."""
    config = dataclasses.replace(PEER_CONFIG, bootstrap_peers=(lab.network.addrs[0],))
    async with open_network(config, seed) as net, trio.open_nursery() as nursery:
        peer = Peer(net)
        for topic in topics:
            channel = await net.subscribe(topic, lambda _peer, _data: accept(), max_message_size=MAX_GOSSIP_MESSAGE)
            peer.received[topic] = []
            nursery.start_soon(_record, channel, peer.received[topic])
        node_id = lab.network.peer_id

        def meshed() -> bool:
            return all(node_id in net.gossip.mesh_peers(t) and net.peer_id in lab.network.gossip.mesh_peers(t)
                       for t in topics)

        await wait_for(meshed, 30, nodes=[lab.node])
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()


async def _record(channel, into: list[bytes]) -> None:
    async for msg in channel:
        into.append(msg.data)


async def fresh_height(lab: Lab) -> int:
    """Wait for a commit and return the height consensus now runs at (stable for about BLOCK_INTERVAL)."""
    assert lab.node.driver is not None
    before = lab.node.driver.stats.commits
    await wait_for(lambda: lab.node.driver.stats.commits > before, 30, nodes=[lab.node])
    return lab.node.chain.height + 1


async def settle() -> None:
    """Time for gossip to cross two hops (and for a wrongly forwarded message to reach the witness)."""
    await trio.sleep(1.5)


async def assert_keeps_finalizing(lab: Lab, *, blocks: int = 2) -> None:
    """Consensus goes on, every block is the node's own, and no funds moved or vanished.

    No test sends a transaction, so every account but the validator's (which earns the
    block rewards) must hold exactly its genesis balance, and the supply must add up.
    """
    node = lab.node
    target = node.chain.height + blocks
    await wait_for(lambda: node.chain.height >= target, 60, nodes=[node])
    me = lab.dev.address("v0")
    for h in range(1, node.chain.height + 1):
        fb = node.chain.get_finalized(h)
        assert fb.block.header.proposer == me and not fb.block.transactions
    genesis = initial_state(lab.dev.genesis)
    state = node.chain.state
    assert state.total_supply() == genesis.total_supply() + state.minted
    for address, account in genesis.accounts.items():
        if address != me:
            assert state.get_account(address) == account


def other_chain() -> DevNetwork:
    """Another chain with the same validator keys: everything it signs is bound to its own chain id."""
    return make_dev_network(validators=("v0",), providers=(), clients=("c0",), params=PARAMS, chain_name="other")


def other_chain_id() -> bytes:
    return other_chain().chain_id


# ----------------------------------------------------------------- /consensus


def vote_bytes(key_name: str, address: bytes, chain_id: bytes, height: int, round_: int,
               block_hash: bytes = b"\x07" * 32) -> bytes:
    vote = Vote(height=height, round=round_, step=VoteStep.PREVOTE, block_hash=block_hash)
    return CONSENSUS_MESSAGES.encode(VoteMessage(sign_vote(dev_validator_key(key_name), address, chain_id, vote)))


def proposal_bytes(lab: Lab, key_name: str, proposer: bytes, chain_id: bytes, height: int, round_: int) -> bytes:
    """A proposal at ``(height, round_)`` carrying a real (old) block, signed by ``key_name`` over ``chain_id``."""
    block = lab.node.chain.get_finalized(1).block
    proposal = Proposal(height=height, round=round_, pol_round=-1, block_hash=block.block_hash())
    signature = dev_validator_key(key_name).sign(proposal_signing_bytes(chain_id, proposal))
    return CONSENSUS_MESSAGES.encode(SignedProposal(proposal=proposal, block=block, proposer=proposer,
                                                    signature=signature))


async def test_malformed_and_oversized_consensus_gossip_is_rejected_and_not_forwarded(tmp_path):
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        async with gossip_peer(lab, b"\x01" * 32, (topic,)) as attacker, \
                gossip_peer(lab, b"\x02" * 32, (topic,)) as witness:
            assert witness.network.peer_id not in attacker.network.connected_peers()
            garbage = b"\xc1 not msgpack at all"
            not_consensus = encode(SyncRequest(from_height=1, max_blocks=1))  # valid msgpack, wrong record
            huge = b"\x00" * OVERSIZED
            for data in (garbage, not_consensus, huge):
                await attacker.publish(topic, data)
            await wait_for(lambda: sum(lab.rejected(topic).values()) >= 3, 30, nodes=[lab.node])
            reasons = lab.rejected(topic)
            assert reasons.get("oversized") == 1, reasons
            assert sum(n for r, n in reasons.items() if r.startswith("decode:")) == 2, reasons
            assert lab.score(attacker.network) <= -25  # three rejections, a little recovered
            # The same path forwards what the node accepts: a well-formed vote for the height just committed
            # (a peer still finishing it needs its votes) reaches the witness, the bad ones never do.
            last = await fresh_height(lab) - 1
            late = vote_bytes("v0", lab.dev.address("v0"), lab.dev.chain_id, last, 9)
            await attacker.publish(topic, late)
            await wait_for(lambda: late in witness.received[topic], 30, nodes=[lab.node])
            assert not witness.got(topic, (garbage, not_consensus, huge))
            assert sum(lab.rejected(topic).values()) == 3
            await assert_keeps_finalizing(lab)


async def test_proposals_and_votes_for_old_heights_are_not_forwarded_nor_charged(tmp_path):
    """Below our head, a proposal or vote can help nobody (a peer that far behind syncs blocks), and its height's
    committee may be long gone: the node forwarded them unchecked, even a proposal signed over another chain's id
    in a made-up proposer's name. Now they are ignored -- not forwarded, and not charged, since late copies of
    real messages are nobody's fault."""
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        chain_id, v0 = lab.dev.chain_id, lab.dev.address("v0")
        intruder = make_dev_network(validators=("x0",), providers=(), clients=()).address("x0")
        async with gossip_peer(lab, b"\x0d" * 32, (topic,)) as attacker, \
                gossip_peer(lab, b"\x0e" * 32, (topic,)) as witness:
            await wait_for(lambda: lab.node.chain.height >= 3, 60, nodes=[lab.node])
            old = [
                vote_bytes("v0", v0, chain_id, 1, 9),
                vote_bytes("v0", v0, chain_id, 2, 7),
                proposal_bytes(lab, "x0", intruder, other_chain_id(), 1, 3),  # forged, another chain, made-up proposer
            ]
            for data in old:
                await attacker.publish(topic, data)
            # then one the node does forward, over the same path: once it arrives, the old ones would have too
            last = await fresh_height(lab) - 1
            late = vote_bytes("v0", v0, chain_id, last, 9)
            await attacker.publish(topic, late)
            await wait_for(lambda: late in witness.received[topic], 30, nodes=[lab.node])
            await settle()
            assert not witness.got(topic, old)
            assert lab.network.metrics.ignored[(topic, "old_height")] == len(old)
            assert lab.rejected(topic) == {}, lab.rejected(topic)
            assert lab.score(attacker.network) == 0.0
            await assert_keeps_finalizing(lab)


async def test_consensus_messages_from_outside_the_committee_or_another_chain_are_rejected(tmp_path):
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        chain_id, v0 = lab.dev.chain_id, lab.dev.address("v0")
        intruder = make_dev_network(validators=("x0",), providers=(), clients=()).address("x0")
        other_chain = other_chain_id()
        async with gossip_peer(lab, b"\x03" * 32, (topic,)) as attacker, \
                gossip_peer(lab, b"\x04" * 32, (topic,)) as witness:
            # Aimed a little ahead: the node knows who signs there (same epoch), and cannot have passed it yet.
            height, round_ = lab.node.chain.height + 3, 2
            bad = {
                "not_validator": vote_bytes("x0", intruder, chain_id, height, round_),
                "not_proposer": proposal_bytes(lab, "x0", intruder, chain_id, height, round_),
                "bad_signature": proposal_bytes(lab, "v0", v0, other_chain, height, round_),
            }
            for data in bad.values():
                await attacker.publish(topic, data)
            await wait_for(lambda: sum(lab.rejected(topic).values()) >= len(bad), 30, nodes=[lab.node])
            assert lab.rejected(topic) == {reason: 1 for reason in bad}, lab.rejected(topic)
            assert lab.score(attacker.network) <= -25
            await settle()
            assert not witness.got(topic, bad.values())
            await assert_keeps_finalizing(lab)
            assert lab.node.chain.get_finalized(height).certificate.round < round_


async def test_forged_votes_are_counted_and_penalised_when_checked(tmp_path):
    """Votes in a committee member's name with a bad (or another chain's) signature.

    Vote signatures are checked lazily, in aggregate, once a vote can matter; so the
    gossip validator lets such a vote through, and the engine must still count it and
    charge its sender when the check fails. A vote for a later round carrying the whole
    committee's stake makes the node check that round at once (it would join the round
    if the vote were real). Six offences cross the ban threshold: the node bans and
    drops the sender, as it would for rejections by a gossip validator.
    """
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        chain_id, v0 = lab.dev.chain_id, lab.dev.address("v0")
        other_chain = other_chain_id()
        async with gossip_peer(lab, b"\x05" * 32, (topic,)) as attacker:
            height = await fresh_height(lab)
            first = lab.node.driver.engine.round + 5
            forged = [vote_bytes("x0", v0, chain_id, height, first + i) for i in range(3)]  # v0's name, another key
            wrong_chain = [vote_bytes("v0", v0, other_chain, height, first + 3 + i) for i in range(3)]  # v0's key
            for data in forged + wrong_chain:
                await attacker.publish(topic, data)
            await wait_for(lambda: lab.rejected(topic).get("bad_signature", 0) >= 6, 30, nodes=[lab.node])
            assert lab.rejected(topic) == {"bad_signature": 6}, lab.rejected(topic)
            assert lab.network.metrics.bans == 1
            assert lab.network.scores.is_banned(attacker.network.peer_id, trio.current_time())
            await wait_for(lambda: attacker.network.peer_id not in lab.network.connected_peers(), 30)
            await assert_keeps_finalizing(lab)
            # none of the forged votes pulled the node into its round
            assert lab.node.chain.get_finalized(height).certificate.round < first


async def test_a_replayed_valid_vote_is_a_duplicate_not_an_offence(tmp_path):
    """Gossip delivers copies of good messages all the time: a replay is dropped as a duplicate, unpunished.

    Message ids are content hashes, so a replayed vote is the same message. The replayer
    does not subscribe to ``/consensus`` (a subscriber would have seen the vote and its
    own libp2p would refuse to send it again); it publishes to the node as a fanout peer.
    """
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        async with gossip_peer(lab, b"\x06" * 32, (topic,)) as listener:
            await wait_for(lambda: any(isinstance(CONSENSUS_MESSAGES.decode(d), VoteMessage)
                                       for d in listener.received[topic]), 30, nodes=[lab.node])
            vote = next(d for d in listener.received[topic] if isinstance(CONSENSUS_MESSAGES.decode(d), VoteMessage))
        # the replayer is then the node's only peer: every duplicate the node counts came from it
        async with gossip_peer(lab, b"\x0c" * 32, (lab.topics.block,)) as replayer:
            await wait_for(lambda: lab.network.peer_id in replayer.network.gossip.topic_peers(topic), 30)
            duplicates = lab.network.metrics.duplicates
            await replayer.publish(topic, vote)
            await wait_for(lambda: lab.network.metrics.duplicates > duplicates, 30, nodes=[lab.node])
            assert lab.rejected(topic) == {}, lab.rejected(topic)
            assert lab.score(replayer.network) == 0.0
            assert replayer.network.peer_id in lab.network.connected_peers()
            await assert_keeps_finalizing(lab)


async def test_a_vote_for_a_far_height_neither_makes_the_node_syncing_nor_keeps_it_polling(tmp_path):
    """One vote for a height whose committee the node cannot know proves nothing, signed or not.

    It used to make /health say "syncing" and the node ask every peer for blocks every 0.5 s for as
    long as that height stayed ahead. Now it is an unproven claim: a few sync requests, ever further
    apart, then dropped; health stays "ready", and its sender (who may be honest: nobody can tell yet)
    is not charged. A second one costs no more than one request in the same time.
    """
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.consensus
        node, driver = lab.node, lab.node.driver
        chain_id, v0 = lab.dev.chain_id, lab.dev.address("v0")
        far = 7 * PARAMS.epoch_length
        signed = vote_bytes("v0", v0, chain_id, far, 0)  # v0's real key: valid if v0's epoch 7 committee had v0
        unsigned = vote_bytes("x0", v0, chain_id, far + 1, 0)  # garbage signature
        service = NodeService(node)
        states: set[str] = set()

        async def watch_health(seconds: float) -> None:
            with trio.move_on_after(seconds):
                while True:
                    states.add((await service.health()).state)
                    await trio.sleep(0.05)

        async with gossip_peer(lab, b"\x0d" * 32, (topic,)) as attacker:
            await attacker.publish(topic, unsigned)
            await wait_for(lambda: driver.stats.sync_requests >= 1, 30, nodes=[node])
            await attacker.publish(topic, signed)  # lower: the node keeps the highest claim only
            await watch_health(2.0)
            assert states == {"ready"}, states
            assert driver.stats.highest_seen_height <= node.chain.height + 1
            # the claim gets max_claim_requests requests (0, 0.5, 1 and 2 s in), then is dropped 4 s later
            await wait_for(lambda: driver.stats.sync_claims_dropped >= 1, 30, nodes=[node])
            requests = driver.stats.sync_requests
            assert 1 <= requests <= driver.engine.config.max_claim_requests
            await watch_health(3.0)
            assert driver.stats.sync_requests == requests  # no more polling
            await attacker.publish(topic, vote_bytes("x0", v0, chain_id, far + 2, 0))
            await watch_health(4.0)  # the pace where the last claim left off: the first request waits 4 s
            assert driver.stats.sync_requests <= requests + 1
            assert states == {"ready"}, states
            assert driver.stats.highest_seen_height <= node.chain.height + 1
            assert not driver.syncing and not node.status()["syncing"]
            assert lab.score(attacker.network) == 0.0 and lab.rejected(topic) == {}
            await assert_keeps_finalizing(lab)


# ----------------------------------------------------------------- /block


async def test_bad_finalized_blocks_are_rejected_and_not_forwarded(tmp_path):
    async with consensus_node(tmp_path) as lab:
        topic = lab.topics.block
        other = other_chain()
        async with gossip_peer(lab, b"\x07" * 32, (topic,)) as attacker, \
                gossip_peer(lab, b"\x08" * 32, (topic,)) as witness:
            # A few heights ahead of the node (in its epoch): the node can check these, and must.
            target = lab.node.chain.height + 10
            # Another chain (same validator key, another chain id) certifies its own blocks up to there.
            dev_chain = DevChain(other)
            while dev_chain.state.height < target:
                dev_chain.produce()
            wrong_chain = dev_chain.blocks[target - 1]
            # Our own head's certificate, relabelled for that block: it proves nothing about it.
            head = lab.node.chain.get_finalized(lab.node.chain.height)
            bad_cert = FinalizedBlock(block=wrong_chain.block,
                                      certificate=dataclasses.replace(head.certificate, height=target))
            bad = [b"\xc1 garbage", b"\x00" * OVERSIZED, encode(wrong_chain), encode(bad_cert)]
            # and a block of an epoch the node cannot check yet: not relayed, not believed, not anyone's fault
            far_header = dataclasses.replace(wrong_chain.block.header, height=5 * PARAMS.epoch_length)
            beyond = dataclasses.replace(wrong_chain, block=dataclasses.replace(wrong_chain.block, header=far_header))
            assert lab.node.chain.height < target
            for data in [*bad, encode(beyond)]:
                await attacker.publish(topic, data)
            await wait_for(lambda: sum(lab.rejected(topic).values()) >= len(bad)
                           and lab.network.metrics.ignored[(topic, "unknown_committee")] >= 1, 30, nodes=[lab.node])
            reasons = lab.rejected(topic)
            assert reasons.get("oversized") == 1 and reasons.get("bad_certificate") == 2, reasons
            assert lab.score(attacker.network) <= -35
            await settle()
            assert not witness.got(topic, [*bad, encode(beyond)])
            assert witness.received[topic]  # while the node's own blocks did reach it
            await assert_keeps_finalizing(lab)
            # nothing the attacker sent made the node believe it is behind, or took a place in its chain
            assert lab.node.driver.stats.highest_seen_height <= lab.node.chain.height + 1
            assert lab.node.driver.stats.sync_requests == 0


# ----------------------------------------------------------------- /p2pgpu/sync/1 and /p2pgpu/status/1


async def raw_exchange(client: Network, server: Network, protocol: str, data: bytes) -> bytes:
    """Write raw bytes on a fresh stream; read until the server closes it."""
    stream = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(protocol)])
    try:
        await stream.write(data)
        reply = b""
        with trio.fail_after(15):
            while True:
                try:
                    chunk = await stream.read(1 << 16)
                except Exception:  # a reset stream raises one of several libp2p types: the reply is complete
                    break
                if not chunk:
                    break
                reply += chunk
        return reply
    finally:
        await stream.reset()


def error_text(reply: bytes) -> str:
    length, kind = struct.unpack_from(">IB", reply)
    assert kind == Kind.ERROR, reply[:64]
    return reply[5 : 4 + length].decode()


def request_frames(request: bytes) -> bytes:
    return encode_frame(Kind.DATA, request) + encode_frame(Kind.END)


async def test_bad_sync_requests_get_an_error_and_good_ones_are_still_served(tmp_path):
    async with consensus_node(tmp_path) as lab:
        async with open_network(dataclasses.replace(PEER_CONFIG, bootstrap_peers=(lab.network.addrs[0],)),
                                b"\x09" * 32) as client:
            server = lab.network
            await wait_for(lambda: server.peer_id in client.connected_peers() and lab.node.chain.height >= 3, 30,
                           nodes=[lab.node])
            errors = server.metrics.request_errors
            # garbage instead of a frame: the u32 length alone is over the limit
            assert "exceeds the limit" in error_text(await raw_exchange(client, server, SYNC_PROTOCOL, b"\xff" * 16))
            # an oversized frame announced honestly
            big = struct.pack(">IB", server.config.max_frame_size + 2, Kind.DATA)
            assert "exceeds the limit" in error_text(await raw_exchange(client, server, SYNC_PROTOCOL, big))
            # a frame whose payload is not a SyncRequest
            text = error_text(await raw_exchange(client, server, SYNC_PROTOCOL, request_frames(b"\xc1 junk")))
            assert "bad sync request" in text
            # two requests on one stream
            two = encode_frame(Kind.DATA, encode(SyncRequest(from_height=1, max_blocks=1))) * 2 + encode_frame(Kind.END)
            assert "more than one message" in error_text(await raw_exchange(client, server, SYNC_PROTOCOL, two))
            assert errors[(SYNC_PROTOCOL, "FrameTooLarge")] == 2 and errors[(SYNC_PROTOCOL, "ProtocolError")] == 2
            # each cost the client score, as a rejected gossip message would (four: one short of a ban)
            assert -40 <= lab.score(client) <= -30
            score = lab.score(client)
            # Well-formed but absurd ranges: an empty answer, not an error.
            for from_height, max_blocks in ((2**64 - 1, 2**16 - 1), (lab.node.chain.height + 1000, 10), (1, 0)):
                request = request_frames(encode(SyncRequest(from_height=from_height, max_blocks=max_blocks)))
                assert await raw_exchange(client, server, SYNC_PROTOCOL, request) == encode_frame(Kind.END)
            assert lab.score(client) >= score  # asking for what is not there is no offence
            # and the node serves a good request afterwards
            blocks = await fetch_blocks(client, server.peer_id, 1, max_blocks=3)
            assert [fb.encode() for fb in blocks] == [lab.node.chain.get_finalized(h).encode() for h in (1, 2, 3)]
            await assert_keeps_finalizing(lab, blocks=1)


async def test_sync_clients_that_stall_or_hang_up_do_not_hold_the_server(tmp_path):
    async with consensus_node(tmp_path) as lab:
        async with open_network(dataclasses.replace(PEER_CONFIG, bootstrap_peers=(lab.network.addrs[0],)),
                                b"\x0a" * 32) as client:
            server = lab.network
            await wait_for(lambda: server.peer_id in client.connected_peers(), 30, nodes=[lab.node])
            errors = server.metrics.request_errors
            # half a request, then the stream is reset: the server counts a lost peer
            stream = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(SYNC_PROTOCOL)])
            await stream.write(encode_frame(Kind.DATA, encode(SyncRequest(from_height=1, max_blocks=5)))[:3])
            await stream.reset()
            await wait_for(lambda: errors[(SYNC_PROTOCOL, "PeerUnreachable")] >= 1, 30, nodes=[lab.node])
            # a whole request but no END, then the client drops the connection
            stream = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(SYNC_PROTOCOL)])
            await stream.write(encode_frame(Kind.DATA, encode(SyncRequest(from_height=1, max_blocks=5))))
            await client.disconnect(server.peer_id)
            await wait_for(lambda: errors[(SYNC_PROTOCOL, "PeerUnreachable")] >= 2, 30, nodes=[lab.node])
            await client.connect(server.addrs[0])
            # a request without its END, then silence: the server gives up after its request timeout
            stream = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(SYNC_PROTOCOL)])
            await stream.write(encode_frame(Kind.DATA, encode(SyncRequest(from_height=1, max_blocks=5))))
            await wait_for(lambda: errors[(SYNC_PROTOCOL, "timeout")] >= 1, REQUEST_TIMEOUT * 5, nodes=[lab.node])
            await stream.reset()
            blocks = await fetch_blocks(client, server.peer_id, 1, max_blocks=2)
            assert [fb.block.height for fb in blocks] == [1, 2]
            assert lab.score(client) == 0.0  # hanging up or stalling is what a crashed or slow peer does too


async def test_bad_status_requests_get_an_error_and_good_ones_are_still_served(tmp_path):
    async with consensus_node(tmp_path) as lab:
        async with open_network(dataclasses.replace(PEER_CONFIG, bootstrap_peers=(lab.network.addrs[0],)),
                                b"\x0b" * 32) as client:
            server = lab.network
            await wait_for(lambda: server.peer_id in client.connected_peers(), 30, nodes=[lab.node])
            with pytest.raises(RemoteError, match="takes an empty request"):
                await client.request(server.peer_id, STATUS_PROTOCOL, b"\x00" * 100)
            assert "exceeds the limit" in error_text(await raw_exchange(client, server, STATUS_PROTOCOL, b"\xff" * 8))
            status = await client.request_status(server.peer_id)
            assert status["address"] == lab.dev.address("v0").hex() and status["height"] >= 1
            errors = server.metrics.request_errors
            assert errors[(STATUS_PROTOCOL, "ProtocolError")] == 1 and errors[(STATUS_PROTOCOL, "FrameTooLarge")] == 1
            assert -20 <= lab.score(client) <= -15  # two bad requests, two charges


async def test_a_sync_peer_that_sends_bad_blocks_is_charged_and_banned_like_any_offender(tmp_path):
    """The client side of /p2pgpu/sync/1: an undecodable block, or a block of the wrong height, is an offence.

    Both go through the network's one scoring path, so enough of them ban the peer: counted,
    blacklisted in pubsub and disconnected, not merely scored.
    """
    chain = DevChain(make_dev_network(validators=("v0",), providers=(), clients=()))
    chain.produce()
    block1 = encode(chain.blocks[0])

    async def liar(stream) -> None:
        from_height = decode(SyncRequest, await stream.receive_exactly_one()).from_height
        # block 1 whatever is asked (right only for a request from 1), garbage for a request from 2
        await stream.send(b"\xc1 not a block" if from_height == 2 else block1)
        await stream.send_end()

    config = dataclasses.replace(PEER_CONFIG, target_peers=4)
    async with open_network(config, b"\x0e" * 32) as server:
        server.set_stream_handler(SYNC_PROTOCOL, liar)
        async with open_network(dataclasses.replace(config, bootstrap_peers=(server.addrs[0],)),
                                b"\x0f" * 32) as client:
            await wait_for(lambda: server.peer_id in client.connected_peers(), 30)
            assert [fb.block.height for fb in await fetch_blocks(client, server.peer_id, 1)] == [1]
            assert client.scores.score(server.peer_id, trio.current_time()) == 0.0
            for from_height, problem in ((2, "malformed block"), (3, "sent block 1, expected 3")) * 2:
                with pytest.raises(SyncFailed, match=problem):
                    await fetch_blocks(client, server.peer_id, from_height)
            assert client.metrics.bans == 0
            assert client.scores.score(server.peer_id, trio.current_time()) <= -35
            for _ in range(2):  # the score recovers a little meanwhile: six offences make sure of a ban
                with pytest.raises(SyncFailed):
                    await fetch_blocks(client, server.peer_id, 2)
            assert client.metrics.bans == 1
            assert ID.from_base58(server.peer_id) in client.gossip.pubsub.blacklisted_peers
            await wait_for(lambda: server.peer_id not in client.connected_peers(), 30)
