"""Every transaction type: valid, and each way it can be invalid (state unchanged).

Tests drive a DevChain: real Ed25519 and BLS signatures, real blocks with
commit certificates, the supply invariant checked after every block.
"""

from __future__ import annotations

import dataclasses

import pytest

from ledger import exceptions as ex
from ledger.devtools import (
    DevChain,
    dev_account_key,
    dev_validator_key,
    sign_bid,
    sign_receipt,
    sign_stream_output,
    sign_transaction,
    sign_vote,
)
from ledger.state import TaskOutcome, TaskStatus, ValidatorStatus
from ledger.transactions import (
    Assign,
    Attest,
    AuditVerdict,
    Bid,
    Bond,
    CancelTask,
    CommitResult,
    Dispute,
    Evidence,
    InputsUnavailable,
    PostTask,
    RegisterProvider,
    RegisterValidator,
    ReopenTask,
    StreamClaim,
    StreamOutput,
    StreamReceipt,
    TaskKind,
    Transfer,
    Unbond,
    compute_task_id,
    registration_message,
    task_terms_hash,
)
from ledger.codec import DecodeError, EncodeError, decode, encode
from ledger.state import Attestation, Task
from ledger.transition import audit_outcome, process_transaction, terms_hash_of_task
from ledger.votes import Vote, VoteStep

FEE = 1
SPEC = b"\x5a" * 32
PASS, FAIL, UNAVAILABLE = AuditVerdict.PASS, AuditVerdict.FAIL, AuditVerdict.UNAVAILABLE


def body(chain: DevChain, name: str, cls, **fields):
    fields.setdefault("fee", FEE)
    fields.setdefault("nonce", chain.nonce(name))
    return cls(sender=chain.network.address(name), **fields)


def tx(chain: DevChain, name: str, cls, **fields):
    return chain.sign(name, body(chain, name, cls, **fields))


def step(chain: DevChain, *txs):
    """Produce one block that must include every tx; check the supply invariant."""
    block, rejected = chain.produce(txs)
    assert not rejected, [str(e) for _, e in rejected]
    assert chain.state.total_supply() == chain.state.genesis_supply + chain.state.minted
    return block


def idle(chain: DevChain, blocks: int) -> None:
    for _ in range(blocks):
        step(chain)


def rejects(chain: DevChain, stx, exc_type, match: str) -> None:
    """``stx`` fails at the next height with ``exc_type`` and leaves the state unchanged."""
    probe = chain.state.copy()
    probe.height += 1
    before = probe.encode()
    with pytest.raises(exc_type, match=match):
        process_transaction(probe, stx)
    assert probe.encode() == before


def bal(chain: DevChain, name: str) -> int:
    return chain.state.get_balance(chain.network.address(name))


def post_task(chain: DevChain, client="c0", *, price=1000, units=1, kind=TaskKind.BATCH, audit=0, window=5, exec_blocks=5):
    t = tx(chain, client, PostTask, kind=kind, spec_hash=SPEC, requirements=b"", max_unit_price=price, units=units,
           bid_window=window, exec_blocks=exec_blocks, audit_rate_bps=audit)
    task_id = compute_task_id(chain.network.address(client), t.body.nonce)
    return t, task_id


def make_bid(chain: DevChain, task_id: bytes, provider="p0", price=800, expiry=None, key_name=None, terms=None):
    if terms is None:
        task = chain.state.tasks.get(task_id)
        terms = terms_hash_of_task(task) if task is not None else bytes(32)
    bid = Bid(task_id=task_id, provider=chain.network.address(provider), unit_price=price, est_seconds=5,
              expiry_height=expiry if expiry is not None else chain.state.height + 10, terms_hash=terms)
    return sign_bid(chain.network.key(key_name or provider), chain.chain_id, bid)


def assigned_task(chain: DevChain, **kw):
    t, task_id = post_task(chain, **kw)
    step(chain, t)
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id)))
    return task_id


# ---------------------------------------------------------------- Transfer


def test_transfer_moves_funds_and_pays_fee(chain):
    c0, c1 = bal(chain, "c0"), bal(chain, "c1")
    step(chain, tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=250))
    assert bal(chain, "c0") == c0 - 250 - FEE
    assert bal(chain, "c1") == c1 + 250
    assert chain.nonce("c0") == 1


def test_transfer_rejections(chain):
    to = chain.network.address("c1")
    rejects(chain, tx(chain, "c0", Transfer, to=to, amount=0), ex.InvalidAmount, "positive")
    rejects(chain, tx(chain, "c0", Transfer, to=to, amount=10**9), ex.InsufficientBalance, "has 1000000")
    rejects(chain, tx(chain, "c0", Transfer, to=to, amount=1, nonce=5), ex.NonceMismatch, "expected 0")
    rejects(chain, tx(chain, "c0", Transfer, to=to, amount=1, fee=0), ex.FeeTooLow, "below the minimum")
    forged = sign_transaction(dev_account_key("c1"), chain.chain_id, body(chain, "c0", Transfer, to=to, amount=1))
    rejects(chain, forged, ex.InvalidSignature, "does not belong to the sender")
    other_chain = sign_transaction(chain.network.key("c0"), b"\x01" * 32, body(chain, "c0", Transfer, to=to, amount=1))
    rejects(chain, other_chain, ex.InvalidSignature, "bad signature")
    good = tx(chain, "c0", Transfer, to=to, amount=1)
    tampered = dataclasses.replace(good, signature=bytes(64))
    rejects(chain, tampered, ex.InvalidSignature, "bad signature")


