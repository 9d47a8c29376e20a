"""Live stream sessions through real nodes (real py-libp2p hosts over loopback, consensus, a warm TF model): a
stream task posted without items, fed by many concurrent callers, as an inference gateway would use it.

By model, one sample per item and then a batch (``rows``) per item: 40 concurrent ``infer`` calls answered as
local Keras answers them, the cap ends a session (``SessionExhausted``), ``aclose`` ends one with its last receipt
claimed and the task paid. A task no provider takes raises ``NoProviderError`` naming the declines; a provider
stopped mid-traffic fails every call still waiting with ``SessionLost`` (none hangs, none gets a wrong answer).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from kernels.bundle import encode_bundle, load_model_file, model_id
from kernels.bymodel import make_model_spec
from kernels.spec import make_spec
from ledger.state import TaskOutcome, TaskStatus
from p2pgpu.api.types import PushModelRequest, SubmitRequest
from p2pgpu.config import ProviderConfig
from p2pgpu.node import Node
from p2pgpu.streams import LiveSession, NoProviderError, SessionExhausted, SessionLost
from tests.kernels.helpers import dense_forward, dense_model

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for
from .test_stream_e2e import PARAMS, claims_of

K = 4
CALLS = 40
ROYALTY = 3


async def concurrently(live: LiveSession, items: list[np.ndarray]) -> list[np.ndarray | BaseException]:
    """``infer`` every item at once, each from its own task; what each call got (an answer or its SessionLost)."""
    got: list[np.ndarray | BaseException] = [np.zeros(0)] * len(items)

    async def call(i: int) -> None:
        try:
            got[i] = await live.infer(items[i])
        except SessionLost as exc:
            got[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(items)):
            nursery.start_soon(call, i)
    return got


async def settled(node: Node, task_id: bytes, everyone: list[Node]) -> None:
    record = node.client_role.clients[task_id]  # type: ignore[union-attr]
    with trio.move_on_after(400):
        await record.closed.wait()
    assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
    assert record.outcome == "paid", (record.outcome, record.detail)


@pytest.mark.slow
async def test_live_sessions_by_model_answer_concurrent_callers_as_keras_does_one_sample_or_a_batch_per_item(
        tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(9)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    rng = np.random.default_rng(11)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=ProviderConfig(
            max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K))
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None and provider.roles_driver is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=ROYALTY))
        await wait_for(lambda: all(ident in n.state.models for n in (client, provider)), 120, nodes=everyone)

        # -- one sample per item: 40 concurrent callers, then the cap ---------------------------------------
        spec = make_model_spec(ident, {}, None, kernel="stream_infer", device="cpu", memory_bytes=256 << 20,
                               seconds=30)
        units = CALLS + 4
        live = await roles.open_live_session(SubmitRequest(
            spec=spec, inputs={}, max_unit_price=5_000, units=units, bid_window=6, audit_rate_bps=0, kind="stream"),
            start_timeout=300)
        assert (live.units, live.remaining, live.receipt_every) == (units, units, K)
        assert live.provider == net.address("p0") and client.state.tasks[live.task_id].provider == live.provider
        items = [rng.standard_normal(4).astype(np.float32) for _ in range(CALLS)]
        with trio.fail_after(120):
            got = await concurrently(live, items)
        expected = model.predict(np.stack(items), verbose=0)
        for i in range(CALLS):
            assert isinstance(got[i], np.ndarray), got[i]
            np.testing.assert_allclose(got[i], expected[i], rtol=1e-4, atol=1e-5)
        with trio.fail_after(60):
            rest = await concurrently(live, items[:4])  # the last 4 units
            assert all(isinstance(r, np.ndarray) for r in rest)
            with pytest.raises(SessionExhausted, match=f"cap of {units} units is used up"):
                await live.infer(items[0])
            assert await live.wait_ended() == "exhausted" and live.remaining == 0
        await settled(client, live.task_id, everyone)
        task = client.state.tasks[live.task_id]
        assert (task.status, task.outcome, task.claimed_units) == (TaskStatus.SETTLED, TaskOutcome.PAID, units)
        assert claims_of(client, live.task_id, task.assign_height, task.settled_height)[-1] == units
        stats = provider.roles_driver.streams.stats[live.task_id]
        assert (stats.items, stats.model_loads) == (units, 1)

        # -- a batch of 1..rows samples per item (one unit each), ended by aclose -------------------------------
        rows = 4
        spec = make_model_spec(ident, {"rows": rows}, None, kernel="stream_infer", device="cpu",
                               memory_bytes=256 << 20, seconds=30)
        live = await roles.open_live_session(SubmitRequest(
            spec=spec, inputs={}, max_unit_price=5_000, units=CALLS + 10, bid_window=6, audit_rate_bps=0,
            kind="stream"), start_timeout=300)
        batches = [rng.standard_normal((1 + i % rows, 4)).astype(np.float32) for i in range(CALLS)]
        with trio.fail_after(120):
            got = await concurrently(live, batches)
        for batch, out in zip(batches, got):
            assert isinstance(out, np.ndarray) and out.shape == (batch.shape[0], 2), out
            np.testing.assert_allclose(out, model.predict(batch, verbose=0), rtol=1e-4, atol=1e-5)
        with trio.fail_after(60):
            await live.aclose()
        assert live.ended == "closed" and live.remaining == 10
        # the last receipt (all 40 answers) is claimed on the ledger: the provider is paid for every unit it served
        # (the unused 10 go back to the client when the task's window ends, as for any stream task)
        await wait_for(lambda: client.state.tasks[live.task_id].claimed_units == CALLS, 120, nodes=everyone)
        assert provider.roles_driver.streams.stats[live.task_id].items == CALLS
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_live_session_no_provider_takes_names_why_and_one_whose_provider_stops_loses_every_waiting_call(
        tmp_path: Path) -> None:
    layers = [(16, "relu"), (3, "softmax")]
    model_inputs, weights = dense_model(8, layers, seed=4)
    spec = make_spec("stream_infer", 1, {}, model_inputs, device="cpu", memory_bytes=256 << 20, seconds=30)
    scopes: dict[str, trio.CancelScope] = {}
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, scopes=scopes, provider=ProviderConfig(
            max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K))
        client = nodes["c0"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None and client.roles_driver is not None

        # A price below every provider's cost: the task expires, and the error says who declined and why.
        with pytest.raises(NoProviderError) as info:
            await roles.open_live_session(SubmitRequest(
                spec=spec, inputs=model_inputs, max_unit_price=1, units=10, bid_window=6, audit_rate_bps=0,
                kind="stream"), start_timeout=300)
        message = str(info.value)
        assert "no provider took the task" in message and "0 bid(s)" in message, message
        assert "1 decline(s)" in message and "price_below_cost" in message, message
        assert roles.clients[info.value.task_id].outcome == "expired"

        # A session whose provider stops mid-traffic: every call still waiting raises SessionLost.
        streams = client.roles_driver.streams
        streams.config = replace(streams.config, answer_timeout=20.0)
        live = await roles.open_live_session(SubmitRequest(
            spec=spec, inputs=model_inputs, max_unit_price=500, units=CALLS * 5, bid_window=6, audit_rate_bps=0,
            kind="stream"), start_timeout=300)
        items = [np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(CALLS * 5)]
        got: list[np.ndarray | BaseException] = []

        async def traffic() -> None:
            got.extend(await concurrently(live, items))

        with trio.fail_after(120):  # none hangs
            async with trio.open_nursery() as inner:
                inner.start_soon(traffic)
                while live.answered < 3:
                    await trio.sleep(0.001)
                scopes["p0"].cancel()  # the provider node stops
        lost = [r for r in got if isinstance(r, BaseException)]
        answered = [(i, r) for i, r in enumerate(got) if isinstance(r, np.ndarray)]
        assert lost and all(isinstance(r, SessionLost) and r.task_id == live.task_id for r in lost)
        assert live.lost and live.ended and len(answered) + len(lost) == len(items)
        for i, out in answered:  # nobody got a wrong answer
            np.testing.assert_allclose(out, dense_forward(items[i][None], layers, weights)[0], rtol=1e-4, atol=1e-5)
        with pytest.raises(SessionLost):
            await live.infer(items[0])
        with trio.fail_after(10):
            await live.aclose()  # a lost session closes without error
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_disputed_batch_of_a_live_session_is_recomputed_as_that_batch_and_the_provider_slashed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2pgpu.roles")
    # p0 signs wrong outputs (fault drill); p1 prices itself out of the auction, so it can only be drawn to verify.
    layers = [(16, "relu"), (3, "softmax")]
    model_inputs, weights = dense_model(8, layers, seed=5)
    spec = make_spec("stream_infer", 1, {"rows": 3}, model_inputs, device="cpu", memory_bytes=256 << 20, seconds=30)
    params = replace(PARAMS, audit_window=40)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(
            nursery, tmp_path, params,
            provider=ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K,
                                    fault="wrong_result"),
            verifiers={"p1": ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10**12)})
        client, verifier = nodes["c0"], nodes["p1"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None and verifier.roles_driver is not None
        live = await roles.open_live_session(SubmitRequest(
            spec=spec, inputs=model_inputs, max_unit_price=5_000, units=3 * K, bid_window=6, audit_rate_bps=0,
            kind="stream"), start_timeout=300)
        assert live.provider == net.address("p0")
        batch = np.random.default_rng(8).standard_normal((3, 8)).astype(np.float32)
        with trio.fail_after(60):
            index, wrong = await live.infer_indexed(batch)
            for _ in range(K - 1):
                await live.infer(np.random.default_rng(_).standard_normal((2, 8)).astype(np.float32))
        assert wrong.shape == (3, 3) and not np.allclose(wrong, dense_forward(batch, layers, weights), rtol=1e-3)
        # the session goes on (the task stays ASSIGNED, disputable); the item is kept by the client's node
        await roles.dispute_stream_item(live.task_id, index, "batch answered wrongly")
        record = roles.clients[live.task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "fraud", (record.outcome, record.detail)
        task = client.state.tasks[live.task_id]
        assert task.disputed_item is not None and task.disputed_item.index == index
        assert verifier.roles_driver.counters["verifications"] == 1  # p1 re-ran the 3-row batch on its runtime
        # a wrong answer found by re-running the batch, not a re-run that could not start (also a FAIL)
        (said,) = [r.getMessage() for r in caplog.records if "verifier: attesting fail" in r.getMessage()]
        assert "failed to run" not in said and "error" in said, said
        nursery.cancel_scope.cancel()
