"""Streaming sessions (pure parts): receipts, serving limits, claims, output signatures.

Risk on both sides is bounded by K = ``receipt_every`` items:

* the **client** signs a cumulative :class:`~ledger.transactions.StreamReceipt`
  every K answered items and never has more than ``max_in_flight`` (default K)
  unanswered items outstanding, so a provider that stops answering stops
  getting work;
* the **provider** serves an item only while fewer than K served items are
  unreceipted, so a client that stops paying gets at most K items free; it
  claims its latest receipt with a ``StreamClaim`` every ``claim_every``
  receipted units and once more at the end.

Every output the provider sends carries its signature over
``StreamOutput(task_id, index, input_hash, output_hash)`` (hashes per
:func:`~p2pgpu.market.results.item_hash`). The client checks each one; a
bad signature, a hash that does not match the bytes, or an out-of-order
index ends the session (:class:`~p2pgpu.market.errors.StreamFault`). Valid
signed outputs are kept (the latest ``max_evidence``) so that one the
client later finds wrong can be disputed (``ClientTask.dispute_stream_item``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ledger.codec import encode
from ledger.keys import AccountKey, address_of, verify_ed25519
from ledger.signing import Domain, signing_bytes
from ledger.state import Task, TaskStatus
from ledger.transactions import (SignedReceipt, SignedStreamOutput, StreamClaim, StreamOutput, StreamReceipt,
                                 sign_receipt, sign_stream_output)

from .errors import MarketUsageError, StreamBackpressure, StreamError, StreamFault
from .events import Action, Report, SendReceipt, SubmitTx
from .results import item_hash

__all__ = [
    "AbandonSession",
    "ClaimRefused",
    "ClientStream",
    "CloseSession",
    "ProviderStream",
    "RetryClaim",
    "SessionCommand",
    "StreamItem",
    "sign_receipt",
    "sign_stream_output",
]

DEFAULT_RECEIPT_EVERY = 8


@dataclass(frozen=True, slots=True)
class StreamItem:
    index: int
    input_hash: bytes


@dataclass(frozen=True, slots=True)
class CloseSession:
    """The task's deadline is near: end the session and claim the latest receipt (``ProviderStream.close``)."""


@dataclass(frozen=True, slots=True)
class RetryClaim:
    """The ledger can take a claim again: claim what earlier claims left out (``ProviderStream.on_ledger``)."""

    task: Task


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """A ``StreamClaim`` was refused: the ledger holds ``claimed_on_ledger`` units (``ProviderStream.claim_failed``)."""

    claimed_on_ledger: int
    reason: str


@dataclass(frozen=True, slots=True)
class AbandonSession:
    """The task settled: serve nothing more and claim nothing (``ProviderStream.abandon``)."""


SessionCommand = CloseSession | RetryClaim | ClaimRefused | AbandonSession
"""What the provider role asks of its stream session. The role does not change a ``ProviderStream`` itself:
it returns ``CommandStream(task_id, command)`` and the session's one owner -- the stream shell's session task
while the session runs -- applies it with :meth:`ProviderStream.apply`."""


