"""Streaming sessions over a real ledger: receipts every K items, serving stops without them, claims settle."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.spec import make_spec
from ledger.params import BPS
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import Attest, AuditVerdict, StreamClaim, StreamOutput, TaskKind
from p2pgpu.market import (
    AbandonSession,
    ClaimRefused,
    ClientConfig,
    ClientStream,
    CloseSession,
    CommandStream,
    FetchStreamItem,
    JobPhase,
    OpenStream,
    PricingPolicy,
    ProviderConfig,
    ProviderStream,
    Report,
    RetryClaim,
    SendReceipt,
    ServeStream,
    ServeStreamItem,
    StreamBackpressure,
    StreamError,
    StreamFault,
    SubmitTx,
    sign_stream_output,
)
from p2pgpu.market.results import item_hash
from tests.kernels.helpers import dense_model

from .sim import TEST_PARAMS, MarketSim

K = 3
UNITS = 10


def model(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """The stream's model in NumPy (the kernel runtime's stand-in): one Dense layer with ReLU."""
    return np.maximum(x @ weights[0] + weights[1], 0).astype(np.float32)


def start_stream(sim: MarketSim, exec_blocks: int = 12):
    role = sim.add_provider("p0", config=ProviderConfig(receipt_every=K))
    inputs, weights = dense_model(4, [(2, "relu")])
    spec = make_spec("stream_infer", 1, {}, inputs)
    config = ClientConfig(bid_window=4, exec_blocks=exec_blocks, audit_rate_bps=0, receipt_every=K)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, kind=TaskKind.STREAM, units=UNITS, config=config)
    sim.run_until(lambda: role.phase(task.task_id) is JobPhase.STREAMING)
    (opened,) = sim.logs["task:" + task.task_id.hex()].of(OpenStream)
    (served,) = sim.logs["p0"].of(ServeStream)
    client_stream, provider_stream = opened.session, served.session
    assert isinstance(client_stream, ClientStream) and isinstance(provider_stream, ProviderStream)
    assert provider_stream is role.stream(task.task_id)
    return role, task, weights, client_stream, provider_stream


def exchange(sim: MarketSim, cs: ClientStream, ps: ProviderStream, weights, x: np.ndarray,
             forward_receipts: bool = True) -> list[SendReceipt]:
    """One item through both halves, as the stream transport would carry it."""
    cs.next_item(x)
    index = ps.accept_item(x)
    y = model(x, weights)
    receipts = [a for a in cs.on_output(y, ps.sign_output(index, y)) if isinstance(a, SendReceipt)]
    if forward_receipts:
        for r in receipts:
            sim.route("p0", ps.on_receipt(r.receipt))
    return receipts


def test_receipts_every_k_items_and_claims_settle() -> None:
    sim = MarketSim(providers=("p0",))
    before_client, before_provider = sim.balance("c0"), sim.balance("p0")
    role, task, weights, cs, ps = start_stream(sim)
    price = sim.task(task.task_id).unit_price
    rng = np.random.default_rng(1)
    receipt_units = []
    for _ in range(UNITS):
        receipt_units += [r.receipt.receipt.units for r in exchange(sim, cs, ps, weights,
                                                                      rng.standard_normal(4).astype(np.float32))]
        sim.step()
    assert receipt_units == [3, 6, 9]
    assert sim.task(task.task_id).claimed_units == 9  # claims at 3, 6 and 9 landed
    (last,) = cs.close()
    assert last.receipt.receipt.units == UNITS
    sim.route("p0", ps.on_receipt(last.receipt))
    sim.route("p0", ps.close())
    sim.run_until(lambda: task.closed)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.outcome == TaskOutcome.PAID and ledger_task.claimed_units == UNITS
    claims = [a for a in sim.logs["p0"].actions if isinstance(a, SubmitTx) and isinstance(a.body, StreamClaim)]
    assert [c.body.receipt.receipt.units for c in claims] == [3, 6, 9, 10]
    paid = sum((u - p) * price - (u - p) * price * TEST_PARAMS.protocol_fee_bps // BPS
               for p, u in [(0, 3), (3, 6), (6, 9), (9, 10)])
    assert sim.balance("p0") == before_provider + paid - len(claims)  # one fee per claim; collateral back
    assert sim.balance("c0") == before_client - UNITS * price - 2  # PostTask and Assign fees; audit fee back
    assert len(cs.evidence) == UNITS and sim.tx_rejects == []


def test_provider_stops_serving_when_receipts_stop_and_claims_what_it_holds() -> None:
    sim = MarketSim(providers=("p0",))
    before_client = sim.balance("c0")
    role, task, weights, cs, ps = start_stream(sim, exec_blocks=8)
    price = sim.task(task.task_id).unit_price
    x = np.ones(4, np.float32)
    for _ in range(K):
        exchange(sim, cs, ps, weights, x)  # first receipt (3 units) reaches the provider
    for _ in range(K):
        exchange(sim, cs, ps, weights, x, forward_receipts=False)  # the client stops paying
    assert ps.unreceipted == K and not ps.can_serve()
    with pytest.raises(StreamBackpressure, match="waiting for a receipt"):
        ps.accept_item(x)
    assert ps.served == 2 * K  # at most K items went unpaid
    sim.run_until(lambda: task.closed)  # the provider closes near the deadline and claims its latest receipt
    ledger_task = sim.task(task.task_id)
    assert ledger_task.outcome == TaskOutcome.PAID and ledger_task.claimed_units == K
    assert sim.balance("c0") == before_client - K * price - 2  # the rest of the escrow came back


def test_client_stops_sending_when_the_provider_stops_answering() -> None:
    sim = MarketSim(providers=("p0",))
    _, _, _, cs, _ = start_stream(sim)
    for _ in range(K):
        cs.next_item(np.zeros(4, np.float32))
    assert not cs.can_send()
    with pytest.raises(StreamBackpressure, match="stopped answering"):
        cs.next_item(np.zeros(4, np.float32))


def test_bad_output_signature_ends_the_session_and_signed_outputs_are_dispute_evidence() -> None:
    sim = MarketSim(providers=("p0", "p1", "p2"))
    sim.add_provider("p1", pricing=PricingPolicy(cost_per_second=10_000))  # verifiers, priced out of the bid
    sim.add_provider("p2", pricing=PricingPolicy(cost_per_second=10_000))
    role, task, weights, cs, ps = start_stream(sim)
    x = np.ones(4, np.float32)
    exchange(sim, cs, ps, weights, x)
    # The next output comes signed by a key that is not the provider's.
    cs.next_item(x)
    index = ps.accept_item(x)
    y = model(x, weights)
    genuine = ps.sign_output(index, y)
    forged = sign_stream_output(sim.network.key("p1"), sim.chain_id, genuine.output)
    with pytest.raises(StreamFault, match="not the assigned provider"):
        cs.on_output(y, forged)
    with pytest.raises(StreamFault, match="session stopped"):
        cs.next_item(x)
    # A tampered output (signed hash differs from the bytes) is refused the same way.
    other = ClientStream(key=sim.network.key("c0"), chain_id=sim.chain_id, task_id=task.task_id,
                         provider=sim.address("p0"), units=UNITS)
    other_ps = ProviderStream(key=sim.network.key("p0"), chain_id=sim.chain_id, task_id=task.task_id,
                              client=sim.address("c0"), units=UNITS)
    other.next_item(x)
    with pytest.raises(StreamFault, match="does not hash to what the provider signed"):
        other.on_output(y + 1, other_ps.sign_output(other_ps.accept_item(x), y))
    # The valid signed output kept from item 0 goes into a Dispute the ledger accepts.
    evidence = cs.evidence[0]
    sim.route("c0", task.dispute_stream_item(evidence, "output looks wrong"), task)
    sim.step()
    ledger_task = sim.task(task.task_id)
    assert ledger_task.status == TaskStatus.AUDITING and ledger_task.disputed_item == evidence.output
    fetches = [a for n in ("p1", "p2") for a in sim.logs[n].of(FetchStreamItem)]
    assert fetches and all(f.input_hash == evidence.output.input_hash for f in fetches)


def test_stream_receipt_checks() -> None:
    sim = MarketSim(providers=("p0",))
    _, task, weights, cs, ps = start_stream(sim)
    x = np.ones(4, np.float32)
    receipts = []
    for _ in range(K):
        receipts += exchange(sim, cs, ps, weights, x, forward_receipts=False)
    from ledger.transactions import SignedReceipt, StreamReceipt
    from p2pgpu.market import sign_receipt

    (r,) = receipts
    assert ps.on_receipt(r.receipt)  # claim at K
    assert ps.on_receipt(r.receipt) == []  # duplicate: cumulative receipts only move forward
    too_many = sign_receipt(sim.network.key("c0"), sim.chain_id, StreamReceipt(task.task_id, 50))
    with pytest.raises(StreamFault, match="only 3 were served"):
        ps.on_receipt(too_many)
    stranger = sign_receipt(sim.network.key("p0"), sim.chain_id, StreamReceipt(task.task_id, 2))
    with pytest.raises(StreamFault, match="not signed by the task's client"):
        ps.on_receipt(stranger)
    forged = SignedReceipt(receipt=StreamReceipt(task.task_id, 3), public_key=r.receipt.public_key,
                           signature=bytes(64))
    with pytest.raises(StreamFault, match="bad client signature"):
        ps.on_receipt(forged)
    full = ProviderStream(key=sim.network.key("p0"), chain_id=sim.chain_id, task_id=task.task_id,
                          client=sim.address("c0"), units=1, receipt_every=5)
    full.accept_item(x)
    with pytest.raises(StreamError, match="cap of 1 units"):
        full.accept_item(x)
    assert StreamOutput  # the record the signatures cover


def test_a_client_with_a_longer_receipt_interval_receipts_every_k_of_the_provider() -> None:
    sim = MarketSim(providers=("p0",))
    _, task, weights, _, ps = start_stream(sim)  # the provider's K is 3
    cs = ClientStream(key=sim.network.key("c0"), chain_id=sim.chain_id, task_id=task.task_id,
                      provider=sim.address("p0"), units=UNITS, receipt_every=8)
    cs.accept_terms(ps.receipt_every, ps.units, ps.served)
    assert (cs.receipt_every, cs.max_in_flight) == (K, K)
    x = np.ones(4, np.float32)
    receipts = [r.receipt.receipt.units for _ in range(2 * K) for r in exchange(sim, cs, ps, weights, x)]
    assert receipts == [K, 2 * K] and ps.can_serve()  # never stalls on a receipt the provider waits for
    shorter = ClientStream(key=sim.network.key("c0"), chain_id=sim.chain_id, task_id=task.task_id,
                           provider=sim.address("p0"), units=UNITS, receipt_every=2)
    shorter.accept_terms(K, UNITS, 0)
    assert shorter.receipt_every == 2  # receipting more often than K is the client's own choice
    with pytest.raises(StreamError, match="receipt interval of 0"):
        shorter.accept_terms(0, UNITS, 0)
    with pytest.raises(StreamError, match="ready for 9 units from item 0"):
        shorter.accept_terms(K, 9, 0)


# ----------------------------------------------------------------- item disputes: a verifier recomputes one item


def numpy_stream_verify(spec, inputs, claimed):
    """stream_infer's verify with the model in NumPy (the kernel's own re-runs it in TensorFlow)."""
    from kernels.kernel import compare_outputs

    weights = [inputs["weight_000"], inputs["weight_001"]]
    return compare_outputs(claimed, {"y": model(inputs["x"], weights)}, 1e-4)


def disputed_stream(honest: bool, client_serves_item: bool = True):
    """A stream whose third output is disputed; the provider signed ``y + 1`` for it unless ``honest``."""
    sim = MarketSim(providers=("p0", "p1", "p2"))
    for name in ("p1", "p2"):  # verifiers, priced out of the bid
        sim.add_provider(name, pricing=PricingPolicy(cost_per_second=10_000))
    sim.verifiers["stream_infer"] = numpy_stream_verify
    role, task, weights, cs, ps = start_stream(sim, exec_blocks=30)
    rng = np.random.default_rng(4)
    for _ in range(2):
        exchange(sim, cs, ps, weights, rng.standard_normal(4).astype(np.float32))
    x = rng.standard_normal(4).astype(np.float32)
    cs.next_item(x)
    index = ps.accept_item(x)
    y = model(x, weights) + (0 if honest else 1)
    cs.on_output(y, ps.sign_output(index, y))  # validly signed: only recomputing shows it wrong
    evidence = cs.evidence[index]
    if client_serves_item:  # what the node does on a dispute: keep both tensors as blobs named by item hash
        sim.items[item_hash(x)], sim.items[item_hash(y)] = x, y
    before = {n: sim.balance(n) for n in ("c0", "p0")}
    sim.route("c0", task.dispute_stream_item(evidence, "output 2 looks wrong"), task)
    sim.step()
    audited = sim.task(task.task_id)
    assert audited.status == TaskStatus.AUDITING and audited.disputed_item == evidence.output
    drawn = [n for n in ("p1", "p2") if sim.address(n) in audited.verifiers]
    assert len(drawn) == len(audited.verifiers) == TEST_PARAMS.verifier_count
    return sim, task, drawn, before


def attestations(sim: MarketSim, drawn: list[str]) -> list[Attest]:
    return [a.body for n in drawn for a in sim.logs[n].of(SubmitTx) if isinstance(a.body, Attest)]


def test_a_disputed_wrong_item_is_recomputed_by_the_verifiers_and_slashes_the_provider() -> None:
    sim, task, drawn, before = disputed_stream(honest=False)
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.FRAUD
    (served,) = sim.logs["task:" + task.task_id.hex()].of(ServeStreamItem)
    assert set(served.peers) == {sim.address(n) for n in drawn}
    assert (served.input_hash, served.output_hash) == (final.disputed_item.input_hash,
                                                       final.disputed_item.output_hash)
    assert all(len(sim.logs[n].of(FetchStreamItem)) == 1 for n in drawn)
    attests = attestations(sim, drawn)
    assert len(attests) == len(drawn) and all(a.verdict == AuditVerdict.FAIL for a in attests)
    assert all("error" in a.detail for a in attests), [a.detail for a in attests]
    assert sim.balance("c0") > before["c0"]  # escrow, bond and part of the collateral came back
    assert sim.chain.state.providers[sim.address("p0")].failed == 1


def test_a_disputed_correct_item_passes_and_the_stream_goes_on() -> None:
    sim, task, drawn, before = disputed_stream(honest=True)
    sim.run_until(lambda: sim.task(task.task_id).status == TaskStatus.ASSIGNED)
    back = sim.task(task.task_id)
    assert back.disputed_item is None and back.dispute_bond == 0
    attests = attestations(sim, drawn)
    assert len(attests) == len(drawn) and all(a.verdict == AuditVerdict.PASS for a in attests)
    assert sim.balance("c0") <= before["c0"] - TEST_PARAMS.dispute_bond  # the bond went to the provider


def test_a_client_that_cannot_produce_the_disputed_item_loses_the_dispute() -> None:
    sim, task, drawn, _ = disputed_stream(honest=False, client_serves_item=False)
    sim.run_until(lambda: sim.task(task.task_id).status != TaskStatus.AUDITING)
    back = sim.task(task.task_id)
    assert back.status == TaskStatus.ASSIGNED and back.outcome != TaskOutcome.FRAUD  # nobody attested fail
    assert attestations(sim, drawn) == []
    reports = [a.message for n in drawn for a in sim.logs[n].of(Report)]
    assert any("cannot fetch stream-item" in m and "abstaining" in m for m in reports), reports


def test_a_provider_session_carries_out_each_command_of_its_role() -> None:
    """``ProviderStream.apply``: what the stream shell's session task does with the role's ``CommandStream``."""
    sim = MarketSim(providers=("p0",))
    _, task, weights, cs, ps = start_stream(sim)
    x = np.ones(4, np.float32)
    for _ in range(K):
        exchange(sim, cs, ps, weights, x)  # a receipt for K units: claimed at once (claim_every = K)
    exchange(sim, cs, ps, weights, x, forward_receipts=False)
    assert ps.claimed == K and ps.served == K + 1
    ledger_task = sim.task(task.task_id)
    assert ps.apply(RetryClaim(ledger_task)) == []  # nothing new receipted: nothing to claim
    (report,) = ps.apply(ClaimRefused(0, "nonce too low"))
    assert isinstance(report, Report) and "StreamClaim refused (nonce too low)" in report.message and ps.claimed == 0
    assert ps.claim_due(ledger_task)
    (retry,) = ps.apply(RetryClaim(ledger_task))
    assert isinstance(retry, SubmitTx) and retry.body.receipt.receipt.units == K and ps.claimed == K
    assert ps.apply(CloseSession()) == [] and ps.closed  # closed; everything receipted is claimed
    assert ps.apply(CloseSession()) == []  # a second close (the role asked again before the first landed)
    ps.abandon()
    assert ps.apply(AbandonSession()) == [] and ps.closed


def test_the_provider_role_closes_its_stream_through_a_command_and_never_changes_it() -> None:
    sim = MarketSim(providers=("p0",))
    role, task, weights, cs, ps = start_stream(sim, exec_blocks=8)
    x = np.ones(4, np.float32)
    for _ in range(K):
        exchange(sim, cs, ps, weights, x)
    sim.run_until(lambda: task.closed)
    commands = [a.command for a in sim.logs["p0"].actions if isinstance(a, CommandStream)]
    assert CloseSession() in commands  # near the deadline: the session's owner closes it and claims
    assert ps.closed and sim.task(task.task_id).claimed_units == K
