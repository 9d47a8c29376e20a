"""The inspector watching real validator nodes: proposals, votes and blocks decode and verify.

It joins late (epoch 1 of a 4-block-epoch chain), so it must catch up on
committees over /p2pgpu/sync/1 before later-epoch signatures verify.
"""

from __future__ import annotations

import pytest
import trio

from ledger.devtools import make_dev_network
from ledger.params import Params
from p2pgpu.inspect import EventType
from p2pgpu.inspect.shell import InspectorConfig, run_inspector
from p2pgpu.node import Node, NodeKeys

from ..node.test_node_consensus import node_config
from .test_network import Recorder


@pytest.mark.slow
async def test_inspector_follows_live_consensus_and_verifies_after_catching_up(tmp_path):
    net = make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("c0",),
                           params=Params(epoch_length=4, committee_size=4))
    recorder = Recorder()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nodes: list[Node] = []
            for name in ("v0", "v1", "v2", "v3"):
                boot = [nodes[0].network.addrs[0]] if nodes else []
                node = Node(node_config(tmp_path, name, {"validator"}, boot),
                            NodeKeys(net.key(name), net.identities[name].bls), net.genesis)
                await nursery.start(node.run)
                nodes.append(node)
            reached = trio.Event()
            nodes[0].add_commit_hook(lambda fb, state: reached.set() if fb.block.height >= 5 else None)
            await reached.wait()  # epoch 1 (blocks 5..8) is under way: its committee came from block 4

            config = InspectorConfig(genesis=net.genesis, bootstrap=tuple(n.network.addrs[0] for n in nodes),
                                     snapshot_interval=0.2)
            inspector, _ = await nursery.start(run_inspector, config, recorder)
            start = nodes[0].chain.height

            def verified_block_after(e) -> bool:
                return (e.event is EventType.DELIVER and e.kind == "FinalizedBlock"
                        and e.fields["height"] > start + 1 and e.fields["verified"] is True)

            block = await recorder.wait_for(verified_block_after)
            await recorder.wait_for(lambda e: e.event is EventType.DELIVER and e.kind == "VoteMessage"
                                    and e.fields["height"] > block.fields["height"] and e.fields["verified"] is True)
            summary = recorder.state.summary()
            assert not summary.topic("consensus").rejected
            assert not summary.topic("block").rejected
            assert summary.head.finalized >= block.fields["height"]
            assert summary.head.consensus_height > summary.head.finalized - 1
            assert summary.delays["vote_spread"].count > 0
            assert sum(inspector.metrics.published.values()) == 0
            nursery.cancel_scope.cancel()
