"""``POST /models`` entered many times at once, through the real nonce path (TxSender, TxOutbox, Mempool) and a
real ledger (DevChain): every push gets a clear outcome, no nonce is left reserved or in a gap, and the registry
ends consistent.

The registry's rule (``ledger.transition.process_register_model``): a model id is registered once, under one
name@version. So one bundle pushed under two names at once must send one ``RegisterModel``, and the other push is
refused before anything is signed or paid (``model_pending``) -- not sent to burn a fee on a registration the
ledger refuses, nor left to overwrite the first push's record so that its status reads "failed".

The interleaving forced: every push awaits its decode and its blob-store write in worker threads, so all the
pushes started in one nursery pass their first check before any of them sends (a check made only before those
awaits lets them all through). Each test was run against the publisher without the in-flight model-id check
and fails there (two RegisterModels for one id; the first push's status reads "failed").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import trio

from kernels.bundle import decode_bundle, encode_bundle, load_model_file
from ledger.devtools import DevChain, make_dev_network
from ledger.mempool import Mempool
from ledger.params import Params
from ledger.transactions import RegisterModel
from p2pgpu.api.types import ApiError, PushModelRequest
from p2pgpu.blobaccess import BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.market import TxFailed
from p2pgpu.modelpublish import MODELS_ORIGIN, ModelPublisher, registration_cost
from p2pgpu.streams import StreamMetrics
from p2pgpu.txoutbox import TxOutbox
from p2pgpu.txsender import TxSender
from tests.kernels.test_bundle import keras_file


class Node:
    """A pusher's node: a real sender, outbox and mempool over a dev chain."""

    def __init__(self, tmp_path: Path, params: Params) -> None:
        self.chain = DevChain(make_dev_network(clients=("c0",), params=params))
        self.key = self.chain.network.key("c0")
        self.me = self.key.address
        self.pool = Mempool(self.chain.state)
        self.sender = TxSender(self.key, self.chain.state.chain_id, self.pool.add, self.chain.state)
        self.failed: list[TxFailed] = []
        self.outbox = TxOutbox(self.sender, self.pool, failed=self._failed, post_refused=lambda b, e: None,
                               claims=StreamMetrics())
        self.store = BlobStore(tmp_path / "blobs")
        self.publisher = ModelPublisher(store=self.store, access=BlobAccess(lambda task_id, address: None),
                                        outbox=self.outbox, me=self.me, state=lambda: self.chain.state,
                                        available=self.sender.available)
        self.bundle = encode_bundle(load_model_file(keras_file(tmp_path)))

    def _failed(self, origin: object, event: TxFailed) -> None:
        assert origin == MODELS_ORIGIN
        self.failed.append(event)
        self.publisher.tx_failed(event)

    def variant(self, i: int) -> bytes:
        """Another canonical bundle (another model id): the same model with one weight nudged."""
        bundle = decode_bundle(self.bundle)
        weights = list(bundle.weights)
        weights[-1] = (weights[-1] + np.float32(i + 1)).astype(weights[-1].dtype)
        return encode_bundle(dataclasses.replace(bundle, weights=tuple(weights)))

    def produce(self) -> None:
        """A block of everything pending, then what the node does after each block."""
        pending = self.pool.pending(self.me)
        self.chain.produce(pending)
        self.pool.update(self.chain.state, pending)
        self.sender.on_block(self.chain.state)
        self.outbox.on_block(self.chain.state)

    def assert_no_nonce_stranded(self) -> None:
        nonces = self.sender.nonces
        assert nonces.reserved() == frozenset() and nonces.gaps() == []
        assert self.pool.pending(self.me) == [] and nonces.pending_cost() == 0
        assert nonces.base == self.chain.state.get_account(self.me).nonce


async def outcome(node: Node, bundle: bytes, name: str, version: str, results: list[tuple[str, str, str]]) -> None:
    """One push; its outcome recorded as (name@version, model id or "", "pending" or the refusal's code)."""
    try:
        view = await node.publisher.push(PushModelRequest(bundle=bundle, name=name, version=version,
                                                          royalty_per_unit=1))
    except ApiError as exc:
        results.append((f"{name}@{version}", "", exc.code))
        return
    results.append((f"{name}@{version}", view.model_id.hex(), view.status))


def registry_is_consistent(node: Node) -> None:
    """Every registered id is in exactly one name@version, every name@version names its id, names are ours."""
    state = node.chain.state
    assert {mid: (e.name, e.version) for mid, e in state.models.items()} == {
        mid: nv for nv, mid in state.model_versions.items()}
    assert all(e.owner == node.me for e in state.models.values())
    assert set(state.model_names) == {e.name for e in state.models.values()}


