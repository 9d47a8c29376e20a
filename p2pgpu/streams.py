"""``/p2pgpu/stream/1``: a stream task's items, outputs and receipts between its client and its provider.

The accounting is the market's (:class:`~p2pgpu.market.ClientStream` and
:class:`~p2pgpu.market.ProviderStream`, sans-I/O); this module carries it
over one libp2p stream and keeps the provider's model warm in one kernel
worker for the whole session. Every frame is a record of :data:`STREAM_MESSAGES`
(a codec :class:`~ledger.codec.RecordUnion`, tensors as the kernels' ext type)::

    client   -> StreamHello(task_id)
    provider -> StreamReady(task_id, receipt_every, units, next_index)     once the model is loaded
    client   -> StreamInput(index, item)        never more than K answers outstanding
    provider -> StreamResult(output, signed)    SignedStreamOutput(task_id, index, input_hash, output_hash)
    client   -> StreamAck(receipt)              a client-signed cumulative receipt every K answers
    client   -> END                             after the last answer (and its receipt)
    provider -> END                             after its final StreamClaim

``K`` is the provider's ``receipt_every`` (the node's ``[provider]
receipt_every``), announced in ``StreamReady``; a client whose own interval
is longer receipts every K answers instead (``ClientStream.accept_terms``:
that only lowers its own risk), so neither side can stall waiting for the
other. A client that ignores K anyway is cut off with ``no_receipt`` once K
served items have waited ``receipt_timeout`` for a receipt, an error that
says why, rather than a silent stall until ``idle_timeout``.

Who may stream. The peer's ledger address comes from its Noise-authenticated
peer id (as on ``/p2pgpu/data/1``); the provider serves only the task's
client, only for a STREAM task the ledger shows ASSIGNED to us, and only
once its role has handed over the session (``ServeStream``) and the model
is loaded. A hello that arrives before that (the client saw the assignment
first) waits for it, up to ``ready_timeout``.

Backpressure. Items beyond the K unreceipted the provider may serve wait in
a queue until the receipt that frees them arrives on the same stream; a
client with more than K items unanswered is flooding and is cut off.

Refusals end the connection with an ERROR frame ``"<code>: <reason>"``
(:class:`StreamRejected`; codes in :data:`REJECTION_CODES`), are counted per
code in :class:`StreamMetrics`, and -- when the peer broke the protocol
rather than merely came too early -- charge it a peer-score rejection. The
provider's session (and warm model) outlives a refused connection, so a
client may connect again.

Actions the market objects return (``SendReceipt``, ``SubmitTx(StreamClaim)``)
and what the client learns (``ResultReady`` with the stacked outputs under
``"outputs"``, ``Report``) go to the node through ``route``. Trio tasks only
switch at ``await``, and every call into a role object and every ``route``
happens between two awaits, so the roles are never touched concurrently.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Protocol

import numpy as np
import trio

from kernels.errors import KernelError, SpecError
from kernels.tensors import Tensor
from ledger.codec import U32, U64, DecodeError, Hash32, Record, RecordUnion, record
from ledger.state import Task, TaskStatus
from ledger.transactions import SignedReceipt, SignedStreamOutput, TaskKind

from .api.types import MAX_STREAM_ITEM_ELEMENTS, STREAM_ITEMS_INPUT
from .dataplane import account_address_of_peer
from .market import (
    Action,
    ClientStream,
    OpenStream,
    ProviderStream,
    Report,
    ReportProgress,
    ResultReady,
    SendReceipt,
    ServeStream,
    Stage,
    StreamError,
    encode_result,
)
from .net import FrameTooLarge, FramedStream, NetError, PeerUnreachable, ProtocolError, RemoteError
from .net.log import log
from .topics import STREAM_PROTOCOL

__all__ = [
    "CLOSE_REASONS",
    "ITEMS_INPUT",
    "MAX_ITEM_ELEMENTS",
    "REJECTION_CODES",
    "STREAM_MESSAGES",
    "STREAM_PROTOCOL",
    "SessionPhase",
    "StreamAck",
    "StreamConfig",
    "StreamHello",
    "StreamInput",
    "StreamMetrics",
    "StreamReady",
    "StreamRefused",
    "StreamRejected",
    "StreamResult",
    "StreamStats",
    "StreamTransport",
    "StreamTransportError",
    "check_admission",
    "decode_message",
    "encode_message",
    "refusal_code",
    "stream_items",
]

logger = logging.getLogger(__name__)

ITEMS_INPUT: Final = STREAM_ITEMS_INPUT
"""Name of the client's submit-time input holding the items to stream, one per row (never part of the spec)."""

