"""The state transition: ``apply_block(state, block) -> state``.

Written in the manner of ethereum/execution-specs: ``apply_block`` →
``validate_header`` → ``begin_block`` → ``process_transaction`` (one
``process_<type>`` per transaction type) → ``process_end_of_block``.

Every ``process_<type>`` runs all of its checks before its first mutation,
so a transaction that raises leaves the state exactly as it was; block
building relies on that to skip bad transactions in place. ``apply_block``
works on a copy, so an invalid block never touches the caller's state.

Funds only move between buckets (balances, escrow, collateral, bonds, stake,
fee pool, burned); ``block_reward`` is the only mint. ``State.total_supply``
therefore always equals ``genesis_supply + minted``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, NewType

from ledger import exceptions as ex
from ledger.blocks import Block, BlockHeader, compute_tx_root
from ledger.bls import get_backend
from ledger.codec import Record, encode
from ledger.committee import (
    compute_committee,
    compute_epoch,
    compute_proposer,
    is_epoch_end,
    verify_certificate,
    vote_signing_bytes,
)
from ledger.keys import AccountKey, address_of, verify_ed25519
from ledger.modelnames import is_valid_model_name
from ledger.params import BPS
from ledger.signing import Domain, signing_bytes
from ledger.state import (
    EMPTY_ACCOUNT,
    Attestation,
    Committee,
    EvidenceKey,
    ModelEntry,
    ModelName,
    Provider,
    State,
    Task,
    TaskOutcome,
    TaskStatus,
    UnbondingEntry,
    Validator,
    ValidatorStatus,
)
from ledger.transactions import (
    TX_TYPES,
    Assign,
    Attest,
    AuditVerdict,
    Bond,
    CancelTask,
    CommitResult,
    Dispute,
    Evidence,
    InputsUnavailable,
    PostTask,
    RegisterModel,
    RegisterProvider,
    RegisterValidator,
    ReopenTask,
    SignedTransaction,
    StreamClaim,
    TaskKind,
    Transaction,
    Transfer,
    Unbond,
    compute_task_id,
    task_terms_hash,
    registration_message,
)
from ledger.votes import NIL_BLOCK, CommitCertificate, VoteStep

U64_MAX = 2**64 - 1
MAX_UNBONDING_ENTRIES = 1024


# ============================================================ signatures


def tx_signing_bytes(chain_id: bytes, body: Record) -> bytes:
    return signing_bytes(Domain.TX, chain_id, TX_TYPES.encode(body))


def sign_transaction(key: AccountKey, chain_id: bytes, body: Transaction) -> SignedTransaction:
    """``body`` signed by ``key`` for ``chain_id``: what :func:`verify_transaction_signature` accepts."""
    return SignedTransaction(body=body, public_key=key.public_key, signature=key.sign(tx_signing_bytes(chain_id, body)))


def verify_transaction_signature(chain_id: bytes, stx: SignedTransaction) -> None:
    """Raise :class:`InvalidSignature` unless the sender signed this body on this chain."""
    if address_of(stx.public_key) != stx.body.sender:
        raise ex.InvalidSignature("public key does not belong to the sender address")
    if not verify_ed25519(stx.public_key, tx_signing_bytes(chain_id, stx.body), stx.signature):
        raise ex.InvalidSignature(f"bad signature on {type(stx.body).__name__} from {stx.body.sender.hex()}")


VerifiedTransaction = NewType("VerifiedTransaction", SignedTransaction)
"""A transaction whose signature :func:`verify_transaction` checked: ``Mempool.add_verified`` takes it as it is."""


def verify_transaction(chain_id: bytes, stx: SignedTransaction) -> VerifiedTransaction:
    """``stx``, marked as verified once its signature checks out (raises :class:`InvalidSignature`)."""
    verify_transaction_signature(chain_id, stx)
    return VerifiedTransaction(stx)


def _verify_signed(chain_id: bytes, domain: Domain, payload: Record, public_key: bytes, signature: bytes) -> bool:
    return verify_ed25519(public_key, signing_bytes(domain, chain_id, encode(payload)), signature)


# ============================================================ helpers


def _add(a: int, b: int, what: str) -> int:
    total = a + b
    if total > U64_MAX:
        raise ex.InvalidAmount(f"{what} would overflow 64 bits")
    return total


def _credit(state: State, address: bytes, amount: int) -> None:
    if amount:
        acct = state.get_account(address)
        state.accounts[address] = replace(acct, balance=acct.balance + amount)


def _require_funds(state: State, address: bytes, amount: int) -> None:
    balance = state.get_balance(address)
    if balance < amount:
        raise ex.InsufficientBalance(f"{address.hex()} has {balance}, needs {amount}")


def _charge(state: State, tx: Record, extra: int = 0) -> None:
    """Take the fee (to the fee pool) and ``extra`` from the sender; bump its nonce.

    Call only after every check, including ``_require_funds(fee + extra)``.
    """
    acct = state.accounts.get(tx.sender, EMPTY_ACCOUNT)  # type: ignore[attr-defined]
    state.accounts[tx.sender] = replace(  # type: ignore[attr-defined]
        acct,
        balance=acct.balance - tx.fee - extra,  # type: ignore[attr-defined]
        nonce=acct.nonce + 1,
    )
    state.fee_pool += tx.fee  # type: ignore[attr-defined]


def _get_task(state: State, task_id: bytes) -> Task:
    task = state.tasks.get(task_id)
    if task is None:
        raise ex.UnknownTask(f"no task {task_id.hex()}")
    return task


def _require_status(task: Task, *allowed: TaskStatus) -> None:
    if task.status not in allowed:
        names = " or ".join(s.name for s in allowed)
        raise ex.InvalidTaskState(f"task {task.task_id.hex()[:16]} is {TaskStatus(task.status).name}, needs {names}")


def _bps(amount: int, bps: int) -> int:
    return amount * bps // BPS


def compute_verifiers(state: State, task: Task, seed: bytes) -> tuple[bytes, ...]:
    """Bond-weighted sample of registered providers, never the task's provider or client."""
    pool = sorted(
        (addr, p.bond)
        for addr, p in state.providers.items()
        if p.bond > 0 and addr != task.provider and addr != task.client
    )
    chosen: list[bytes] = []
    total = sum(b for _, b in pool)
    for i in range(min(state.params.verifier_count, len(pool))):
        target = int.from_bytes(hashlib.sha256(seed + task.task_id + i.to_bytes(2, "big")).digest(), "big") % total
        for j, (_, bond) in enumerate(pool):
            if target < bond:
                break
            target -= bond
        addr, bond = pool.pop(j)
        total -= bond
        chosen.append(addr)
    return tuple(sorted(chosen))


