"""The market roles' outgoing transactions: sent through the node's :class:`~p2pgpu.txsender.TxSender`, each
remembered by nonce until the ledger executes it, and replaced by a filler when it never can.

A role's ``SubmitTx`` comes here (:meth:`TxOutbox.submit`). The sender
signs it at a nonce from the node's allocator and admits it to our mempool.
A refusal goes back to the role that sent it as ``TxFailed``; a refused
``PostTask`` is also reported to the client service (``post_refused``),
which answers the API's submit with the reason.

After each block, :meth:`TxOutbox.on_block` asks the nonce keeper
(:mod:`p2pgpu.nonce_keeper`) which of our pending transactions can never
execute (a head that fails its dry run, or one behind it), sends a filler
at that nonce paying more than the transaction it replaces, and tells the
role that sent it (``TxFailed``) -- the filler is what lets the
transactions after it run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ledger.mempool import Mempool, MempoolRejected
from ledger.state import State
from ledger.transactions import PostTask, SignedTransaction, StreamClaim
from p2pgpu.market import TxFailed
from p2pgpu.net.log import log
from p2pgpu.nonce_keeper import NonceKeeper, filler_for
from p2pgpu.streams import StreamMetrics
from p2pgpu.txsender import TxSender

__all__ = ["TxOutbox"]

logger = logging.getLogger(__name__)


class TxOutbox:
    """Sends the roles' transactions and repairs the ones that cannot execute. See the module docstring."""

    def __init__(self, sender: TxSender, mempool: Mempool | None, *, failed: Callable[[object, TxFailed], None],
                 post_refused: Callable[[PostTask, MempoolRejected], None], claims: StreamMetrics) -> None:
        """``failed(origin, event)``: a role's transaction was refused or cannot execute (posted to its inbox).

        ``post_refused(body, error)``: our mempool refused a PostTask. ``claims``: where StreamClaims sent and
        refused are counted. Without a ``mempool`` nothing is pending to repair.
        """
        self.sender = sender
        self.mempool = mempool
        self.address = sender.address
        self._failed = failed
        self._post_refused = post_refused
        self._claims = claims
        self.nonce_keeper = NonceKeeper(self.address)
        self._sent: dict[int, tuple[object, int]] = {}  # nonce of our unexecuted tx -> (sending role, fee)
        self.refused = 0
        """Transactions our mempool refused."""
        self.unstuck = 0
        """Transactions replaced by a filler because they could never execute."""

    def submit(self, origin: object, body: Any, *, assign_nonce: bool = True) -> None:
        """Send one of ``origin``'s transactions (``assign_nonce``: at the next nonce; else at its own, held nonce)."""
        claim = isinstance(body, StreamClaim)
        try:
            stx = self.sender.send(body) if assign_nonce else self.sender.send_reserved(body)
        except MempoolRejected as exc:
            self.refused += 1
            self._claims.claims_refused += claim
            log(logger, logging.WARNING, "role_tx_refused", tx=type(body).__name__, reason=str(exc))
            self._failed(origin, TxFailed(body, str(exc)))
            if isinstance(body, PostTask):
                self._post_refused(body, exc)
            return
        self._sent[stx.body.nonce] = (origin, body.fee)  # type: ignore[attr-defined]  # every body has one
        self._claims.claims_submitted += claim

    def send(self, origin: object, body: Any) -> SignedTransaction:
        """Send one of ``origin``'s transactions at the next nonce and return it signed; a refusal is raised
        (:class:`MempoolRejected`, counted), not reported, for a caller that answers it at once (``POST /models``).
        A later failure to execute is reported to ``origin`` as ``TxFailed``, as for :meth:`submit`."""
        try:
            stx = self.sender.send(body)
        except MempoolRejected:
            self.refused += 1
            raise
        self._sent[stx.body.nonce] = (origin, body.fee)  # type: ignore[attr-defined]  # every body has one
        return stx

    def on_block(self, state: State) -> None:
        """Replace with fillers our transactions that can never execute (see p2pgpu.nonce_keeper)."""
        if self.mempool is None:
            return
        executed = state.get_account(self.address).nonce
        for nonce in [n for n in self._sent if n < executed]:
            del self._sent[nonce]
        nonces = self.sender.nonces
        in_hand = nonces.reserved() | frozenset(nonces.gaps())  # being built, or filled by the sender
        pending = self.mempool.pending(self.address)
        head = self.nonce_keeper.check(state, pending, skip=in_hand)
        stuck = ([head] if head is not None else []) + self.nonce_keeper.check_behind(state, pending)
        for dead in stuck:
            origin, fee = self._sent.pop(dead.nonce, (None, 0))
            self.unstuck += 1
            log(logger, logging.WARNING, "tx_cannot_execute", nonce=dead.nonce, reason=dead.reason,
                tx=type(dead.stx.body).__name__ if dead.stx is not None else "dropped",
                action="replaced by a filler so the transactions after it can run")
            filler = filler_for(self.address, dead, min_fee=state.params.min_fee, fee_to_beat=fee,
                                bump_pct=self.mempool.config.replace_fee_bump_pct)
            self.submit(None, filler, assign_nonce=False)
            if origin is not None and dead.stx is not None:
                self._failed(origin, TxFailed(dead.stx.body, dead.reason))
