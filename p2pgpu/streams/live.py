"""Live stream sessions: a stream task whose items are fed one request at a time, for an inference gateway.

A stream task posted without items (a ``stream_infer`` spec naming only its
model) opens a *live* session once assigned:
:meth:`p2pgpu.clientservice.ClientService.open_live_session` posts it, waits for
the provider's ``StreamReady`` and returns a :class:`LiveSession`. Its
:meth:`~LiveSession.infer` may be called by many tasks at once: items go out in
call order, at most the session's K unanswered, each caller gets the answer to
its own item (matched by index); callers beyond the window wait in the queue.

The handle is the callers' side only. The session's one owner task (in
:mod:`p2pgpu.streams.transport`, ``StreamTransport.run_live_client``) drives
the sans-I/O :class:`~p2pgpu.streams.client_core.ClientProtocol` in live mode:
``infer`` only checks the item, takes the next index and posts it to the
owner's inbox, then waits; the owner sends, receives, checks signatures,
receipts and claims exactly as for a batch session, and hands each answer
back here. So nothing but the owner changes the session's market state.

How it ends, and what the callers see:

* :meth:`~LiveSession.aclose` (or the unit cap reached and every item
  answered): the last receipt, END, the provider claims as today;
  ``ended`` says ``"closed"`` / ``"exhausted"``;
* the provider stalls (nothing answered for the stream config's
  ``answer_timeout`` with items unanswered), disconnects, refuses, or sends a
  bad output or signature (``StreamFault``): every call in flight or queued
  raises :class:`SessionLost` with the reason (``ended``), so the caller can
  retry those items on another session; the ledger side (disputes, missed)
  is as for any stream task;
* past the cap, :meth:`~LiveSession.infer` raises :class:`SessionExhausted`
  without sending anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from kernels.kernel import ItemSignature
from kernels.tensors import canonical_array

from .messages import MAX_ITEM_ELEMENTS

__all__ = [
    "InvalidItem",
    "KeptItems",
    "LiveSession",
    "LiveSessionError",
    "LiveStart",
    "NoProviderError",
    "SessionClosed",
    "SessionExhausted",
    "SessionLost",
    "SessionStartError",
]


class LiveSessionError(Exception):
    """Base of the live-session errors; ``task_id`` names the stream task."""

    def __init__(self, task_id: bytes, reason: str) -> None:
        super().__init__(f"stream task {task_id.hex()[:16]}: {reason}")
        self.task_id = task_id
        self.reason = reason


class SessionStartError(LiveSessionError):
    """The live session did not start: the task was assigned but the provider never became ready, or it
    refused the session (``reason`` says which), or we stopped waiting (``start_timeout``)."""


class NoProviderError(SessionStartError):
    """No provider took the task: it expired without a bid we could assign, or the auction outlasted
    ``start_timeout``; ``reason`` names the bids (and prices) and the declines (and why) the task saw."""


class SessionLost(LiveSessionError):
    """The session ended under this call (stall, disconnect, refusal, a bad output or signature): the item
    was not answered here and may be retried on another session. ``index`` is the item's, if it had one."""

    def __init__(self, task_id: bytes, reason: str, index: int | None = None) -> None:
        super().__init__(task_id, reason)
        self.index = index


class SessionExhausted(LiveSessionError):
    """The task's unit cap is used up: open another session. Nothing was sent."""


class SessionClosed(LiveSessionError):
    """``aclose`` was called: the session takes no more items. Nothing was sent."""


class InvalidItem(LiveSessionError, ValueError):
    """The item cannot be sent (dtype, shape, batch rows, size, NaN): the provider would refuse it and end the
    session for every caller, so it is refused here first. Nothing was sent."""


@dataclass(slots=True)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    output: np.ndarray | None = None
    error: LiveSessionError | None = None


@dataclass(frozen=True, slots=True)
class Fed:
    """Owner's inbox: the item with this index was handed to :meth:`LiveSession.infer` (in index order)."""

    index: int
    item: np.ndarray


@dataclass(frozen=True, slots=True)
class Finish:
    """Owner's inbox: :meth:`LiveSession.aclose` -- end the session once the items fed are answered."""


