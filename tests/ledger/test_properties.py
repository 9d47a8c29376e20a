"""Property tests: random valid and invalid transactions, block after block.

After every block: total supply is conserved (and its books add up bucket by
bucket, with block rewards the only mint), no balance is negative, no task is
paid twice, settled tasks stay settled, and no task settles as fraud without a
FAIL verdict (an UNAVAILABLE one never counts towards fraud). Models are
registered (valid and not) and tasks name them, so royalties take part in
every interleaving.
"""

from __future__ import annotations

import dataclasses
import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.books import get_books
from ledger.devtools import DevChain, make_dev_network, sign_bid, sign_receipt, sign_stream_output, sign_vote
from ledger.params import Params
from ledger.codec import encode
from ledger.state import State, TaskOutcome, TaskStatus
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
    RegisterModel,
    RegisterProvider,
    ReopenTask,
    StreamClaim,
    StreamOutput,
    StreamReceipt,
    TaskKind,
    TensorSignature,
    Transfer,
    Unbond,
)
from ledger.transition import terms_hash_of_task
from ledger.votes import Vote, VoteStep

NAMES = ("v0", "v1", "v2", "v3", "p0", "p1", "p2", "c0", "c1")
PARAMS = Params(epoch_length=5, committee_size=4, unbonding_period=2, jail_period=3, challenge_window=1,
                audit_window=2, verifier_count=2, min_provider_bond=100, block_reward=3)
NETWORK = make_dev_network(validators=NAMES[:4], providers=NAMES[4:7], clients=NAMES[7:], balance=5_000,
                           stake=2_000, params=PARAMS)

action = st.tuples(
    st.sampled_from(
        ["transfer", "post", "post_stream", "assign", "commit", "attest", "dispute", "claim", "cancel", "reopen", "bond",
         "unbond", "register_provider", "evidence", "bad_nonce", "end_block", "register_model", "post_model"]
    ),
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
    st.integers(0, 6_000),
    st.booleans(),
)


def _task_ids(chain: DevChain) -> list[bytes]:
    return sorted(chain.state.tasks)