def test_one_bundle_pushed_under_many_names_at_once_sends_one_registration(tmp_path: Path) -> None:
    node = Node(tmp_path, Params(epoch_length=8, committee_size=4))
    balance = node.chain.state.get_balance(node.me)
    results: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(outcome, node, node.bundle, f"name{i}", "1", results)

    trio.run(main)
    sent = [r for r in results if r[2] == "pending"]
    assert len(results) == 16 and len(sent) == 1
    assert sorted(code for _, _, code in results if code != "pending") == ["model_pending"] * 15
    (stx,) = node.pool.pending(node.me)
    assert isinstance(stx.body, RegisterModel) and f"{stx.body.name}@{stx.body.version}" == sent[0][0]

    node.produce()
    mid = bytes.fromhex(sent[0][1])
    entry = node.chain.state.models[mid]
    assert f"{entry.name}@{entry.version}" == sent[0][0]
    assert node.publisher.status(mid).status == "registered"
    assert node.chain.state.get_balance(node.me) == balance - registration_cost(node.chain.state)  # one fee
    assert node.failed == [] and node.store.is_pinned(mid)
    registry_is_consistent(node)
    node.assert_no_nonce_stranded()


def test_a_refused_push_of_a_pending_model_may_be_pushed_again_once_the_first_fails(tmp_path: Path) -> None:
    """``model_pending`` lasts only while the first push can still register the id: when its transaction is
    reported failed, the same bundle may be pushed under another name."""
    node = Node(tmp_path, Params(epoch_length=8, committee_size=4))
    results: list[tuple[str, str, str]] = []
    trio.run(outcome, node, node.bundle, "first", "1", results)
    trio.run(outcome, node, node.bundle, "second", "1", results)
    assert [code for _, _, code in results] == ["pending", "model_pending"]
    (stx,) = node.pool.pending(node.me)
    node.publisher.tx_failed(TxFailed(stx.body, "cannot execute: refused"))
    trio.run(outcome, node, node.bundle, "second", "1", results)
    assert results[-1][2] == "pending"


def test_many_concurrent_pushes_of_different_models_each_get_an_outcome_and_strand_no_nonce(tmp_path: Path) -> None:
    """Twenty pushes at once: distinct models under a few names and versions, some name@versions twice, and a
    balance that covers only eight registrations. Each push is sent or refused with a specific code; every sent
    one registers; the nonces are contiguous and none is left reserved or in a gap."""
    cost_budget = 8
    balance = make_dev_network(clients=("c0",)).genesis.accounts[0].balance
    fee = balance // cost_budget - 1  # registration fee + min fee (1): exactly eight fit
    node = Node(tmp_path, Params(epoch_length=8, committee_size=4, model_registration_fee=fee))
    assert node.chain.state.get_balance(node.me) // registration_cost(node.chain.state) == cost_budget
    variants = [node.variant(i) for i in range(20)]
    plan = [(variants[i], f"m{i % 5}", str(i // 5 if i < 15 else i - 15)) for i in range(20)]  # 5 name@v twice
    results: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for bundle, name, version in plan:
                nursery.start_soon(outcome, node, bundle, name, version, results)

    trio.run(main)
    assert len(results) == 20
    codes = sorted(code for _, _, code in results)
    assert set(codes) <= {"pending", "version_taken", "insufficient_funds"}
    sent = [r for r in results if r[2] == "pending"]
    assert len(sent) == cost_budget
    assert len({nv for nv, _, _ in sent}) == len(sent)  # no name@version sent twice
    assert sorted(stx.body.nonce for stx in node.pool.pending(node.me)) == list(range(cost_budget))

    node.produce()
    assert node.failed == []
    for nv, mid, _ in sent:
        view = node.publisher.status(bytes.fromhex(mid))
        assert view.status == "registered" and f"{view.name}@{view.version}" == nv
    assert len(node.chain.state.models) == cost_budget
    assert node.chain.state.get_balance(node.me) < registration_cost(node.chain.state)
    registry_is_consistent(node)
    node.assert_no_nonce_stranded()


@pytest.mark.parametrize("rounds", [3])
def test_pushes_racing_blocks_strand_no_nonce(tmp_path: Path, rounds: int) -> None:
    """Pushes interleaved with blocks landing (the state the second check reads moves between the awaits):
    still one registration per id and per name@version, nothing stranded."""
    node = Node(tmp_path, Params(epoch_length=8, committee_size=4))
    variants = [node.variant(i) for i in range(6)]
    results: list[tuple[str, str, str]] = []

    async def main() -> None:
        for r in range(rounds):
            async with trio.open_nursery() as nursery:
                for i, bundle in enumerate(variants):
                    nursery.start_soon(outcome, node, bundle, f"n{i % 3}", str(r), results)
                nursery.start_soon(outcome, node, node.bundle, f"same{r}", "1", results)
                await trio.sleep(0)
                node.produce()  # lands while the pushes are in their worker threads
            node.produce()

    trio.run(main)
    assert len(results) == rounds * 7
    assert {code for _, _, code in results} <= {"pending", "version_taken", "model_pending", "model_registered"}
    assert node.failed == []
    registry_is_consistent(node)
    for nv, mid, code in results:
        if code == "pending":
            view = node.publisher.status(bytes.fromhex(mid))
            assert view.status == "registered" and f"{view.name}@{view.version}" == nv
    node.assert_no_nonce_stranded()
