"""The mempool: pending transactions, admitted against the current state, handed to proposers in order.

Pure: no I/O, no clock. The node feeds it gossip and API submissions with
:meth:`Mempool.add`, a proposer takes candidates with :meth:`Mempool.reap`,
and after every finalized block the node calls :meth:`Mempool.update`,
which drops what was included or became invalid and keeps future nonces.

Admission checks only what cannot change in the sender's favour by waiting
(signature, chain, stale nonce, fee floor) plus what protects the pool
(duplicates, size and byte limits, a bound on held future nonces per
sender). Balance is checked against the *cumulative* cost of the sender's
pending transactions in nonce order, so one account cannot fill the pool
with transactions it cannot pay for. Type-specific checks (task state,
deadlines) are left to block building, which skips failures; the proposer
reports them back with :meth:`Mempool.discard_rejected`.

Every refusal raises :class:`MempoolRejected` carrying a
:class:`RejectReason` the node counts per reason.

Ordering: per sender, strictly by nonce; across senders, by the fee of the
sender's next transaction (highest first), oldest first among equal fees.
Eviction when full: held future-nonce transactions first, then the tail
(highest nonce) of a sender's chain, lowest fee first, oldest first; a
newcomer only evicts a transaction with a strictly lower fee.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ledger import exceptions as ex
from ledger.params import Params
from ledger.state import EvidenceKey, ModelEntry, State
from ledger.transactions import (
    Bond,
    Dispute,
    Evidence,
    PostTask,
    RegisterModel,
    RegisterProvider,
    RegisterValidator,
    SignedTransaction,
    Transaction,
    Transfer,
)
from ledger.transition import VerifiedTransaction, verify_transaction

__all__ = ["Mempool", "MempoolConfig", "MempoolRejected", "RejectReason", "tx_cost"]


class RejectReason(enum.Enum):
    DUPLICATE = "duplicate"  # this exact transaction is already pending
    BAD_SIGNATURE = "bad_signature"
    NONCE_TOO_LOW = "nonce_too_low"  # already used on chain
    NONCE_TOO_FAR = "nonce_too_far"  # beyond the future-nonce window for this sender
    NONCE_TAKEN = "nonce_taken"  # another pending tx has this nonce and the fee bump is too small
    FEE_TOO_LOW = "fee_too_low"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    TOO_LARGE = "too_large"
    SENDER_LIMIT = "sender_limit"
    POOL_FULL = "pool_full"  # full, and nothing cheaper to evict
    ALREADY_PUNISHED = "already_punished"  # evidence for a double vote the chain already slashed


class MempoolRejected(Exception):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MempoolConfig:
    max_txs: int = 10_000
    max_bytes: int = 32 << 20
    max_tx_bytes: int = 8192
    max_per_sender: int = 1024
    """A busy client keeps hundreds of tasks in flight (a PostTask and an Assign each) before a block lands."""
    max_future_gap: int = 1024
    """Nonces beyond the account's next nonce that may be held. A node signs its transactions in parallel
    (a PostTask waits for its inputs to be sealed while later nonces go out), so peers see them out of order."""
    replace_fee_bump_pct: int = 10  # a same-nonce replacement must pay this much more


def tx_cost(body: Transaction, params: Params | None = None,
            models: Mapping[bytes, ModelEntry] | None = None) -> int:
    """What a transaction takes from its sender's balance at most: the fee plus what it moves or locks.

    With ``params``, a PostTask's escrow includes the audit fee the ledger
    locks with it and a RegisterModel's cost its registration fee; with
    ``models`` (the registry), a PostTask naming a model includes its
    royalty per unit. Without them the bound is lower by those amounts.
    """
    fee: int = body.fee
    if isinstance(body, Transfer):
        return fee + body.amount
    if isinstance(body, Bond):
        return fee + body.amount
    if isinstance(body, RegisterValidator):
        return fee + body.stake
    if isinstance(body, RegisterProvider):
        return fee + body.bond
    if isinstance(body, PostTask):
        model = models.get(body.model_id) if models is not None and body.model_id is not None else None
        royalty = model.royalty_per_unit if model is not None else 0
        return (fee + (body.max_unit_price + royalty) * body.units
                + (params.audit_fee if params is not None else 0))
    if isinstance(body, RegisterModel):
        return fee + (params.model_registration_fee if params is not None else 0)
    if isinstance(body, Dispute):
        return fee  # the bond is a chain parameter; block building checks it
    return fee


@dataclass(slots=True)
class _Entry:
    stx: SignedTransaction
    tx_hash: bytes
    size: int
    seq: int  # admission order: "oldest" for eviction and ordering ties

    @property
    def fee(self) -> int:
        return self.stx.body.fee

    @property
    def nonce(self) -> int:
        return self.stx.body.nonce

    @property
    def sender(self) -> bytes:
        return self.stx.body.sender


@dataclass
class Mempool:
    """Pending transactions for one node. Call :meth:`update` after every block."""

    state: State
    config: MempoolConfig = field(default_factory=MempoolConfig)
    _by_hash: dict[bytes, _Entry] = field(default_factory=dict)
    _by_sender: dict[bytes, dict[int, _Entry]] = field(default_factory=dict)
    _bytes: int = 0
    _seq: int = 0

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._by_hash

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def next_nonce(self, sender: bytes) -> int:
        """The nonce a new transaction from ``sender`` should use (after its contiguous pending ones)."""
        nonce = self.state.get_account(sender).nonce
        pending = self._by_sender.get(sender, {})
        while nonce in pending:
            nonce += 1
        return nonce

    def pending(self, sender: bytes) -> list[SignedTransaction]:
        return [e.stx for _, e in sorted(self._by_sender.get(sender, {}).items())]

    def has_ready(self) -> bool:
        """Whether some transaction can execute now (the next nonce of its sender is pending)."""
        return any(self.state.get_account(sender).nonce in pending for sender, pending in self._by_sender.items())

    def ready(self, sender: bytes) -> list[SignedTransaction]:
        """The sender's transactions that can execute now: contiguous nonces from the account's."""
        return [e.stx for e in self._ready_entries(sender)]

    # ------------------------------------------------------------ admission

    def add(self, stx: SignedTransaction) -> bytes:
        """Admit ``stx`` or raise :class:`MempoolRejected`; returns its hash."""
        return self._admit(stx, verified=False)

    def add_verified(self, stx: VerifiedTransaction) -> bytes:
        """:meth:`add` for a transaction whose signature was checked already (by the ``/tx`` gossip validator):
        the same checks, bar the signature."""
        return self._admit(stx, verified=True)

    def _admit(self, stx: SignedTransaction, *, verified: bool) -> bytes:
        encoded = stx.encode()
        tx_hash = stx.tx_hash()
        if tx_hash in self._by_hash:
            raise MempoolRejected(RejectReason.DUPLICATE, f"transaction {tx_hash.hex()[:16]} is already pending")
        if len(encoded) > self.config.max_tx_bytes:
            raise MempoolRejected(
                RejectReason.TOO_LARGE, f"{len(encoded)} bytes exceeds the limit of {self.config.max_tx_bytes}"
            )
        body = stx.body
        if not verified:
            try:
                verify_transaction(self.state.chain_id, stx)
            except ex.InvalidSignature as exc:
                raise MempoolRejected(RejectReason.BAD_SIGNATURE, str(exc)) from exc
        sender: bytes = body.sender
        nonce: int = body.nonce
        fee: int = body.fee
        if fee < self.state.params.min_fee:
            raise MempoolRejected(RejectReason.FEE_TOO_LOW, f"fee {fee} below the minimum {self.state.params.min_fee}")
        account_nonce = self.state.get_account(sender).nonce
        if nonce < account_nonce:
            raise MempoolRejected(RejectReason.NONCE_TOO_LOW, f"nonce {nonce} already used (account is at {account_nonce})")
        if nonce > account_nonce + self.config.max_future_gap:
            raise MempoolRejected(
                RejectReason.NONCE_TOO_FAR,
                f"nonce {nonce} is more than {self.config.max_future_gap} ahead of the account's {account_nonce}",
            )
        if isinstance(body, Evidence) and self._evidence_punished(body):
            raise MempoolRejected(RejectReason.ALREADY_PUNISHED, "this double vote was already punished")
        pending = self._by_sender.get(sender, {})
        replaced = pending.get(nonce)
        if replaced is not None:
            need = replaced.fee + max(1, replaced.fee * self.config.replace_fee_bump_pct // 100)
            if fee < need:
                raise MempoolRejected(
                    RejectReason.NONCE_TAKEN, f"nonce {nonce} is pending with fee {replaced.fee}; a replacement needs {need}"
                )
        elif len(pending) >= self.config.max_per_sender and nonce > max(pending, default=-1):
            # A transaction filling a gap below the sender's highest pending nonce is always let in: refused,
            # nothing above the gap could ever execute, no block would free room, and the sender would be stuck
            # for good (a burst of concurrent submissions admitted out of order did exactly that). It cannot
            # grow the pool past the nonce window: every pending nonce lies within max_future_gap of the account.
            raise MempoolRejected(
                RejectReason.SENDER_LIMIT, f"sender already has {len(pending)} pending transactions"
            )
        # cumulative cost of the sender's chain up to and including this nonce
        balance = self.state.get_balance(sender)
        params = self.state.params
        models = self.state.models
        cost = tx_cost(body, params, models) + sum(tx_cost(e.stx.body, params, models)
                                                   for n, e in pending.items() if n < nonce)
        if cost > balance:
            raise MempoolRejected(
                RejectReason.INSUFFICIENT_BALANCE,
                f"{sender.hex()[:16]} has {balance}, its pending transactions up to nonce {nonce} cost {cost}",
            )
        entry = _Entry(stx=stx, tx_hash=tx_hash, size=len(encoded), seq=self._seq)
        extra_bytes = entry.size - (replaced.size if replaced else 0)
        extra_txs = 0 if replaced else 1
        victims = self._make_room(entry, extra_txs, extra_bytes, protect=sender if replaced else None)
        for victim in victims:
            self._remove(victim)
        if replaced is not None:
            self._remove(replaced)
        self._seq += 1
        self._insert(entry)
        return tx_hash

    def _make_room(self, entry: _Entry, extra_txs: int, extra_bytes: int, protect: bytes | None) -> list[_Entry]:
        count = len(self._by_hash) + extra_txs
        size = self._bytes + extra_bytes
        victims: list[_Entry] = []
        if count <= self.config.max_txs and size <= self.config.max_bytes:
            return victims
        exclude = entry.sender if protect is None else protect
        future: list[_Entry] = []
        chains: dict[bytes, list[_Entry]] = {}
        for sender, pending in self._by_sender.items():
            if sender == exclude:
                continue
            chain = self._ready_entries(sender)
            chains[sender] = chain
            ready = {e.nonce for e in chain}
            future.extend(e for n, e in pending.items() if n not in ready)
        future.sort(key=lambda e: (e.fee, e.seq), reverse=True)
        while count > self.config.max_txs or size > self.config.max_bytes:
            if future:
                victim = future[-1]
            else:
                # only a chain's tail is evictable: evicting inside a chain would strand the nonces above it
                tails = [c[-1] for c in chains.values() if c]
                if not tails:
                    break
                victim = min(tails, key=lambda e: (e.fee, e.seq))
            if victim.fee >= entry.fee:
                break
            if future and victim is future[-1]:
                future.pop()
            else:
                chains[victim.sender].pop()
            victims.append(victim)
            count -= 1
            size -= victim.size
        if count > self.config.max_txs or size > self.config.max_bytes:
            raise MempoolRejected(
                RejectReason.POOL_FULL,
                f"pool holds {len(self._by_hash)} transactions / {self._bytes} bytes and none pays less than {entry.fee}",
            )
        return victims

    # ------------------------------------------------------------ proposing

    def reap(self, max_txs: int, max_bytes: int) -> list[SignedTransaction]:
        """Executable transactions for a block: per sender in nonce order, senders by next fee (high first)."""
        heads: list[tuple[int, int, int, bytes]] = []
        chains: dict[bytes, list[_Entry]] = {}
        for sender in self._by_sender:
            chain = self._ready_entries(sender)
            if chain:
                chains[sender] = chain
                heapq.heappush(heads, (-chain[0].fee, chain[0].seq, 0, sender))
        out: list[SignedTransaction] = []
        used = 0
        while heads and len(out) < max_txs:
            _, _, i, sender = heapq.heappop(heads)
            entry = chains[sender][i]
            if used + entry.size > max_bytes:
                continue  # the rest of this sender's chain cannot follow a skipped nonce
            out.append(entry.stx)
            used += entry.size
            if i + 1 < len(chains[sender]):
                nxt = chains[sender][i + 1]
                heapq.heappush(heads, (-nxt.fee, nxt.seq, i + 1, sender))
        return out

    def discard_rejected(self, rejected: Iterable[tuple[SignedTransaction, ex.InvalidTransaction]]) -> int:
        """Drop what block building refused for good (not nonce gaps, which may close). Returns how many."""
        dropped = 0
        for stx, exc in rejected:
            if isinstance(exc, ex.NonceMismatch):
                continue
            entry = self._by_hash.get(stx.tx_hash())
            if entry is not None:
                self._remove(entry)
                dropped += 1
        return dropped

    # ------------------------------------------------------------ after a block

    def update(self, state: State, included: Iterable[SignedTransaction] = ()) -> list[tuple[bytes, RejectReason]]:
        """Move to ``state`` (after a finalized block): drop included and invalidated txs; keep future ones.

        Returns the dropped hashes with the reason, for the node's counters.
        """
        self.state = state
        dropped: list[tuple[bytes, RejectReason]] = []
        for stx in included:
            entry = self._by_hash.get(stx.tx_hash())
            if entry is not None:
                self._remove(entry)
        for sender in list(self._by_sender):
            account = state.get_account(sender)
            balance = account.balance
            spent = 0
            for nonce, entry in sorted(self._by_sender.get(sender, {}).items()):
                reason: RejectReason | None = None
                body = entry.stx.body
                if nonce < account.nonce:
                    reason = RejectReason.NONCE_TOO_LOW
                elif isinstance(body, Evidence) and self._evidence_punished(body):
                    reason = RejectReason.ALREADY_PUNISHED
                else:
                    spent += tx_cost(body, state.params, state.models)
                    if spent > balance:
                        reason = RejectReason.INSUFFICIENT_BALANCE
                if reason is not None:
                    self._remove(entry)
                    dropped.append((entry.tx_hash, reason))
        return dropped

    # ------------------------------------------------------------ internals

    def _evidence_punished(self, body: Evidence) -> bool:
        v = body.vote_a.vote
        key = EvidenceKey(validator=body.vote_a.validator, height=v.height, round=v.round, step=v.step)
        return key in self.state.evidence_seen

    def _ready_entries(self, sender: bytes) -> list[_Entry]:
        pending = self._by_sender.get(sender)
        if not pending:
            return []
        nonce = self.state.get_account(sender).nonce
        out = []
        while nonce in pending:
            out.append(pending[nonce])
            nonce += 1
        return out

    def _insert(self, entry: _Entry) -> None:
        self._by_hash[entry.tx_hash] = entry
        self._by_sender.setdefault(entry.sender, {})[entry.nonce] = entry
        self._bytes += entry.size

    def _remove(self, entry: _Entry) -> None:
        del self._by_hash[entry.tx_hash]
        pending = self._by_sender[entry.sender]
        del pending[entry.nonce]
        if not pending:
            del self._by_sender[entry.sender]
        self._bytes -= entry.size