class ClientStream:
    """The client's half: what may be sent, checks on what comes back, when to receipt."""

    def __init__(self, *, key: AccountKey, chain_id: bytes, task_id: bytes, provider: bytes, units: int,
                 receipt_every: int = DEFAULT_RECEIPT_EVERY, max_in_flight: int | None = None,
                 max_evidence: int = 4096) -> None:
        if receipt_every < 1:
            raise MarketUsageError("receipt_every must be at least 1")
        self.key = key
        self.chain_id = chain_id
        self.task_id = task_id
        self.provider = provider
        self.units = units
        self.receipt_every = receipt_every
        self.max_in_flight = max_in_flight if max_in_flight is not None else receipt_every
        self.max_evidence = max_evidence
        self.sent = 0
        self.answered = 0
        self.receipted = 0
        self.stopped: str | None = None
        self._pending: dict[int, bytes] = {}
        self.evidence: OrderedDict[int, SignedStreamOutput] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return self.sent - self.answered

    def accept_terms(self, receipt_every: int, units: int, next_index: int) -> None:
        """Take the provider's session terms (``StreamReady``); raises StreamError when they cannot work.

        The provider serves at most ``receipt_every`` (its K) items beyond our
        last receipt. If our own interval is longer we receipt every K answers
        instead: that only lowers our risk, and the task is already assigned
        and escrowed, so refusing would waste it. Waiting for our own
        interval would deadlock (the provider waits for a receipt, we for
        answers), which is why it is never an option.
        """
        if receipt_every < 1:
            raise StreamError(f"provider announced a receipt interval of {receipt_every}; it must be at least 1")
        if units != self.units or next_index != self.sent:
            raise StreamError(f"provider is ready for {units} units from item {next_index} (K={receipt_every}); "
                              f"we have {self.units} units, next item {self.sent}")
        self.receipt_every = min(self.receipt_every, receipt_every)
        self.max_in_flight = min(self.max_in_flight, self.receipt_every)

    def can_send(self) -> bool:
        return self.stopped is None and self.sent < self.units and self.in_flight < self.max_in_flight

    def next_item(self, item: np.ndarray) -> StreamItem:
        """Register ``item`` as the next one to send; refuses when the provider is behind or the cap is hit."""
        if self.stopped is not None:
            raise StreamFault(f"session stopped: {self.stopped}")
        if self.sent >= self.units:
            raise StreamError(f"the task's cap of {self.units} units is used up")
        if self.in_flight >= self.max_in_flight:
            raise StreamBackpressure(f"{self.in_flight} items unanswered; the provider stopped answering")
        index = self.sent
        self._pending[index] = item_hash(item)
        self.sent += 1
        return StreamItem(index, self._pending[index])

    def _fault(self, reason: str) -> StreamFault:
        self.stopped = reason
        return StreamFault(reason)

    def on_output(self, output: np.ndarray, signed: SignedStreamOutput) -> list[Action]:
        """Check one answer; returns a ``SendReceipt`` when K more items are answered. Raises StreamFault."""
        if self.stopped is not None:
            raise StreamFault(f"session stopped: {self.stopped}")
        out = signed.output
        expected = self.answered
        if out.task_id != self.task_id:
            raise self._fault("provider signed an output for another task")
        if out.index != expected or expected not in self._pending:
            raise self._fault(f"output for item {out.index}, expected item {expected}")
        if address_of(signed.public_key) != self.provider:
            raise self._fault("output signed by a key that is not the assigned provider's")
        if not verify_ed25519(signed.public_key, signing_bytes(Domain.STREAM_OUTPUT, self.chain_id, encode(out)),
                              signed.signature):
            raise self._fault(f"bad provider signature on output {out.index}")
        if out.input_hash != self._pending[expected]:
            raise self._fault(f"provider's output {out.index} names another input")
        if out.output_hash != item_hash(output):
            raise self._fault(f"output {out.index} does not hash to what the provider signed")
        del self._pending[expected]
        self.answered += 1
        self.evidence[out.index] = signed
        while len(self.evidence) > self.max_evidence:
            self.evidence.popitem(last=False)
        if self.answered - self.receipted >= self.receipt_every:
            return [self._receipt()]
        return []

    def _receipt(self) -> SendReceipt:
        self.receipted = self.answered
        receipt = sign_receipt(self.key, self.chain_id, StreamReceipt(task_id=self.task_id, units=self.answered))
        return SendReceipt(self.task_id, receipt)

    def close(self) -> list[Action]:
        """End the session: a last receipt for answered items not yet receipted."""
        self.stopped = self.stopped or "closed"
        if self.answered > self.receipted:
            return [self._receipt()]
        return []


