"""Transaction records (DESIGN section 5) and the off-ledger objects they carry.

Every transaction body starts with ``sender``, ``nonce`` and ``fee``. A
:class:`SignedTransaction` wraps a body with the sender's Ed25519 public key
and its signature over ``signing_bytes(TX, chain_id, body)``; the ledger
checks ``address_of(public_key) == body.sender``, so accounts need not store
keys.

Objects signed by someone other than the sender travel inside transactions:
a provider's :class:`SignedBid` inside ``Assign``, a client's
:class:`SignedReceipt` inside ``StreamClaim``, a provider's
:class:`SignedStreamOutput` inside a stream ``Dispute``, two
:class:`~ledger.votes.SignedVote` inside ``Evidence``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import field
from typing import Annotated

from ledger.codec import (
    U8,
    U16,
    U32,
    U64,
    Address,
    Bytes,
    FixedBytes,
    Hash32,
    Int,
    ListOf,
    Maybe,
    Nested,
    OneOf,
    Record,
    RecordUnion,
    Text,
    encode,
    record,
)
from ledger.keys import AccountKey
from ledger.signing import Domain, signing_bytes
from ledger.votes import BLSPubkey, BLSSignature, SignedVote

PublicKey = Annotated[bytes, FixedBytes(32)]
ModelId = Hash32
"""A model's id: the SHA-256 of its canonical bundle (``kernels.bundle``); the ledger never sees the bundle."""
Signature = Annotated[bytes, FixedBytes(64)]
TaskId = Hash32
MAX_CAPABILITIES_BYTES = 4096
MAX_TX_BYTES = 8192
MAX_TENSOR_NDIM = 8  # as kernels.tensors.MAX_NDIM (the ledger imports nothing outside ledger/)


class TaskKind(enum.IntEnum):
    BATCH = 1
    STREAM = 2


class AuditVerdict(enum.IntEnum):
    """What a verifier attests about the result (or disputed item) it was drawn to audit.

    Only ``PASS`` and ``FAIL`` are verdicts on a result that was fetched and
    checked; ``UNAVAILABLE`` says the provider did not serve its committed
    result within the audit window. It never counts towards fraud: a
    verifier's word that it could not fetch proves nothing about the
    result, and unavailability can be caused by a third party (issue 13, a
    peer starving the provider's data plane). How the ledger settles it:
    :func:`ledger.transition._settle_audit`.
    """

    PASS = 1
    FAIL = 2
    UNAVAILABLE = 3


Verdict = Annotated[int, Int(int(min(AuditVerdict)), int(max(AuditVerdict)))]
"""An :class:`AuditVerdict` on the wire: any other value is refused when decoding."""


def registration_message(chain_id: bytes, bls_pubkey: bytes, account: bytes) -> bytes:
    """What a validator's BLS key signs to register under ``account`` on this chain."""
    return signing_bytes(Domain.POP, chain_id, bls_pubkey + account)


def compute_task_id(client: bytes, nonce: int) -> bytes:
    """A task's id is fixed by its PostTask's (client, nonce): known before inclusion, never reused."""
    return hashlib.sha256(b"p2pgpu/task" + client + nonce.to_bytes(8, "big")).digest()


# ---------------------------------------------------------------- signed off-ledger objects


def task_terms_hash(*, kind: int, spec_hash: bytes, requirements: bytes, units: int, exec_blocks: int,
                    model_id: bytes | None = None) -> bytes:
    """The terms a provider prices: what to run, on what, how much of it and in how long.

    A :class:`Bid` carries this hash and ``Assign`` is refused unless it
    equals the posted task's, so a bid can be made (and an ``Assign`` can
    land in the same block as its ``PostTask``) before the provider has seen
    the task on the ledger, without the client being able to post other
    terms than it announced. ``max_unit_price`` is left out (the ledger
    checks the bid's price against it directly), and so is the audit rate,
    which costs an honest provider nothing. A task naming a registered
    model (``PostTask.model_id``) has it hashed too, so a bid commits to the
    model whose owner the royalty goes to; without one the hash is as it was.
    """
    h = hashlib.sha256(b"p2pgpu/task-terms/1")
    h.update(bytes([kind]))
    h.update(spec_hash)
    h.update(len(requirements).to_bytes(4, "big") + requirements)
    h.update(units.to_bytes(4, "big") + exec_blocks.to_bytes(4, "big"))
    if model_id is not None:
        h.update(b"model" + model_id)
    return h.digest()


@record
class Bid(Record):
    """A provider's offer for a task, gossiped on the bid topic and carried by Assign.

    ``terms_hash`` (:func:`task_terms_hash`) binds the offer to the terms
    it was priced for, not just to the task id.
    """

    MAX_BYTES = 256
    task_id: TaskId
    provider: Address
    unit_price: U64
    est_seconds: U32
    expiry_height: U64
    terms_hash: Hash32