MAX_ITEM_ELEMENTS: Final = MAX_STREAM_ITEM_ELEMENTS
"""Largest tensor a stream frame may carry (the transport's ``max_item_bytes`` is usually the tighter bound).
Defined with the API's submission checks, which refuse larger items before a task is posted."""

REJECTION_CODES: Final = frozenset({
    "malformed",        # undecodable frame, or the stream ended before StreamHello
    "unexpected",       # a message that has no place at this point of the exchange
    "not_entitled",     # the peer is not the task's client (or its peer id names no account)
    "not_stream",       # the task is not a STREAM task
    "not_assigned",     # the task is not assigned to us
    "task_closed",      # the task is settled or otherwise no longer ASSIGNED
    "not_ready",        # our role has not handed us the session (or the model is loading) in time
    "model_failed",     # the model could not be loaded, or its worker died
    "busy",             # another connection serves this task right now
    "closed",           # the session is closed (client ended it, or the deadline is near)
    "bad_index",        # an item's index is not the next one
    "oversized_item",   # an item over max_item_bytes
    "cap_reached",      # more items than the task's unit cap
    "flooding",         # more than K items sent without waiting for answers
    "bad_item",         # the model refused the item (dtype, shape)
    "bad_receipt",      # a receipt not signed by the client, for another task, or for more than was served
    "idle",             # no frame for idle_timeout
    "no_receipt",       # K items served without a receipt, and none came within receipt_timeout
})
_PENALIZED: Final = frozenset({"malformed", "unexpected", "not_entitled", "bad_index", "oversized_item",
                               "flooding", "bad_receipt"})


# -- wire records --------------------------------------------------------------------


@record
class StreamHello(Record):
    """Client: open the session of ``task_id`` (our identity is the connection's)."""

    TYPE_ID = 1
    task_id: Hash32


@record
class StreamReady(Record):
    """Provider: the model is loaded; receipt every ``receipt_every`` answers; next item is ``next_index``."""

    TYPE_ID = 2
    task_id: Hash32
    receipt_every: U32
    units: U64
    next_index: U64


@record
class StreamInput(Record):
    """Client: item ``index`` (0-based, consecutive over the whole session)."""

    TYPE_ID = 3
    index: U64
    item: Annotated[np.ndarray, Tensor(MAX_ITEM_ELEMENTS)]


@record
class StreamResult(Record):
    """Provider: the output of item ``signed.output.index``, with the provider's signature over its hash."""

    TYPE_ID = 4
    output: Annotated[np.ndarray, Tensor(MAX_ITEM_ELEMENTS)]
    signed: SignedStreamOutput


@record
class StreamAck(Record):
    """Client: a signed cumulative receipt (what the provider claims with ``StreamClaim``)."""

    TYPE_ID = 5
    receipt: SignedReceipt


STREAM_MESSAGES: Final = RecordUnion(
    "StreamMessage", (StreamHello, StreamReady, StreamInput, StreamResult, StreamAck),
    max_bytes=8 * MAX_ITEM_ELEMENTS + 4096,
)


def encode_message(msg: Record) -> bytes:
    return STREAM_MESSAGES.encode(msg)


def decode_message(data: bytes) -> Record:
    """One frame's record; raises :class:`~ledger.codec.DecodeError` naming the bad field."""
    return STREAM_MESSAGES.decode(data)


# -- errors --------------------------------------------------------------------------


class StreamTransportError(Exception):
    """A streaming session could not go on (the reason names the peer and the task)."""


class StreamRefused(StreamTransportError):
    """The provider refused or ended our session with an ERROR frame; ``code`` is its rejection code."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


class StreamRejected(ProtocolError):
    """Provider side: the peer's session is refused; the network layer sends ``"<code>: <reason>"`` as ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message


_CODE_IN_ERROR = re.compile(r"bad request: ([a-z_]+): ")