def make_tx(chain: DevChain, kind: str, a: str, b: str, amount: int, flag: bool, pick: int):
    net = chain.network
    nonce = chain.nonce(a)
    common = dict(sender=net.address(a), nonce=nonce, fee=1)
    # Mostly aim at tasks in the status the action needs, so the lifecycle is really explored;
    # sometimes at any task, so the invalid paths are too.
    wanted = {"assign": TaskStatus.POSTED, "commit": TaskStatus.ASSIGNED, "attest": TaskStatus.AUDITING,
              "claim": TaskStatus.ASSIGNED, "dispute": TaskStatus.COMMITTED, "cancel": TaskStatus.POSTED,
              "reopen": TaskStatus.ASSIGNED}.get(kind)
    tasks = _task_ids(chain)
    if flag and wanted is not None:
        tasks = [t for t in tasks if chain.state.tasks[t].status == wanted
                 and (kind != "reopen" or chain.state.tasks[t].kind == TaskKind.BATCH)] or tasks
    task = chain.state.tasks[tasks[pick % len(tasks)]] if tasks else None
    if kind == "assign" and flag:
        providers = [n for n in NAMES[4:7] if task is None or net.address(n) != task.client]
        b = providers[pick % len(providers)]
    if kind == "transfer":
        body = Transfer(**common, to=net.address(b), amount=amount)
    elif kind in ("post", "post_stream"):
        stream = kind == "post_stream"
        body = PostTask(**common, kind=TaskKind.STREAM if stream else TaskKind.BATCH, spec_hash=b"\x01" * 32,
                        requirements=b"", max_unit_price=max(1, amount // 10), units=5 if stream else 1,
                        bid_window=8, exec_blocks=6, audit_rate_bps=5_000 if flag else 0)
    elif kind == "register_model":
        # few ids, names and versions, so duplicates, taken names and taken versions all happen; sometimes a
        # royalty over the maximum
        royalty = amount % 40 if flag or amount % 5 else PARAMS.max_royalty_per_unit + 1
        sig = TensorSignature(dtype="float32", shape=(None,))
        body = RegisterModel(**common, model_id=hashlib.sha256(bytes([amount % 5])).digest(),
                             name=("m0", "m1")[pick % 2], version=str(amount % 3), royalty_per_unit=royalty,
                             input=sig, output=sig, bundle_size=1 + amount)
    elif kind == "post_model":
        models = sorted(chain.state.models)
        model_id = models[pick % len(models)] if models and (flag or amount % 4) else hashlib.sha256(b"none").digest()
        stream = amount % 2 == 1
        body = PostTask(**common, kind=TaskKind.STREAM if stream else TaskKind.BATCH, spec_hash=b"\x01" * 32,
                        requirements=b"", max_unit_price=max(1, amount // 10), units=5 if stream else 1,
                        bid_window=8, exec_blocks=6, audit_rate_bps=5_000 if flag else 0, model_id=model_id)
    elif kind == "assign" and task is not None:
        bid = Bid(task_id=task.task_id, provider=net.address(b), unit_price=max(1, amount // 20) if not flag else max(1, task.max_unit_price // 2), est_seconds=1,
                  expiry_height=chain.state.height + 5, terms_hash=terms_hash_of_task(task))
        body = Assign(**dict(common, sender=task.client if flag else net.address(a),
                             nonce=chain.state.get_account(task.client if flag else net.address(a)).nonce),
                      task_id=task.task_id, bid=sign_bid(net.key(b), chain.chain_id, bid))
        signer = net.by_address(body.sender).name
        return chain.sign(signer, body)
    elif kind == "commit" and task is not None and task.provider is not None:
        who = net.by_address(task.provider).name if flag else a
        body = CommitResult(sender=net.address(who), nonce=chain.nonce(who), fee=1, task_id=task.task_id,
                            result_hash=b"\x02" * 32, exec_ms=1)
        return chain.sign(who, body)
    elif kind == "attest" and task is not None and task.verifiers:
        who = net.by_address(task.verifiers[pick % len(task.verifiers)]).name
        verdict = (AuditVerdict.PASS, AuditVerdict.FAIL, AuditVerdict.UNAVAILABLE)[amount % 3]
        body = Attest(sender=net.address(who), nonce=chain.nonce(who), fee=1, task_id=task.task_id, verdict=verdict,
                      detail="")
        return chain.sign(who, body)
    elif kind == "dispute" and task is not None:
        who = net.by_address(task.client).name
        item = None
        if task.kind == TaskKind.STREAM and task.provider is not None:
            out = StreamOutput(task_id=task.task_id, index=0, input_hash=b"\x03" * 32, output_hash=b"\x04" * 32)
            item = sign_stream_output(net.by_address(task.provider).account, chain.chain_id, out)
        body = Dispute(sender=net.address(who), nonce=chain.nonce(who), fee=1, task_id=task.task_id, item=item)
        return chain.sign(who, body)
    elif kind == "claim" and task is not None and task.provider is not None:
        who = net.by_address(task.provider).name
        units = task.claimed_units + 1 + amount % 3 if flag else amount % 7
        receipt = StreamReceipt(task_id=task.task_id, units=units)
        signed = sign_receipt(net.by_address(task.client).account, chain.chain_id, receipt)
        body = StreamClaim(sender=net.address(who), nonce=chain.nonce(who), fee=1, receipt=signed)
        return chain.sign(who, body)
    elif kind == "cancel" and task is not None:
        body = CancelTask(**common, task_id=task.task_id)
    elif kind == "reopen" and task is not None:
        who = net.by_address(task.client).name if flag else a
        body = ReopenTask(sender=net.address(who), nonce=chain.nonce(who), fee=1, task_id=task.task_id)
        return chain.sign(who, body)
    elif kind == "bond":
        body = Bond(**common, amount=amount)
    elif kind == "unbond":
        body = Unbond(**common, amount=amount)
    elif kind == "register_provider":
        body = RegisterProvider(**common, capabilities=b"x", bond=amount)
    elif kind == "evidence":
        ident = net.identities[b] if net.identities[b].bls else net.identities["v0"]
        votes = [
            sign_vote(ident.bls, ident.address, chain.chain_id,
                      Vote(height=amount % 4, round=0, step=VoteStep.PREVOTE, block_hash=bytes([k]) * 32))
            for k in (1, 2)
        ]
        body = Evidence(**common, vote_a=votes[0], vote_b=votes[1])
    elif kind == "bad_nonce":
        body = Transfer(**dict(common, nonce=nonce + 1 + amount % 3), to=net.address(b), amount=1)
    else:
        return None
    return chain.sign(a, body)


def check_invariants(chain: DevChain, paid_before: dict[bytes, int]) -> dict[bytes, int]:
    state = chain.state
    assert state.total_supply() == state.genesis_supply + state.minted
    books = get_books(state)
    assert books.minted == state.height * PARAMS.block_reward
    assert books.fee_pool == 0  # paid to the proposer at the end of every block
    assert min(getattr(books, f.name) for f in dataclasses.fields(books)) >= 0
    assert all(a.balance >= 0 for a in state.accounts.values())
    assert all(t.model_id in state.models for t in state.tasks.values() if t.model_id is not None)
    assert all(state.model_versions[(m.name, m.version)] == mid for mid, m in state.models.items())
    assert all(state.model_names[m.name].owner == m.owner for m in state.models.values())
    # State.encode reuses the bytes of tasks that did not change since the last block: still the canonical encoding
    assert state.encode() == encode(state.to_record())
    assert State.decode(state.encode()).encode() == state.encode()
    settled = {}
    for tid, t in state.tasks.items():
        if t.status == TaskStatus.SETTLED:
            assert t.escrow == 0 and t.collateral == 0 and t.dispute_bond == 0
            settled[tid] = t.outcome
            if t.outcome == TaskOutcome.FRAUD:  # fraud only on a result some verifier fetched and checked
                assert any(a.verdict == AuditVerdict.FAIL for a in t.attestations), "fraud without a FAIL verdict"
            if tid in paid_before:
                assert paid_before[tid] == t.outcome, "a settled task changed outcome"
    completed = sum(p.completed for p in state.providers.values())
    paid = sum(
        1 for t in state.tasks.values()
        if t.outcome == TaskOutcome.PAID and (t.kind == TaskKind.BATCH or t.claimed_units > 0)
    )
    assert completed == paid, "a task was paid more than once (or payment not counted)"
    return settled


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=5, max_size=40), st.randoms(use_true_random=False))
def test_random_transaction_sequences_keep_invariants(actions, rnd):
    chain = DevChain(NETWORK)
    settled: dict[bytes, int] = {}
    pending = []
    for kind, a, b, amount, flag in actions:
        if kind == "end_block" or len(pending) >= 6:
            chain.produce(pending)
            pending = []
            settled = check_invariants(chain, settled)
            if kind == "end_block":
                continue
        stx = make_tx(chain, kind, a, b, amount, flag, rnd.randrange(1 << 16))
        if stx is not None:
            # alone in its block so nonces computed from the current state stay right
            chain.produce([stx])
            settled = check_invariants(chain, settled)
    for _ in range(6):
        chain.produce()
        settled = check_invariants(chain, settled)


failover_step = st.tuples(st.sampled_from(["reopen", "assign", "commit", "unavailable", "idle"]), st.sampled_from(NAMES[4:7]),
                          st.integers(1, 100), st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(failover_step, min_size=3, max_size=20))
def test_a_task_reopened_any_number_of_times_pays_at_most_once(steps):
    """Assign, reopen, commit, inputs-unavailable and idle blocks in any order, on one batch task: the books add
    up after every block, the client pays at most one price (to the provider whose result settled) or one
    reservation fee (to the provider that could not fetch the inputs), and every provider that was taken off
    the task loses at most a slash of its collateral and nothing else."""
    chain = DevChain(NETWORK)
    net = chain.network
    c0 = net.address("c0")
    post = chain.sign("c0", PostTask(sender=c0, nonce=chain.nonce("c0"), fee=1, kind=TaskKind.BATCH,
                                     spec_hash=b"\x01" * 32, requirements=b"", max_unit_price=100, units=1,
                                     bid_window=4, exec_blocks=8, audit_rate_bps=0))
    start = {n: chain.state.get_balance(net.address(n)) for n in NAMES}
    chain.produce([post])
    task_id = next(iter(chain.state.tasks))
    fees = {n: 0 for n in NAMES}
    fees["c0"] = 1
    assigned = {n: 0 for n in NAMES}
    settled: dict[bytes, int] = {}
    for kind, provider, price, flag in steps:
        task = chain.state.tasks[task_id]
        stx = None
        if kind == "assign" and task.status == TaskStatus.POSTED:
            bid = Bid(task_id=task_id, provider=net.address(provider), unit_price=price, est_seconds=1,
                      expiry_height=chain.state.height + 3, terms_hash=terms_hash_of_task(task))
            stx = chain.sign("c0", Assign(sender=c0, nonce=chain.nonce("c0"), fee=1, task_id=task_id,
                                          bid=sign_bid(net.key(provider), chain.chain_id, bid)))
        elif kind == "reopen":
            stx = chain.sign("c0", ReopenTask(sender=c0, nonce=chain.nonce("c0"), fee=1, task_id=task_id))
        elif kind == "unavailable" and task.provider is not None:
            who = net.by_address(task.provider).name if flag else provider
            stx = chain.sign(who, InputsUnavailable(sender=net.address(who), nonce=chain.nonce(who), fee=1,
                                                    task_id=task_id, detail="inputs not served"))
        elif kind == "commit" and task.provider is not None:
            who = net.by_address(task.provider).name if flag else provider
            stx = chain.sign(who, CommitResult(sender=net.address(who), nonce=chain.nonce(who), fee=1,
                                               task_id=task_id, result_hash=b"\x02" * 32, exec_ms=1))
        _, rejected = chain.produce([stx] if stx is not None else [])
        if stx is not None and not rejected:
            fees[net.by_address(stx.body.sender).name] += 1
            if isinstance(stx.body, Assign):
                assigned[net.by_address(stx.body.bid.bid.provider).name] += 1
        settled = check_invariants(chain, settled)
    while chain.state.tasks[task_id].status != TaskStatus.SETTLED:
        chain.produce()
    settled = check_invariants(chain, settled)
    task = chain.state.tasks[task_id]
    assert task.status == TaskStatus.SETTLED
    paid = task.unit_price if task.outcome == TaskOutcome.PAID else 0
    if task.outcome == TaskOutcome.INPUTS_UNAVAILABLE:
        paid = task.unit_price * PARAMS.reservation_fee_bps // 10_000
    assert chain.state.get_balance(c0) == start["c0"] - fees["c0"] - paid  # clients never propose
    for name in NAMES[4:7]:
        before, after = start[name], chain.state.get_balance(net.address(name))
        if task.outcome in (TaskOutcome.PAID, TaskOutcome.INPUTS_UNAVAILABLE) and task.provider == net.address(name):
            continue  # the winner: paid its price less the protocol's cut, or the reservation fee
        assert after <= before - fees[name]  # no one else was paid
        # each assignment it lost cost it at most its collateral's slash (reopened, or its deadline missed)
        worst = 100 * PARAMS.collateral_bps // 10_000 * max(PARAMS.reopen_slash_bps, PARAMS.missed_deadline_slash_bps)
        assert after >= before - fees[name] - worst // 10_000 * assigned[name]
