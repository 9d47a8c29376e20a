"""The real node behind the real HTTP API: health, ledger queries, metrics, and bad requests."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import trio
from prometheus_client.parser import text_string_to_metric_families

from kernels.spec import make_spec
from ledger.devtools import make_dev_network
from p2pgpu.api.types import SubmitRequest, encode_submit
from p2pgpu.config import ApiConfig
from p2pgpu.node import Node, NodeKeys
from p2pgpu.node_service import serve_node

from .test_node_consensus import node_config, wait_for


async def test_single_validator_node_serves_its_api(tmp_path):
    net = make_dev_network(validators=("v0",), providers=(), clients=())
    cfg = dataclasses.replace(node_config(tmp_path, "v0", {"validator"}, block_interval=0.1), api=ApiConfig(port=0))
    node = Node(cfg, NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_node, node)
        await wait_for(lambda: node.chain.height >= 2, 120, nodes=[node])
        async with httpx.AsyncClient(base_url=info["api_url"], timeout=10) as api:
            health = await api.get("/health")
            assert health.status_code == 200 and health.json()["state"] == "ready"
            head = (await api.get("/ledger/head")).json()
            assert head["height"] >= 2
            balance = await api.get(f"/ledger/balance/{net.address('v0').hex()}")
            assert balance.status_code == 200
            validators = (await api.get("/ledger/validators")).json()["validators"]
            assert validators and validators[0]["in_committee"] is True
            supply = (await api.get("/ledger/supply")).json()
            genesis = net.genesis
            assert supply["conserved"] is True and supply["height"] >= 2
            assert supply["genesis_supply"] == supply["total"] - supply["minted"] == (
                sum(a.balance for a in genesis.accounts) + sum(v.stake for v in genesis.validators))
            names = {f.name for f in text_string_to_metric_families((await api.get("/metrics")).text)}
            assert {"p2pgpu_chain_height", "p2pgpu_blocks_committed", "p2pgpu_peers"} <= names
            # inbound stream refusals and peer charges, by reason (issue 13)
            assert {"p2pgpu_inbound_streams_refused", "p2pgpu_inbound_streams", "p2pgpu_peer_charges",
                    "p2pgpu_peer_bans"} <= names
            # bad input: a clear error, and the node keeps serving
            bad = await api.get("/ledger/balance/not-hex")
            assert bad.status_code == 400 and bad.json()["error"]
            missing = await api.get("/ledger/blocks/999999")
            assert missing.status_code == 404 and "head" in missing.json()["message"]
            a = np.ones((4, 4), np.float32)
            body = encode_submit(SubmitRequest(spec=make_spec("matmul", 1, {}, {"a": a, "b": a}),
                                               inputs={"a": a, "b": a}, max_unit_price=10))
            refused = await api.post("/tasks", content=body, headers={"content-type": "application/msgpack"})
            assert refused.status_code == 503 and refused.json()["error"] == "no_client_role"
            garbage = await api.post("/tasks", content=b"\xc1garbage", headers={"content-type": "application/msgpack"})
            assert garbage.status_code == 400
            assert (await api.get("/health")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_configured_tokens_guard_the_real_node_and_count_its_real_costs(tmp_path):
    """``[[api.tokens]]`` reaches the server through serve_node, and a task's cost is the chain's, fee included."""
    import hashlib

    from p2pgpu.config import ApiToken
    from p2pgpu.node_api import NodeService

    secret = "p2pgpu_node-test-token"
    token = ApiToken("ops", hashlib.sha256(secret.encode()).hexdigest(), frozenset({"read"}))
    net = make_dev_network(validators=("v0",), providers=(), clients=())
    cfg = dataclasses.replace(node_config(tmp_path, "v0", {"validator"}, block_interval=0.1),
                              api=ApiConfig(port=0, tokens=(token,)))
    node = Node(cfg, NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_node, node)
        await wait_for(lambda: node.chain.height >= 1, 120, nodes=[node])
        async with httpx.AsyncClient(base_url=info["api_url"], timeout=10) as api:
            assert (await api.get("/health")).status_code == 200
            refused = await api.get("/ledger/head")
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
            head = await api.get("/ledger/head", headers={"authorization": f"Bearer {secret}"})
            assert head.status_code == 200 and head.json()["height"] >= 1
        a = np.ones((2, 2), np.float32)
        request = SubmitRequest(spec=make_spec("matmul", 1, {}, {"a": a, "b": a}), inputs={"a": a, "b": a},
                                max_unit_price=7, units=1)
        p = node.state.params
        service = NodeService(node)
        assert await service.task_cost(request) == 7 + p.audit_fee + p.min_fee
        assert await service.dispute_cost() == p.dispute_bond + p.min_fee
        nursery.cancel_scope.cancel()