def test_replayed_transaction_is_rejected(chain):
    t = tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=5)
    step(chain, t)
    rejects(chain, t, ex.NonceMismatch, "expected 1")


# ---------------------------------------------------------------- validators


def register_validator_tx(chain, name="c1", stake=2_000, bls_name=None, pop_name=None, pop_account=None):
    key = dev_validator_key(bls_name or name)
    signer = dev_validator_key(pop_name or bls_name or name)
    account = chain.network.address(pop_account or name)
    pop = signer.sign(registration_message(chain.chain_id, key.public_key, account))
    return tx(chain, name, RegisterValidator, bls_pubkey=key.public_key, proof_of_possession=pop, stake=stake)


def test_register_validator_and_join_committee_at_epoch_end(chain):
    before = bal(chain, "c1")
    step(chain, register_validator_tx(chain, stake=50_000))
    addr = chain.network.address("c1")
    assert chain.state.validators[addr].stake == 50_000
    assert bal(chain, "c1") == before - 50_000 - FEE
    assert addr not in {m.address for m in chain.state.committee.members}
    epoch_length = chain.state.params.epoch_length
    while chain.state.height < epoch_length:
        block = step(chain)
    assert block.header.next_committee is not None
    assert chain.state.committee.epoch == 1
    assert addr in {m.address for m in chain.state.committee.members}


def test_register_validator_rejections(chain):
    rejects(chain, register_validator_tx(chain, "v0"), ex.AlreadyRegistered, "already a validator")
    rejects(chain, register_validator_tx(chain, stake=10), ex.InvalidAmount, "below the minimum")
    rejects(chain, register_validator_tx(chain, pop_name="someone-else"), ex.InvalidSignature, "proof of possession")
    rejects(chain, register_validator_tx(chain, bls_name="v1"), ex.AlreadyRegistered, "BLS public key")
    # a proof made for another account cannot be replayed by this one (front-running a registration)
    rejects(chain, register_validator_tx(chain, bls_name="fresh", pop_account="c0"), ex.InvalidSignature, "and account")
    standard_pop = dev_validator_key("fresh").proof_of_possession()
    replay = tx(chain, "c1", RegisterValidator, bls_pubkey=dev_validator_key("fresh").public_key,
                proof_of_possession=standard_pop, stake=2_000)
    rejects(chain, replay, ex.InvalidSignature, "proof of possession")
    rejects(chain, register_validator_tx(chain, stake=10**8), ex.InsufficientBalance, "needs")


def test_bond_unbond_and_payout(chain):
    addr = chain.network.address("v0")
    stake = chain.state.validators[addr].stake
    step(chain, tx(chain, "v0", Bond, amount=500))
    assert chain.state.validators[addr].stake == stake + 500
    before = bal(chain, "v0")
    step(chain, tx(chain, "v0", Unbond, amount=stake + 500 - 999))  # leaves 999 < minimum 1000
    v = chain.state.validators[addr]
    assert v.stake == 999 and v.status == ValidatorStatus.INACTIVE
    assert len(v.unbonding) == 1
    release = v.unbonding[0].release_height
    while chain.state.height < release:
        step(chain)
    assert chain.state.validators[addr].unbonding == ()
    # proposer fees may also land on v0; the unbonded amount certainly did
    assert bal(chain, "v0") >= before - FEE + stake + 500 - 999
    step(chain, tx(chain, "v0", Bond, amount=1))
    assert chain.state.validators[addr].status == ValidatorStatus.ACTIVE


def test_bond_unbond_rejections(chain):
    rejects(chain, tx(chain, "c0", Bond, amount=5), ex.UnknownValidator, "not a validator")
    rejects(chain, tx(chain, "v0", Bond, amount=0), ex.InvalidAmount, "positive")
    rejects(chain, tx(chain, "v0", Bond, amount=10**9), ex.InsufficientBalance, "needs")
    rejects(chain, tx(chain, "v0", Unbond, amount=0), ex.InvalidAmount, "must be in")
    rejects(chain, tx(chain, "v0", Unbond, amount=10**9), ex.InvalidAmount, "must be in")
    rejects(chain, tx(chain, "c0", Unbond, amount=1), ex.UnknownValidator, "not a validator")


# ---------------------------------------------------------------- providers


def test_register_provider_and_top_up(chain):
    step(chain, tx(chain, "c1", RegisterProvider, capabilities=b"gpu", bond=150))
    addr = chain.network.address("c1")
    assert chain.state.providers[addr].bond == 150
    step(chain, tx(chain, "c1", RegisterProvider, capabilities=b"gpu2", bond=10))
    assert chain.state.providers[addr].bond == 160
    assert chain.state.providers[addr].capabilities == b"gpu2"


def test_register_provider_rejections(chain):
    rejects(chain, tx(chain, "c1", RegisterProvider, capabilities=b"", bond=99), ex.InvalidAmount, "below the minimum")
    rejects(chain, tx(chain, "c1", RegisterProvider, capabilities=b"", bond=10**9), ex.InsufficientBalance, "needs")


# ---------------------------------------------------------------- batch task lifecycle


