"""The six-node network the in-process market tests share: 4 validators, provider p0, client c0."""

from __future__ import annotations

from dataclasses import replace

import trio

from ledger.devtools import DevNetwork, make_dev_network
from ledger.params import Params
from p2pgpu.config import ClientConfig, ProviderConfig
from p2pgpu.node import Node, NodeKeys

from .test_node_consensus import node_config, wait_for

NAMES = ("v0", "v1", "v2", "v3", "p0", "c0")


async def start_market_network(nursery: trio.Nursery, tmp_path, params: Params, *,
                               provider: ProviderConfig | None = None,
                               verifiers: dict[str, ProviderConfig] | None = None,
                               scopes: dict[str, trio.CancelScope] | None = None,
                               ) -> tuple[DevNetwork, dict[str, Node]]:
    """Start the nodes over real libp2p and wait until the providers' kernel runtimes are warm (TensorFlow loads
    in a worker).

    ``provider`` replaces p0's ``[provider]`` settings (default: one CPU job at unit cost 10); ``verifiers``
    adds more provider nodes (name -> settings), e.g. to be drawn as verifiers of p0's tasks. ``scopes``: run
    each node in its own cancel scope, recorded there by name, so a test can stop one node (a crash drill).
    """
    extra = dict(verifiers or {})
    names = (*NAMES[:5], *extra, NAMES[5])
    net = make_dev_network(validators=NAMES[:4], providers=("p0", *extra), clients=("c0",), params=params)
    nodes: dict[str, Node] = {}
    boot = None
    for name in names:
        is_provider = name == "p0" or name in extra
        roles = {"validator"} if name.startswith("v") else ({"provider"} if is_provider else {"client"})
        cfg = node_config(tmp_path, name, roles, [boot] if boot else [], block_interval=0.3)
        if name == "p0":
            cfg = replace(cfg, provider=provider or ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10))
        if name in extra:
            cfg = replace(cfg, provider=extra[name])
        if name == "c0":
            cfg = replace(cfg, client=ClientConfig(enough_bids=1))
        node = Node(cfg, NodeKeys(net.key(name), net.identities[name].bls), net.genesis)
        if scopes is not None:
            scopes[name] = await nursery.start(run_in_own_scope, node)
        else:
            await nursery.start(node.run)
        nodes[name] = node
        boot = boot or node.network.addrs[0]
    providers = [nodes["p0"], *(nodes[n] for n in extra)]
    await wait_for(lambda: all(p.roles_driver.provider is not None for p in providers), 300,
                   nodes=list(nodes.values()))
    return net, nodes


async def run_in_own_scope(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run ``node`` until its scope (given to ``task_status.started``) is cancelled: stopping it stops only it."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(node.run)
            task_status.started(scope)