def refusal_code(error_text: str) -> str | None:
    """The rejection code inside a RemoteError's text, if the provider sent one of ours."""
    match = _CODE_IN_ERROR.search(error_text)
    return match.group(1) if match and match.group(1) in REJECTION_CODES else None


# -- configuration, metrics ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamConfig:
    max_item_bytes: int = 1 << 20
    """Largest item (element bytes) the provider accepts."""
    hello_timeout: float = 10.0
    """A connection that sends no StreamHello within this is dropped."""
    ready_timeout: float = 60.0
    """How long a hello may wait for our role to hand over the session and the model to load."""
    idle_timeout: float = 120.0
    """Provider: drop a connection that sends nothing for this long (the session stays)."""
    receipt_timeout: float = 30.0
    """Provider: with K items served and unreceipted, the client owes a receipt (it sends one as soon as it
    reads the K-th answer); a client that sends none for this long is cut off with ``no_receipt``, so a
    client that ignores the announced K learns why instead of stalling until ``idle_timeout``."""
    answer_timeout: float = 120.0
    """Client: give up when the provider answers nothing for this long."""
    connect_timeout: float = 180.0
    """Client: keep trying to reach the provider (not connected yet, model loading) for this long."""
    retry_interval: float = 1.0
    kept_stats: int = 256

    def __post_init__(self) -> None:
        for name in ("max_item_bytes", "kept_stats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hello_timeout", "ready_timeout", "idle_timeout", "receipt_timeout", "answer_timeout",
                     "connect_timeout", "retry_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(slots=True)
class StreamStats:
    """One provider session, as served: the figures an operator (or a test) checks."""

    task_id: bytes
    items: int = 0
    model_loads: int = 0
    receipts: int = 0
    connections: int = 0
    closed_by: str = ""


CLOSE_REASONS: Final = ("client_ended", "settled", "role_closed", "model_failed")
"""Why a provider session (a loaded model) ended: the label values of its closed-sessions counter."""


@dataclass(slots=True)
class StreamMetrics:
    """Both halves' counters; ``p2pgpu.metrics_text.stream_metric_families`` renders them at /metrics."""

    # provider side
    sessions_served: int = 0
    """Sessions opened: the model loaded and the session was ready for its client."""
    sessions_closed: Counter[str] = field(default_factory=Counter)
    """Opened sessions that ended, per reason in :data:`CLOSE_REASONS`."""
    connections: int = 0
    """Client connections admitted to a session (a client may reconnect)."""
    items_served: int = 0
    receipts_received: int = 0
    claims_submitted: int = 0
    """StreamClaim transactions handed to the mempool (counted by the node's roles)."""
    claims_refused: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Connections refused or cut off, per rejection code."""
    penalties: int = 0
    # client side
    sessions_started: int = 0
    """Sessions the provider accepted (StreamReady received)."""
    sessions_streamed: int = 0
    """Sessions that answered every item."""
    client_failures: int = 0
    items_streamed: int = 0
    items_answered: int = 0
    """Answers received and checked (signature, hashes)."""
    receipts_sent: int = 0

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            value = getattr(self, name)
            out[name] = dict(value) if isinstance(value, Counter) else value
        return out


# -- admission (pure) ------------------------------------------------------------------


class SessionPhase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


WAIT: Final = "wait"
ADMIT: Final = "admit"


def check_admission(peer_address: bytes | None, me: bytes, task_id: bytes, task: Task | None,
                    phase: SessionPhase | None, failure: str = "") -> Refusal | str:
    """May the peer at ``peer_address`` stream task ``task_id`` with us now: ADMIT, WAIT, or a Refusal.

    WAIT covers our ledger or role lagging the client's (the task unknown or
    still POSTED here, the session not handed over or the model loading):
    the caller waits for the next block or session change.
    """
    tid = task_id.hex()[:16]
    if peer_address is None:
        return Refusal("not_entitled", "the peer id does not embed an Ed25519 account key")
    if task is None:
        return WAIT
    if task.client != peer_address:
        return Refusal("not_entitled", f"{peer_address.hex()} is not the client of task {tid}")
    if task.kind != TaskKind.STREAM:
        return Refusal("not_stream", f"task {tid} is a batch task")
    if task.status == TaskStatus.POSTED:
        return WAIT
    if task.provider != me:
        return Refusal("not_assigned", f"task {tid} is not assigned to us")
    if task.status not in (TaskStatus.ASSIGNED, TaskStatus.AUDITING):
        return Refusal("task_closed", f"task {tid} is {TaskStatus(task.status).name.lower()}")
    if phase is None or phase is SessionPhase.LOADING:
        return WAIT
    if phase is SessionPhase.FAILED:
        return Refusal("model_failed", f"task {tid}: {failure}")
    if phase is SessionPhase.CONNECTED:
        return Refusal("busy", f"another connection streams task {tid}")
    if phase is SessionPhase.CLOSED:
        return Refusal("closed", f"the session of task {tid} is closed")
    return ADMIT


def stream_items(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The items a client supplied at submit time: the rows of its ``items`` input (none if absent)."""
    items = inputs.get(ITEMS_INPUT)
    if items is None:
        return []
    arr = np.asarray(items)
    if arr.ndim < 1:
        raise StreamError(f"input {ITEMS_INPUT!r} must hold one item per row, got a scalar")
    return [arr[i] for i in range(arr.shape[0])]