def test_batch_task_paid_without_audit(chain):
    p = chain.state.params
    c0, p0 = bal(chain, "c0"), bal(chain, "p0")
    t, task_id = post_task(chain, price=1000)
    step(chain, t)
    assert bal(chain, "c0") == c0 - 1000 - p.audit_fee - FEE
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=800)))
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.ASSIGNED and task.collateral == 800 * p.collateral_bps // 10_000
    assert bal(chain, "c0") == c0 - 800 - p.audit_fee - 2 * FEE  # overbid refunded at assignment
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=5))
    assert chain.state.tasks[task_id].status == TaskStatus.COMMITTED
    idle(chain, p.challenge_window + 1)
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.SETTLED and task.outcome == TaskOutcome.PAID
    cut = 800 * p.protocol_fee_bps // 10_000
    p0_fees = _proposer_income(chain, "p0")
    assert bal(chain, "p0") == p0 + 800 - cut - FEE + p0_fees
    assert bal(chain, "c0") == c0 - 800 - 2 * FEE  # audit fee refunded: no audit happened
    assert chain.state.providers[chain.network.address("p0")].completed == 1


def _proposer_income(chain, name):
    return 0  # providers never propose in these tests (they are not validators)


def test_post_task_rejections(chain):
    def post(**kw):
        base = dict(kind=TaskKind.BATCH, spec_hash=SPEC, requirements=b"", max_unit_price=10, units=1, bid_window=5,
                    exec_blocks=5, audit_rate_bps=0)
        base.update(kw)
        return tx(chain, "c0", PostTask, **base)

    rejects(chain, post(kind=9), ex.InvalidTransaction, "unknown task kind")
    rejects(chain, post(units=2), ex.InvalidAmount, "exactly 1 unit")
    rejects(chain, post(max_unit_price=0), ex.InvalidAmount, "positive")
    rejects(chain, post(bid_window=0), ex.InvalidAmount, "bid_window")
    rejects(chain, post(exec_blocks=0), ex.InvalidAmount, "exec_blocks")
    rejects(chain, post(audit_rate_bps=10_001), ex.InvalidAmount, "audit_rate_bps")
    rejects(chain, post(max_unit_price=10**12), ex.InsufficientBalance, "needs")
    rejects(chain, post(kind=TaskKind.STREAM, units=2**20, max_unit_price=2**60), ex.InvalidAmount, "units|overflow")


def test_assign_rejections(chain):
    t, task_id = post_task(chain, price=1000, window=3)
    step(chain, t)

    def assign(bid, sender="c0"):
        return tx(chain, sender, Assign, task_id=task_id, bid=bid)

    rejects(chain, assign(make_bid(chain, task_id), sender="c1"), ex.NotAuthorized, "only the task's client")
    rejects(chain, assign(make_bid(chain, b"\x00" * 32)), ex.InvalidBid, "another task")
    rejects(chain, assign(make_bid(chain, task_id, expiry=0)), ex.InvalidBid, "expired")
    rejects(chain, assign(make_bid(chain, task_id, price=1001)), ex.InvalidBid, "outside")
    rejects(chain, assign(make_bid(chain, task_id, provider="c1")), ex.UnknownProvider, "not a registered provider")
    rejects(chain, assign(make_bid(chain, task_id, key_name="p1")), ex.InvalidBid, "public key does not belong")
    good = make_bid(chain, task_id)
    rejects(chain, assign(dataclasses.replace(good, signature=bytes(64))), ex.InvalidBid, "bad provider signature")
    bid_c0 = Bid(task_id=task_id, provider=chain.network.address("c0"), unit_price=5, est_seconds=1, expiry_height=99,
                 terms_hash=terms_hash_of_task(chain.state.tasks[task_id]))
    rejects(chain, assign(sign_bid(chain.network.key("c0"), chain.chain_id, bid_c0)), ex.InvalidBid, "itself")
    rejects(chain, tx(chain, "c0", Assign, task_id=b"\x07" * 32, bid=good), ex.UnknownTask, "no task")
    # provider without funds for collateral
    poor = chain.network.address("p2")
    step(chain, tx(chain, "p2", Transfer, to=chain.network.address("c1"), amount=bal(chain, "p2") - FEE))
    assert chain.state.get_balance(poor) == 0
    rejects(chain, assign(make_bid(chain, task_id, provider="p2")), ex.InsufficientBalance, "needs")
    idle(chain, 3)
    assert chain.state.tasks[task_id].status == TaskStatus.SETTLED  # expired: no bid assigned in the window
    rejects(chain, assign(make_bid(chain, task_id)), ex.InvalidTaskState, "is SETTLED")


def test_assign_refuses_a_bid_made_for_other_terms(chain):
    t, task_id = post_task(chain, exec_blocks=5)
    step(chain, t)
    task = chain.state.tasks[task_id]
    for changed in ({"exec_blocks": 50}, {"units": 2}, {"spec_hash": b"\x09" * 32}, {"requirements": b"gpu"},
                    {"kind": TaskKind.STREAM}):
        terms = terms_hash_of_task(dataclasses.replace(task, **changed))
        bid = make_bid(chain, task_id, terms=terms)
        rejects(chain, tx(chain, "c0", Assign, task_id=task_id, bid=bid), ex.InvalidBid, "other terms")


def test_post_and_assign_final_in_one_block(chain):
    """A provider can bid on an announced task before its PostTask is final; both can land together."""
    t, task_id = post_task(chain, price=1000)
    post = t.body
    terms = task_terms_hash(kind=post.kind, spec_hash=post.spec_hash, requirements=post.requirements,
                            units=post.units, exec_blocks=post.exec_blocks)
    bid = make_bid(chain, task_id, terms=terms)
    assign = tx(chain, "c0", Assign, nonce=post.nonce + 1, task_id=task_id, bid=bid)
    block = step(chain, t, assign)
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.ASSIGNED and task.assign_height == task.post_height == block.height
    assert task.provider == chain.network.address("p0")