# ============================================================ transactions


def process_transfer(state: State, tx: Transfer, height: int) -> None:
    if tx.amount == 0:
        raise ex.InvalidAmount("transfer amount must be positive")
    _require_funds(state, tx.sender, tx.fee + tx.amount)
    _charge(state, tx, tx.amount)
    _credit(state, tx.to, tx.amount)


def process_register_validator(state: State, tx: RegisterValidator, height: int) -> None:
    if tx.sender in state.validators:
        raise ex.AlreadyRegistered(f"{tx.sender.hex()} is already a validator; use Bond to add stake")
    if tx.stake < state.params.min_validator_stake:
        raise ex.InvalidAmount(f"stake {tx.stake} below the minimum {state.params.min_validator_stake}")
    if any(v.bls_pubkey == tx.bls_pubkey for v in state.validators.values()):
        raise ex.AlreadyRegistered("BLS public key already registered by another validator")
    _require_funds(state, tx.sender, tx.fee + tx.stake)
    message = registration_message(state.chain_id, tx.bls_pubkey, tx.sender)
    if not get_backend().verify(tx.bls_pubkey, message, tx.proof_of_possession):
        raise ex.InvalidSignature("BLS proof of possession does not verify for this key and account")
    _charge(state, tx, tx.stake)
    state.validators[tx.sender] = Validator(
        bls_pubkey=tx.bls_pubkey, stake=tx.stake, status=ValidatorStatus.ACTIVE, jailed_until=0, unbonding=()
    )


def _get_validator(state: State, address: bytes) -> Validator:
    v = state.validators.get(address)
    if v is None:
        raise ex.UnknownValidator(f"{address.hex()} is not a validator")
    return v


def process_bond(state: State, tx: Bond, height: int) -> None:
    v = _get_validator(state, tx.sender)
    if tx.amount == 0:
        raise ex.InvalidAmount("bond amount must be positive")
    stake = _add(v.stake, tx.amount, "stake")
    _require_funds(state, tx.sender, tx.fee + tx.amount)
    _charge(state, tx, tx.amount)
    status = v.status
    if status == ValidatorStatus.INACTIVE and stake >= state.params.min_validator_stake:
        status = ValidatorStatus.ACTIVE
    state.validators[tx.sender] = replace(v, stake=stake, status=status)


def process_unbond(state: State, tx: Unbond, height: int) -> None:
    v = _get_validator(state, tx.sender)
    if not 0 < tx.amount <= v.stake:
        raise ex.InvalidAmount(f"unbond amount {tx.amount} must be in 1..{v.stake}")
    if len(v.unbonding) >= MAX_UNBONDING_ENTRIES:
        raise ex.InvalidAmount(f"too many pending unbondings (max {MAX_UNBONDING_ENTRIES})")
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    stake = v.stake - tx.amount
    status = v.status
    if status == ValidatorStatus.ACTIVE and stake < state.params.min_validator_stake:
        status = ValidatorStatus.INACTIVE
    entry = UnbondingEntry(amount=tx.amount, release_height=height + state.params.unbonding_period)
    state.validators[tx.sender] = replace(v, stake=stake, status=status, unbonding=(*v.unbonding, entry))


def process_register_provider(state: State, tx: RegisterProvider, height: int) -> None:
    existing = state.providers.get(tx.sender)
    bond = _add(existing.bond if existing else 0, tx.bond, "provider bond")
    if bond < state.params.min_provider_bond:
        raise ex.InvalidAmount(f"provider bond {bond} below the minimum {state.params.min_provider_bond}")
    _require_funds(state, tx.sender, tx.fee + tx.bond)
    _charge(state, tx, tx.bond)
    if existing is None:
        state.providers[tx.sender] = Provider(capabilities=tx.capabilities, bond=bond, completed=0, failed=0, missed=0)
    else:
        state.providers[tx.sender] = replace(existing, capabilities=tx.capabilities, bond=bond)


def process_register_model(state: State, tx: RegisterModel, height: int) -> None:
    """Register a model under ``name@version``; the registration fee is burned.

    Names: the first account to register a name owns it and every version of
    it (others get :class:`ModelNameTaken`); a version is registered once and
    never changes; the last version registered is the name's latest. A model
    id is registered once, under one name and version, so a task's model id
    names one owner and one royalty.
    """
    p = state.params
    for what, text in (("name", tx.name), ("version", tx.version)):
        if not is_valid_model_name(text):
            raise ex.InvalidModelName(f"model {what} {text!r}: lowercase letters, digits and . _ - (first a letter "
                                      f"or digit), at most 64, and not a 64-digit hex id")
    if tx.model_id in state.models:
        held = state.models[tx.model_id]
        raise ex.ModelAlreadyRegistered(f"model {tx.model_id.hex()[:16]} is registered as {held.name}@{held.version}")
    holder = state.model_names.get(tx.name)
    if holder is not None and holder.owner != tx.sender:
        raise ex.ModelNameTaken(f"model name {tx.name!r} belongs to {holder.owner.hex()}")
    if (tx.name, tx.version) in state.model_versions:
        raise ex.ModelVersionTaken(f"{tx.name}@{tx.version} is registered already; versions never change")
    if tx.royalty_per_unit > p.max_royalty_per_unit:
        raise ex.RoyaltyTooHigh(f"royalty {tx.royalty_per_unit} per unit over the maximum {p.max_royalty_per_unit}")
    if tx.bundle_size == 0:
        raise ex.InvalidAmount("a model bundle is not empty")
    _require_funds(state, tx.sender, tx.fee + p.model_registration_fee)
    _charge(state, tx, p.model_registration_fee)
    state.burned += p.model_registration_fee
    state.models[tx.model_id] = ModelEntry(
        model_id=tx.model_id, owner=tx.sender, name=tx.name, version=tx.version,
        royalty_per_unit=tx.royalty_per_unit, input=tx.input, output=tx.output, bundle_size=tx.bundle_size,
        registered_height=height,
    )
    state.model_names[tx.name] = ModelName(name=tx.name, owner=tx.sender, latest_version=tx.version)
    state.model_versions[(tx.name, tx.version)] = tx.model_id