class LiveSession:
    """The callers' handle on one live stream session (see the module docstring).

    Built by the session's owner task once the provider is ready; ``post``
    puts a :class:`Fed` or :class:`Finish` into the owner's inbox (never
    blocks). The owner calls :meth:`deliver`, :meth:`lose` and :meth:`end`.
    """

    def __init__(self, task_id: bytes, provider: bytes, units: int, *, post: Callable[[Fed | Finish], None],
                 signature: ItemSignature | None = None, max_item_bytes: int | None = None,
                 receipt_every: int = 1) -> None:
        self.task_id = task_id
        self.provider = provider
        """The provider's ledger address."""
        self.units = units
        """The task's unit cap: items this session may send in all (one item = one unit)."""
        self.receipt_every = receipt_every
        """K: items the session keeps unanswered at most (more callers wait in the queue)."""
        self.signature = signature
        self.max_item_bytes = max_item_bytes
        self.ended: str | None = None
        """Why the session ended (``"closed"``, ``"exhausted"``, or what lost it), None while it runs."""
        self.lost = False
        """It ended by a failure: calls in flight raised :class:`SessionLost`."""
        self.answered = 0
        self._post = post
        self._fed = 0
        self._closing = False
        self._pending: dict[int, _Pending] = {}
        self._finished = trio.Event()

    @property
    def remaining(self) -> int:
        """Units left: items that may still be fed."""
        return self.units - self._fed

    @property
    def in_flight(self) -> int:
        """Calls waiting for their answer (sent, or queued behind the window)."""
        return len(self._pending)

    def check_item(self, item: np.ndarray) -> np.ndarray:
        """The item as it will be sent (canonical), or :class:`InvalidItem` naming what is wrong with it."""
        if not isinstance(item, np.ndarray):
            raise InvalidItem(self.task_id, f"an item is a numpy array, got {type(item).__name__}")
        arr = canonical_array(item)
        sig = self.signature
        if sig is not None:
            if arr.dtype.name not in sig.dtypes:
                raise InvalidItem(self.task_id, f"item dtype {arr.dtype.name}, but the model takes {sig.describe()}")
            if not sig.fits_shape(tuple(arr.shape)):
                raise InvalidItem(self.task_id, f"item shape {tuple(arr.shape)}, but the model takes "
                                                f"{sig.describe()}")
        if arr.size > MAX_ITEM_ELEMENTS or (self.max_item_bytes is not None and arr.nbytes > self.max_item_bytes):
            raise InvalidItem(self.task_id, f"item of {arr.nbytes} bytes ({arr.size} elements), over the stream "
                                            f"limit of {self.max_item_bytes} bytes")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidItem(self.task_id, "item holds NaN or infinite values (its output could not be verified)")
        return arr

    async def infer(self, item: np.ndarray) -> np.ndarray:
        """The provider's checked answer to ``item`` (with ``rows > 0``, a batch: ``[n, *out_shape]``).

        Raises :class:`InvalidItem`, :class:`SessionExhausted` or
        :class:`SessionClosed` before sending anything, and
        :class:`SessionLost` if the session ends before this item's answer
        came. A caller cancelled while waiting leaves its item in the session
        (it goes out and its unit is used; the answer is dropped).
        """
        _, output = await self.infer_indexed(item)
        return output

    async def infer_indexed(self, item: np.ndarray) -> tuple[int, np.ndarray]:
        """:meth:`infer`, with the item's index in the session: what ``dispute_stream_item`` names it by."""
        if self.lost:
            raise SessionLost(self.task_id, self.ended or "lost")
        if self._fed >= self.units:
            raise SessionExhausted(self.task_id, f"the cap of {self.units} units is used up: open another session")
        if self._closing or self.ended is not None:
            raise SessionClosed(self.task_id, "the session is closed: it takes no more items")
        arr = self.check_item(item)
        index = self._fed
        self._fed += 1
        pending = _Pending()
        self._pending[index] = pending
        self._post(Fed(index, arr))
        try:
            await pending.done.wait()
        finally:
            self._pending.pop(index, None)
        if pending.error is not None:
            raise pending.error
        assert pending.output is not None
        return index, pending.output

    async def aclose(self) -> None:
        """End the session: the items fed are answered first, then the last receipt and END (the provider claims
        as for any stream task). Returns once the session is over; safe to call more than once, and from many
        tasks. A session lost meanwhile ends without error here (its callers got :class:`SessionLost`)."""
        self.close_soon()
        await self._finished.wait()

    def close_soon(self) -> None:
        """:meth:`aclose` without waiting: the session ends properly on its owner's task (usable when cancelled)."""
        if not self._closing and self.ended is None:
            self._closing = True
            self._post(Finish())

    async def wait_ended(self) -> str:
        """Wait until the session ends; its reason (``ended``)."""
        await self._finished.wait()
        assert self.ended is not None
        return self.ended

    # -- the owner's side (StreamTransport.run_live_client) ------------------------------------

    def deliver(self, index: int, output: np.ndarray) -> None:
        """Owner: item ``index``'s checked answer (dropped if its caller left)."""
        self.answered += 1
        pending = self._pending.get(index)
        if pending is not None and not pending.done.is_set():
            pending.output = output
            pending.done.set()

    def lose(self, reason: str) -> None:
        """Owner: the session failed; every call in flight or queued raises :class:`SessionLost`."""
        if self.ended is not None:
            return
        self.ended, self.lost = reason, True
        for index, pending in list(self._pending.items()):
            if not pending.done.is_set():
                pending.error = SessionLost(self.task_id, reason, index)
                pending.done.set()
        self._finished.set()

    def end(self, reason: str) -> None:
        """Owner: the session ended properly (every item fed was answered)."""
        if self.ended is None:
            self.ended = reason
            for index, pending in list(self._pending.items()):  # none expected: a bug must not hang a caller
                if not pending.done.is_set():
                    pending.error = SessionLost(self.task_id, f"session ended ({reason}) without answering it",
                                                index)
                    pending.done.set()
        self._finished.set()


