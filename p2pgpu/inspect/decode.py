"""Decode and verify one gossip payload per topic: a record with its summary, or a reason.

The inspector checks what a node's validators check, and more, because it
wants to *show* every message rather than only keep the useful ones:

* ``tx``        -- a :class:`~ledger.transactions.SignedTransaction`, or a
  :class:`~p2pgpu.txgossip.TxBatch` of them, whose Ed25519 signatures verify
  on this chain;
* ``task`` / ``bid`` -- the market validators
  (:func:`~p2pgpu.market.validate_market_message`), whose errors already
  carry a stable ``reason`` and whether the sender is to blame;
* ``consensus`` -- proposals signed by the expected proposer of (height,
  round) and votes by a committee member, BLS signatures checked one by one
  (a node defers these to its engine; an observer has no engine);
* ``block``     -- a :class:`~ledger.blocks.FinalizedBlock` whose commit
  certificate proves a quorum of its epoch's committee.

Committees are followed the way a light client follows them
(:func:`ledger.committee.verify_chain`): the genesis committee signs epoch
0, and a verified block that ends an epoch names the next one. A consensus
message or block from an epoch whose committee we have not seen yet (the
inspector joined a long-running chain) is still decoded and shown, marked
``verified: false`` -- guessing a committee would be worse than saying so.

:class:`MessageDecoder` is a sans-I/O object: bytes in, :class:`Decoded` or
:class:`Invalid` out; its only state is the committees, the highest
certified height (for market expiry) and the market replay caches.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger import exceptions as ex
from ledger.blocks import Block, FinalizedBlock
from ledger.bls import BLSError, get_backend
from ledger.codec import DecodeError, Record
from ledger.committee import compute_epoch, compute_proposer, is_epoch_end, vote_signing_bytes
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    SignedProposal,
    VoteMessage,
    proposal_signing_bytes,
    verify_finalized_block,
)
from ledger.genesis import Genesis, initial_state
from ledger.state import Committee
from ledger.transactions import (
    Assign,
    PostTask,
    SignedTransaction,
    StreamClaim,
    Transfer,
    compute_task_id,
)
from ledger.transition import verify_transaction_signature
from ledger.votes import NIL_BLOCK, VoteStep
from p2pgpu.inspect.events import FieldValue
from p2pgpu.market import (
    BID_TOPIC,
    TASK_TOPIC,
    BidMessage,
    DeclineReason,
    MarketMessageError,
    SeenCache,
    SignedAnnounce,
    SignedDecline,
    validate_market_message,
)
from p2pgpu.market.messages import (DEFAULT_HORIZON_BLOCKS, MAX_ADVERT_MESSAGE_BYTES, MAX_BID_MESSAGE_BYTES,
                                    MAX_TASK_MESSAGE_BYTES, AdvertBook, validate_advert_message)
from p2pgpu.net.config import MAX_GOSSIP_MESSAGE
from p2pgpu.txgossip import TxBatch, decode_tx_gossip

__all__ = [
    "TOPIC_LIMITS",
    "Decoded",
    "Invalid",
    "MessageDecoder",
    "TopicKind",
    "batch_fields",
    "block_task_touches",
    "transaction_fields",
]


class TopicKind(enum.Enum):
    TX = "tx"
    TASK = "task"
    BID = "bid"
    CONSENSUS = "consensus"
    BLOCK = "block"
    ADVERT = "advert"


TOPIC_LIMITS: dict[TopicKind, int] = {
    TopicKind.TX: TxBatch.MAX_BYTES,  # a batch; a lone transaction is at most MAX_TX_BYTES (its codec checks)
    TopicKind.TASK: MAX_TASK_MESSAGE_BYTES,
    TopicKind.BID: MAX_BID_MESSAGE_BYTES,
    TopicKind.CONSENSUS: MAX_GOSSIP_MESSAGE,
    TopicKind.BLOCK: MAX_GOSSIP_MESSAGE,
    TopicKind.ADVERT: MAX_ADVERT_MESSAGE_BYTES,
}
"""Largest payload each topic carries, checked before anything is parsed (a node uses the same bounds)."""

SHORT = 16
"""Hex digits shown of hashes and addresses: enough to tell them apart on a screen."""


@dataclass(frozen=True, slots=True)
class Decoded:
    kind: str
    fields: dict[str, FieldValue]
    record: Record
    verified: bool = True
    """False when no known committee could check the BLS signatures (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str
    """Short stable label: a metric key and the REJECT event's reason."""
    detail: str
    blame: bool = True
    """Whether the forwarder is at fault (go-libp2p-pubsub's "validation failed" vs "ignored")."""


def _hex(data: bytes) -> str:
    return data.hex()


def transaction_fields(stx: SignedTransaction) -> dict[str, FieldValue]:
    """What the inspector shows of a transaction: type, sender, nonce, fee, and the task it concerns."""
    body = stx.body
    out: dict[str, FieldValue] = {
        "tx": type(body).__name__,
        "sender": _hex(body.sender),
        "nonce": body.nonce,
        "fee": body.fee,
        "tx_hash": _hex(stx.tx_hash()),
    }
    task = _task_of(body)
    if task is not None:
        out["task_id"] = _hex(task)
    if isinstance(body, Transfer):
        out["to"] = _hex(body.to)
        out["amount"] = body.amount
    elif isinstance(body, Assign):
        out["provider"] = _hex(body.bid.bid.provider)
        out["unit_price"] = body.bid.bid.unit_price
    elif isinstance(body, PostTask):
        out["max_unit_price"] = body.max_unit_price
        out["bid_window"] = body.bid_window
    return out


def _task_of(body: Record) -> bytes | None:
    if isinstance(body, PostTask):
        return compute_task_id(body.sender, body.nonce)
    if isinstance(body, StreamClaim):
        return body.receipt.receipt.task_id
    task_id = getattr(body, "task_id", None)
    return task_id if isinstance(task_id, bytes) else None


def batch_fields(stxs: Iterable[SignedTransaction]) -> dict[str, FieldValue]:
    """What the inspector shows of a ``/tx`` batch: how many of each type, its senders, the tasks it touches."""
    stxs = tuple(stxs)
    kinds: dict[str, int] = {}
    for stx in stxs:
        kinds[type(stx.body).__name__] = kinds.get(type(stx.body).__name__, 0) + 1
    return {"count": len(stxs), "txs": ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())),
            "senders": sorted({_hex(stx.body.sender) for stx in stxs}), "tasks": task_touches(stxs)}