def _royalty_per_unit(state: State, model_id: bytes | None) -> int:
    """The royalty a task naming ``model_id`` escrows per unit (0 without a model); raises :class:`UnknownModel`."""
    if model_id is None:
        return 0
    entry = state.models.get(model_id)
    if entry is None:
        raise ex.UnknownModel(f"no registered model {model_id.hex()}")
    return entry.royalty_per_unit


def _pay_royalty(state: State, task: Task, units: int) -> int:
    """Credit the model's owner the royalty of ``units`` units of ``task``; return the amount (taken from escrow)."""
    amount = task.royalty_per_unit * units
    if amount:
        assert task.model_id is not None  # a royalty is only ever escrowed for a registered model
        _credit(state, state.models[task.model_id].owner, amount)
    return amount


def process_post_task(state: State, tx: PostTask, height: int) -> None:
    p = state.params
    if tx.kind not in (TaskKind.BATCH, TaskKind.STREAM):
        raise ex.InvalidTransaction(f"unknown task kind {tx.kind}")
    if tx.kind == TaskKind.BATCH and tx.units != 1:
        raise ex.InvalidAmount("a batch task has exactly 1 unit")
    if not 1 <= tx.units <= p.max_stream_units:
        raise ex.InvalidAmount(f"units must be in 1..{p.max_stream_units}")
    if tx.max_unit_price == 0:
        raise ex.InvalidAmount("max_unit_price must be positive")
    if not 1 <= tx.bid_window <= p.max_bid_window:
        raise ex.InvalidAmount(f"bid_window must be in 1..{p.max_bid_window} blocks")
    if not 1 <= tx.exec_blocks <= p.max_exec_blocks:
        raise ex.InvalidAmount(f"exec_blocks must be in 1..{p.max_exec_blocks} blocks")
    if tx.audit_rate_bps > BPS:
        raise ex.InvalidAmount(f"audit_rate_bps must be at most {BPS}")
    royalty = _royalty_per_unit(state, tx.model_id)
    per_unit = tx.max_unit_price + royalty
    escrow = _add(per_unit * tx.units if per_unit * tx.units <= U64_MAX else U64_MAX + 1,
                  p.audit_fee, "task escrow")
    task_id = compute_task_id(tx.sender, tx.nonce)
    if task_id in state.tasks:
        raise ex.InvalidTransaction("task id already exists")
    _require_funds(state, tx.sender, tx.fee + escrow)
    _charge(state, tx, escrow)
    state.tasks[task_id] = Task(
        task_id=task_id,
        client=tx.sender,
        kind=tx.kind,
        spec_hash=tx.spec_hash,
        requirements=tx.requirements,
        max_unit_price=tx.max_unit_price,
        units=tx.units,
        audit_rate_bps=tx.audit_rate_bps,
        exec_blocks=tx.exec_blocks,
        status=TaskStatus.POSTED,
        outcome=TaskOutcome.NONE,
        escrow=escrow,
        audit_fee=p.audit_fee,
        post_height=height,
        bid_deadline=height + tx.bid_window,
        model_id=tx.model_id,
        royalty_per_unit=royalty,
    )


def process_cancel_task(state: State, tx: CancelTask, height: int) -> None:
    task = _get_task(state, tx.task_id)
    if task.client != tx.sender:
        raise ex.NotAuthorized("only the task's client may cancel it")
    _require_status(task, TaskStatus.POSTED)
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    _credit(state, task.client, task.escrow)
    state.tasks[task.task_id] = replace(
        task, escrow=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.CANCELLED, settled_height=height
    )


def terms_hash_of_task(task: Task) -> bytes:
    """The terms a bid on ``task`` must have been made for (see :func:`task_terms_hash`)."""
    return task_terms_hash(kind=task.kind, spec_hash=task.spec_hash, requirements=task.requirements,
                           units=task.units, exec_blocks=task.exec_blocks, model_id=task.model_id)


