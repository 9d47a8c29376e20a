"""The client's half of ``/p2pgpu/stream/1`` as a sans-I/O protocol core: frames in, frames and actions out.

One :class:`ClientProtocol` drives one stream session (the market's
:class:`~p2pgpu.market.ClientStream`, which checks answers and decides when
to receipt) over whichever connection the Trio shell has open. It never
touches a socket or a clock: the shell sends :meth:`~ClientProtocol.hello_frame`,
hands it every frame the provider sent (``None`` for the provider's END) and
sends the frames it returns. A provider that breaks the protocol -- ends the
stream early, sends a message out of place, announces terms that cannot
work, signs a wrong answer -- raises a typed error naming the problem:
:class:`~p2pgpu.streams.errors.StreamTransportError`,
:class:`~p2pgpu.market.StreamFault`, or the codec's
:class:`~ledger.codec.DecodeError` for a frame that does not decode.

Two ways to give it items. Batch: every item at construction (``items``),
kept with their outputs (``outputs``) for item disputes. Live
(``live=True``): items are fed one at a time with :meth:`~ClientProtocol.feed`
while the session runs, each answer comes back with its index
(:meth:`~ClientProtocol.receive_live_answer`), and nothing is kept here once
sent or answered (the shell keeps a bounded window for disputes); the session
ends after :meth:`~ClientProtocol.finish` once every fed item is answered.

All of the session's state on this side changes inside these methods, each a
complete transition called from the session's one task. The receipts the
session signs are queued here as it signs them (and still returned, for the
node's record), so nothing outside the connection's task writes to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from ledger.transactions import SignedReceipt

from ..market import Action, ClientStream, SendReceipt, StreamError
from .errors import StreamTransportError
from .messages import StreamAck, StreamHello, StreamInput, StreamReady, StreamResult, decode_message, encode_message

__all__ = ["ClientProtocol"]


class ClientProtocol:
    """Streams ``items`` through one session: at most K unanswered, a receipt whenever the session asks."""

    def __init__(self, session: ClientStream, items: Sequence[np.ndarray] = (), *, live: bool = False) -> None:
        if live and items:
            raise StreamError("a live session is fed its items one at a time, not given them up front")
        self.session = session
        self.live = live
        self.items = list(items)
        """Batch mode: every item. Live mode: stays empty (items wait in a queue until sent)."""
        self.outputs: list[np.ndarray] = []
        """Batch mode: checked answers so far, in item order (kept after the session for item disputes)."""
        self.started = False
        """The provider accepted the session (StreamReady): from then on a failure is not retried."""
        self.answered = 0
        """Answers received and checked on this session."""
        self._sent = 0
        self._fed = 0
        self._queue: deque[np.ndarray] = deque()  # live: fed, not sent yet
        self._finished = not live
        self._outbox: deque[SignedReceipt] = deque()
        self._queued_units = 0  # the highest receipt queued: cumulative receipts only move forward

    @property
    def task_id(self) -> bytes:
        return self.session.task_id

    @property
    def total(self) -> int:
        """Items this session has to answer: all of them (batch), or those fed so far (live)."""
        return self._fed if self.live else len(self.items)

    @property
    def unanswered(self) -> int:
        """Items given (sent or waiting to be sent) and not answered yet."""
        return self.total - self.answered

    @property
    def done(self) -> bool:
        """Every item answered (live: and no more will be fed)."""
        return self._finished and self.answered >= self.total

    def feed(self, item: np.ndarray) -> int:
        """Live: queue ``item`` as the next one (sent once the session has room); returns its index.

        Raises :class:`~p2pgpu.market.StreamError` once :meth:`finish` was
        called or when the task's unit cap would be passed (the item is not
        queued then).
        """
        if not self.live:
            raise StreamError("a batch session was given its items up front; feed() is for live sessions")
        if self._finished:
            raise StreamError("the session is ending: no more items")
        if self._fed >= self.session.units:
            raise StreamError(f"the task's cap of {self.session.units} units is used up")
        index = self._fed
        self._fed += 1
        self._queue.append(item)
        return index

    def finish(self) -> None:
        """Live: no more items; the session ends once the fed ones are answered."""
        self._finished = True

    def hello_frame(self) -> bytes:
        """StreamHello: the connection's first frame."""
        return encode_message(StreamHello(self.session.task_id))

    def receive_ready(self, raw: bytes | None, peer: str) -> StreamReady:
        """The provider's answer to the hello: its StreamReady, whose terms the session takes."""
        cs = self.session
        if raw is None:
            raise StreamTransportError(f"provider {peer} ended the stream without StreamReady")
        ready = decode_message(raw)
        if not isinstance(ready, StreamReady) or ready.task_id != cs.task_id:
            raise StreamTransportError(f"provider {peer} answered the hello with {type(ready).__name__}")
        try:
            cs.accept_terms(ready.receipt_every, ready.units, ready.next_index)
        except StreamError as exc:
            raise StreamTransportError(f"provider {peer}: {exc}") from exc
        self.started = True
        return ready

    def item_frames(self) -> list[bytes]:
        """StreamInput frames for every item the session may send now (it stops at K unanswered)."""
        cs = self.session
        frames = []
        while self._sent < self.total and cs.can_send():
            item = self._queue.popleft() if self.live else self.items[self._sent]
            cs.next_item(item)
            frames.append(encode_message(StreamInput(cs.sent - 1, item)))
            self._sent += 1
        return frames

    def receive_answer(self, raw: bytes | None) -> list[Action]:
        """One answer from the provider, checked; the actions (``SendReceipt`` every K) go to the node.

        Raises :class:`~p2pgpu.market.StreamFault` for a bad signature,
        hash or index, which ends the session.
        """
        _, output, actions = self._answer(raw)
        self.outputs.append(output)
        return actions

    def receive_live_answer(self, raw: bytes | None) -> tuple[int, np.ndarray, list[Action]]:
        """Live: one answer, checked: ``(index, output, actions)``; the output is not kept here.

        Raises as :meth:`receive_answer` does.
        """
        return self._answer(raw)

    def _answer(self, raw: bytes | None) -> tuple[int, np.ndarray, list[Action]]:
        cs = self.session
        if raw is None:
            raise StreamTransportError(f"provider ended the stream after {self.answered} of {self.total} answers")
        msg = decode_message(raw)
        if not isinstance(msg, StreamResult):
            raise StreamTransportError(f"provider sent {type(msg).__name__} where an answer belongs")
        actions = cs.on_output(msg.output, msg.signed)
        index = self.answered
        self.answered += 1
        self._queue_own(actions)
        return index, msg.output, actions

    def _queue_own(self, actions: list[Action]) -> None:
        """The session's own receipts go out on its own connection, before the next item.

        The connection's task sends them (:meth:`receipt_frames`) right after
        this answer: waiting for the node to hand them back would stall the
        provider, which serves no more than K items beyond the last receipt.
        """
        for action in actions:
            if isinstance(action, SendReceipt) and action.task_id == self.task_id:
                self.queue_receipt(action.receipt)

    def queue_receipt(self, receipt: SignedReceipt) -> None:
        """A receipt to send (``SendReceipt``): it goes out before the next item.

        One no newer than a receipt already queued is dropped: receipts are
        cumulative, and the session queues its own as it signs them, so the
        node handing the same ``SendReceipt`` back changes nothing.
        """
        if receipt.receipt.units <= self._queued_units:
            return
        self._queued_units = receipt.receipt.units
        self._outbox.append(receipt)

    def receipt_frames(self) -> list[bytes]:
        """StreamAck frames for the receipts queued so far."""
        frames = [encode_message(StreamAck(receipt)) for receipt in self._outbox]
        self._outbox.clear()
        return frames

    def close(self) -> list[Action]:
        """Every item answered: end the session (a last ``SendReceipt`` for answers not yet receipted)."""
        self._finished = True
        actions = self.session.close()
        self._queue_own(actions)
        return actions

    def receive_end(self, raw: bytes | None) -> None:
        """After our END, the provider's END (after its final claim), and nothing else."""
        if raw is not None:
            raise StreamTransportError("provider sent data after the last answer")