@record
class SignedBid(Record):
    MAX_BYTES = 512
    bid: Bid
    public_key: PublicKey
    signature: Signature


@record
class StreamReceipt(Record):
    """Client's acknowledgement of ``units`` items served so far (cumulative)."""

    MAX_BYTES = 128
    task_id: TaskId
    units: U64


@record
class SignedReceipt(Record):
    MAX_BYTES = 256
    receipt: StreamReceipt
    public_key: PublicKey
    signature: Signature


@record
class StreamOutput(Record):
    """Provider's signed statement: item ``index`` with this input gave this output."""

    MAX_BYTES = 256
    task_id: TaskId
    index: U64
    input_hash: Hash32
    output_hash: Hash32


@record
class SignedStreamOutput(Record):
    MAX_BYTES = 512
    output: StreamOutput
    public_key: PublicKey
    signature: Signature


# The one way to sign each off-ledger record a transaction later carries (the ledger verifies them in
# ``ledger.transition``; the market's validators in ``p2pgpu.market``). The market, the devnet tools
# and the tests all sign through these.


def sign_bid(key: AccountKey, chain_id: bytes, bid: Bid) -> SignedBid:
    sig = key.sign(signing_bytes(Domain.BID, chain_id, encode(bid)))
    return SignedBid(bid=bid, public_key=key.public_key, signature=sig)


def sign_receipt(key: AccountKey, chain_id: bytes, receipt: StreamReceipt) -> SignedReceipt:
    sig = key.sign(signing_bytes(Domain.RECEIPT, chain_id, encode(receipt)))
    return SignedReceipt(receipt=receipt, public_key=key.public_key, signature=sig)


def sign_stream_output(key: AccountKey, chain_id: bytes, output: StreamOutput) -> SignedStreamOutput:
    sig = key.sign(signing_bytes(Domain.STREAM_OUTPUT, chain_id, encode(output)))
    return SignedStreamOutput(output=output, public_key=key.public_key, signature=sig)


# ---------------------------------------------------------------- transaction bodies


@record
class Transfer(Record):
    TYPE_ID = 1
    sender: Address
    nonce: U64
    fee: U64
    to: Address
    amount: U64


@record
class RegisterValidator(Record):
    """Bond ``stake`` under a BLS key.

    ``proof_of_possession`` is the BLS key's signature over
    ``registration_message(chain_id, bls_pubkey, sender)``: it proves the
    sender holds the secret key (rogue-key defence) *and* binds the key to
    this account on this chain, so a published (key, proof) pair cannot be
    replayed by someone else (as Ethereum deposits sign their credentials).
    """

    TYPE_ID = 2
    sender: Address
    nonce: U64
    fee: U64
    bls_pubkey: BLSPubkey
    proof_of_possession: BLSSignature
    stake: U64


@record
class Bond(Record):
    TYPE_ID = 3
    sender: Address
    nonce: U64
    fee: U64
    amount: U64


@record
class Unbond(Record):
    TYPE_ID = 4
    sender: Address
    nonce: U64
    fee: U64
    amount: U64


@record
class RegisterProvider(Record):
    """Advertise capabilities and post a bond (weights verifier selection; slashable)."""

    TYPE_ID = 5
    sender: Address
    nonce: U64
    fee: U64
    capabilities: Annotated[bytes, Bytes(MAX_CAPABILITIES_BYTES)]
    bond: U64


@record
class PostTask(Record):
    """Open a task and escrow ``(max_unit_price + royalty_per_unit) * units + audit_fee``.

    ``royalty_per_unit`` is the registered royalty of ``model_id`` (0 without one).

    Batch tasks have ``units == 1``; a stream task's ``units`` caps the items
    a provider may claim. Windows are in blocks from the block that includes
    this transaction.
    """

    TYPE_ID = 6
    sender: Address
    nonce: U64
    fee: U64
    kind: U8
    spec_hash: Hash32
    requirements: Annotated[bytes, Bytes(1024)]
    max_unit_price: U64
    units: U32
    bid_window: U32
    exec_blocks: U32
    audit_rate_bps: U16
    model_id: Annotated[bytes | None, Maybe(FixedBytes(32))] = None
    """The registered model the task runs (None: a task without one). Its royalty is escrowed with the task."""


@record
class CancelTask(Record):
    TYPE_ID = 7
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId


@record
class Assign(Record):
    TYPE_ID = 8
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId
    bid: SignedBid


@record
class CommitResult(Record):
    TYPE_ID = 9
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId
    result_hash: Hash32
    exec_ms: U64