def test_unassigned_task_expires_with_full_refund(chain):
    c0 = bal(chain, "c0")
    t, task_id = post_task(chain, window=2)
    step(chain, t)
    idle(chain, 2)
    task = chain.state.tasks[task_id]
    assert task.outcome == TaskOutcome.EXPIRED and task.escrow == 0
    assert bal(chain, "c0") == c0 - FEE


def test_cancel_task(chain):
    c0 = bal(chain, "c0")
    t, task_id = post_task(chain)
    step(chain, t)
    rejects(chain, tx(chain, "c1", CancelTask, task_id=task_id), ex.NotAuthorized, "only the task's client")
    step(chain, tx(chain, "c0", CancelTask, task_id=task_id))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.CANCELLED
    assert bal(chain, "c0") == c0 - 2 * FEE
    rejects(chain, tx(chain, "c0", CancelTask, task_id=task_id), ex.InvalidTaskState, "is SETTLED")


def test_cancel_after_assignment_is_refused(chain):
    task_id = assigned_task(chain)
    rejects(chain, tx(chain, "c0", CancelTask, task_id=task_id), ex.InvalidTaskState, "is ASSIGNED")


def test_commit_result_rejections(chain):
    task_id = assigned_task(chain, exec_blocks=2)
    commit = dict(task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1)
    rejects(chain, tx(chain, "p1", CommitResult, **commit), ex.NotAuthorized, "assigned provider")
    rejects(chain, tx(chain, "p0", CommitResult, **dict(commit, task_id=b"\x09" * 32)), ex.UnknownTask, "no task")
    step(chain)
    step(chain)  # deadline reached: missed
    rejects(chain, tx(chain, "p0", CommitResult, **commit), ex.InvalidTaskState, "is SETTLED")


def test_missed_deadline_refunds_and_partially_slashes(chain):
    p = chain.state.params
    c0, p0 = bal(chain, "c0"), bal(chain, "p0")
    task_id = assigned_task(chain, exec_blocks=2)
    collateral = chain.state.tasks[task_id].collateral
    burned = chain.state.burned
    idle(chain, 2)
    task = chain.state.tasks[task_id]
    assert task.outcome == TaskOutcome.MISSED
    slash = collateral * p.missed_deadline_slash_bps // 10_000
    assert chain.state.burned == burned + slash
    assert bal(chain, "p0") == p0 - slash
    assert bal(chain, "c0") == c0 - 2 * FEE
    assert chain.state.providers[chain.network.address("p0")].missed == 1


# ---------------------------------------------------------------- ReopenTask (failover)


def test_reopen_takes_the_task_back_and_a_second_provider_is_paid_once(chain):
    p = chain.state.params
    c0, p0, p1 = bal(chain, "c0"), bal(chain, "p0"), bal(chain, "p1")
    task_id = assigned_task(chain, price=1000, window=5, exec_blocks=10)
    first = chain.state.tasks[task_id]
    collateral, burned = first.collateral, chain.state.burned
    rejects(chain, tx(chain, "c0", ReopenTask, task_id=task_id), ex.InvalidTaskState, "can be reopened from height")
    idle(chain, p.reopen_after_blocks - 1)
    rejects(chain, tx(chain, "c1", ReopenTask, task_id=task_id), ex.NotAuthorized, "only the task's client")
    step(chain, tx(chain, "c0", ReopenTask, task_id=task_id))
    task = chain.state.tasks[task_id]
    h = chain.state.height
    assert task.status == TaskStatus.POSTED and task.provider is None and task.reopens == 1
    assert task.bid_deadline == h + (first.bid_deadline - first.post_height)
    assert task.escrow == 1000 + p.audit_fee  # the full max price locked again, as at PostTask
    slash = collateral * p.reopen_slash_bps // 10_000
    assert chain.state.burned == burned + slash and bal(chain, "p0") == p0 - slash
    assert chain.state.providers[chain.network.address("p0")].missed == 1
    # the first provider cannot commit any more; the fresh auction's winner does, and is paid once
    rejects(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1),
            ex.NotAuthorized, "assigned provider")
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, provider="p1", price=900)))
    step(chain, tx(chain, "p1", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    idle(chain, p.challenge_window + 1)
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.SETTLED and task.outcome == TaskOutcome.PAID and task.unit_price == 900
    assert bal(chain, "c0") == c0 - 900 - 4 * FEE  # PostTask, Assign, ReopenTask, Assign: 4 fees; one price
    assert bal(chain, "p1") == p1 + 900 - 900 * p.protocol_fee_bps // 10_000 - FEE


def test_reopen_rejections(chain):
    p = chain.state.params
    t, task_id = post_task(chain)
    step(chain, t)
    rejects(chain, tx(chain, "c0", ReopenTask, task_id=task_id), ex.InvalidTaskState, "is POSTED")
    task_id = assigned_task(chain, exec_blocks=p.reopen_after_blocks + 2)
    idle(chain, p.reopen_after_blocks)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    rejects(chain, tx(chain, "c0", ReopenTask, task_id=task_id), ex.InvalidTaskState, "is COMMITTED")
    # a task reopened max_reopens times stays with its provider
    task_id = assigned_task(chain, exec_blocks=50, window=3)
    for n in range(p.max_reopens):
        idle(chain, p.reopen_after_blocks)
        step(chain, tx(chain, "c0", ReopenTask, task_id=task_id))
        step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, provider=f"p{(n + 1) % 2}")))
    idle(chain, p.reopen_after_blocks)
    rejects(chain, tx(chain, "c0", ReopenTask, task_id=task_id), ex.InvalidTaskState, "reopened 3 times")
    # at the deadline the task settles as missed: too late to reopen
    task_id = assigned_task(chain, exec_blocks=p.reopen_after_blocks + 1)
    idle(chain, p.reopen_after_blocks)
    probe_ok = chain.state.tasks[task_id].deadline_height - chain.state.height
    assert probe_ok == 1
    step(chain)
    assert chain.state.tasks[task_id].outcome == TaskOutcome.MISSED