def block_task_touches(block: Block) -> list[list[str]]:
    """``[[task id hex, tx type], ...]`` for the block's transactions that concern a task (timelines)."""
    return task_touches(block.transactions)


def task_touches(stxs: Iterable[SignedTransaction]) -> list[list[str]]:
    """``[[task id hex, tx type], ...]`` for the transactions that concern a task (a block's, a batch's)."""
    out: list[list[str]] = []
    for stx in stxs:
        task = _task_of(stx.body)
        if task is not None:
            out.append([_hex(task), type(stx.body).__name__])
    return out


@dataclass
class MessageDecoder:
    """Per-chain decoder: ``decode(topic kind, bytes) -> Decoded | Invalid``.

    ``verify_bls=False`` skips BLS checks (marking messages unverified); it
    exists for replaying huge captures quickly, never as a default.
    """

    genesis: Genesis
    verify_bls: bool = True
    chain_id: bytes = field(init=False)
    epoch_length: int = field(init=False)
    committees: dict[int, Committee] = field(init=False)
    certified_height: int = field(init=False, default=0)
    _seen: dict[TopicKind, SeenCache] = field(init=False)

    def __post_init__(self) -> None:
        state = initial_state(self.genesis)
        self.chain_id = state.chain_id
        self.epoch_length = state.params.epoch_length
        self.committees = {state.committee.epoch: state.committee}
        self._seen = {TopicKind.TASK: SeenCache(), TopicKind.BID: SeenCache()}
        self._adverts = AdvertBook()

    # ------------------------------------------------------------ entry point

    def decode(self, topic: TopicKind, data: bytes) -> Decoded | Invalid:
        limit = TOPIC_LIMITS[topic]
        if len(data) > limit:
            return Invalid("oversized", f"{len(data)} bytes exceed the {topic.value} topic limit of {limit}")
        if topic is TopicKind.TX:
            return self._decode_tx(data)
        if topic in (TopicKind.TASK, TopicKind.BID):
            return self._decode_market(topic, data)
        if topic is TopicKind.CONSENSUS:
            return self._decode_consensus(data)
        if topic is TopicKind.ADVERT:
            return self._decode_advert(data)
        return self._decode_block(data)

    def committee_for(self, height: int) -> Committee | None:
        return self.committees.get(compute_epoch(height, self.epoch_length))

    def learn_blocks(self, blocks: Iterable[FinalizedBlock]) -> int:
        """Feed certified blocks fetched out of band (catch-up sync); returns how many verified.

        Each goes through the same certificate check as a gossiped block, so
        a lying sync peer cannot plant a committee.
        """
        verified = 0
        for fb in blocks:
            result = self._decode_block_record(fb)
            if isinstance(result, Decoded) and result.verified:
                verified += 1
        return verified

    # ------------------------------------------------------------ per topic

    def _decode_tx(self, data: bytes) -> Decoded | Invalid:
        try:
            stxs = decode_tx_gossip(data)
        except DecodeError as exc:
            return Invalid("malformed", str(exc))
        for i, stx in enumerate(stxs):
            try:
                verify_transaction_signature(self.chain_id, stx)
            except ex.InvalidSignature as exc:
                where = f"transaction {i} of the batch: " if len(stxs) > 1 else ""
                return Invalid("bad-signature", f"{where}{exc}")
        if len(stxs) == 1:
            return Decoded(type(stxs[0].body).__name__, transaction_fields(stxs[0]), stxs[0])
        return Decoded("TxBatch", batch_fields(stxs), TxBatch(stxs))

    def _decode_market(self, topic: TopicKind, data: bytes) -> Decoded | Invalid:
        now = self.certified_height
        # Before any certified block the inspector does not know the chain's height, so it cannot
        # tell "too far ahead" from "we joined late"; expiry still applies once blocks arrive.
        horizon = DEFAULT_HORIZON_BLOCKS if now > 0 else 2**64
        name = TASK_TOPIC if topic is TopicKind.TASK else BID_TOPIC
        try:
            message = validate_market_message(name, self.chain_id, now, data, self._seen[topic], horizon=horizon)
        except MarketMessageError as exc:
            return Invalid(exc.reason, str(exc), blame=exc.penalize)
        fields: dict[str, FieldValue]
        if isinstance(message, SignedAnnounce):
            a = message.announce
            fields = {"task_id": _hex(a.task_id), "client": _hex(a.client), "kernel": a.kernel,
                      "max_unit_price": a.max_unit_price, "units": a.units, "bid_deadline": a.bid_deadline_height}
        elif isinstance(message, BidMessage):
            b = message.signed.bid
            fields = {"task_id": _hex(b.task_id), "provider": _hex(b.provider), "unit_price": b.unit_price,
                      "est_seconds": b.est_seconds, "expiry": b.expiry_height}
        else:
            assert isinstance(message, SignedDecline)
            n = message.notice
            fields = {"task_id": _hex(n.task_id), "provider": _hex(n.provider),
                      "decline": DeclineReason(n.reason).name.lower(), "expiry": n.expiry_height}
        return Decoded(type(message).__name__, fields, message)

    def _decode_advert(self, data: bytes) -> Decoded | Invalid:
        """A provider's signed warm models (checked as a client checks them, replays refused by sequence)."""
        now = self.certified_height
        horizon = DEFAULT_HORIZON_BLOCKS if now > 0 else 2**64
        try:
            message = validate_advert_message(self.chain_id, now, data, self._adverts, horizon=horizon)
        except MarketMessageError as exc:
            return Invalid(exc.reason, str(exc), blame=exc.penalize)
        a = message.advert
        fields: dict[str, FieldValue] = {
            "provider": _hex(a.provider), "sequence": a.sequence, "free_slots": a.free_slots,
            "models": ",".join(f"{m.model_id.hex()[:16]}@{m.unit_price}" for m in a.models) or "-",
            "expiry": a.expiry_height}
        return Decoded("SignedAdvert", fields, message)

    def _decode_consensus(self, data: bytes) -> Decoded | Invalid:
        try:
            message = CONSENSUS_MESSAGES.decode(data)
        except DecodeError as exc:
            return Invalid("malformed", str(exc))
        if isinstance(message, SignedProposal):
            return self._check_proposal(message)
        assert isinstance(message, VoteMessage)
        return self._check_vote(message)

    def _check_proposal(self, sp: SignedProposal) -> Decoded | Invalid:
        p = sp.proposal
        fields: dict[str, FieldValue] = {
            "height": p.height, "round": p.round, "pol_round": p.pol_round, "proposer": _hex(sp.proposer),
            "block_hash": _hex(p.block_hash), "txs": len(sp.block.transactions),
            "tasks": block_task_touches(sp.block),
        }
        if not -1 <= p.pol_round < p.round:
            return Invalid("bad-pol-round", f"proposal pol_round {p.pol_round} not below its round {p.round}")
        if sp.block.block_hash() != p.block_hash:
            return Invalid("block-mismatch", f"proposal at height {p.height} names another block than it carries")
        if sp.block.header.height != p.height:
            return Invalid("block-mismatch", f"proposal for height {p.height} carries block {sp.block.height}")
        committee = self.committee_for(p.height)
        if committee is None or not self.verify_bls:
            return self._unverified("SignedProposal", fields, sp, p.height)
        expected = compute_proposer(committee, p.height, p.round)
        if sp.proposer != expected:
            return Invalid("wrong-proposer", f"proposal for height {p.height} round {p.round} from "
                           f"{sp.proposer.hex()[:SHORT]}, expected {expected.hex()[:SHORT]}")
        member = next(m for m in committee.members if m.address == expected)
        if not _bls_verify(member.bls_pubkey, proposal_signing_bytes(self.chain_id, p), sp.signature):
            return Invalid("bad-signature", f"proposal for height {p.height} round {p.round}: BLS signature "
                           f"by {sp.proposer.hex()[:SHORT]} does not verify")
        return Decoded("SignedProposal", {**fields, "verified": True}, sp)

    def _check_vote(self, vm: VoteMessage) -> Decoded | Invalid:
        sv = vm.signed
        v = sv.vote
        if v.step not in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
            return Invalid("bad-step", f"vote step {v.step} is neither prevote nor precommit")
        fields: dict[str, FieldValue] = {
            "height": v.height, "round": v.round, "step": VoteStep(v.step).name.lower(),
            "validator": _hex(sv.validator), "block_hash": "nil" if v.block_hash == NIL_BLOCK else _hex(v.block_hash),
        }
        committee = self.committee_for(v.height)
        if committee is None or not self.verify_bls:
            return self._unverified("VoteMessage", fields, vm, v.height)
        member = next((m for m in committee.members if m.address == sv.validator), None)
        if member is None:
            return Invalid("not-in-committee", f"vote at height {v.height} from {sv.validator.hex()[:SHORT]}, "
                           f"not a member of epoch {committee.epoch}'s committee")
        if not _bls_verify(member.bls_pubkey, vote_signing_bytes(self.chain_id, v), sv.signature):
            return Invalid("bad-signature", f"{fields['step']} at height {v.height} round {v.round}: BLS signature "
                           f"by {sv.validator.hex()[:SHORT]} does not verify")
        return Decoded("VoteMessage", {**fields, "verified": True}, vm)

    def _decode_block(self, data: bytes) -> Decoded | Invalid:
        try:
            fb = FinalizedBlock.from_bytes(data)
        except DecodeError as exc:
            return Invalid("malformed", str(exc))
        return self._decode_block_record(fb)

    def _decode_block_record(self, fb: FinalizedBlock) -> Decoded | Invalid:
        header = fb.block.header
        height = header.height
        fields: dict[str, FieldValue] = {
            "height": height, "round": fb.certificate.round, "proposer": _hex(header.proposer),
            "block_hash": _hex(header.block_hash()), "txs": len(fb.block.transactions),
            "timestamp_ms": header.timestamp_ms, "tasks": block_task_touches(fb.block),
        }
        committee = self.committee_for(height)
        if committee is None or not self.verify_bls:
            return self._unverified("FinalizedBlock", fields, fb, height)
        try:
            verify_finalized_block(fb, committee, self.chain_id, block_hash=header.block_hash())
        except ex.InvalidCertificate as exc:
            return Invalid("bad-certificate", str(exc))
        if header.next_committee is not None:
            epoch = compute_epoch(height, self.epoch_length)
            if not is_epoch_end(height, self.epoch_length) or header.next_committee.epoch != epoch + 1:
                return Invalid("bad-committee", f"block {height} names a committee for epoch "
                               f"{header.next_committee.epoch} (it is in epoch {epoch})")
            self.committees.setdefault(epoch + 1, header.next_committee)
        self.certified_height = max(self.certified_height, height)
        return Decoded("FinalizedBlock", {**fields, "verified": True}, fb)

    def _unverified(self, kind: str, fields: dict[str, FieldValue], record: Record, height: int) -> Decoded:
        epoch = compute_epoch(height, self.epoch_length)
        note = "BLS checks off" if not self.verify_bls else f"committee of epoch {epoch} not known yet"
        return Decoded(kind, {**fields, "verified": False, "note": note}, record, verified=False)


def _bls_verify(pk: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        return bool(get_backend().verify(pk, msg, sig))
    except BLSError:
        return False