# -- the transport -------------------------------------------------------------------


class _KernelSession(Protocol):
    model_loads: int

    async def infer(self, item: np.ndarray) -> np.ndarray: ...

    async def aclose(self) -> None: ...


class _Runtime(Protocol):
    async def open_stream(self, spec: Any, inputs: Mapping[str, np.ndarray]) -> _KernelSession: ...


class _Ledger(Protocol):
    @property
    def tasks(self) -> Mapping[bytes, Task]: ...


class _NetworkLike(Protocol):
    peer_id: str
    scores: Any

    def set_stream_handler(self, protocol: str, handler: Callable[[FramedStream], Any]) -> None: ...

    def open_stream(self, peer: str, protocol: str) -> Any: ...

    async def disconnect(self, peer: str) -> None: ...


Route = Callable[[object, list[Action]], None]


@dataclass(slots=True)
class _ProviderSession:
    origin: object
    stream: ProviderStream
    stats: StreamStats
    phase: SessionPhase = SessionPhase.LOADING
    failure: str = ""
    kernel: _KernelSession | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    close_reason: str = ""

    def finish(self, why: str, reason: str) -> None:
        """End the session (once); ``reason`` is one of :data:`CLOSE_REASONS`, ``why`` the words for the log."""
        if not self.finished.is_set():
            self.stats.closed_by = why
            self.close_reason = reason
            self.finished.set()


@dataclass(slots=True)
class _ClientSession:
    origin: object
    stream: ClientStream
    outbox: deque[SignedReceipt] = field(default_factory=deque)
    started: bool = False
    outputs: list[np.ndarray] = field(default_factory=list)
    """Checked answers so far, in item order (kept after the session for item disputes)."""


