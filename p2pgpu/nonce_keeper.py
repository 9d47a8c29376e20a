"""Keep this node's own nonce chain moving when its next transaction can never execute.

The ledger leaves a transaction whose action fails out of the block: it does
not consume the sender's nonce. So if the head of our pending chain can never
run (an ``Assign`` retried after the first one landed, a ``Dispute`` after the
task settled), every transaction we queued behind it waits forever: a client
whose next ``PostTask`` sits behind such a head can no longer post anything.

:class:`NonceKeeper` notices a head that has stayed unexecuted for a few
blocks, dry-runs it against the finalized state, and if it fails there, the
node replaces it in every mempool with a filler at the same nonce. The same
filler closes a gap: a head our own mempool dropped as unexecutable (when we
proposed the block that refused it) while other nodes still hold it and the
transactions behind it wait (a 1-token
transfer to itself, at a fee high enough to count as a replacement). That is
what Ethereum wallets do to cancel a transaction; it costs one fee and keeps
the task ids of the transactions behind it (a task id is fixed by the
PostTask's nonce, so renumbering them is not an option).

Not only the head: behind it, a busy client's chain holds dozens of
transactions, and under load several of them die while they wait (a
Dispute for a task that settled meanwhile, an Assign whose bid expired).
Replaced one head at a time, each cost two blocks while every Assign behind
it waited and expired in turn. :meth:`NonceKeeper.check_behind` dry-runs the
whole chain in nonce order (a failed one counted as replaced) and reports
every transaction behind the head that failed at two consecutive blocks, so
they are all replaced at once.

Pure: the node calls :meth:`NonceKeeper.check` and
:meth:`NonceKeeper.check_behind` after each block and submits what
:func:`filler_for` returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set as AbstractSet
from dataclasses import dataclass, field, replace

from ledger import exceptions as ex
from ledger.state import State
from ledger.transactions import SignedTransaction, Transfer
from ledger.transition import process_transaction

__all__ = ["NonceKeeper", "StuckHead", "filler_for"]


@dataclass(frozen=True, slots=True)
class StuckHead:
    """Our account's next nonce, which no transaction we hold can use: replace or fill it."""

    nonce: int
    reason: str
    stx: SignedTransaction | None = None
    """The transaction holding the nonce that cannot execute (None: a gap, we hold nothing at it)."""


@dataclass(slots=True)
class NonceKeeper:
    address: bytes
    patience_blocks: int = 2
    """Blocks a head must stay unexecuted before it is dry-run (it may simply be waiting for a proposer)."""
    behind_patience_blocks: int = 1
    """Blocks a transaction behind the head must keep failing its dry-run before it is replaced."""
    _head: tuple[int, bytes] | None = None
    _since: int = 0
    _failing: dict[bytes, int] = field(default_factory=dict)
    """Transactions behind the head whose dry-run failed, by hash: the height it first failed at."""

    def check(self, state: State, pending: Sequence[SignedTransaction],
              skip: AbstractSet[int] = frozenset()) -> StuckHead | None:
        """The head of our pending chain if it cannot execute on ``state`` and has waited long enough.

        ``skip``: nonces whose transactions are still being built (a PostTask
        sealing its inputs) or that the sender is filling itself: a missing
        head there is not a gap.
        """
        nonce = state.get_account(self.address).nonce
        head = next((stx for stx in pending if stx.body.nonce == nonce), None)  # type: ignore[attr-defined]
        later = any(stx.body.nonce > nonce for stx in pending)  # type: ignore[attr-defined]
        if head is None and (nonce in skip or not later):
            self._head = None
            return None
        key = (nonce, head.tx_hash() if head is not None else b"")
        if key != self._head:
            self._head, self._since = key, state.height
            return None
        if state.height - self._since < self.patience_blocks:
            return None
        if head is None:
            self._head = None
            return StuckHead(nonce, "nonce gap: the transaction at this nonce was dropped as unexecutable")
        probe = state.copy()
        probe.height += 1
        try:
            process_transaction(probe, head)
        except ex.InvalidTransaction as exc:
            self._head = None
            return StuckHead(nonce, str(exc), head)
        return None


    def check_behind(self, state: State, pending: Sequence[SignedTransaction]) -> list[StuckHead]:
        """Every transaction behind our head that cannot execute, dry-running the chain in nonce order.

        A transaction that fails counts as replaced by a filler (its nonce is
        consumed, a fee paid) for the ones after it. The dry-run stops at a
        gap: what lies beyond it cannot be judged yet. The head itself is
        :meth:`check`'s.
        """
        account = state.get_account(self.address)
        chain = sorted((stx for stx in pending if stx.body.nonce >= account.nonce),  # type: ignore[attr-defined]
                       key=lambda stx: stx.body.nonce)  # type: ignore[attr-defined]
        probe = state.copy()
        probe.height += 1
        expected = account.nonce
        failing: dict[bytes, int] = {}
        out: list[StuckHead] = []
        for stx in chain:
            nonce: int = stx.body.nonce  # type: ignore[attr-defined]
            if nonce != expected:
                break
            expected += 1
            try:
                process_transaction(probe, stx, check_signatures=False)
            except ex.InvalidTransaction as exc:
                if nonce == account.nonce:
                    _consume(probe, stx, state.params.min_fee)
                    continue
                digest = stx.tx_hash()
                since = failing[digest] = self._failing.get(digest, state.height)
                if state.height - since >= self.behind_patience_blocks:
                    out.append(StuckHead(nonce, str(exc), stx))
                _consume(probe, stx, state.params.min_fee)
        self._failing = failing
        return out


def _consume(probe: State, stx: SignedTransaction, min_fee: int) -> None:
    """In a dry-run: the nonce of a transaction that fails is taken by its filler, which pays a fee."""
    sender: bytes = stx.body.sender  # type: ignore[attr-defined]
    account = probe.get_account(sender)
    fee = min(account.balance, max(min_fee, stx.body.fee + 1))  # type: ignore[attr-defined]
    probe.accounts[sender] = replace(account, nonce=account.nonce + 1, balance=account.balance - fee)


def filler_for(sender: bytes, stuck: StuckHead, *, min_fee: int, bump_pct: int, fee_to_beat: int = 0) -> Transfer:
    """A transaction that takes the stuck nonce, pays enough that mempools replace what holds it, and does nothing.

    ``fee_to_beat``: for a gap, the highest fee another node may hold at that nonce (ours we no longer know).
    """
    old_fee: int = stuck.stx.body.fee if stuck.stx is not None else fee_to_beat  # type: ignore[attr-defined]
    fee = max(min_fee, old_fee + max(1, math.ceil(old_fee * bump_pct / 100)))
    return Transfer(sender=sender, nonce=stuck.nonce, fee=fee, to=sender, amount=1)