def process_assign(state: State, tx: Assign, height: int, *, check_signatures: bool = True) -> None:
    task = _get_task(state, tx.task_id)
    bid = tx.bid.bid
    if task.client != tx.sender:
        raise ex.NotAuthorized("only the task's client may assign it")
    _require_status(task, TaskStatus.POSTED)
    if height > task.bid_deadline:
        raise ex.DeadlinePassed(f"bid window closed at height {task.bid_deadline}")
    if bid.task_id != task.task_id:
        raise ex.InvalidBid("bid is for another task")
    if bid.terms_hash != terms_hash_of_task(task):
        raise ex.InvalidBid("bid was made for other terms (spec, requirements, units or exec_blocks) "
                            "than the task was posted with")
    if bid.expiry_height < height:
        raise ex.InvalidBid(f"bid expired at height {bid.expiry_height}")
    if not 0 < bid.unit_price <= task.max_unit_price:
        raise ex.InvalidBid(f"bid price {bid.unit_price} outside 1..{task.max_unit_price}")
    if bid.provider == task.client:
        raise ex.InvalidBid("a client cannot assign its own task to itself")
    if bid.provider not in state.providers:
        raise ex.UnknownProvider(f"{bid.provider.hex()} is not a registered provider")
    if address_of(tx.bid.public_key) != bid.provider:
        raise ex.InvalidBid("bid public key does not belong to the provider")
    if check_signatures and not _verify_signed(
        state.chain_id, Domain.BID, bid, tx.bid.public_key, tx.bid.signature
    ):
        raise ex.InvalidBid("bad provider signature on bid")
    price = bid.unit_price * task.units
    collateral = _bps(price, state.params.collateral_bps)
    _require_funds(state, tx.sender, tx.fee)
    _require_funds(state, bid.provider, collateral)
    _charge(state, tx)
    _credit(state, task.client, (task.max_unit_price - bid.unit_price) * task.units)
    prov = state.get_account(bid.provider)
    state.accounts[bid.provider] = replace(prov, balance=prov.balance - collateral)
    state.tasks[task.task_id] = replace(
        task,
        status=TaskStatus.ASSIGNED,
        provider=bid.provider,
        unit_price=bid.unit_price,
        escrow=price + task.royalty_per_unit * task.units + task.audit_fee,
        collateral=collateral,
        assign_height=height,
        deadline_height=height + task.exec_blocks,
    )


def process_reopen_task(state: State, tx: ReopenTask, height: int) -> None:
    """Failover: the client takes a batch task back from its provider and opens a fresh auction.

    The provider is treated as a no-show, with a smaller slash than a missed
    deadline (``Params.reopen_slash_bps``: the client's claim is not proven
    on the ledger); the client locks the full ``max_unit_price`` again, as at
    ``PostTask``, and pays only the provider that delivers. A provider whose
    ``CommitResult`` landed first has kept the task (it is COMMITTED, not
    ASSIGNED), so a result that is in cannot be taken away.
    """
    p = state.params
    task = _get_task(state, tx.task_id)
    if task.client != tx.sender:
        raise ex.NotAuthorized("only the task's client may reopen it")
    if task.kind != TaskKind.BATCH:
        raise ex.InvalidTaskState("only batch tasks can be reopened; a stream's client closes it instead")
    _require_status(task, TaskStatus.ASSIGNED)
    if height < task.assign_height + p.reopen_after_blocks:
        raise ex.InvalidTaskState(f"task assigned at height {task.assign_height}; it can be reopened from height "
                                  f"{task.assign_height + p.reopen_after_blocks}")
    if height >= task.deadline_height:
        raise ex.DeadlinePassed(f"execution deadline was height {task.deadline_height}: the task settles as missed")
    if task.reopens >= p.max_reopens:
        raise ex.InvalidTaskState(f"task was reopened {task.reopens} times already (at most {p.max_reopens})")
    # Back to the escrow of a posted task: the full max price, as PostTask locked it.
    topup = (task.max_unit_price - task.unit_price) * task.units
    _require_funds(state, tx.sender, tx.fee + topup)
    _charge(state, tx, extra=topup)
    _release_no_show(state, task, p.reopen_slash_bps)
    state.tasks[task.task_id] = replace(
        task,
        status=TaskStatus.POSTED,
        escrow=task.escrow + topup,
        bid_deadline=height + (task.bid_deadline - task.post_height),
        provider=None,
        unit_price=0,
        collateral=0,
        assign_height=0,
        deadline_height=0,
        reopens=task.reopens + 1,
    )


def process_inputs_unavailable(state: State, tx: InputsUnavailable, height: int) -> None:
    """The provider gives a batch task back: it could not fetch the inputs. Settles without a slash.

    Not proven either way (who failed a transfer is not visible on the
    ledger), so neither side is punished: the provider's collateral comes
    back with a reservation fee (``reservation_fee_bps`` of the price) from
    the client's escrow, and the provider's ``unavailable`` count goes up,
    for clients to weigh. Must land before the deadline: after it, the
    provider missed.
    """
    task = _get_task(state, tx.task_id)
    if task.provider != tx.sender:
        raise ex.NotAuthorized("only the assigned provider may report the inputs unavailable")
    if task.kind != TaskKind.BATCH:
        raise ex.InvalidTaskState("stream tasks end by StreamClaim and deadline, not InputsUnavailable")
    _require_status(task, TaskStatus.ASSIGNED)
    if height >= task.deadline_height:
        raise ex.DeadlinePassed(f"execution deadline was height {task.deadline_height}")
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    provider = tx.sender
    price = task.unit_price * task.units
    reservation = min(_bps(price, state.params.reservation_fee_bps), task.escrow)
    _credit(state, provider, task.collateral + reservation)
    _credit(state, task.client, task.escrow - reservation)
    prov = state.providers[provider]
    state.providers[provider] = replace(prov, unavailable=prov.unavailable + 1)
    state.tasks[task.task_id] = replace(
        task, escrow=0, collateral=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.INPUTS_UNAVAILABLE,
        settled_height=height,
    )


def process_commit_result(state: State, tx: CommitResult, height: int) -> None:
    task = _get_task(state, tx.task_id)
    if task.provider != tx.sender:
        raise ex.NotAuthorized("only the assigned provider may commit a result")
    if task.kind != TaskKind.BATCH:
        raise ex.InvalidTaskState("stream tasks settle by StreamClaim, not CommitResult")
    _require_status(task, TaskStatus.ASSIGNED)
    if height > task.deadline_height:
        raise ex.DeadlinePassed(f"execution deadline was height {task.deadline_height}")
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    state.tasks[task.task_id] = replace(
        task,
        status=TaskStatus.COMMITTED,
        result_hash=tx.result_hash,
        commit_height=height,
        challenge_end=height + state.params.challenge_window,
    )