def test_a_client_without_funds_for_the_full_price_cannot_reopen(chain):
    task_id = assigned_task(chain, price=1000)
    idle(chain, chain.state.params.reopen_after_blocks)
    c0 = chain.network.address("c0")
    drain = bal(chain, "c0") - 2 * FEE - 100  # keep less than the 200 of top-up (1000 max - 800 price)
    step(chain, tx(chain, "c0", Transfer, to=chain.network.address("c1"), amount=drain))
    rejects(chain, tx(chain, "c0", ReopenTask, task_id=task_id), ex.InsufficientBalance, c0.hex())


def test_inputs_unavailable_settles_without_a_slash_and_pays_a_reservation_fee(chain):
    p = chain.state.params
    c0, p0 = bal(chain, "c0"), bal(chain, "p0")
    task_id = assigned_task(chain, price=1000, exec_blocks=5)
    task = chain.state.tasks[task_id]
    burned = chain.state.burned
    rejects(chain, tx(chain, "c0", InputsUnavailable, task_id=task_id, detail="x"), ex.NotAuthorized,
            "only the assigned provider")
    step(chain, tx(chain, "p0", InputsUnavailable, task_id=task_id, detail="client unreachable"))
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.SETTLED and task.outcome == TaskOutcome.INPUTS_UNAVAILABLE
    reservation = 800 * p.reservation_fee_bps // 10_000
    assert reservation > 0 and chain.state.burned == burned
    assert bal(chain, "p0") == p0 + reservation - FEE  # collateral back in full
    assert bal(chain, "c0") == c0 - reservation - 2 * FEE  # the rest of the escrow (and audit fee) refunded
    record = chain.state.providers[chain.network.address("p0")]
    assert (record.unavailable, record.missed, record.failed) == (1, 0, 0)
    rejects(chain, tx(chain, "p0", InputsUnavailable, task_id=task_id, detail=""), ex.InvalidTaskState, "is SETTLED")


def test_inputs_unavailable_after_the_deadline_is_too_late(chain):
    task_id = assigned_task(chain, exec_blocks=2)
    step(chain)
    late = tx(chain, "p0", InputsUnavailable, task_id=task_id, detail="")
    step(chain)
    assert chain.state.tasks[task_id].outcome == TaskOutcome.MISSED
    rejects(chain, late, ex.InvalidTaskState, "is SETTLED")


def _audited_commit(chain):
    task_id = assigned_task(chain, audit=10_000)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    step(chain)  # the audit draw happens in the next block, with its randomness
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.AUDITING
    assert chain.network.address("p0") not in task.verifiers
    assert chain.network.address("c0") not in task.verifiers
    assert len(task.verifiers) == 2
    return task_id, task.verifiers


def _name_of(chain, address):
    return chain.network.by_address(address).name


def test_audit_pass_pays_provider_and_verifiers(chain):
    p = chain.state.params
    task_id, verifiers = _audited_commit(chain)
    names = [_name_of(chain, v) for v in verifiers]
    before = {n: bal(chain, n) for n in names}
    rejects(chain, tx(chain, "c1", Attest, task_id=task_id, verdict=PASS, detail=""), ex.NotAuthorized, "not drawn")
    step(chain, tx(chain, names[0], Attest, task_id=task_id, verdict=PASS, detail="ok"))
    rejects(chain, tx(chain, names[0], Attest, task_id=task_id, verdict=PASS, detail=""), ex.InvalidTaskState, "already")
    step(chain, tx(chain, names[1], Attest, task_id=task_id, verdict=PASS, detail="ok"))
    task = chain.state.tasks[task_id]
    assert task.outcome == TaskOutcome.PAID
    for n in names:
        assert bal(chain, n) == before[n] - FEE + p.audit_fee // 2


def test_audit_fail_slashes_provider(chain):
    p = chain.state.params
    c0 = bal(chain, "c0")
    task_id, verifiers = _audited_commit(chain)
    collateral = chain.state.tasks[task_id].collateral
    for v in verifiers:
        step(chain, tx(chain, _name_of(chain, v), Attest, task_id=task_id, verdict=FAIL, detail="mismatch"))
    task = chain.state.tasks[task_id]
    assert task.outcome == TaskOutcome.FRAUD and task.collateral == 0 and task.escrow == 0
    to_client = collateral * p.fraud_client_share_bps // 10_000
    assert bal(chain, "c0") == c0 - 2 * FEE - p.audit_fee + to_client
    assert chain.state.providers[chain.network.address("p0")].failed == 1


def test_audit_deadline_without_attestations_pays(chain):
    task_id, _ = _audited_commit(chain)
    idle(chain, chain.state.params.audit_window)
    assert chain.state.tasks[task_id].outcome == TaskOutcome.PAID


# ---------------------------------------------------------------- unavailable results (issue 13)
#
# A verifier that cannot fetch the committed result attests UNAVAILABLE. That is never fraud: fraud needs a
# result fetched and checked. A majority of the drawn verifiers finding it unavailable, and nobody having
# fetched it, settles the task by the no-show rule (as a missed deadline).


