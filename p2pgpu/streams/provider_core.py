"""The provider's half of ``/p2pgpu/stream/1`` as a sans-I/O protocol core: frames in, frames and events out.

One :class:`ProviderProtocol` drives one client connection to one session
(the market's :class:`~p2pgpu.market.ProviderStream`, which does the
accounting). It never reads a socket, sleeps or runs the model: the Trio
shell hands it each frame the client sent (``None`` for the client's END),
asks it what to wait for next (:meth:`ProviderProtocol.expectation`), runs
the model on the item :meth:`ProviderProtocol.next_item` offers, and sends the
frames it returns. Every way the client can break the protocol -- an
undecodable or truncated frame, a message out of place, a wrong index, an
oversized item, flooding, a bad receipt -- raises
:class:`~p2pgpu.streams.errors.StreamRejected` with the code that names it.

All of the session's state changes on this side happen inside these methods,
each a complete transition called from the connection's one task.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ledger.codec import DecodeError, Record

from ..market import Action, ProviderStream, StreamError
from .config import StreamConfig
from .errors import StreamRejected
from .messages import StreamAck, StreamHello, StreamInput, StreamReady, StreamResult, decode_message, encode_message

__all__ = [
    "ClientEnded",
    "Expectation",
    "ItemQueued",
    "ProviderEvent",
    "ProviderProtocol",
    "ReceiptTaken",
    "hello_expectation",
    "read_hello",
]


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the connection waits for next, for how long, and the refusal when nothing comes in time."""

    timeout: float
    code: str
    message: str

    def expired(self) -> StreamRejected:
        return StreamRejected(self.code, self.message)


@dataclass(frozen=True, slots=True)
class ItemQueued:
    """The client's item ``index`` passed every check and waits for the model (and the receipts) to allow it."""

    index: int


@dataclass(frozen=True, slots=True)
class ReceiptTaken:
    """A valid receipt moved the session forward; ``actions`` (a ``StreamClaim``, perhaps) go to the node."""

    units: int
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class ClientEnded:
    """The client sent END: answer what the receipts allow, then :meth:`ProviderProtocol.close`."""


ProviderEvent = ItemQueued | ReceiptTaken | ClientEnded


def _expect(timeout: float, code: str, what: str, detail: str = "") -> Expectation:
    return Expectation(timeout, code, f"no {what} within {timeout} s" + (f": {detail}" if detail else ""))


def hello_expectation(config: StreamConfig) -> Expectation:
    """A fresh connection owes a StreamHello within ``hello_timeout``."""
    return _expect(config.hello_timeout, "idle", "StreamHello")


def decode_frame(raw: bytes) -> Record:
    """One client frame's record; an undecodable one is ``malformed`` (the codec's error names the field)."""
    try:
        return decode_message(raw)
    except DecodeError as exc:
        raise StreamRejected("malformed", f"undecodable frame: {exc}") from exc


def read_hello(raw: bytes | None) -> StreamHello:
    """The connection's first frame, which must be a StreamHello."""
    if raw is None:
        raise StreamRejected("malformed", "the stream ended before StreamHello")
    hello = decode_frame(raw)
    if not isinstance(hello, StreamHello):
        raise StreamRejected("unexpected", f"expected StreamHello, got {type(hello).__name__}")
    return hello