def process_attest(state: State, tx: Attest, height: int) -> None:
    task = _get_task(state, tx.task_id)
    _require_status(task, TaskStatus.AUDITING)
    if tx.sender not in task.verifiers:
        raise ex.NotAuthorized("sender was not drawn as a verifier of this task")
    if any(a.verifier == tx.sender for a in task.attestations):
        raise ex.InvalidTaskState("verifier already attested")
    if height > task.audit_deadline:
        raise ex.DeadlinePassed(f"audit closed at height {task.audit_deadline}")
    if tx.verdict == AuditVerdict.UNAVAILABLE and task.kind != TaskKind.BATCH:
        # A stream dispute's item is the client's to produce (one it cannot produce loses the dispute); the
        # provider has no committed result to withhold.
        raise ex.InvalidTaskState("an unavailable verdict is about a committed batch result, not a stream item")
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    state.tasks[task.task_id] = replace(
        task, attestations=(*task.attestations, Attestation(verifier=tx.sender, verdict=tx.verdict))
    )


def process_dispute(state: State, tx: Dispute, height: int, *, check_signatures: bool = True) -> None:
    task = _get_task(state, tx.task_id)
    if task.client != tx.sender:
        raise ex.NotAuthorized("only the task's client may dispute it")
    if task.kind == TaskKind.BATCH:
        _require_status(task, TaskStatus.COMMITTED)
        if tx.item is not None:
            raise ex.InvalidTransaction("a batch dispute names no stream item")
        if height > task.challenge_end:
            raise ex.DeadlinePassed(f"challenge window closed at height {task.challenge_end}")
    else:
        _require_status(task, TaskStatus.ASSIGNED)
        if tx.item is None:
            raise ex.InvalidTransaction("a stream dispute must carry the provider-signed output")
        out = tx.item.output
        if out.task_id != task.task_id:
            raise ex.InvalidTransaction("disputed output belongs to another task")
        if address_of(tx.item.public_key) != task.provider:
            raise ex.InvalidSignature("disputed output was not signed by the task's provider")
        if check_signatures and not _verify_signed(
            state.chain_id, Domain.STREAM_OUTPUT, out, tx.item.public_key, tx.item.signature
        ):
            raise ex.InvalidSignature("bad provider signature on the disputed output")
    verifiers = compute_verifiers(state, task, state.randomness)
    if not verifiers:
        raise ex.InvalidTaskState("no eligible verifiers are registered to audit this task")
    bond = state.params.dispute_bond
    _require_funds(state, tx.sender, tx.fee + bond)
    _charge(state, tx, bond)
    state.tasks[task.task_id] = replace(
        task,
        status=TaskStatus.AUDITING,
        audit_drawn=True,
        verifiers=verifiers,
        attestations=(),
        audit_deadline=height + state.params.audit_window,
        dispute_bond=bond,
        disputed_item=tx.item.output if tx.item is not None else None,
    )


def process_stream_claim(state: State, tx: StreamClaim, height: int, *, check_signatures: bool = True) -> None:
    receipt = tx.receipt.receipt
    task = _get_task(state, receipt.task_id)
    if task.provider != tx.sender:
        raise ex.NotAuthorized("only the assigned provider may claim a stream receipt")
    if task.kind != TaskKind.STREAM:
        raise ex.InvalidTaskState("only stream tasks take receipts")
    _require_status(task, TaskStatus.ASSIGNED)
    if height > task.deadline_height + state.params.challenge_window:
        raise ex.DeadlinePassed("the stream's claim period is over")
    if not task.claimed_units < receipt.units <= task.units:
        raise ex.InvalidReceipt(f"receipt covers {receipt.units} units; need {task.claimed_units + 1}..{task.units}")
    if address_of(tx.receipt.public_key) != task.client:
        raise ex.InvalidReceipt("receipt was not signed by the task's client")
    if check_signatures and not _verify_signed(
        state.chain_id, Domain.RECEIPT, receipt, tx.receipt.public_key, tx.receipt.signature
    ):
        raise ex.InvalidReceipt("bad client signature on receipt")
    _require_funds(state, tx.sender, tx.fee)
    amount = (receipt.units - task.claimed_units) * task.unit_price
    cut = _bps(amount, state.params.protocol_fee_bps)
    _charge(state, tx)
    _credit(state, task.provider, amount - cut)
    state.fee_pool += cut
    royalty = _pay_royalty(state, task, receipt.units - task.claimed_units)
    task = replace(task, escrow=task.escrow - amount - royalty, claimed_units=receipt.units)
    state.tasks[task.task_id] = task
    if task.claimed_units == task.units:
        _settle_stream(state, task, height)


def process_evidence(state: State, tx: Evidence, height: int) -> None:
    a, b = tx.vote_a, tx.vote_b
    if a.validator != b.validator:
        raise ex.InvalidEvidence("votes are from different validators")
    if (a.vote.height, a.vote.round, a.vote.step) != (b.vote.height, b.vote.round, b.vote.step):
        raise ex.InvalidEvidence("votes are for different (height, round, step)")
    if a.vote.step not in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
        raise ex.InvalidEvidence(f"unknown vote step {a.vote.step}")
    if a.vote.block_hash == b.vote.block_hash:
        raise ex.InvalidEvidence("votes are for the same block: not a double vote")
    v = _get_validator(state, a.validator)
    key = EvidenceKey(validator=a.validator, height=a.vote.height, round=a.vote.round, step=a.vote.step)
    if key in state.evidence_seen:
        raise ex.InvalidEvidence("this double vote was already punished")
    backend = get_backend()
    for sv in (a, b):
        if not backend.verify(v.bls_pubkey, vote_signing_bytes(state.chain_id, sv.vote), sv.signature):
            raise ex.InvalidEvidence("a vote's signature does not verify with the validator's key")
    _require_funds(state, tx.sender, tx.fee)
    _charge(state, tx)
    slash = _bps(v.stake, state.params.double_sign_slash_bps)
    reward = _bps(slash, state.params.evidence_reward_bps)
    _credit(state, tx.sender, reward)
    state.burned += slash - reward
    state.validators[a.validator] = replace(
        v,
        stake=v.stake - slash,
        status=ValidatorStatus.JAILED,
        jailed_until=height + state.params.jail_period,
    )
    state.evidence_seen.add(key)


