"""The node's one way to sign and send its own transactions.

Every role and the consensus driver send through one :class:`TxSender`,
which takes nonces from the node's :class:`~p2pgpu.nonces.NonceAllocator`,
signs with the account key and hands the transaction to the node (mempool
admission, then gossip). Everything here is synchronous: between taking a
nonce and admitting its transaction there is no ``await``, except where a
caller reserves a nonce on purpose (:meth:`TxSender.reserve`) to build a
transaction that needs it -- a ``PostTask``'s task id is fixed by its nonce,
and its inputs are sealed to that id in a thread -- and then either sends
(:meth:`TxSender.send`) or gives the reservation back
(:meth:`TxSender.release`).

A refusal never strands the transactions behind it: a refused nonce at the
top is taken back, one below the top is filled at once with a 1-token
transfer to ourselves, and a filler that is refused too is retried after
every block (:meth:`TxSender.on_block`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ledger.keys import AccountKey
from ledger.mempool import MempoolRejected, RejectReason, tx_cost
from ledger.params import Params
from ledger.transition import sign_transaction
from ledger.state import State
from ledger.transactions import SignedTransaction, Transfer
from p2pgpu.net.log import log
from p2pgpu.nonces import NonceAllocator, NonceState

__all__ = ["TxSender"]

logger = logging.getLogger(__name__)


class TxSender:
    """Signs and sends this node's transactions with nonces from one allocator. See the module docstring."""

    def __init__(self, key: AccountKey, chain_id: bytes, admit: Callable[[SignedTransaction], bytes],
                 state: State) -> None:
        """``admit``: the node's mempool admission plus gossip; raises :class:`MempoolRejected`."""
        self.key = key
        self.address = key.address
        self.chain_id = chain_id
        self._admit = admit
        self._params: Params = state.params
        self.nonces = NonceAllocator.resume(self.address, state.get_account(self.address).nonce)
        self.fillers_sent = 0
        self.refused = 0

    # ------------------------------------------------------------ costs and funds

    def cost_of(self, body: Any) -> int:
        """What ``body`` may take from our balance at most (a PostTask's escrow includes the audit fee)."""
        return tx_cost(body, self._params)

    def available(self, state: State) -> int:
        """Our balance on ``state`` minus what our unexecuted transactions may still take."""
        return state.get_balance(self.address) - self.nonces.pending_cost()

    # ------------------------------------------------------------ sending

    def reserve(self, cost: int = 0) -> int:
        """Take the next nonce for a transaction still being built; :meth:`send` or :meth:`release` it."""
        return self.nonces.reserve(cost)

    def send(self, body: Any) -> SignedTransaction:
        """Sign and send ``body`` at the next nonce (its own ``nonce`` is ignored); raises :class:`MempoolRejected`.

        A refused transaction gives its nonce back (or fills it).
        """
        nonce = self.nonces.reserve(self.cost_of(body))
        return self.send_reserved(replace(body, nonce=nonce))

    def send_reserved(self, body: Any) -> SignedTransaction:
        """Sign and send ``body`` at its own nonce, which must be held; raises :class:`MempoolRejected`.

        The nonce is a reservation being completed, a gap being filled, or
        a nonce sent already (a replacement at a higher fee, e.g. the nonce
        keeper's filler). A refused reservation is given back or filled; a
        refused replacement leaves what it would have replaced.
        """
        nonce: int = body.nonce
        state = self.nonces.state_of(nonce)
        if state is None:
            reason = RejectReason.NONCE_TOO_LOW if nonce < self.nonces.base else RejectReason.NONCE_TOO_FAR
            raise MempoolRejected(reason, f"nonce {nonce} was not handed out by this node "
                                  f"(held: {self.nonces.base}..{self.nonces.top - 1})")
        stx = sign_transaction(self.key, self.chain_id, body)
        try:
            self._admit(stx)
        except MempoolRejected:
            self.refused += 1
            if state is NonceState.RESERVED:
                self.release(nonce)
            raise
        self.nonces.sent(nonce, self.cost_of(body))
        return stx

    def release(self, nonce: int) -> None:
        """A reservation will not be sent: take the nonce back, or fill it if later nonces are out."""
        if self.nonces.refused(nonce):
            self._fill(nonce)

    def on_block(self, state: State) -> None:
        """Forget what ``state`` executed; retry fillers for gaps still open."""
        self._params = state.params
        self.nonces.on_block(state.get_account(self.address).nonce)
        for nonce in self.nonces.gaps():
            self._fill(nonce)

    def _fill(self, nonce: int) -> None:
        filler = Transfer(sender=self.address, nonce=nonce, fee=self._params.min_fee, to=self.address, amount=1)
        try:
            self._admit(sign_transaction(self.key, self.chain_id, filler))
        except MempoolRejected as exc:
            log(logger, logging.WARNING, "nonce_gap_unfilled", nonce=nonce, reason=str(exc),
                action="retried after the next block")
            return
        self.fillers_sent += 1
        self.nonces.sent(nonce, self.cost_of(filler))
        log(logger, logging.INFO, "nonce_gap_filled", nonce=nonce)