def test_a_result_the_verifiers_could_not_fetch_settles_as_missed_never_as_fraud(chain):
    p = chain.state.params
    c0, p0 = bal(chain, "c0"), bal(chain, "p0")
    task_id, verifiers = _audited_commit(chain)
    task = chain.state.tasks[task_id]
    names = [_name_of(chain, v) for v in verifiers]
    before = {n: bal(chain, n) for n in names}
    burned = chain.state.burned
    for n in names:
        step(chain, tx(chain, n, Attest, task_id=task_id, verdict=UNAVAILABLE, detail="provider did not serve it"))
    settled = chain.state.tasks[task_id]
    assert settled.outcome == TaskOutcome.MISSED and settled.escrow == settled.collateral == 0
    assert [a.verdict for a in settled.attestations] == [UNAVAILABLE, UNAVAILABLE]
    record = chain.state.providers[chain.network.address("p0")]
    assert (record.failed, record.missed, record.completed) == (0, 1, 0)
    # the no-show rule: part of the collateral burned, the rest back; no price paid
    slash = task.collateral * p.missed_deadline_slash_bps // 10_000
    assert chain.state.burned == burned + slash
    assert bal(chain, "p0") == p0 - FEE - slash  # the CommitResult fee and the slash, nothing else
    # the client gets its escrow back but the audit fee, which pays the verifiers who did the audit
    assert bal(chain, "c0") == c0 - 2 * FEE - p.audit_fee
    for n in names:
        assert bal(chain, n) == before[n] - FEE + p.audit_fee // 2


def test_one_verifier_that_fetched_and_passed_outweighs_an_unavailable_claim(chain):
    p = chain.state.params
    task_id, verifiers = _audited_commit(chain)
    liar, honest = (_name_of(chain, v) for v in verifiers)
    before = {n: bal(chain, n) for n in (liar, honest)}
    step(chain, tx(chain, liar, Attest, task_id=task_id, verdict=UNAVAILABLE, detail="could not fetch"))
    step(chain, tx(chain, honest, Attest, task_id=task_id, verdict=PASS, detail="ok"))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.PAID
    assert chain.state.providers[chain.network.address("p0")].missed == 0
    assert bal(chain, liar) == before[liar] - FEE  # claiming "unavailable" earned nothing
    assert bal(chain, honest) == before[honest] - FEE + p.audit_fee


def test_a_lone_unavailable_claim_is_no_majority_and_the_provider_is_paid(chain):
    task_id, verifiers = _audited_commit(chain)
    step(chain, tx(chain, _name_of(chain, verifiers[0]), Attest, task_id=task_id, verdict=UNAVAILABLE, detail=""))
    idle(chain, chain.state.params.audit_window)
    assert chain.state.tasks[task_id].outcome == TaskOutcome.PAID
    record = chain.state.providers[chain.network.address("p0")]
    assert (record.failed, record.missed, record.completed) == (0, 0, 1)


def test_a_fail_from_a_verifier_that_did_fetch_is_still_fraud(chain):
    task_id, verifiers = _audited_commit(chain)
    step(chain, tx(chain, _name_of(chain, verifiers[0]), Attest, task_id=task_id, verdict=FAIL, detail="wrong"))
    step(chain, tx(chain, _name_of(chain, verifiers[1]), Attest, task_id=task_id, verdict=UNAVAILABLE, detail=""))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.FRAUD


def test_a_disputed_result_nobody_could_fetch_refunds_the_client_with_its_bond(chain):
    p = chain.state.params
    task_id = assigned_task(chain)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    c0 = bal(chain, "c0")
    escrow = chain.state.tasks[task_id].escrow
    step(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None))
    for v in chain.state.tasks[task_id].verifiers:
        step(chain, tx(chain, _name_of(chain, v), Attest, task_id=task_id, verdict=UNAVAILABLE, detail=""))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.MISSED
    assert bal(chain, "c0") == c0 - FEE + escrow - p.audit_fee  # the bond came back with the escrow
    assert chain.state.providers[chain.network.address("p0")].failed == 0


def test_unavailable_is_refused_for_a_stream_item(chain):
    task_id = stream_task(chain)
    output = StreamOutput(task_id=task_id, index=0, input_hash=b"\x02" * 32, output_hash=b"\x03" * 32)
    step(chain, tx(chain, "c0", Dispute, task_id=task_id,
                   item=sign_stream_output(chain.network.key("p0"), chain.chain_id, output)))
    verifier = _name_of(chain, chain.state.tasks[task_id].verifiers[0])
    rejects(chain, tx(chain, verifier, Attest, task_id=task_id, verdict=UNAVAILABLE, detail=""),
            ex.InvalidTaskState, "committed batch result")


def test_a_verdict_outside_the_three_is_refused_on_the_wire(chain):
    attest = body(chain, "p1", Attest, task_id=b"\x01" * 32, verdict=PASS, detail="")
    wire = encode(attest)
    assert decode(Attest, wire).verdict == PASS
    with pytest.raises(EncodeError, match="verdict"):
        encode(dataclasses.replace(attest, verdict=4))
    forged = wire.replace(bytes([0x01, 0xA0]), bytes([0x04, 0xA0]))  # verdict 1 -> 4, then the empty detail
    assert forged != wire
    with pytest.raises(DecodeError, match="verdict"):
        decode(Attest, forged)