# Each processor takes its own transaction type; the table's key is that type, so the body handed over always fits.
_Processor = Callable[[State, Any, int], None]


def _processors(check_signatures: bool) -> dict[type[Record], _Processor]:
    def signed(fn: Callable[..., None]) -> _Processor:
        return lambda s, t, h: fn(s, t, h, check_signatures=check_signatures)

    return {
        Transfer: process_transfer,
        RegisterValidator: process_register_validator,
        Bond: process_bond,
        Unbond: process_unbond,
        RegisterProvider: process_register_provider,
        PostTask: process_post_task,
        CancelTask: process_cancel_task,
        Assign: signed(process_assign),
        CommitResult: process_commit_result,
        Attest: process_attest,
        Dispute: signed(process_dispute),
        StreamClaim: signed(process_stream_claim),
        Evidence: process_evidence,
        ReopenTask: process_reopen_task,
        InputsUnavailable: process_inputs_unavailable,
        RegisterModel: process_register_model,
    }


_PROCESSORS = {True: _processors(True), False: _processors(False)}


def check_nonce_and_fee(state: State, stx: SignedTransaction) -> None:
    body = stx.body
    acct = state.get_account(body.sender)
    if body.nonce != acct.nonce:
        raise ex.NonceMismatch(
            f"nonce {body.nonce} for {body.sender.hex()}, expected {acct.nonce}",
            expected=acct.nonce,
            got=body.nonce,
        )
    if body.fee < state.params.min_fee:
        raise ex.FeeTooLow(f"fee {body.fee} below the minimum {state.params.min_fee}")


def process_transaction(state: State, stx: SignedTransaction, *, check_signatures: bool = True) -> None:
    """Apply one transaction at ``state.height``, or raise and change nothing."""
    if check_signatures:
        verify_transaction_signature(state.chain_id, stx)
    elif address_of(stx.public_key) != stx.body.sender:
        raise ex.InvalidSignature("public key does not belong to the sender address")
    check_nonce_and_fee(state, stx)
    _PROCESSORS[check_signatures][type(stx.body)](state, stx.body, state.height)


# ============================================================ end of block


def _settle_paid(state: State, task: Task, height: int) -> Task:
    """Pay the provider and the model's owner, reward verifiers who attested, return collateral and bond."""
    price = task.unit_price * task.units
    cut = _bps(price, state.params.protocol_fee_bps)
    provider = task.provider
    assert provider is not None
    _credit(state, provider, price - cut + task.collateral + task.dispute_bond)
    state.fee_pool += cut
    _pay_royalty(state, task, task.units)
    verifier_pay = _pay_verifiers(state, task, AuditVerdict.PASS)
    _credit(state, task.client, task.audit_fee - verifier_pay)
    p = state.providers[provider]
    state.providers[provider] = replace(p, completed=p.completed + 1)
    return replace(
        task, escrow=0, collateral=0, dispute_bond=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.PAID,
        settled_height=height,
    )


def _pay_verifiers(state: State, task: Task, verdict: AuditVerdict, *, extra: int = 0) -> int:
    """Split the audit fee (+ ``extra``) among verifiers that attested ``verdict``; burn the remainder."""
    winners = [a.verifier for a in task.attestations if a.verdict == verdict]
    pot = task.audit_fee + extra if winners else 0
    if not winners:
        return 0
    share = pot // len(winners)
    for w in winners:
        _credit(state, w, share)
    state.burned += pot - share * len(winners)
    return task.audit_fee


def _settle_fraud(state: State, task: Task, height: int) -> Task:
    """Slash collateral: client compensated, verifiers rewarded, the rest burned; refund the client."""
    p = state.params
    to_client = _bps(task.collateral, p.fraud_client_share_bps)
    to_verifiers = _bps(task.collateral, p.fraud_verifier_share_bps)
    paid_verifiers = _pay_verifiers(state, task, AuditVerdict.FAIL, extra=to_verifiers)
    burned = task.collateral - to_client - (to_verifiers if paid_verifiers else 0)
    state.burned += burned
    # escrow still holds the unpaid price part and the audit fee (used by verifiers if any)
    refund = task.escrow - paid_verifiers + to_client + task.dispute_bond
    _credit(state, task.client, refund)
    provider = task.provider
    assert provider is not None
    prov = state.providers[provider]
    state.providers[provider] = replace(prov, failed=prov.failed + 1)
    return replace(
        task, escrow=0, collateral=0, dispute_bond=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.FRAUD,
        settled_height=height,
    )


def _settle_stream(state: State, task: Task, height: int) -> None:
    """End a stream: remaining escrow back to the client, collateral back to the provider."""
    provider = task.provider
    assert provider is not None
    _credit(state, task.client, task.escrow)
    _credit(state, provider, task.collateral)
    if task.claimed_units:
        p = state.providers[provider]
        state.providers[provider] = replace(p, completed=p.completed + 1)
    state.tasks[task.task_id] = replace(
        task, escrow=0, collateral=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.PAID, settled_height=height
    )


def _release_no_show(state: State, task: Task, slash_bps: int) -> None:
    """The provider leaves ``task`` as a no-show: ``slash_bps`` of its collateral burned, the rest back to it,
    its ``missed`` counted. The caller moves the task (settled, or posted again) and the client's escrow."""
    provider = task.provider
    assert provider is not None
    slash = _bps(task.collateral, slash_bps)
    state.burned += slash
    _credit(state, provider, task.collateral - slash)
    prov = state.providers[provider]
    state.providers[provider] = replace(prov, missed=prov.missed + 1)


