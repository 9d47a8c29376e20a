"""Ledger state: accounts, validators, providers, tasks, registered models, committee, pools.

Entities are frozen records, replaced (never mutated) on change. The
:class:`State` container holds them in dicts; :meth:`State.copy` copies only
the dicts, so applying a block to a copy costs O(entries) pointer copies and
leaves the parent untouched — fork choice and proposal building rely on it.

The canonical encoding of :class:`StateRecord` is the state root's preimage
and the snapshot format of the store.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from dataclasses import dataclass, field, replace
from typing import Annotated

from ledger.books import get_books
from ledger.codec import (
    U8,
    U16,
    U32,
    U64,
    Address,
    Bytes,
    Hash32,
    ListOf,
    Maybe,
    Nested,
    Record,
    Text,
    decode,
    encode,
    encode_with_encoded_list,
    record,
)
from ledger.modelnames import ModelRef
from ledger.params import Params
from ledger.transactions import MAX_CAPABILITIES_BYTES, AuditVerdict, StreamOutput, TensorSignature, Verdict
from ledger.votes import BLSPubkey

MAX_LIST = 1 << 24


class ValidatorStatus(enum.IntEnum):
    ACTIVE = 1  # eligible for committees (stake >= minimum, not jailed)
    INACTIVE = 2  # below minimum stake; may bond again
    JAILED = 3  # slashed for a double vote; out of committees until released


class TaskStatus(enum.IntEnum):
    POSTED = 1  # escrow locked, collecting bids
    ASSIGNED = 2  # bid accepted, provider running (or streaming)
    COMMITTED = 3  # result committed; audit draw pending, then challenge window
    AUDITING = 4  # verifiers drawn, waiting for attestations
    SETTLED = 5  # terminal; see TaskOutcome


class TaskOutcome(enum.IntEnum):
    NONE = 0
    PAID = 1  # result accepted (audit passed or no dispute)
    FRAUD = 2  # audit failed: provider slashed, client refunded
    MISSED = 3  # provider missed its deadline, or did not serve its committed result to the audit: refund, partial slash
    EXPIRED = 4  # no bid assigned within the bid window: refund
    CANCELLED = 5  # client cancelled before assignment: refund
    INPUTS_UNAVAILABLE = 6  # the provider could not fetch the inputs: refund less a reservation fee, no slash


@record
class Account(Record):
    balance: U64
    nonce: U64


@record
class UnbondingEntry(Record):
    amount: U64
    release_height: U64


@record
class Validator(Record):
    bls_pubkey: BLSPubkey
    stake: U64
    status: U8
    jailed_until: U64
    unbonding: Annotated[tuple[UnbondingEntry, ...], ListOf(Nested(UnbondingEntry), 1024)]


@record
class Provider(Record):
    capabilities: Annotated[bytes, Bytes(MAX_CAPABILITIES_BYTES)]
    bond: U64
    completed: U64
    failed: U64
    missed: U64
    unavailable: U64 = 0  # tasks it gave back because it could not fetch their inputs (InputsUnavailable)


@record
class Attestation(Record):
    verifier: Address
    verdict: Verdict
    """An :class:`~ledger.transactions.AuditVerdict`."""

    @property
    def passed(self) -> bool:
        return self.verdict == AuditVerdict.PASS


@record
class Task(Record):
    task_id: Hash32
    client: Address
    kind: U8
    spec_hash: Hash32
    requirements: Annotated[bytes, Bytes(1024)]
    max_unit_price: U64
    units: U32
    audit_rate_bps: U16
    exec_blocks: U32
    status: U8
    outcome: U8
    escrow: U64  # client funds held for this task (price part + audit fee)
    audit_fee: U64
    post_height: U64
    bid_deadline: U64
    provider: Annotated[bytes | None, Maybe(Bytes(20, 20))] = None
    unit_price: U64 = 0
    collateral: U64 = 0
    assign_height: U64 = 0
    deadline_height: U64 = 0
    result_hash: Annotated[bytes | None, Maybe(Bytes(32, 32))] = None
    commit_height: U64 = 0
    audit_drawn: bool = False
    challenge_end: U64 = 0
    verifiers: Annotated[tuple[bytes, ...], ListOf(Bytes(20, 20), 64)] = ()
    attestations: Annotated[tuple[Attestation, ...], ListOf(Nested(Attestation), 64)] = ()
    audit_deadline: U64 = 0
    dispute_bond: U64 = 0
    disputed_item: Annotated[StreamOutput | None, Maybe(Nested(StreamOutput))] = None
    claimed_units: U64 = 0
    settled_height: U64 = 0
    reopens: U8 = 0  # times the client took it back from a stopped provider (ReopenTask)
    model_id: Annotated[bytes | None, Maybe(Bytes(32, 32))] = None  # the registered model it runs, if any
    royalty_per_unit: U64 = 0  # the model's royalty when the task was posted; escrowed, paid to its owner


@record
class ModelEntry(Record):
    """A registered model (``RegisterModel``): who owns it, what it is called, what one unit of it costs in royalty.

    Never changed or removed once registered: a task that names it can rely
    on its owner and royalty until it settles.
    """

    model_id: Hash32
    owner: Address
    name: Annotated[str, Text(64, min_len=1)]
    version: Annotated[str, Text(64, min_len=1)]
    royalty_per_unit: U64
    input: TensorSignature
    output: TensorSignature
    bundle_size: U64
    registered_height: U64


@record
class ModelName(Record):
    """A registered model name: its owner (the first to register it) and its latest version (the last registered)."""

    name: Annotated[str, Text(64, min_len=1)]
    owner: Address
    latest_version: Annotated[str, Text(64, min_len=1)]


@record
class CommitteeMember(Record):
    address: Address
    bls_pubkey: BLSPubkey
    stake: U64


@record
class Committee(Record):
    """The validators that sign the blocks of one epoch, in canonical order."""

    epoch: U64
    members: Annotated[tuple[CommitteeMember, ...], ListOf(Nested(CommitteeMember), 1024)]

    @property
    def total_stake(self) -> int:
        return sum(m.stake for m in self.members)

    def committee_hash(self) -> bytes:
        return _committee_hash(self)


@functools.lru_cache(maxsize=8)
def _committee_hash(committee: Committee) -> bytes:
    """Committees are immutable and asked for their hash on every proposer lookup; encode each once."""
    return hashlib.sha256(encode(committee)).digest()


@record
class AccountEntry(Record):
    address: Address
    account: Account


@record
class ValidatorEntry(Record):
    address: Address
    validator: Validator


@record
class ProviderEntry(Record):
    address: Address
    provider: Provider


@record
class EvidenceKey(Record):
    validator: Address
    height: U64
    round: U32
    step: U8


@record
class StateRecord(Record):
    """Every field of :class:`State`, maps as key-sorted lists."""

    MAX_BYTES = 1 << 30
    chain_id: Hash32
    height: U64
    last_block_hash: Hash32
    randomness: Hash32
    params: Params
    genesis_supply: U64
    minted: U64
    burned: U64
    fee_pool: U64
    committee: Committee
    previous_committee: Committee
    accounts: Annotated[tuple[AccountEntry, ...], ListOf(Nested(AccountEntry), MAX_LIST)]
    validators: Annotated[tuple[ValidatorEntry, ...], ListOf(Nested(ValidatorEntry), MAX_LIST)]
    providers: Annotated[tuple[ProviderEntry, ...], ListOf(Nested(ProviderEntry), MAX_LIST)]
    tasks: Annotated[tuple[Task, ...], ListOf(Nested(Task), MAX_LIST)]
    evidence_seen: Annotated[tuple[EvidenceKey, ...], ListOf(Nested(EvidenceKey), MAX_LIST)]
    models: Annotated[tuple[ModelEntry, ...], ListOf(Nested(ModelEntry), MAX_LIST)] = ()
    model_names: Annotated[tuple[ModelName, ...], ListOf(Nested(ModelName), MAX_LIST)] = ()


@dataclass(slots=True)
class State:
    """The whole ledger state at one height. Copy before you change it."""

    chain_id: bytes
    params: Params
    genesis_supply: int
    height: int = 0
    last_block_hash: bytes = b"\x00" * 32
    randomness: bytes = b"\x00" * 32
    minted: int = 0
    burned: int = 0
    fee_pool: int = 0
    committee: Committee = field(default_factory=lambda: Committee(0, ()))
    previous_committee: Committee = field(default_factory=lambda: Committee(0, ()))
    accounts: dict[bytes, Account] = field(default_factory=dict)
    validators: dict[bytes, Validator] = field(default_factory=dict)
    providers: dict[bytes, Provider] = field(default_factory=dict)
    tasks: dict[bytes, Task] = field(default_factory=dict)
    evidence_seen: set[EvidenceKey] = field(default_factory=set)
    models: dict[bytes, ModelEntry] = field(default_factory=dict)
    model_names: dict[str, ModelName] = field(default_factory=dict)
    model_versions: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(name, version) -> model id: an index of ``models``, rebuilt from them when a state is decoded."""
    task_encodings: dict[bytes, tuple[Task, bytes]] = field(default_factory=dict, repr=False, compare=False)
    """A cache for :meth:`encode`: each task's bytes as last encoded, with the ``Task`` they were encoded from.
    The state is encoded for its root every block, and most of it is tasks that did not change since the last
    block (a settled task stays 64 blocks); a task whose object was replaced is encoded again. Copies share the
    dict; it is only ever replaced, never changed in place, so a state encoded in a worker thread is safe."""

    def copy(self) -> State:
        return replace(
            self,
            accounts=dict(self.accounts),
            validators=dict(self.validators),
            providers=dict(self.providers),
            tasks=dict(self.tasks),
            evidence_seen=set(self.evidence_seen),
            models=dict(self.models),
            model_names=dict(self.model_names),
            model_versions=dict(self.model_versions),
        )

    def to_record(self, *, with_tasks: bool = True) -> StateRecord:
        return StateRecord(
            chain_id=self.chain_id,
            height=self.height,
            last_block_hash=self.last_block_hash,
            randomness=self.randomness,
            params=self.params,
            genesis_supply=self.genesis_supply,
            minted=self.minted,
            burned=self.burned,
            fee_pool=self.fee_pool,
            committee=self.committee,
            previous_committee=self.previous_committee,
            accounts=tuple(AccountEntry(a, v) for a, v in sorted(self.accounts.items())),
            validators=tuple(ValidatorEntry(a, v) for a, v in sorted(self.validators.items())),
            providers=tuple(ProviderEntry(a, v) for a, v in sorted(self.providers.items())),
            tasks=tuple(t for _, t in sorted(self.tasks.items())) if with_tasks else (),
            evidence_seen=tuple(sorted(self.evidence_seen, key=encode)),
            models=tuple(m for _, m in sorted(self.models.items())),
            model_names=tuple(n for _, n in sorted(self.model_names.items())),
        )

    @classmethod
    def from_record(cls, rec: StateRecord) -> State:
        return cls(
            chain_id=rec.chain_id,
            params=rec.params,
            genesis_supply=rec.genesis_supply,
            height=rec.height,
            last_block_hash=rec.last_block_hash,
            randomness=rec.randomness,
            minted=rec.minted,
            burned=rec.burned,
            fee_pool=rec.fee_pool,
            committee=rec.committee,
            previous_committee=rec.previous_committee,
            accounts={e.address: e.account for e in rec.accounts},
            validators={e.address: e.validator for e in rec.validators},
            providers={e.address: e.provider for e in rec.providers},
            tasks={t.task_id: t for t in rec.tasks},
            evidence_seen=set(rec.evidence_seen),
            models={m.model_id: m for m in rec.models},
            model_names={n.name: n for n in rec.model_names},
            model_versions={(m.name, m.version): m.model_id for m in rec.models},
        )

    def encode(self) -> bytes:
        """``encode(self.to_record())``, byte for byte, with unchanged tasks' bytes taken from ``task_encodings``."""
        cached = self.task_encodings
        fresh: dict[bytes, tuple[Task, bytes]] = {}
        for task_id, task in sorted(self.tasks.items()):
            hit = cached.get(task_id)
            fresh[task_id] = hit if hit is not None and hit[0] is task else (task, encode(task))
        self.task_encodings = fresh
        return encode_with_encoded_list(self.to_record(with_tasks=False), "tasks",
                                        [data for _, data in fresh.values()])

    @classmethod
    def decode(cls, data: bytes) -> State:
        return cls.from_record(decode(StateRecord, data))

    def state_root(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    # ------------------------------------------------------------ queries

    def get_account(self, address: bytes) -> Account:
        return self.accounts.get(address, EMPTY_ACCOUNT)

    def get_balance(self, address: bytes) -> int:
        return self.get_account(address).balance

    def find_model(self, ref: ModelRef) -> ModelEntry | None:
        """The model a reference names (by id, or ``name`` at ``version``/its latest); None if none is registered."""
        if ref.model_id is not None:
            return self.models.get(ref.model_id)
        return self.get_model(ref.name, ref.version) if ref.name is not None else None

    def get_model(self, name: str, version: str | None = None) -> ModelEntry | None:
        """The model registered as ``name@version``, or the name's latest version; None if there is none."""
        if version is None:
            entry = self.model_names.get(name)
            if entry is None:
                return None
            version = entry.latest_version
        model_id = self.model_versions.get((name, version))
        return None if model_id is None else self.models[model_id]

    def total_supply(self) -> int:
        """Everything that exists: must equal genesis supply + minted, always.

        Summed by :func:`ledger.books.get_books`, so the supply and its breakdown by bucket
        (``GET /ledger/supply``) have one definition and cannot drift apart.
        """
        return get_books(self).total


EMPTY_ACCOUNT = Account(balance=0, nonce=0)