@pytest.mark.parametrize(("kind", "verdicts", "drawn", "outcome"), [
    (TaskKind.BATCH, (), 2, TaskOutcome.PAID),  # nobody answered: innocent unless shown otherwise
    (TaskKind.BATCH, (PASS, PASS), 2, TaskOutcome.PAID),
    (TaskKind.BATCH, (FAIL, FAIL), 2, TaskOutcome.FRAUD),
    (TaskKind.BATCH, (FAIL,), 2, TaskOutcome.FRAUD),
    (TaskKind.BATCH, (PASS, FAIL), 2, TaskOutcome.PAID),
    (TaskKind.BATCH, (UNAVAILABLE, UNAVAILABLE), 2, TaskOutcome.MISSED),
    (TaskKind.BATCH, (UNAVAILABLE,), 2, TaskOutcome.PAID),  # one of two is no majority
    (TaskKind.BATCH, (UNAVAILABLE,), 1, TaskOutcome.MISSED),
    (TaskKind.BATCH, (UNAVAILABLE, UNAVAILABLE), 3, TaskOutcome.MISSED),
    (TaskKind.BATCH, (UNAVAILABLE, UNAVAILABLE, PASS), 3, TaskOutcome.PAID),  # it was there to be fetched
    (TaskKind.BATCH, (UNAVAILABLE, UNAVAILABLE, FAIL), 3, TaskOutcome.FRAUD),
    (TaskKind.BATCH, (UNAVAILABLE, PASS, FAIL), 3, TaskOutcome.PAID),
    (TaskKind.STREAM, (UNAVAILABLE, UNAVAILABLE), 2, TaskOutcome.PAID),
])
def test_audit_outcome_never_counts_unavailable_as_fraud(kind, verdicts, drawn, outcome):
    verifiers = tuple(bytes([i]) * 20 for i in range(drawn))
    task = dataclasses.replace(
        _blank_task(kind), verifiers=verifiers,
        attestations=tuple(Attestation(verifier=v, verdict=x) for v, x in zip(verifiers, verdicts)),
    )
    assert audit_outcome(task) == outcome
    if UNAVAILABLE in verdicts and FAIL not in verdicts:
        assert outcome != TaskOutcome.FRAUD


def _blank_task(kind: TaskKind) -> Task:
    return Task(task_id=b"\x01" * 32, client=b"\x02" * 20, kind=kind, spec_hash=SPEC, requirements=b"",
                max_unit_price=1, units=1, audit_rate_bps=0, exec_blocks=1, status=TaskStatus.AUDITING,
                outcome=TaskOutcome.NONE, escrow=0, audit_fee=0, post_height=0, bid_deadline=0)


def test_dispute_forces_audit_and_fraud_returns_bond(chain):
    p = chain.state.params
    task_id = assigned_task(chain)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    c0 = bal(chain, "c0")
    rejects(chain, tx(chain, "c1", Dispute, task_id=task_id, item=None), ex.NotAuthorized, "only the task's client")
    step(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None))
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.AUDITING and task.dispute_bond == p.dispute_bond
    assert bal(chain, "c0") == c0 - FEE - p.dispute_bond
    for v in task.verifiers:
        step(chain, tx(chain, _name_of(chain, v), Attest, task_id=task_id, verdict=FAIL, detail="wrong"))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.FRAUD
    assert bal(chain, "c0") >= c0 - FEE  # bond back plus refund and compensation


def test_dispute_lost_pays_bond_to_provider(chain):
    p = chain.state.params
    task_id = assigned_task(chain)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    p0 = bal(chain, "p0")
    step(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None))
    task = chain.state.tasks[task_id]
    for v in task.verifiers:
        step(chain, tx(chain, _name_of(chain, v), Attest, task_id=task_id, verdict=PASS, detail="ok"))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.PAID
    price = task.unit_price
    assert bal(chain, "p0") == p0 + price - price * p.protocol_fee_bps // 10_000 + task.collateral + p.dispute_bond


def test_dispute_after_window_is_refused(chain):
    task_id = assigned_task(chain)
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    step(chain)
    step(chain)
    rejects(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None), ex.InvalidTaskState, "is SETTLED")


def test_dispute_rejections(chain):
    task_id = assigned_task(chain)
    rejects(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None), ex.InvalidTaskState, "is ASSIGNED")
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    out = sign_stream_output(chain.network.key("p0"), chain.chain_id,
                             StreamOutput(task_id=task_id, index=0, input_hash=b"\x00" * 32, output_hash=b"\x01" * 32))
    rejects(chain, tx(chain, "c0", Dispute, task_id=task_id, item=out), ex.InvalidTransaction, "names no stream item")


# ---------------------------------------------------------------- streaming


def stream_task(chain, units=10, price=20):
    t, task_id = post_task(chain, kind=TaskKind.STREAM, units=units, price=price, exec_blocks=6)
    step(chain, t)
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=price)))
    return task_id


def claim(chain, task_id, units, signer="c0", sender="p0"):
    receipt = sign_receipt(chain.network.key(signer), chain.chain_id, StreamReceipt(task_id=task_id, units=units))
    return tx(chain, sender, StreamClaim, receipt=receipt)


def test_stream_claims_and_settlement(chain):
    p = chain.state.params
    c0, p0 = bal(chain, "c0"), bal(chain, "p0")
    task_id = stream_task(chain, units=10, price=20)
    collateral = chain.state.tasks[task_id].collateral
    step(chain, claim(chain, task_id, 4))
    paid = 4 * 20 - 4 * 20 * p.protocol_fee_bps // 10_000
    assert bal(chain, "p0") == p0 - collateral - FEE + paid
    rejects(chain, claim(chain, task_id, 4), ex.InvalidReceipt, "need 5..10")
    rejects(chain, claim(chain, task_id, 11), ex.InvalidReceipt, "need 5..10")
    rejects(chain, claim(chain, task_id, 6, signer="p0"), ex.InvalidReceipt, "not signed by the task's client")
    rejects(chain, claim(chain, task_id, 6, sender="p1"), ex.NotAuthorized, "assigned provider")
    bad = claim(chain, task_id, 6)
    bad_receipt = dataclasses.replace(bad.body.receipt, signature=bytes(64))
    rejects(chain, chain.sign("p0", dataclasses.replace(bad.body, receipt=bad_receipt)), ex.InvalidReceipt,
            "bad client signature")
    step(chain, claim(chain, task_id, 10))  # the cap: settles immediately
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.SETTLED and task.claimed_units == 10 and task.escrow == 0
    assert bal(chain, "c0") == c0 - 2 * FEE - 200  # audit fee returned