def _settle_missed(state: State, task: Task, height: int) -> Task:
    """The no-show rule: part of the collateral burned, the rest back, the escrow refunded, ``missed`` counted.

    Applied to a batch task whose provider did not commit by its deadline,
    and to one whose committed result the audit could not fetch
    (:func:`_settle_audit`): a result nobody can fetch is no delivery. In the
    second case the verifiers who reported it unavailable are paid from the
    audit fee, as the winning side of any audit is, and the client's dispute
    bond (if it disputed) comes back. Nothing of the slash goes to the client
    or the verifiers: claiming unavailability earns nobody a share of the
    provider's collateral.
    """
    _release_no_show(state, task, state.params.missed_deadline_slash_bps)
    verifier_pay = _pay_verifiers(state, task, AuditVerdict.UNAVAILABLE) if task.attestations else 0
    _credit(state, task.client, task.escrow - verifier_pay + task.dispute_bond)
    return replace(
        task, escrow=0, collateral=0, dispute_bond=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.MISSED,
        settled_height=height,
    )


def audit_outcome(task: Task) -> TaskOutcome:
    """How an audit of ``task`` settles, from its attestations (pure; :func:`_settle_audit` applies it).

    * **fraud** only on more ``FAIL`` than ``PASS`` verdicts: both are verdicts
      on a result that was fetched and checked. ``UNAVAILABLE`` never counts
      towards fraud.
    * **missed** (the no-show rule) for a batch result that *no* verifier
      fetched (no ``PASS``, no ``FAIL``) and that a majority of the drawn
      verifiers reported ``UNAVAILABLE``: the provider committed a result and
      did not serve it. One fetch and check by anyone outweighs any number of
      unavailability claims (the result was there to be had), and one or a
      few verifiers that lie "unavailable" cannot reach a majority of the
      drawn on their own, so they cannot hurt an honest provider.
    * **paid** otherwise (a batch result: passed, a tie, or too few answers --
      innocent unless shown otherwise); a stream keeps streaming.
    """
    verdicts = [a.verdict for a in task.attestations]
    passes, fails = verdicts.count(AuditVerdict.PASS), verdicts.count(AuditVerdict.FAIL)
    unavailable = verdicts.count(AuditVerdict.UNAVAILABLE)
    if fails > passes:
        return TaskOutcome.FRAUD
    if task.kind == TaskKind.BATCH and passes == fails == 0 and 2 * unavailable > len(task.verifiers):
        return TaskOutcome.MISSED
    return TaskOutcome.PAID


def _settle_audit(state: State, task: Task, height: int) -> None:
    outcome = audit_outcome(task)
    if outcome == TaskOutcome.FRAUD:
        state.tasks[task.task_id] = _settle_fraud(state, task, height)
    elif outcome == TaskOutcome.MISSED:
        state.tasks[task.task_id] = _settle_missed(state, task, height)
    elif task.kind == TaskKind.BATCH:
        state.tasks[task.task_id] = _settle_paid(state, task, height)
    else:
        # A stream survives a failed dispute: verifiers paid, bond to the provider, streaming goes on.
        verifier_pay = _pay_verifiers(state, task, AuditVerdict.PASS)
        provider = task.provider
        assert provider is not None
        _credit(state, provider, task.dispute_bond)
        state.tasks[task.task_id] = replace(
            task,
            status=TaskStatus.ASSIGNED,
            escrow=task.escrow - verifier_pay,
            audit_fee=task.audit_fee - verifier_pay,
            dispute_bond=0,
            verifiers=(),
            attestations=(),
            disputed_item=None,
        )


def _process_task_deadlines(state: State, task: Task, height: int) -> None:
    p = state.params
    status = task.status
    if status == TaskStatus.POSTED:
        if height >= task.bid_deadline:
            _credit(state, task.client, task.escrow)
            state.tasks[task.task_id] = replace(
                task, escrow=0, status=TaskStatus.SETTLED, outcome=TaskOutcome.EXPIRED, settled_height=height
            )
    elif status == TaskStatus.ASSIGNED:
        if task.kind == TaskKind.STREAM:
            if height >= task.deadline_height + p.challenge_window:
                _settle_stream(state, task, height)
        elif height >= task.deadline_height:
            state.tasks[task.task_id] = _settle_missed(state, task, height)
    elif status == TaskStatus.COMMITTED:
        if not task.audit_drawn and height > task.commit_height:
            draw = int.from_bytes(hashlib.sha256(b"p2pgpu/audit" + state.randomness + task.task_id).digest(), "big")
            verifiers = compute_verifiers(state, task, state.randomness) if draw % BPS < task.audit_rate_bps else ()
            if verifiers:
                state.tasks[task.task_id] = replace(
                    task, status=TaskStatus.AUDITING, audit_drawn=True, verifiers=verifiers,
                    audit_deadline=height + p.audit_window,
                )
                return
            task = replace(task, audit_drawn=True)
            state.tasks[task.task_id] = task
        if task.audit_drawn and height >= task.challenge_end:
            state.tasks[task.task_id] = _settle_paid(state, task, height)
    elif status == TaskStatus.AUDITING:
        if len(task.attestations) == len(task.verifiers) or height >= task.audit_deadline:
            _settle_audit(state, task, height)


def process_end_of_block(state: State, proposer: bytes) -> None:
    """Deadlines, audit draws, settlement, unbonding and jail release, rewards, epoch change."""
    height = state.height
    p = state.params
    for addr in sorted(state.validators):
        v = state.validators[addr]
        if v.unbonding and any(u.release_height <= height for u in v.unbonding):
            released = sum(u.amount for u in v.unbonding if u.release_height <= height)
            _credit(state, addr, released)
            v = replace(v, unbonding=tuple(u for u in v.unbonding if u.release_height > height))
        if v.status == ValidatorStatus.JAILED and height >= v.jailed_until:
            active = v.stake >= p.min_validator_stake
            v = replace(v, status=ValidatorStatus.ACTIVE if active else ValidatorStatus.INACTIVE)
        state.validators[addr] = v
    for task_id in sorted(tid for tid, t in state.tasks.items() if t.status != TaskStatus.SETTLED):
        _process_task_deadlines(state, state.tasks[task_id], height)
    for task_id in [tid for tid, t in state.tasks.items()
                    if t.status == TaskStatus.SETTLED and t.settled_height + p.task_retention <= height]:
        del state.tasks[task_id]  # settled long enough ago: every follower has seen it (Params.task_retention)
    state.minted += p.block_reward
    _credit(state, proposer, state.fee_pool + p.block_reward)
    state.fee_pool = 0
    if is_epoch_end(height, p.epoch_length):
        epoch = compute_epoch(height, p.epoch_length) + 1
        committee = compute_committee(state.validators, state.randomness, p.committee_size, epoch,
                                      p.min_validator_stake)
        if not committee.members:
            # Never halt the chain for want of validators: the old committee carries on.
            committee = Committee(epoch=epoch, members=state.committee.members)
        state.previous_committee = state.committee
        state.committee = committee