class ProviderStream:
    """The provider's half: whether to serve, signed outputs, receipt tracking and claims."""

    def __init__(self, *, key: AccountKey, chain_id: bytes, task_id: bytes, client: bytes, units: int,
                 receipt_every: int = DEFAULT_RECEIPT_EVERY, claim_every: int | None = None, fee: int = 1) -> None:
        if receipt_every < 1:
            raise MarketUsageError("receipt_every must be at least 1")
        self.key = key
        self.chain_id = chain_id
        self.task_id = task_id
        self.client = client
        self.units = units
        self.receipt_every = receipt_every
        self.claim_every = claim_every if claim_every is not None else receipt_every
        self.fee = fee
        self.served = 0
        self.receipted = 0
        self.latest: SignedReceipt | None = None
        self.claimed = 0  # units covered by claims submitted (reset to the ledger's on failure)
        self.closed = False
        self._pending: dict[int, bytes] = {}

    @property
    def unreceipted(self) -> int:
        return self.served - self.receipted

    def can_serve(self) -> bool:
        return not self.closed and self.served < self.units and self.unreceipted < self.receipt_every

    def accept_item(self, item: np.ndarray) -> int:
        """Admit the next item (its index) or refuse: StreamBackpressure until a receipt comes."""
        if self.closed:
            raise StreamFault("session closed")
        if self.served >= self.units:
            raise StreamError(f"the task's cap of {self.units} units is used up")
        if self.unreceipted >= self.receipt_every:
            raise StreamBackpressure(f"{self.unreceipted} items unreceipted; waiting for a receipt")
        index = self.served
        self._pending[index] = item_hash(item)
        self.served += 1
        return index

    def sign_output(self, index: int, output: np.ndarray) -> SignedStreamOutput:
        """The signed statement that item ``index`` gave ``output``."""
        input_hash = self._pending.pop(index, None)
        if input_hash is None:
            raise MarketUsageError(f"item {index} was not accepted or was already answered")
        out = StreamOutput(task_id=self.task_id, index=index, input_hash=input_hash, output_hash=item_hash(output))
        return sign_stream_output(self.key, self.chain_id, out)

    def on_receipt(self, signed: SignedReceipt) -> list[Action]:
        """Take a client receipt; returns a ``StreamClaim`` when ``claim_every`` new units are covered."""
        r = signed.receipt
        if r.task_id != self.task_id:
            raise StreamFault("receipt for another task")
        if address_of(signed.public_key) != self.client:
            raise StreamFault("receipt not signed by the task's client")
        if not verify_ed25519(signed.public_key, signing_bytes(Domain.RECEIPT, self.chain_id, encode(r)),
                              signed.signature):
            raise StreamFault("bad client signature on receipt")
        if r.units > self.served:
            raise StreamFault(f"receipt covers {r.units} units but only {self.served} were served")
        if r.units <= self.receipted:
            return []  # stale or duplicate: cumulative receipts only move forward
        self.receipted = r.units
        self.latest = signed
        if self.receipted - self.claimed >= self.claim_every:
            return self._claim()
        return []

    def _claim(self) -> list[Action]:
        assert self.latest is not None
        self.claimed = self.latest.receipt.units
        body = StreamClaim(sender=self.key.address, nonce=0, fee=self.fee, receipt=self.latest)
        return [SubmitTx(body)]

    def on_ledger(self, task: Task) -> list[Action]:
        """Retry, after a failed claim (see ``claim_failed``), once the task can take claims again."""
        return self._claim() if self.claim_due(task) else []

    def claim_due(self, task: Task) -> bool:
        """Whether :meth:`on_ledger` would claim now (a read: the role asks before it sends ``RetryClaim``)."""
        return self.latest is not None and self.receipted > self.claimed and task.status == TaskStatus.ASSIGNED \
            and (self.closed or self.receipted - self.claimed >= self.claim_every)

    def claim_failed(self, claimed_on_ledger: int, reason: str) -> list[Action]:
        self.claimed = claimed_on_ledger
        return [Report(self.task_id, f"StreamClaim refused ({reason}); will retry")]

    def close(self) -> list[Action]:
        """End the session and claim whatever the latest receipt covers beyond earlier claims."""
        self.closed = True
        if self.latest is not None and self.receipted > self.claimed:
            return self._claim()
        return []

    def abandon(self) -> None:
        """The task settled: the session serves nothing more (and there is nothing left to claim)."""
        self.closed = True

    def apply(self, command: SessionCommand) -> list[Action]:
        """Carry out the role's ``command`` (from the session's owner); the actions go to the node."""
        if isinstance(command, CloseSession):
            return [] if self.closed else self.close()
        if isinstance(command, RetryClaim):
            return self.on_ledger(command.task)
        if isinstance(command, ClaimRefused):
            return self.claim_failed(command.claimed_on_ledger, command.reason)
        if isinstance(command, AbandonSession):
            self.abandon()
            return []
        raise MarketUsageError(f"not a session command: {command!r}")