def test_stream_ends_at_deadline_refunding_unclaimed(chain):
    c0 = bal(chain, "c0")
    task_id = stream_task(chain, units=10, price=20)
    step(chain, claim(chain, task_id, 3))
    while chain.state.tasks[task_id].status != TaskStatus.SETTLED:
        step(chain)
    assert bal(chain, "c0") == c0 - 2 * FEE - 60


def test_stream_dispute_with_signed_output(chain):
    task_id = stream_task(chain)
    output = StreamOutput(task_id=task_id, index=3, input_hash=b"\x02" * 32, output_hash=b"\x03" * 32)
    item = sign_stream_output(chain.network.key("p0"), chain.chain_id, output)
    forged = sign_stream_output(chain.network.key("c0"), chain.chain_id, output)
    rejects(chain, tx(chain, "c0", Dispute, task_id=task_id, item=None), ex.InvalidTransaction, "must carry")
    rejects(chain, tx(chain, "c0", Dispute, task_id=task_id, item=forged), ex.InvalidSignature, "not signed by")
    step(chain, tx(chain, "c0", Dispute, task_id=task_id, item=item))
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.AUDITING and task.disputed_item == output
    for v in task.verifiers:
        step(chain, tx(chain, _name_of(chain, v), Attest, task_id=task_id, verdict=FAIL, detail="bad output"))
    assert chain.state.tasks[task_id].outcome == TaskOutcome.FRAUD


# ---------------------------------------------------------------- evidence


def double_vote(chain, name="v1", height=3):
    key = chain.network.identities[name].bls
    addr = chain.network.address(name)
    a = sign_vote(key, addr, chain.chain_id, Vote(height=height, round=0, step=VoteStep.PRECOMMIT, block_hash=b"\x01" * 32))
    b = sign_vote(key, addr, chain.chain_id, Vote(height=height, round=0, step=VoteStep.PRECOMMIT, block_hash=b"\x02" * 32))
    return a, b


def test_evidence_slashes_jails_and_rewards(chain):
    p = chain.state.params
    addr = chain.network.address("v1")
    stake = chain.state.validators[addr].stake
    c1 = bal(chain, "c1")
    a, b = double_vote(chain)
    step(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=b))
    v = chain.state.validators[addr]
    slash = stake * p.double_sign_slash_bps // 10_000
    assert v.stake == stake - slash and v.status == ValidatorStatus.JAILED
    assert bal(chain, "c1") == c1 - FEE + slash * p.evidence_reward_bps // 10_000
    rejects(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=b), ex.InvalidEvidence, "already punished")
    while chain.state.height < v.jailed_until:
        step(chain)
    assert chain.state.validators[addr].status == ValidatorStatus.ACTIVE


def test_evidence_rejections(chain):
    a, b = double_vote(chain)
    rejects(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=a), ex.InvalidEvidence, "same block")
    other = double_vote(chain, "v2")[1]
    rejects(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=other), ex.InvalidEvidence, "different validators")
    later = double_vote(chain, height=4)[1]
    rejects(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=later), ex.InvalidEvidence, "different")
    forged = dataclasses.replace(b, signature=double_vote(chain, "v2")[1].signature)
    rejects(chain, tx(chain, "c1", Evidence, vote_a=a, vote_b=forged), ex.InvalidEvidence, "does not verify")
    nonval = dataclasses.replace(a, validator=chain.network.address("c0"))
    nonval_b = dataclasses.replace(b, validator=chain.network.address("c0"))
    rejects(chain, tx(chain, "c1", Evidence, vote_a=nonval, vote_b=nonval_b), ex.UnknownValidator, "not a validator")


def test_a_settled_task_is_pruned_task_retention_blocks_after_it_settled() -> None:
    """The state holds tasks in flight, not every task ever: its root is re-encoded every block."""
    from ledger.devtools import DevChain, make_dev_network
    from ledger.params import Params
    from ledger.transactions import CancelTask, PostTask, compute_task_id

    net = make_dev_network(validators=("v0",), providers=(), clients=("c",), params=Params(task_retention=3))
    chain = DevChain(net)
    me = net.address("c")
    post = PostTask(sender=me, nonce=0, fee=1, kind=1, spec_hash=b"\1" * 32, requirements=b"", max_unit_price=5,
                    units=1, bid_window=10, exec_blocks=10, audit_rate_bps=0)
    chain.produce([chain.sign("c", post)])
    task_id = compute_task_id(me, 0)
    chain.produce([chain.sign("c", CancelTask(sender=me, nonce=1, fee=1, task_id=task_id))])
    settled = chain.state.tasks[task_id].settled_height
    assert settled == chain.state.height
    supply = chain.state.total_supply()
    chain.produce([])
    chain.produce([])
    assert task_id in chain.state.tasks  # settled + 2 < settled + 3
    chain.produce([])
    assert task_id not in chain.state.tasks
    assert chain.state.total_supply() == supply
