"""Run a node together with its local HTTP API, and say where both can be reached."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from p2pgpu.node import Node

if TYPE_CHECKING:
    from p2pgpu.gateway.service import InferenceGateway


async def _start_gateway(node: Node, nursery: trio.Nursery) -> InferenceGateway | None:
    """The inference gateway of a client node (``[gateway] enabled``), its lanes run in ``nursery``."""
    roles = node.client_role
    if not node.config.gateway.enabled or roles is None:
        return None
    from p2pgpu.gateway.nodesessions import live_session_opener
    from p2pgpu.gateway.service import InferenceGateway

    gateway = InferenceGateway(lambda: node.state, live_session_opener(roles.open_live_session, node.config.gateway),
                               node.config.gateway,
                               warm_providers=lambda model_id: len(roles.warm_providers(model_id)))
    await nursery.start(gateway.run)
    return gateway


async def serve_node(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Start ``node`` and (if enabled) its API; ``task_status.started`` gets the run info dict."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        api_url = ""
        api = node.config.api
        if api.enabled:
            # Imported here: the HTTP stack costs 0.37 s on top of the node (measured), which a node without an API
            # does not pay.
            from p2pgpu.api.server import serve_api
            from p2pgpu.node_api import NodeService

            gateway = await _start_gateway(node, nursery)
            port = await nursery.start(
                lambda task_status: serve_api(
                    NodeService(node), api.host, api.port, allow_remote=api.allow_remote,
                    tokens=api.tokens, max_body_bytes=api.max_body_bytes, gateway=gateway, task_status=task_status,
                )
            )
            api_url = f"http://{api.host}:{port}"
        task_status.started({
            "pid": os.getpid(),
            "peer_id": node.network.peer_id,  # type: ignore[union-attr]
            "address": node.keys.account.address.hex(),
            "addrs": node.network.addrs,  # type: ignore[union-attr]
            "api_url": api_url,
            "chain": node.chain_id.hex(),
            "roles": sorted(node.roles),
        })