# ============================================================ blocks


def committee_for_height(state: State, height: int) -> Committee:
    """The committee that signs block ``height`` (the current or the previous epoch's)."""
    epoch = compute_epoch(height, state.params.epoch_length)
    if state.committee.epoch == epoch:
        return state.committee
    if state.previous_committee.epoch == epoch and state.previous_committee.members:
        return state.previous_committee
    raise ex.InvalidBlock(f"no committee known for height {height} (epoch {epoch})")


def compute_randomness(state: State, header: BlockHeader) -> bytes:
    """Hash of the previous block's aggregate signature: unknown until the committee signs it."""
    if header.last_commit is None:
        return hashlib.sha256(b"p2pgpu/rand" + state.chain_id).digest()
    return hashlib.sha256(b"p2pgpu/rand" + header.last_commit.aggregate_signature).digest()


def validate_header(state: State, header: BlockHeader, *, check_last_commit: bool = True) -> None:
    height = state.height + 1
    if header.height != height:
        raise ex.InvalidBlock(f"block height {header.height}, expected {height}")
    if header.prev_hash != state.last_block_hash:
        raise ex.InvalidBlock(f"block {height} does not build on the current head")
    committee = committee_for_height(state, height)
    expected = compute_proposer(committee, height, header.round)
    if header.proposer != expected:
        raise ex.InvalidBlock(f"block {height} round {header.round} proposed by the wrong validator")
    if height == 1:
        if header.last_commit is not None:
            raise ex.InvalidBlock("block 1 carries no last commit")
        return
    if header.last_commit is None:
        raise ex.InvalidBlock(f"block {height} lacks the certificate of block {height - 1}")
    if header.last_commit.block_hash == NIL_BLOCK:
        raise ex.InvalidBlock("last commit certifies no block")
    if check_last_commit:
        verify_certificate(
            committee_for_height(state, height - 1),
            state.chain_id,
            header.last_commit,
            height=height - 1,
            block_hash=state.last_block_hash,
        )


def begin_block(state: State, header: BlockHeader) -> None:
    state.height = header.height
    state.randomness = compute_randomness(state, header)


def apply_block(
    state: State,
    block: Block,
    *,
    check_signatures: bool = True,
    check_last_commit: bool = True,
) -> State:
    """Validate and apply ``block``; return the new state (``state`` is untouched).

    ``header.state_root`` is the root of the post-state *before* its
    ``last_block_hash`` is set to this block's hash (the hash covers the root).
    """
    header = block.header
    validate_header(state, header, check_last_commit=check_last_commit)
    if len(block.transactions) > state.params.max_block_txs:
        raise ex.InvalidBlock(f"block has {len(block.transactions)} transactions, limit {state.params.max_block_txs}")
    if compute_tx_root(block.transactions) != header.tx_root:
        raise ex.InvalidBlock("tx_root does not match the transactions")
    post = state.copy()
    begin_block(post, header)
    for i, stx in enumerate(block.transactions):
        try:
            process_transaction(post, stx, check_signatures=check_signatures)
        except ex.InvalidTransaction as exc:
            raise ex.InvalidBlock(f"transaction {i} ({type(stx.body).__name__}): {exc}") from exc
    process_end_of_block(post, header.proposer)
    expected_next = post.committee if is_epoch_end(header.height, state.params.epoch_length) else None
    if header.next_committee != expected_next:
        raise ex.InvalidBlock(f"block {header.height} names the wrong next committee")
    if post.state_root() != header.state_root:
        raise ex.InvalidBlock(f"block {header.height} state root does not match its execution")
    post.last_block_hash = header.block_hash()
    return post


def build_block(
    state: State,
    candidates: Iterable[SignedTransaction],
    *,
    proposer: bytes,
    round_: int = 0,
    timestamp_ms: int = 0,
    last_commit: CommitCertificate | None = None,
    check_signatures: bool = True,
) -> tuple[Block, State, list[tuple[SignedTransaction, ex.InvalidTransaction]]]:
    """Build a valid block from ``candidates``, skipping (and returning) the ones that fail.

    Returns the block, the post-state (as ``apply_block`` would return it)
    and the rejected transactions with their reasons.
    """
    height = state.height + 1
    draft = BlockHeader(
        height=height, round=round_, prev_hash=state.last_block_hash, proposer=proposer,
        timestamp_ms=timestamp_ms, tx_root=b"\x00" * 32, state_root=b"\x00" * 32,
        last_commit=last_commit, next_committee=None,
    )
    post = state.copy()
    begin_block(post, draft)
    included: list[SignedTransaction] = []
    rejected: list[tuple[SignedTransaction, ex.InvalidTransaction]] = []
    for stx in candidates:
        if len(included) >= state.params.max_block_txs:
            break
        try:
            process_transaction(post, stx, check_signatures=check_signatures)
        except ex.InvalidTransaction as exc:
            rejected.append((stx, exc))
        else:
            included.append(stx)
    process_end_of_block(post, proposer)
    header = replace(
        draft,
        tx_root=compute_tx_root(included),
        state_root=post.state_root(),
        next_committee=post.committee if is_epoch_end(height, state.params.epoch_length) else None,
    )
    post.last_block_hash = header.block_hash()
    return Block(header=header, transactions=tuple(included)), post, rejected