@record
class Attest(Record):
    TYPE_ID = 10
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId
    verdict: Verdict
    """An :class:`AuditVerdict`."""
    detail: Annotated[str, Text(200)]


@record
class Dispute(Record):
    """Client forces an audit; ``item`` names a stream output it holds signed."""

    TYPE_ID = 11
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId
    item: Annotated[SignedStreamOutput | None, Maybe(Nested(SignedStreamOutput))]


@record
class StreamClaim(Record):
    TYPE_ID = 12
    sender: Address
    nonce: U64
    fee: U64
    receipt: SignedReceipt


@record
class Evidence(Record):
    """Two conflicting votes by one validator for the same (height, round, step)."""

    TYPE_ID = 13
    sender: Address
    nonce: U64
    fee: U64
    vote_a: SignedVote
    vote_b: SignedVote


@record
class ReopenTask(Record):
    """The client takes a batch task back from a provider that stopped, and opens a fresh auction for it.

    Failover (``docs/architecture.md``, "No-shows and failover"): the first
    provider is marked missed, the task is POSTED again with a new bid
    window, and the client pays only the provider that delivers.
    """

    TYPE_ID = 14
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId


@record
class InputsUnavailable(Record):
    """The assigned provider could not fetch the task's inputs before it had to start: it gives the task back.

    The task settles ``INPUTS_UNAVAILABLE`` (``docs/architecture.md``, "No-shows
    and failover"): the provider gets its collateral back and a reservation
    fee, the client the rest of its escrow; nobody is slashed.
    """

    TYPE_ID = 15
    sender: Address
    nonce: U64
    fee: U64
    task_id: TaskId
    detail: Annotated[str, Text(200)]


@record
class TensorSignature(Record):
    """A model's input or output as the registry records it: dtype and per-item shape (None = any size).

    The same fields and encoding as ``kernels.bundle.TensorSignature``, which
    the ledger cannot import.
    """

    dtype: Annotated[str, Text(16, min_len=1)]
    shape: Annotated[tuple[int | None, ...], ListOf(Maybe(Int(0, 2**32 - 1)), MAX_TENSOR_NDIM)]


@record
class RegisterModel(Record):
    """Record a model bundle under ``name@version``, with the royalty its owner earns per unit of work.

    The sender pays ``Params.model_registration_fee`` (burned) besides the
    fee, and becomes the owner of the name (if it is new) and of this entry.
    The ledger does not see the bundle: ``input``, ``output`` and
    ``bundle_size`` are the registrant's statement, which anyone who fetches
    the bundle by its id can check (the id is the bundle's hash).
    """

    TYPE_ID = 16
    sender: Address
    nonce: U64
    fee: U64
    model_id: ModelId
    name: Annotated[str, Text(64, min_len=1)]
    version: Annotated[str, Text(64, min_len=1)]
    royalty_per_unit: U64
    input: TensorSignature
    output: TensorSignature
    bundle_size: U64


TX_TYPES: RecordUnion[Record] = RecordUnion(
    "Transaction",
    [
        Transfer,
        RegisterValidator,
        Bond,
        Unbond,
        RegisterProvider,
        PostTask,
        CancelTask,
        Assign,
        CommitResult,
        Attest,
        Dispute,
        StreamClaim,
        Evidence,
        ReopenTask,
        InputsUnavailable,
        RegisterModel,
    ],
    max_bytes=MAX_TX_BYTES,
)

Transaction = (
    Transfer | RegisterValidator | Bond | Unbond | RegisterProvider | PostTask | CancelTask | Assign | CommitResult
    | Attest | Dispute | StreamClaim | Evidence | ReopenTask | InputsUnavailable | RegisterModel
)
"""A transaction body: one of :data:`TX_TYPES`' members, each with its ``sender``, ``nonce`` and ``fee``."""


@record
class SignedTransaction(Record):
    MAX_BYTES = MAX_TX_BYTES
    body: Annotated[Transaction, OneOf(TX_TYPES)]
    public_key: PublicKey
    signature: Signature
    _tx_hash: bytes | None = field(default=None, init=False, repr=False, compare=False)
    """The hash, once asked for: the mempool (admission, each block's re-check), the block's tx root, the /tx
    validator and the block applier each ask for it, and it is a SHA-256 over a fresh encoding every time.
    Not a wire field (``record`` skips fields outside ``__init__``); the record is immutable, so it never goes
    stale."""

    def tx_hash(self) -> bytes:
        h = self._tx_hash
        if h is None:
            h = hashlib.sha256(self.encode()).digest()
            object.__setattr__(self, "_tx_hash", h)  # frozen: a memo of the immutable value, not a change
        return h
