"""Adverts through real nodes: a provider that keeps every registered model warm advertises the model it prefetched
on ``/advert``; the client's node learns it over gossip and its HTTP API lists the provider for that model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kernels.bundle import encode_bundle, load_model_file, model_id
from ledger.modelnames import parse_model_ref
from p2pgpu.api.server import serve_api
from p2pgpu.api.types import PushModelRequest, Unavailable
from p2pgpu.config import MODEL_WILDCARD, ProviderConfig
from p2pgpu.market.pricing import advert_unit_price
from p2pgpu.node_api import NodeService

from .market_net import start_market_network
from .test_market_e2e import PARAMS
from .test_node_consensus import wait_for


@pytest.mark.slow
async def test_a_client_learns_a_warm_providers_advert_and_its_api_lists_it(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    settings = ProviderConfig(max_concurrent_jobs=2, device="cpu", unit_cost=10, models=(MODEL_WILDCARD,))
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=settings)
        provider, client, validator = nodes["p0"], nodes["c0"], nodes["v0"]
        everyone = list(nodes.values())
        roles, driver = client.client_role, provider.roles_driver
        assert roles is not None and driver is not None and driver.provider is not None
        assert roles.warm_providers(ident) == []
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=1))
        await wait_for(lambda: driver.model_cache.is_warm(ident), 120, nodes=everyone)
        await wait_for(lambda: bool(roles.warm_providers(ident)), 60, nodes=everyone)

        port = await nursery.start(lambda task_status: serve_api(NodeService(client), "127.0.0.1", 0,
                                                                 task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            for ref in ("dense", "dense@1", ident.hex()):
                resp = await api.get(f"/ledger/models/{ref}/providers")
                assert resp.status_code == 200, resp.text
                answer = resp.json()
                assert answer["model_id"] == ident.hex()
                (warm,) = answer["providers"]
                assert warm["provider"] == net.address("p0").hex()
                assert warm["peer"] == provider.network.peer_id
                assert warm["free_slots"] == 2
                entry = client.state.models[ident]
                role = driver.provider
                assert warm["unit_price"] == advert_unit_price(role.pricing, role.capabilities, entry.bundle_size)
                assert warm["advert_age_s"] >= 0 and warm["expiry_height"] > answer["height"]
            known = {s.name: s.value for f in text_string_to_metric_families((await api.get("/metrics")).text)
                     for s in f.samples}
            assert known["p2pgpu_adverts_known"] >= 1 and known["p2pgpu_adverts_published_total"] == 0
        assert driver.advertiser.core.published >= 1
        # a validator-only node does not follow the market: it heard no adverts and says so
        assert validator.roles_driver is not None and not validator.follows_market
        with pytest.raises(Unavailable, match="does not follow"):
            await NodeService(validator).model_providers(parse_model_ref(ident.hex()))
        nursery.cancel_scope.cancel()
