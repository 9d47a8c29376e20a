"""One owner for this node's nonces: a sender-side allocator, atomic with respect to every ``await``.

Every transaction a node signs (a client's ``PostTask`` and ``Assign``, a
provider's ``CommitResult``, a verifier's ``Attest``, evidence, the nonce
keeper's fillers) takes its nonce from the one :class:`NonceAllocator` of
the node's account. Handing a nonce out is a plain method call, so two
callers can never read the same "next nonce" across an ``await`` -- the
defect that made concurrent submissions sign several ``PostTask``s with one
nonce (and so one task id): a ``PostTask`` reserves its nonce, seals its
inputs in a thread, and only then signs and sends.

A reserved nonce ends in one of three ways:

* **sent** -- our mempool admitted the transaction (it is gossiped);
* **refused at the top** -- nothing above it was handed out, so the nonce is
  simply taken back and the next reservation gets it again;
* **refused below the top** -- later nonces are already out, and a hole
  would strand them all (the ledger executes a sender's transactions in
  nonce order), so the nonce becomes a *gap* the node fills at once with a
  filler (a 1-token transfer to itself, :func:`p2pgpu.nonce_keeper.filler_for`);
  a gap whose filler is refused too is retried after every block.

The allocator also remembers what each held nonce may cost, so a caller can
refuse a transaction the balance cannot cover *before* it takes a nonce:
"balance minus what our unexecuted transactions may take" is what is
really available. After each finalized block :meth:`NonceAllocator.on_block`
forgets the nonces the ledger executed.

Pure: no I/O, no clock, no Trio. :class:`p2pgpu.txsender.TxSender` is its shell.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["HeldNonce", "NonceAllocator", "NonceState", "NonceUsageError"]


class NonceUsageError(Exception):
    """The allocator was misused: a nonce reported sent or refused that it never handed out (a bug)."""


class NonceState(enum.Enum):
    RESERVED = "reserved"
    """Handed out; its transaction is being built (e.g. inputs sealed) and not yet in the mempool."""
    SENT = "sent"
    """Its transaction (or a filler) is in our mempool, waiting for a block."""
    GAP = "gap"
    """Refused below the top: needs a filler so the nonces above it can execute."""


@dataclass(slots=True)
class HeldNonce:
    state: NonceState
    cost: int
    """What the transaction may take from the balance at most (fee plus what it moves or locks)."""


@dataclass(slots=True)
class NonceAllocator:
    """The nonces of one account, from the ledger's next one up to the highest handed out."""

    address: bytes
    base: int = 0
    """The account's nonce on the last finalized state seen: every lower nonce is executed."""
    top: int = 0
    """The next nonce to hand out; every nonce in ``[base, top)`` is held."""
    held: dict[int, HeldNonce] = field(default_factory=dict)

    @classmethod
    def resume(cls, address: bytes, account_nonce: int, pending: Iterable[int] = ()) -> NonceAllocator:
        """An allocator for a (re)started node: the ledger's nonce, and the nonces our mempool still holds.

        A hole between pending nonces is a gap to fill (the transaction that
        held it is gone with the old process), so nothing above it strands.
        """
        alloc = cls(address, base=account_nonce, top=account_nonce)
        sent = {n for n in pending if n >= account_nonce}
        if sent:
            alloc.top = max(sent) + 1
        for nonce in range(alloc.base, alloc.top):
            alloc.held[nonce] = HeldNonce(NonceState.SENT if nonce in sent else NonceState.GAP, 0)
        return alloc

    # ------------------------------------------------------------ queries

    def pending_cost(self) -> int:
        """What our handed-out, unexecuted transactions may still take from the balance."""
        return sum(h.cost for h in self.held.values())

    def reserved(self) -> frozenset[int]:
        """Nonces handed out whose transactions are still being built (not in any mempool yet)."""
        return frozenset(n for n, h in self.held.items() if h.state is NonceState.RESERVED)

    def gaps(self) -> list[int]:
        """Nonces that need a filler, lowest first."""
        return sorted(n for n, h in self.held.items() if h.state is NonceState.GAP)

    def state_of(self, nonce: int) -> NonceState | None:
        held = self.held.get(nonce)
        return held.state if held is not None else None

    # ------------------------------------------------------------ transitions

    def reserve(self, cost: int = 0) -> int:
        """Hand out the next nonce; its transaction may cost up to ``cost``."""
        if cost < 0:
            raise NonceUsageError(f"cost {cost} is negative")
        nonce = self.top
        self.top += 1
        self.held[nonce] = HeldNonce(NonceState.RESERVED, cost)
        return nonce

    def sent(self, nonce: int, cost: int | None = None) -> None:
        """The transaction at ``nonce`` (or a filler for its gap) is in our mempool."""
        if nonce < self.base:
            return  # the ledger moved past it meanwhile (someone else signed with our key)
        held = self._held(nonce)
        held.state = NonceState.SENT
        if cost is not None:
            held.cost = cost

    def refused(self, nonce: int) -> bool:
        """The transaction at a reserved ``nonce`` will not be sent. Returns True if the nonce must be filled.

        At the top it is taken back (with any unfilled gaps right below it);
        below the top it becomes a gap.
        """
        if nonce < self.base:
            return False  # the ledger moved past it meanwhile: nothing to take back or fill
        held = self._held(nonce)
        if held.state is NonceState.SENT:
            raise NonceUsageError(f"nonce {nonce} was already sent; a replacement refused leaves it sent")
        if nonce != self.top - 1:
            held.state, held.cost = NonceState.GAP, 0
            return True
        del self.held[nonce]
        self.top = nonce
        while self.top > self.base and self.state_of(self.top - 1) is NonceState.GAP:
            self.top -= 1
            del self.held[self.top]
        return False

    def on_block(self, account_nonce: int) -> None:
        """A finalized state shows the account at ``account_nonce``: forget what it executed."""
        if account_nonce <= self.base:
            return
        for nonce in range(self.base, min(account_nonce, self.top)):
            self.held.pop(nonce, None)
        self.base = account_nonce
        if self.top < account_nonce:  # someone else signed with our key: follow the ledger
            self.held.clear()
            self.top = account_nonce

    def _held(self, nonce: int) -> HeldNonce:
        held = self.held.get(nonce)
        if held is None:
            raise NonceUsageError(f"nonce {nonce} is not held (held: {self.base}..{self.top - 1})")
        return held
