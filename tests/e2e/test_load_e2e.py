"""Concurrent load on real node processes: 64 tasks from two clients at once, every one paid, every coin accounted.

A devnet of 4 validators, 2 providers and 2 clients. Both clients post 32
tasks each in one ``POST /tasks/batch`` at the same moment, so the market
runs 64 auctions at once, each provider queues work for its slot, and the
ledger carries blocks of dozens of transactions. Then every task must end
paid with its result in the client's hands (checked against NumPy), every
node must agree on the books, and each account must have moved by exactly
what its tasks and fees say.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from devnet.demo import wait_providers_ready
from devnet.launcher import DevnetSpec, NodeRecord
from ledger.params import Params
from p2pgpu.api.client import ApiClient
from p2pgpu.api.types import ApiError, NotReady, SubmitRequest
from p2pgpu.config import ClientConfig, ProviderConfig

from .conftest import TrackedDevnet, devnet_processes
from .helpers import account, get_json, height, live, matmul_job, on_every_node, wait_until

pytestmark = pytest.mark.slow

PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=60, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
SPEC = DevnetSpec(
    validators=4, providers=2, clients=2, block_interval=0.5, params=PARAMS,
    provider_configs={"p0": ProviderConfig(device="cpu", unit_cost=10),
                      "p1": ProviderConfig(device="cpu", unit_cost=10)},
    client_config=ClientConfig(enough_bids=1),
)
PER_CLIENT = 32
SETTLE_S = 300.0


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedDevnet]:
    with devnet_processes(tmp_path_factory.mktemp("load") / "devnet", SPEC) as devnet:
        devnet.wait_finalized(2, timeout=120)
        yield devnet


def _views(client: NodeRecord, ids: list[bytes]) -> list:
    with ApiClient(client.api_url, timeout=30.0) as api:
        return [api.task(t) for t in ids]


def test_64_concurrent_tasks_from_two_clients_all_settle_paid_and_the_books_balance(net: TrackedDevnet) -> None:
    wait_providers_ready(net.manifest, timeout=240.0)
    clients = [net.manifest.node("c0"), net.manifest.node("c1")]
    providers = [net.manifest.node("p0"), net.manifest.node("p1")]
    accounts = {r.name: r.address for r in (*clients, *providers)}
    start = height(clients[0])
    before = on_every_node(live(net), start, lambda rec: {n: account(rec, a) for n, a in accounts.items()})["c0"]

    jobs = {c.name: [matmul_job(32, seed=100 * i + j) for j in range(PER_CLIENT)] for i, c in enumerate(clients)}
    ids: dict[str, list[bytes]] = {}
    for c in clients:  # one batch each, back to back: 64 auctions open at once
        with ApiClient(c.api_url, timeout=60.0) as api:
            answers = api.submit_many([SubmitRequest(spec=s, inputs=x, max_unit_price=1_000, bid_window=60,
                                                     audit_rate_bps=0) for s, x in jobs[c.name]])
        refused = [a for a in answers if isinstance(a, ApiError)]
        assert not refused, [(e.code, e.message) for e in refused[:3]]
        ids[c.name] = [a for a in answers if isinstance(a, bytes)]
    assert len(set(ids["c0"]) | set(ids["c1"])) == 2 * PER_CLIENT

    def all_settled() -> bool:
        return all(v.stage == "settled" for c in clients for v in _views(c, ids[c.name]))

    wait_until(all_settled, timeout=SETTLE_S, what="all 64 tasks settled", interval=1.0)
    views = {c.name: _views(c, ids[c.name]) for c in clients}
    unpaid = [(v.task_id.hex()[:8], v.outcome, v.detail) for vs in views.values() for v in vs if v.outcome != "paid"]
    assert not unpaid, unpaid

    def results_in_hand() -> bool:
        for c in clients:
            with ApiClient(c.api_url, timeout=30.0) as api:
                for (_, x), t in zip(jobs[c.name], ids[c.name], strict=True):
                    try:
                        got = api.task_result(t)
                    except NotReady:
                        return False
                    np.testing.assert_allclose(got["c"], x["a"] @ x["b"], rtol=1e-4, atol=1e-4)
        return True

    wait_until(results_in_hand, timeout=120.0, what="every paid result in its client's hands", interval=1.0)

    # once the clients stop signing (fillers may still replace Assigns that lost a race), every node holds
    # the same block at a common height, the same accounts and the same conserved books
    seen: list[dict] = []

    def quiet() -> dict | None:
        end = max(height(c) for c in clients) + 1
        reads = on_every_node(live(net), end, lambda rec: {n: account(rec, a) for n, a in accounts.items()})
        same = all(r == reads["c0"] for r in reads.values()) and seen and seen[-1] == reads["c0"]
        seen.append(reads["c0"])
        return reads if same else None

    after = wait_until(quiet, timeout=120.0, what="accounts settled and equal on every node", interval=2.0)
    end = max(height(c) for c in clients)
    books = on_every_node(live(net), end, lambda rec: get_json(rec, "/ledger/supply"))
    assert all(b["conserved"] for b in books.values()), books
    assert len({b["total"] for b in books.values()}) == 1
    now = after["c0"]
    fees = _fees_paid(clients[0], start + 1, end, {a: n for n, a in accounts.items()})
    prices = {c.name: sum(v.unit_price for v in views[c.name]) for c in clients}
    for c in clients:  # paid what its tasks cost, plus the fee of every transaction it signed
        assert before[c.name]["balance"] - now[c.name]["balance"] == prices[c.name] + fees[c.name], c.name
    earned = {p.name: 0 for p in providers}
    for vs in views.values():
        for v in vs:
            name = next(p.name for p in providers if p.address == v.provider.hex())
            earned[name] += v.unit_price - v.unit_price * PARAMS.protocol_fee_bps // 10_000
    for p in providers:  # paid its prices less the protocol's cut, minus its own fees
        assert now[p.name]["balance"] - before[p.name]["balance"] == earned[p.name] - fees[p.name], p.name


def _fees_paid(rec: NodeRecord, first: int, last: int, names: dict[str, str]) -> dict[str, int]:
    """The fees each named account paid in blocks ``first..last`` (fillers that replace a transaction pay more)."""
    paid = {name: 0 for name in names.values()}
    for h in range(first, last + 1):
        for tx in get_json(rec, f"/ledger/blocks/{h}")["transactions"]:
            sender = names.get(tx["body"]["sender"])
            if sender is not None:
                paid[sender] += int(tx["body"]["fee"])
    return paid