@dataclass(slots=True)
class LiveStart:
    """The hand-over between ``open_live_session`` (waiting) and the transport (connecting): set once."""

    signature: ItemSignature | None = None
    """What an item must look like (checked before it is sent)."""
    session: LiveSession | None = None
    failure: str | None = None
    abandoned: bool = False
    """The opener stopped waiting: a session that starts later is closed at once (nobody would feed it)."""
    settled: trio.Event = field(default_factory=trio.Event)

    def started(self, session: LiveSession) -> None:
        if not self.settled.is_set():
            self.session = session
            self.settled.set()

    def failed(self, reason: str) -> None:
        if not self.settled.is_set():
            self.failure = reason
            self.settled.set()



class KeptItems:
    """A live session's newest items and checked outputs, for item disputes, within a byte budget.

    A batch session keeps every item (submitted) and output; a live session
    may run for days, so only the newest items that fit ``max_bytes`` (and
    at most ``max_items``, the evidence ``ClientStream`` keeps) stay here;
    older ones can no longer be disputed. Pure: the owner task adds, the
    dispute path reads.
    """

    def __init__(self, max_bytes: int, max_items: int) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.bytes = 0
        self._kept: OrderedDict[int, list[np.ndarray | None]] = OrderedDict()

    def add(self, index: int, item: np.ndarray) -> None:
        self._kept[index] = [item, None]
        self.bytes += item.nbytes
        self._trim()

    def answer(self, index: int, output: np.ndarray) -> None:
        entry = self._kept.get(index)
        if entry is not None:
            entry[1] = output
            self.bytes += output.nbytes
            self._trim()

    def item(self, index: int) -> np.ndarray | None:
        entry = self._kept.get(index)
        return entry[0] if entry is not None else None

    def output(self, index: int) -> np.ndarray | None:
        entry = self._kept.get(index)
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        return len(self._kept)

    def _trim(self) -> None:
        while self._kept and (self.bytes > self.max_bytes or len(self._kept) > self.max_items):
            _, (item, output) = self._kept.popitem(last=False)
            self.bytes -= (item.nbytes if item is not None else 0) + (output.nbytes if output is not None else 0)