class StreamTransport:
    """Both halves of ``/p2pgpu/stream/1`` for one node; the node's roles drive it through ``_act``."""

    def __init__(self, network: _NetworkLike, *, address: bytes, ledger: Callable[[], _Ledger],
                 runtime: Callable[[], _Runtime | None], route: Route, peer_of: Callable[[bytes], str | None],
                 config: StreamConfig | None = None) -> None:
        self.network = network
        self.address = address
        self.ledger = ledger
        self.runtime = runtime
        self.route = route
        self.peer_of = peer_of
        self.config = config or StreamConfig()
        self.metrics = StreamMetrics()
        self.stats: OrderedDict[bytes, StreamStats] = OrderedDict()
        self._sessions: dict[bytes, _ProviderSession] = {}
        self._clients: dict[bytes, _ClientSession] = {}
        self._client_outputs: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
        self._changed = trio.Event()

    # -- wiring ------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer ``/p2pgpu/stream/1`` (refusing every task that is not ours to stream)."""
        self.network.set_stream_handler(STREAM_PROTOCOL, self._handle)

    def on_block(self, fb: object, state: _Ledger) -> None:
        """Commit hook: release sessions whose task settled or that the role closed; wake waiting hellos."""
        for task_id, session in list(self._sessions.items()):
            task = state.tasks.get(task_id)
            if task is None or task.status == TaskStatus.SETTLED:
                session.finish("settled", "settled")
                if session.phase is SessionPhase.FAILED:
                    del self._sessions[task_id]
            elif session.stream.closed and session.phase is not SessionPhase.CONNECTED:
                session.finish("role closed the session", "role_closed")
        self._notify()

    def active_sessions(self) -> tuple[int, int]:
        """(provider sessions with a loaded model, client sessions streaming) right now: gauges for /metrics."""
        serving = sum(1 for s in self._sessions.values() if s.phase in (SessionPhase.READY, SessionPhase.CONNECTED))
        return serving, len(self._clients)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _keep_stats(self, stats: StreamStats) -> None:
        self.stats[stats.task_id] = stats
        while len(self.stats) > self.config.kept_stats:
            self.stats.popitem(last=False)

    # -- provider: the warm model ----------------------------------------------------

    async def serve_session(self, origin: object, action: ServeStream) -> None:
        """Load the model once and keep it for the session (``ServeStream``); returns when the session ends."""
        task_id = action.task_id
        ps = action.session
        if not isinstance(ps, ProviderStream):
            raise TypeError(f"ServeStream.session must be a ProviderStream, got {type(ps).__name__}")
        old = self._sessions.get(task_id)
        if old is not None and not old.finished.is_set():
            log(logger, logging.WARNING, "stream_session_duplicate", task=task_id.hex()[:16])
            return
        session = _ProviderSession(origin, ps, StreamStats(task_id))
        self._sessions[task_id] = session
        self._keep_stats(session.stats)
        runtime = self.runtime()
        try:
            if runtime is None:
                raise StreamTransportError("no kernel runtime on this node")
            kernel = await runtime.open_stream(action.spec, action.inputs)
        except Exception as exc:  # KernelError, no runtime, or a worker that could not be reached
            session.phase, session.failure = SessionPhase.FAILED, f"{type(exc).__name__}: {exc}"
            self._notify()
            self.route(origin, [Report(task_id, f"stream model could not be loaded: {session.failure}")])
            return  # kept (FAILED) so that the client's hello is refused with the reason, until the task ends
        session.kernel = kernel
        session.stats.model_loads = kernel.model_loads
        session.phase = SessionPhase.READY
        self.metrics.sessions_served += 1
        log(logger, logging.INFO, "stream_model_ready", task=task_id.hex()[:16], units=ps.units,
            receipt_every=ps.receipt_every)
        self._notify()
        try:
            await session.finished.wait()
        finally:
            session.phase = SessionPhase.CLOSED
            session.stats.model_loads = kernel.model_loads
            self.metrics.sessions_closed[session.close_reason or "role_closed"] += 1
            if self._sessions.get(task_id) is session:
                del self._sessions[task_id]
            self._notify()
            try:
                await kernel.aclose()
            except KernelError as exc:  # the worker is replaced by the runtime; nothing else to undo
                log(logger, logging.WARNING, "stream_model_close_failed", task=task_id.hex()[:16], error=repr(exc))
            log(logger, logging.INFO, "stream_session_closed", task=task_id.hex()[:16], items=session.stats.items,
                loads=session.stats.model_loads, why=session.stats.closed_by)

    # -- provider: connections -------------------------------------------------------

    async def _handle(self, stream: FramedStream) -> None:
        peer = stream.peer
        raw = await self._receive_frame(stream, self.config.hello_timeout, "StreamHello")
        if raw is None:
            raise await self._rejection(peer, "malformed", "the stream ended before StreamHello")
        hello = await self._decode(peer, raw)
        if not isinstance(hello, StreamHello):
            raise await self._rejection(peer, "unexpected", f"expected StreamHello, got {type(hello).__name__}")
        session = await self._admit(peer, hello.task_id)
        session.phase = SessionPhase.CONNECTED
        session.stats.connections += 1
        self.metrics.connections += 1
        try:
            ps = session.stream
            await stream.send(encode_message(StreamReady(hello.task_id, ps.receipt_every, ps.units, ps.served)))
            await self._serve_items(stream, session)
        finally:
            if session.phase is SessionPhase.CONNECTED:
                session.phase = SessionPhase.CLOSED if session.finished.is_set() else SessionPhase.READY
            self._notify()

    async def _admit(self, peer: str, task_id: bytes) -> _ProviderSession:
        address = account_address_of_peer(peer)
        with trio.move_on_after(self.config.ready_timeout):
            while True:
                session = self._sessions.get(task_id)
                verdict = check_admission(address, self.address, task_id, self.ledger().tasks.get(task_id),
                                          session.phase if session is not None else None,
                                          session.failure if session is not None else "")
                if isinstance(verdict, Refusal):
                    raise await self._rejection(peer, verdict.code, verdict.message)
                if verdict == ADMIT:
                    assert session is not None
                    return session
                await self._changed.wait()
        raise await self._rejection(peer, "not_ready", f"task {task_id.hex()[:16]} is not being served by us "
                                                       f"within {self.config.ready_timeout} s")

    async def _serve_items(self, stream: FramedStream, session: _ProviderSession) -> None:
        ps, peer = session.stream, stream.peer
        queue: deque[np.ndarray] = deque()
        while True:
            if ps.unreceipted >= ps.receipt_every and not ps.closed:
                raw = await self._receive_frame(
                    stream, self.config.receipt_timeout, "receipt", code="no_receipt",
                    detail=f"{ps.unreceipted} items served since the last receipt and K={ps.receipt_every} "
                           f"(announced in StreamReady): a client must receipt at least every "
                           f"{ps.receipt_every} answers")
            else:
                raw = await self._receive_frame(stream, self.config.idle_timeout, "an item or a receipt")
            if raw is None:
                await self._answer(stream, session, queue)
                break
            msg = await self._decode(peer, raw)
            if isinstance(msg, StreamInput):
                await self._queue_item(peer, ps, queue, msg)
            elif isinstance(msg, StreamAck):
                try:
                    actions = ps.on_receipt(msg.receipt)
                except StreamError as exc:
                    raise await self._rejection(peer, "bad_receipt", str(exc)) from exc
                self.metrics.receipts_received += 1
                session.stats.receipts += 1
                self.route(session.origin, actions)
            else:
                raise await self._rejection(peer, "unexpected", f"{type(msg).__name__} during a session")
            await self._answer(stream, session, queue)
            if ps.closed and queue:  # the role closed it (deadline near): these can never be answered
                raise await self._rejection(peer, "closed", "the session was closed (its deadline is near)")
        # The client ended the session: claim the latest receipt, release the model, say goodbye.
        self.route(session.origin, ps.close())
        session.finish("client ended the session", "client_ended")
        await stream.send_end()

    async def _queue_item(self, peer: str, ps: ProviderStream, queue: deque[np.ndarray], msg: StreamInput) -> None:
        expected = ps.served + len(queue)
        if msg.index != expected:
            raise await self._rejection(peer, "bad_index", f"item {msg.index}, expected item {expected}")
        if msg.item.nbytes > self.config.max_item_bytes:
            raise await self._rejection(peer, "oversized_item", f"item {msg.index} has {msg.item.nbytes} bytes, "
                                                                f"limit {self.config.max_item_bytes}")
        if expected >= ps.units:
            raise await self._rejection(peer, "cap_reached", f"item {msg.index} is over the task's cap of "
                                                             f"{ps.units} units")
        if ps.closed:
            raise await self._rejection(peer, "closed", "the session was closed (its deadline is near)")
        if len(queue) >= ps.receipt_every:
            raise await self._rejection(peer, "flooding", f"more than {ps.receipt_every} items unanswered")
        queue.append(msg.item)

    async def _answer(self, stream: FramedStream, session: _ProviderSession, queue: deque[np.ndarray]) -> None:
        """Answer queued items while the receipts allow (the rest wait for the next receipt)."""
        ps, peer = session.stream, stream.peer
        while queue and ps.can_serve():
            item = queue[0]
            assert session.kernel is not None
            try:
                output = await session.kernel.infer(item)
            except SpecError as exc:
                raise await self._rejection(peer, "bad_item", f"item {ps.served}: {exc}") from exc
            except KernelError as exc:
                session.phase, session.failure = SessionPhase.FAILED, f"{type(exc).__name__}: {exc}"
                session.finish("model failed", "model_failed")
                raise await self._rejection(peer, "model_failed", session.failure) from exc
            queue.popleft()
            index = ps.accept_item(item)
            signed = ps.sign_output(index, output)
            session.stats.items += 1
            self.metrics.items_served += 1
            await stream.send(encode_message(StreamResult(output, signed)))

    async def _receive_frame(self, stream: FramedStream, timeout: float, what: str, *, code: str = "idle",
                             detail: str = "") -> bytes | None:
        """The client's next DATA frame (None at its END), with its framing faults as counted rejections."""
        raw: bytes | None = None
        with trio.move_on_after(timeout) as waited:
            try:
                raw = await stream.receive()
            except FrameTooLarge as exc:
                raise await self._rejection(stream.peer, "oversized_item", str(exc)) from exc
            except RemoteError:
                raise  # the client aborted and said why: nothing to answer
            except ProtocolError as exc:
                raise await self._rejection(stream.peer, "malformed", str(exc)) from exc
        if waited.cancelled_caught:
            raise await self._rejection(stream.peer, code, f"no {what} within {timeout} s" + (
                f": {detail}" if detail else ""))
        return raw

    async def _decode(self, peer: str, raw: bytes) -> Record:
        try:
            return decode_message(raw)
        except DecodeError as exc:
            raise await self._rejection(peer, "malformed", f"undecodable frame: {exc}") from exc

    async def _rejection(self, peer: str, code: str, message: str) -> StreamRejected:
        self.metrics.rejected[code] += 1
        log(logger, logging.INFO, "stream_rejected", peer=peer, code=code, detail=message)
        if code in _PENALIZED:
            self.metrics.penalties += 1
            self.network.penalize(peer, STREAM_PROTOCOL, code, message)
            await trio.lowlevel.checkpoint()
        return StreamRejected(code, message)

    # -- client ----------------------------------------------------------------------

    def send_receipt(self, action: SendReceipt) -> None:
        """``SendReceipt``: queue the receipt on the task's open session (sent before the next item)."""
        session = self._clients.get(action.task_id)
        if session is None:
            log(logger, logging.WARNING, "stream_receipt_dropped", task=action.task_id.hex()[:16],
                units=action.receipt.receipt.units, reason="no open session")
            return
        session.outbox.append(action.receipt)

    async def run_client(self, origin: object, action: OpenStream, items: Sequence[np.ndarray]) -> None:
        """``OpenStream``: stream ``items`` to the assigned provider; the outputs come back as ``ResultReady``."""
        cs = action.session
        if not isinstance(cs, ClientStream):
            raise TypeError(f"OpenStream.session must be a ClientStream, got {type(cs).__name__}")
        task_id = action.task_id
        session = _ClientSession(origin, cs)
        self._clients[task_id] = session
        self._client_outputs[task_id] = session.outputs
        while len(self._client_outputs) > self.config.kept_stats:
            self._client_outputs.popitem(last=False)
        todo = list(items)
        if len(todo) > cs.units:
            self.route(origin, [Report(task_id, f"{len(todo)} items supplied but the cap is {cs.units}; "
                                                f"streaming the first {cs.units}")])
            todo = todo[:cs.units]
        try:
            outputs = await self._client_session(session, action.peer, todo)
        except (StreamTransportError, StreamError, NetError, ValueError) as exc:  # ValueError: codec errors
            self.metrics.client_failures += 1
            log(logger, logging.WARNING, "stream_failed", task=task_id.hex()[:16], error=f"{type(exc).__name__}: {exc}")
            self.route(origin, [Report(task_id, f"stream stopped after {cs.answered} of {len(todo)} items: {exc}")])
            return
        except Exception as exc:  # our bug: report it, and keep it from taking the node's roles down
            self.metrics.client_failures += 1
            logger.exception("%s", f"event=stream_client_crashed task={task_id.hex()[:16]} error={exc!r}")
            self.route(origin, [Report(task_id, f"stream stopped by an internal error: {exc!r}")])
            return
        finally:
            del self._clients[task_id]
        self.metrics.sessions_streamed += 1
        result = {"outputs": np.stack(outputs) if outputs else np.zeros((0,), np.float32)}
        self.route(origin, [
            ReportProgress(task_id, Stage.DELIVERED, f"{len(outputs)} stream outputs, every one signed"),
            ResultReady(task_id, encode_result(result), result),
        ])

    def client_output(self, task_id: bytes, index: int) -> np.ndarray | None:
        """The checked output of item ``index`` of our stream ``task_id`` (live or ended), if still held.

        What a client needs, beside the item and the provider's signed
        output hash, to dispute that one item.
        """
        outputs = self._client_outputs.get(task_id)
        return outputs[index] if outputs is not None and 0 <= index < len(outputs) else None

    async def _client_session(self, session: _ClientSession, provider: bytes,
                              items: list[np.ndarray]) -> list[np.ndarray]:
        task_id = session.stream.task_id
        give_up = trio.current_time() + self.config.connect_timeout
        last = "the provider is not connected"
        while True:
            peer = self.peer_of(provider)
            if peer is not None:
                try:
                    async with self.network.open_stream(peer, STREAM_PROTOCOL) as stream:
                        ready = await self._hello(stream, session)
                        session.started = True
                        self.metrics.sessions_started += 1
                        self.route(session.origin, [ReportProgress(task_id, Stage.RUNNING,
                                                                   f"streaming {len(items)} items")])
                        return await self._stream_items(stream, session, ready, items)
                except PeerUnreachable as exc:
                    if session.started:
                        raise
                    last = str(exc)
                except StreamRefused as exc:
                    if session.started or exc.code not in ("not_ready", "busy"):
                        raise
                    last = str(exc)
            if trio.current_time() >= give_up:
                raise StreamTransportError(f"could not start streaming task {task_id.hex()[:16]} within "
                                           f"{self.config.connect_timeout} s: {last}")
            await trio.sleep(self.config.retry_interval)

    async def _receive(self, stream: FramedStream, what: str) -> bytes | None:
        with trio.move_on_after(self.config.answer_timeout):
            try:
                return await stream.receive()
            except RemoteError as exc:
                raise StreamRefused(str(exc), refusal_code(str(exc))) from exc
        raise StreamTransportError(f"peer {stream.peer} sent no {what} within {self.config.answer_timeout} s")

    async def _hello(self, stream: FramedStream, session: _ClientSession) -> StreamReady:
        cs = session.stream
        await stream.send(encode_message(StreamHello(cs.task_id)))
        raw = await self._receive(stream, "StreamReady")  # answer_timeout > ready_timeout: the provider decides
        if raw is None:
            raise StreamTransportError(f"provider {stream.peer} ended the stream without StreamReady")
        ready = decode_message(raw)
        if not isinstance(ready, StreamReady) or ready.task_id != cs.task_id:
            raise StreamTransportError(f"provider {stream.peer} answered the hello with {type(ready).__name__}")
        wanted = cs.receipt_every
        try:
            cs.accept_terms(ready.receipt_every, ready.units, ready.next_index)
        except StreamError as exc:
            raise StreamTransportError(f"provider {stream.peer}: {exc}") from exc
        if cs.receipt_every != wanted:
            log(logger, logging.INFO, "stream_receipt_interval", task=cs.task_id.hex()[:16], ours=wanted,
                provider_k=ready.receipt_every)
        return ready

    async def _stream_items(self, stream: FramedStream, session: _ClientSession, ready: StreamReady,
                            items: list[np.ndarray]) -> list[np.ndarray]:
        cs = session.stream
        outputs = session.outputs
        sent = 0
        while len(outputs) < len(items):
            while sent < len(items) and cs.can_send():
                cs.next_item(items[sent])
                await stream.send(encode_message(StreamInput(cs.sent - 1, items[sent])))
                sent += 1
                self.metrics.items_streamed += 1
            raw = await self._receive(stream, f"answer to item {cs.answered}")
            if raw is None:
                raise StreamTransportError(f"provider ended the stream after {cs.answered} of {len(items)} answers")
            msg = decode_message(raw)
            if not isinstance(msg, StreamResult):
                raise StreamTransportError(f"provider sent {type(msg).__name__} where an answer belongs")
            actions = cs.on_output(msg.output, msg.signed)  # StreamFault: a bad signature or hash ends it
            self.metrics.items_answered += 1
            outputs.append(msg.output)
            self.route(session.origin, actions)
            await self._flush(stream, session)
        self.route(session.origin, cs.close())
        await self._flush(stream, session)
        await stream.send_end()
        tail = await self._receive(stream, "END")
        if tail is not None:
            raise StreamTransportError("provider sent data after the last answer")
        return outputs

    async def _flush(self, stream: FramedStream, session: _ClientSession) -> None:
        while session.outbox:
            receipt = session.outbox.popleft()
            await stream.send(encode_message(StreamAck(receipt)))
            self.metrics.receipts_sent += 1