class ProviderProtocol:
    """One admitted connection to one provider session: checks the client's frames, gates items by receipts.

    Items beyond what the receipts allow wait in a queue (at most K of them:
    a client with more unanswered is flooding). The shell's loop is::

        send(ready_frame()); loop: raw = receive within expectation(); receive_frame(raw);
        while (item := next_item()) is not None: send(answer(model(item)));
        stop if ended, else check_open(); finally close()
    """

    def __init__(self, session: ProviderStream, config: StreamConfig) -> None:
        self.session = session
        self._max_item_bytes = config.max_item_bytes
        self._idle_timeout = config.idle_timeout
        self._receipt_timeout = config.receipt_timeout
        self._queue: deque[np.ndarray] = deque()
        self.ended = False
        """The client sent END."""

    @property
    def queued(self) -> int:
        """Items received and checked, not yet answered."""
        return len(self._queue)

    def ready_frame(self) -> bytes:
        """StreamReady: the session's terms, sent once the connection is admitted."""
        ps = self.session
        return encode_message(StreamReady(ps.task_id, ps.receipt_every, ps.units, ps.served))

    def expectation(self) -> Expectation:
        """A receipt when K served items are unreceipted (``no_receipt``), else any frame (``idle``)."""
        ps = self.session
        if ps.unreceipted >= ps.receipt_every and not ps.closed:
            return _expect(self._receipt_timeout, "no_receipt", "receipt",
                           f"{ps.unreceipted} items served since the last receipt and K={ps.receipt_every} "
                           f"(announced in StreamReady): a client must receipt at least every "
                           f"{ps.receipt_every} answers")
        return _expect(self._idle_timeout, "idle", "an item or a receipt")

    def receive_frame(self, raw: bytes | None) -> list[ProviderEvent]:
        """Take one frame from the client (``None``: its END)."""
        if self.ended:
            raise RuntimeError("receive_frame() after the client's END")  # our misuse: the framing ends there
        if raw is None:
            self.ended = True
            return [ClientEnded()]
        msg = decode_frame(raw)
        if isinstance(msg, StreamInput):
            return [self._queue_item(msg)]
        if isinstance(msg, StreamAck):
            try:
                actions = self.session.on_receipt(msg.receipt)
            except StreamError as exc:
                raise StreamRejected("bad_receipt", str(exc)) from exc
            return [ReceiptTaken(msg.receipt.receipt.units, tuple(actions))]
        raise StreamRejected("unexpected", f"{type(msg).__name__} during a session")

    def _queue_item(self, msg: StreamInput) -> ItemQueued:
        ps = self.session
        expected = ps.served + len(self._queue)
        if msg.index != expected:
            raise StreamRejected("bad_index", f"item {msg.index}, expected item {expected}")
        if msg.item.nbytes > self._max_item_bytes:
            raise StreamRejected("oversized_item", f"item {msg.index} has {msg.item.nbytes} bytes, "
                                                   f"limit {self._max_item_bytes}")
        if expected >= ps.units:
            raise StreamRejected("cap_reached", f"item {msg.index} is over the task's cap of {ps.units} units")
        if ps.closed:
            raise StreamRejected("closed", "the session was closed (its deadline is near)")
        if len(self._queue) >= ps.receipt_every:
            raise StreamRejected("flooding", f"more than {ps.receipt_every} items unanswered")
        self._queue.append(msg.item)
        return ItemQueued(msg.index)

    def next_item(self) -> np.ndarray | None:
        """The next queued item the receipts allow us to answer now, if any (run the model on it)."""
        return self._queue[0] if self._queue and self.session.can_serve() else None

    def answer(self, output: np.ndarray) -> bytes:
        """The model's ``output`` for :meth:`next_item`: the signed StreamResult frame to send."""
        if not self._queue:
            raise RuntimeError("answer() without an item from next_item()")
        item = self._queue.popleft()
        index = self.session.accept_item(item)
        signed = self.session.sign_output(index, output)
        return encode_message(StreamResult(output, signed))

    def refuse_item(self, error: Exception) -> StreamRejected:
        """The model refused :meth:`next_item` (dtype, shape): the ``bad_item`` rejection to raise."""
        return StreamRejected("bad_item", f"item {self.session.served}: {error}")

    def check_open(self) -> None:
        """After answering: items still queued on a session our role closed (deadline near) can never be served."""
        if self.session.closed and self._queue:
            raise StreamRejected("closed", "the session was closed (its deadline is near)")

    def close(self) -> list[Action]:
        """The client ended the session: end it and claim the latest receipt (``SubmitTx(StreamClaim)``)."""
        return self.session.close()
