"""A stream task by model through real nodes: the provider's account registers a stock Keras model whose bundle
the client's node serves; the client posts a ``stream_infer`` task naming it by id (no weights in the spec, items
sent one by one); the provider fetches the bundle from the client's node, opens its warm session on the expanded
spec, serves every item, and the claims settle the task PAID with the royalty paid per claimed unit. A disputed item
of such a task is recomputed by a drawn verifier from the bundle it fetches itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from kernels.bundle import encode_bundle, load_model_file, model_id
from kernels.bymodel import make_model_spec
from ledger.params import BPS
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import AuditVerdict, RegisterModel, TensorSignature
from p2pgpu.api.types import PushModelRequest, SubmitRequest
from p2pgpu.blobaccess import ANY_PEER
from p2pgpu.config import ProviderConfig
from p2pgpu.streams import ITEMS_INPUT

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for
from .test_stream_e2e import PARAMS, claims_of

ROYALTY = 11
K = 4
ITEMS = 8


@pytest.mark.slow
async def test_a_stream_task_by_model_serves_every_item_as_the_model_and_pays_the_royalty_per_claimed_unit(
        tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    items = np.random.default_rng(3).standard_normal((ITEMS, 4)).astype(np.float32)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=ProviderConfig(
            max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K))
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None and provider.roles_driver is not None
        # p0 owns the model (a validator's balance also moves with block rewards; p0's moves only by its task), and
        # c0 holds the bundle and serves it to any peer: the provider fetches it from the task's client.
        data = encode_bundle(bundle)
        c0_driver = client.roles_driver
        assert c0_driver is not None and c0_driver.store.put(data) == ident
        c0_driver.store.pin(ident)
        c0_driver.access.grant((ANY_PEER,), ident)
        owner = provider
        assert owner.tx_sender is not None
        owner.tx_sender.send(RegisterModel(
            sender=net.address("p0"), nonce=0, fee=PARAMS.min_fee, model_id=ident, name="dense", version="1",
            royalty_per_unit=ROYALTY, input=TensorSignature(bundle.input.dtype, tuple(bundle.input.shape)),
            output=TensorSignature(bundle.output.dtype, tuple(bundle.output.shape)),
            bundle_size=len(data)))
        await wait_for(lambda: ident in client.state.models and ident in provider.state.models, 120, nodes=everyone)
        c0, p0 = net.address("c0"), net.address("p0")
        assert client.state.models[ident].owner == p0
        c0_before, p0_before = client.state.get_balance(c0), client.state.get_balance(p0)
        c0_nonce, p0_nonce = client.state.get_account(c0).nonce, client.state.get_account(p0).nonce
        spec = make_model_spec(ident, {}, None, kernel="stream_infer", device="cpu", memory_bytes=256 << 20,
                               seconds=30)
        assert spec.input_dict() == {}  # no weights, no model config: the id only
        task_id = await roles.submit(SubmitRequest(
            spec=spec, inputs={ITEMS_INPUT: items}, max_unit_price=5_000, units=ITEMS, bid_window=6,
            audit_rate_bps=0, kind="stream"))
        record = roles.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)

        # Every item's output is the model's, from one fetch of the bundle and one model load.
        outputs = roles.result(task_id)["outputs"]
        expected = np.stack([model.predict(items[i:i + 1], verbose=0)[0] for i in range(ITEMS)])
        np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
        assert provider.roles_driver.model_cache.fetches == 1
        stats = provider.roles_driver.streams.stats[task_id]
        assert (stats.items, stats.model_loads) == (ITEMS, 1)

        # The ledger: the task names the model, every unit was claimed, and the royalty was paid per claimed unit.
        task = client.state.tasks[task_id]
        assert (task.status, task.outcome, task.claimed_units) == (TaskStatus.SETTLED, TaskOutcome.PAID, ITEMS)
        assert task.model_id == ident and task.royalty_per_unit == ROYALTY
        view = roles.view(task_id)
        assert view.model_id == ident and view.royalty_per_unit == ROYALTY
        claims = claims_of(client, task_id, task.assign_height, task.settled_height)
        assert claims == [K, ITEMS]
        await wait_for(lambda: provider.chain.height >= client.chain.height, 120, nodes=everyone)
        state = client.state
        price = task.unit_price
        cut = sum(n * price * PARAMS.protocol_fee_bps // BPS for n in (K, ITEMS - K))
        fees_c0 = (state.get_account(c0).nonce - c0_nonce) * PARAMS.min_fee
        fees_p0 = (state.get_account(p0).nonce - p0_nonce) * PARAMS.min_fee
        # c0 paid price + royalty per claimed unit; p0 got the price (less the protocol's cut, which the royalty
        # does not bear) as the provider and the royalty per claimed unit as the model's owner.
        assert state.get_balance(c0) == c0_before - ITEMS * (price + ROYALTY) - fees_c0
        assert state.get_balance(p0) == p0_before + ITEMS * (price + ROYALTY) - cut - fees_p0
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_disputed_item_of_a_stream_task_by_model_is_recomputed_from_the_bundle_by_the_verifier(
        tmp_path: Path) -> None:
    # p0 signs wrong outputs (fault drill); p1 prices itself out of the auction, so it can only be drawn to verify.
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    items = np.random.default_rng(4).standard_normal((K, 4)).astype(np.float32)
    params = replace(PARAMS, audit_window=40)  # the verifier fetches the bundle, loads the model and attests
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(
            nursery, tmp_path, params,
            provider=ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K,
                                    fault="wrong_result"),
            verifiers={"p1": ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10**12)})
        provider, verifier, client = nodes["p0"], nodes["p1"], nodes["c0"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None and verifier.roles_driver is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=ROYALTY))
        await wait_for(lambda: all(ident in n.state.models for n in (client, provider, verifier)), 120,
                       nodes=everyone)
        spec = make_model_spec(ident, {}, None, kernel="stream_infer", device="cpu", memory_bytes=256 << 20,
                               seconds=30)
        # More units than items: the task stays ASSIGNED (disputable) after the session.
        task_id = await roles.submit(SubmitRequest(
            spec=spec, inputs={ITEMS_INPUT: items}, max_unit_price=5_000, units=3 * K, bid_window=6,
            audit_rate_bps=0, kind="stream"))
        record = roles.clients[task_id]
        await wait_for(lambda: record.outputs is not None or record.closed.is_set(), 400, nodes=everyone)
        assert record.outputs is not None, f"stream failed: {record.stage} ({record.detail})"
        assert client.state.tasks[task_id].provider == net.address("p0")

        wrong = record.outputs["outputs"][1]
        assert not np.allclose(wrong, model.predict(items[1:2], verbose=0)[0], rtol=1e-3)
        await roles.dispute_stream_item(task_id, 1, "output 1 is not the model's")
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "fraud", (record.outcome, record.detail)
        task = client.state.tasks[task_id]
        assert (task.status, task.outcome) == (TaskStatus.SETTLED, TaskOutcome.FRAUD)
        assert [(a.verifier, a.verdict) for a in task.attestations] == [(net.address("p1"), AuditVerdict.FAIL)]
        assert verifier.roles_driver.counters["verifications"] == 1  # p1 recomputed the item on its own runtime
        assert verifier.roles_driver.model_cache.fetches == 1  # from the bundle it fetched, not from any spec
        nursery.cancel_scope.cancel()
