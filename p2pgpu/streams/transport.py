"""The Trio shell of ``/p2pgpu/stream/1``: moves frames and time for the protocol cores, nothing else.

Every decision about a frame is made by :class:`~.provider_core.ProviderProtocol`
or :class:`~.client_core.ClientProtocol`; this module opens and accepts libp2p
streams, waits with timeouts, runs the warm model in its kernel worker,
maps transport errors to the stream's own errors where they enter, counts,
logs and charges rejections, and hands the cores' actions to the node's
``route`` (the node queues them into its roles' inbox).

One writer per session. A provider session's ``ProviderStream`` is changed
only by its owner, the :meth:`StreamTransport.serve_session` task: a
connection's handler task reads the hello and admits the client, then hands
the connection over; the owner serves it with a reader child that only
receives frames, and applies the role's commands (``CommandStream``:
close near the deadline, retry or note a refused claim, abandon on
settlement) between frames. A client session's ``ClientStream`` is changed
only by its ``run_client`` task, which also queues the receipts it signs. A
live session's (:mod:`.live`) is changed only by its ``run_live_client``
task: callers' items, their close and the provider's frames (from a reader
child) all arrive in that task's one inbox.
"""


from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import trio

from kernels.errors import KernelError, SpecError
from ledger.state import Task, TaskStatus

from ..dataplane.identity import account_address_of_peer
from ..modelcache import ModelUnavailable
from ..market import (
    Action,
    ClientStream,
    OpenStream,
    ProviderStream,
    Report,
    ReportProgress,
    ResultReady,
    SendReceipt,
    ServeStream,
    SessionCommand,
    Stage,
    StreamError,
    encode_result,
)
from ..net import FrameTooLarge, FramedStream, NetError, PeerUnreachable, ProtocolError, RemoteError
from ..net.log import log
from ..topics import STREAM_PROTOCOL
from .admission import ADMIT, Refusal, SessionPhase, check_admission
from .client_core import ClientProtocol
from .config import StreamConfig, StreamMetrics, StreamStats
from .errors import StreamRefused, StreamRejected, StreamTransportError, refusal_code
from .live import Fed, Finish, KeptItems, LiveSession, LiveStart
from .provider_core import Expectation, ProviderProtocol, ReceiptTaken, hello_expectation, read_hello

__all__ = ["Route", "StreamTransport"]

logger = logging.getLogger(__name__)


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
    @property
    def peer_id(self) -> str: ...

    @property
    def scores(self) -> Any: ...

    def set_stream_handler(self, protocol: str, handler: Callable[[FramedStream], Any]) -> None: ...

    def open_stream(self, peer: str, protocol: str) -> Any: ...

    async def disconnect(self, peer: str) -> None: ...

    def penalize(self, peer: str, protocol: str, reason: str, detail: str = "") -> Any: ...


Route = Callable[[object, list[Action]], None]

WithModel = Callable[[bytes, Any, Mapping[str, np.ndarray]], Awaitable[tuple[Any, Mapping[str, np.ndarray]]]]
"""``with_model(task_id, spec, inputs)``: the spec and inputs a session's model opens on -- a by-model spec
expanded with its registered bundle (fetched if need be); raises :class:`ModelUnavailable` if none can be had."""


@dataclass(slots=True)
class _Connection:
    """A client connection admitted by its handler task and handed to the session's owner to serve."""

    stream: FramedStream
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None
    """Why the owner stopped serving it (a :class:`StreamRejected`, ...): the handler raises it, as it leaves."""


@dataclass(slots=True)
class _Frame:
    """One frame (``None``: the client's END) or the error receiving it, from a connection's reader."""

    source: FramedStream
    """The connection it came on: a frame left over from an earlier connection is never taken for this one's."""
    raw: bytes | None
    error: Exception | None = None
    taken: trio.Event = field(default_factory=trio.Event)


_SessionMessage = _Connection | _Frame | SessionCommand | None
"""What a provider session's owner receives: a connection to serve, a frame on it, a command of the role's,
or ``None`` (look again: the session may have finished)."""


@dataclass(slots=True)
class _ProviderSession:
    """One served stream session: its market half and the inbox of the one task that changes it.

    The ``ProviderStream`` is changed only by the session's owner, the
    :meth:`StreamTransport.serve_session` task: it serves each admitted
    connection itself (a reader child only receives frames) and applies the
    role's commands (``CommandStream``) between frames. Once that task has
    returned, nothing else serves the session, and the role's commands are
    applied where they arrive.
    """

    origin: object
    stream: ProviderStream
    stats: StreamStats
    phase: SessionPhase = SessionPhase.LOADING
    failure: str = ""
    failure_code: str = "model_failed"
    """The rejection code a hello gets once the session FAILED (``model_unavailable``: no holder gave the model)."""
    kernel: _KernelSession | None = None
    finished: trio.Event = field(default_factory=trio.Event)
    inbox: tuple[trio.MemorySendChannel[_SessionMessage], trio.MemoryReceiveChannel[_SessionMessage]] = field(
        default_factory=lambda: trio.open_memory_channel[_SessionMessage](math.inf))
    owned: bool = True
    """Its owner task still runs (commands go to its inbox)."""

    close_reason: str = ""

    def post(self, message: _SessionMessage) -> None:
        self.inbox[0].send_nowait(message)

    def finish(self, why: str, reason: str) -> None:
        """End the session (once); ``reason`` is one of :data:`CLOSE_REASONS`, ``why`` the words for the log."""
        if not self.finished.is_set():
            self.stats.closed_by = why
            self.close_reason = reason
            self.finished.set()
            self.post(None)  # the owner looks again


@dataclass(slots=True)
class _ClientSession:
    origin: object
    protocol: ClientProtocol


@dataclass(frozen=True, slots=True)
class _Received:
    """A live client session's inbox: one frame from the provider (``None``: its END), or the error receiving it."""

    raw: bytes | None
    error: Exception | None = None


_LiveMessage = Fed | Finish | _Received
"""What a live client session's owner receives: an item from a caller, the callers' close, a provider frame."""


class _IdleDropped(Exception):
    """The provider dropped an idle live connection (``idle``, nothing unanswered): connect again when used."""


class StreamTransport:
    """Both halves of ``/p2pgpu/stream/1`` for one node; the node's roles drive it through ``_act``."""

    def __init__(self, network: _NetworkLike, *, address: bytes, ledger: Callable[[], _Ledger],
                 runtime: Callable[[], _Runtime | None], route: Route, peer_of: Callable[[bytes], str | None],
                 config: StreamConfig | None = None, with_model: WithModel | None = None) -> None:
        self.network = network
        self.with_model = with_model
        self.address = address
        self.ledger = ledger
        self.runtime = runtime
        self.route = route
        self.peer_of = peer_of
        self.config = config or StreamConfig()
        self.metrics = StreamMetrics()
        self.stats: OrderedDict[bytes, StreamStats] = OrderedDict()
        self._sessions: dict[bytes, _ProviderSession] = {}
        self._ended: OrderedDict[bytes, _ProviderSession] = OrderedDict()  # for the role's late commands
        self._clients: dict[bytes, _ClientSession] = {}
        self._client_outputs: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
        self._client_kept: OrderedDict[bytes, KeptItems] = OrderedDict()  # live sessions' items and outputs
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
            spec, inputs = action.spec, action.inputs
            if self.with_model is not None:  # a by-model task: its registered bundle's model and weights
                spec, inputs = await self.with_model(task_id, spec, inputs)
            kernel = await runtime.open_stream(spec, inputs)
        except Exception as exc:  # KernelError, ModelUnavailable, no runtime, or a worker that could not be reached
            session.phase, session.failure = SessionPhase.FAILED, f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ModelUnavailable):
                session.failure_code = "model_unavailable"
            self._release(session)
            self._notify()
            self.route(origin, [Report(task_id, f"stream model could not be loaded: {session.failure}")])
            return  # kept (FAILED) so that the client's hello is refused with the reason, until the task ends
        except BaseException:  # cancelled while loading: nobody owns the session any more
            self._release(session)
            raise
        session.kernel = kernel
        session.stats.model_loads = kernel.model_loads
        session.phase = SessionPhase.READY
        self.metrics.sessions_served += 1
        log(logger, logging.INFO, "stream_model_ready", task=task_id.hex()[:16], units=ps.units,
            receipt_every=ps.receipt_every)
        self._notify()
        try:
            await self._own(session)
        finally:
            self._release(session)
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

    async def _own(self, session: _ProviderSession) -> None:
        """The session's owner loop: serve each admitted connection, apply each command, until it finishes."""
        receive = session.inbox[1]
        while not session.finished.is_set():
            message = await receive.receive()
            if isinstance(message, _Connection):
                await self._serve_admitted(session, message)
            elif message is not None and not isinstance(message, _Frame):  # a stale frame: its connection is gone
                self._apply(session, message)

    def _apply(self, session: _ProviderSession, command: SessionCommand) -> None:
        """One command of the role's, applied by the session's owner; its actions go to the node."""
        actions = session.stream.apply(command)
        if actions:
            self.route(session.origin, actions)

    def _release(self, session: _ProviderSession) -> None:
        """The owner is gone: apply the commands still queued, turn away connections still waiting."""
        session.owned = False
        self._ended[session.stream.task_id] = session
        while len(self._ended) > self.config.kept_stats:
            self._ended.popitem(last=False)
        while True:
            try:
                message = session.inbox[1].receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(message, _Connection):
                message.error = StreamRejected("not_ready", "the session ended")
                message.done.set()
            elif message is not None and not isinstance(message, _Frame):
                self._apply(session, message)

    def command(self, task_id: bytes, command: SessionCommand) -> None:
        """``CommandStream``: the role's ``command`` for its session, carried out by the session's owner.

        A session this transport no longer serves (its task ended, or its
        model never loaded) has no other writer left, so the command is
        applied here (a claim refused after the session ended is retried).
        """
        session = self._sessions.get(task_id) or self._ended.get(task_id)
        if session is None:
            log(logger, logging.WARNING, "stream_command_dropped", task=task_id.hex()[:16],
                command=type(command).__name__)
        elif session.owned:
            session.post(command)
        else:
            self._apply(session, command)

    # -- provider: connections -------------------------------------------------------

    async def _handle(self, stream: FramedStream) -> None:
        """One client connection; every refusal on it is counted (and charged) here, once, as it leaves."""
        try:
            await self._serve_connection(stream)
        except StreamRejected as exc:
            await self._charge(stream.peer, exc)
            raise

    async def _serve_connection(self, stream: FramedStream) -> None:
        """Admit the client, then hand the connection to the session's owner and wait until it is done with it."""
        hello = read_hello(await self._receive_frame(stream, hello_expectation(self.config)))
        session = await self._admit(stream.peer, hello.task_id)
        session.phase = SessionPhase.CONNECTED  # taken: admission turns a second connection away (busy)
        session.stats.connections += 1
        self.metrics.connections += 1
        connection = _Connection(stream)
        session.post(connection)
        await connection.done.wait()
        if connection.error is not None:
            raise connection.error

    async def _serve_admitted(self, session: _ProviderSession, admitted: _Connection) -> None:
        """The owner serves one connection: frames from a reader child, commands between them."""
        stream = admitted.stream
        try:
            connection = ProviderProtocol(session.stream, self.config)
            async with trio.open_nursery() as nursery:
                try:
                    await stream.send(connection.ready_frame())
                    nursery.start_soon(_read_frames, stream, session)
                    await self._serve_items(stream, session, connection)
                except Exception as exc:  # handed to the connection's handler, which counts, charges, raises it
                    admitted.error = exc  # (caught in here: the nursery would wrap it in an ExceptionGroup)
                finally:
                    nursery.cancel_scope.cancel()  # the reader (which never raises) stops with the connection
        finally:
            if session.phase is SessionPhase.CONNECTED:
                session.phase = SessionPhase.CLOSED if session.finished.is_set() else SessionPhase.READY
            admitted.done.set()
            self._notify()

    async def _admit(self, peer: str, task_id: bytes) -> _ProviderSession:
        address = account_address_of_peer(peer)
        with trio.move_on_after(self.config.ready_timeout):
            while True:
                session = self._sessions.get(task_id)
                verdict = check_admission(address, self.address, task_id, self.ledger().tasks.get(task_id),
                                          session.phase if session is not None else None,
                                          session.failure if session is not None else "",
                                          session.failure_code if session is not None else "model_failed")
                if isinstance(verdict, Refusal):
                    raise StreamRejected(verdict.code, verdict.message)
                if verdict == ADMIT:
                    assert session is not None
                    return session
                await self._changed.wait()
        raise StreamRejected("not_ready", f"task {task_id.hex()[:16]} is not being served by us "
                                          f"within {self.config.ready_timeout} s")

    async def _serve_items(self, stream: FramedStream, session: _ProviderSession,
                           connection: ProviderProtocol) -> None:
        while True:
            raw = await self._next_frame(stream, session, connection)
            for event in connection.receive_frame(raw):
                if isinstance(event, ReceiptTaken):
                    self.metrics.receipts_received += 1
                    session.stats.receipts += 1
                    self.route(session.origin, list(event.actions))
            await self._answer(stream, session, connection)
            if connection.ended:
                break
            connection.check_open()
        # The client ended the session: claim the latest receipt, release the model, say goodbye.
        self.route(session.origin, connection.close())
        session.finish("client ended the session", "client_ended")
        await stream.send_end()

    async def _answer(self, stream: FramedStream, session: _ProviderSession, connection: ProviderProtocol) -> None:
        """Answer queued items while the receipts allow (the rest wait for the next receipt)."""
        while (item := connection.next_item()) is not None:
            assert session.kernel is not None
            try:
                output = await session.kernel.infer(item)
            except SpecError as exc:
                raise connection.refuse_item(exc) from exc
            except KernelError as exc:
                session.phase, session.failure = SessionPhase.FAILED, f"{type(exc).__name__}: {exc}"
                session.finish("model failed", "model_failed")
                raise StreamRejected("model_failed", session.failure) from exc
            frame = connection.answer(output)
            session.stats.items += 1
            self.metrics.items_served += 1
            await stream.send(frame)

    async def _next_frame(self, stream: FramedStream, session: _ProviderSession,
                          connection: ProviderProtocol) -> bytes | None:
        """The client's next DATA frame (None at its END) within the expectation; commands are applied meanwhile."""
        expectation = connection.expectation()
        receive = session.inbox[1]
        with trio.move_on_after(expectation.timeout):
            while True:
                message = await receive.receive()
                if isinstance(message, _Frame):
                    if message.source is not stream:
                        continue  # left over from an earlier connection
                    message.taken.set()
                    if message.error is not None:
                        raise _stream_error(message.error)
                    return message.raw
                if isinstance(message, _Connection):  # admission lets one at a time in: never while connected
                    message.error = StreamRejected("busy", "the session is serving another connection")
                    message.done.set()
                elif message is not None:
                    self._apply(session, message)
        raise expectation.expired()

    async def _receive_frame(self, stream: FramedStream, expectation: Expectation) -> bytes | None:
        """The client's next DATA frame (None at its END), with framing faults as rejections."""
        raw: bytes | None = None
        with trio.move_on_after(expectation.timeout) as waited:
            try:
                raw = await stream.receive()
            except FrameTooLarge as exc:
                raise StreamRejected("oversized_item", str(exc)) from exc
            except RemoteError:
                raise  # the client aborted and said why: nothing to answer
            except ProtocolError as exc:
                raise StreamRejected("malformed", str(exc)) from exc
        if waited.cancelled_caught:
            raise expectation.expired()
        return raw

    async def _charge(self, peer: str, rejection: StreamRejected) -> None:
        """Count a refusal per code; one where the peer broke the protocol also costs it peer score."""
        self.metrics.rejected[rejection.code] += 1
        log(logger, logging.INFO, "stream_rejected", peer=peer, code=rejection.code, detail=rejection.reason)
        if rejection.penalized:
            self.metrics.penalties += 1
            self.network.penalize(peer, STREAM_PROTOCOL, rejection.code, rejection.reason)
            await trio.lowlevel.checkpoint()

    # -- client ----------------------------------------------------------------------

    def send_receipt(self, action: SendReceipt) -> None:
        """``SendReceipt``: queue the receipt on the task's open session (sent before the next item)."""
        session = self._clients.get(action.task_id)
        if session is None:
            log(logger, logging.WARNING, "stream_receipt_dropped", task=action.task_id.hex()[:16],
                units=action.receipt.receipt.units, reason="no open session")
            return
        session.protocol.queue_receipt(action.receipt)

    async def run_client(self, origin: object, action: OpenStream, items: Sequence[np.ndarray]) -> None:
        """``OpenStream``: stream ``items`` to the assigned provider; the outputs come back as ``ResultReady``."""
        cs = action.session
        if not isinstance(cs, ClientStream):
            raise TypeError(f"OpenStream.session must be a ClientStream, got {type(cs).__name__}")
        task_id = action.task_id
        todo = list(items)
        if len(todo) > cs.units:
            self.route(origin, [Report(task_id, f"{len(todo)} items supplied but the cap is {cs.units}; "
                                                f"streaming the first {cs.units}")])
            todo = todo[:cs.units]
        protocol = ClientProtocol(cs, todo)
        session = _ClientSession(origin, protocol)
        self._clients[task_id] = session
        self._client_outputs[task_id] = protocol.outputs
        while len(self._client_outputs) > self.config.kept_stats:
            self._client_outputs.popitem(last=False)
        try:
            outputs = await self._client_session(session, action.peer)
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
        if outputs is not None:
            return outputs[index] if 0 <= index < len(outputs) else None
        kept = self._client_kept.get(task_id)
        return kept.output(index) if kept is not None else None

    def client_item(self, task_id: bytes, index: int) -> np.ndarray | None:
        """Item ``index`` a live session of ours sent, if still kept (a batch session's items are its inputs)."""
        kept = self._client_kept.get(task_id)
        return kept.item(index) if kept is not None else None

    def forget_client(self, task_id: bytes) -> None:
        """Our task settled: its outputs and kept items can no longer be disputed, so they go."""
        self._client_outputs.pop(task_id, None)
        self._client_kept.pop(task_id, None)

    async def run_live_client(self, origin: object, action: OpenStream, start: LiveStart) -> None:
        """``OpenStream`` of a stream task posted without items: a live session (:mod:`.live`).

        Connects as :meth:`run_client` does; once the provider is ready, hands
        a :class:`~.live.LiveSession` to ``start`` and serves it as its one
        owner until it is closed, exhausted or lost. A loss is reported on
        the task like a batch session's (the ledger side is unchanged).
        """
        cs = action.session
        if not isinstance(cs, ClientStream):
            raise TypeError(f"OpenStream.session must be a ClientStream, got {type(cs).__name__}")
        task_id = action.task_id
        protocol = ClientProtocol(cs, live=True)
        session = _ClientSession(origin, protocol)
        send, inbox = trio.open_memory_channel[_LiveMessage](math.inf)
        live = LiveSession(task_id, action.peer, cs.units, post=send.send_nowait, signature=start.signature,
                           max_item_bytes=self.config.max_item_bytes)
        kept = KeptItems(self.config.live_kept_bytes, cs.max_evidence)
        self._clients[task_id] = session
        self._client_kept[task_id] = kept
        while len(self._client_kept) > self.config.kept_stats:
            self._client_kept.popitem(last=False)
        carry: _LiveMessage | None = None
        try:
            while True:
                serve = partial(self._serve_live, live=live, start=start, inbox=inbox, send=send, kept=kept,
                                first=carry)
                try:
                    await self._client_session(session, action.peer, serve)
                    break
                except _IdleDropped:
                    # A gateway's session idles between requests; the provider keeps the session (and its
                    # model) but not an idle connection. Connect again with the next item (or to END it).
                    carry = None
                    while not isinstance(carry, (Fed, Finish)):
                        carry = await inbox.receive()
                    protocol.started = False
                    log(logger, logging.INFO, "stream_live_reconnect", task=task_id.hex()[:16],
                        answered=protocol.answered)
        except (StreamTransportError, StreamError, NetError, ValueError) as exc:  # ValueError: codec errors
            self._live_lost(session, live, start, str(exc))
            return
        except Exception as exc:  # our bug: report it, and keep it from taking the node's roles down
            logger.exception("%s", f"event=stream_client_crashed task={task_id.hex()[:16]} error={exc!r}")
            self._live_lost(session, live, start, f"internal error: {exc!r}")
            return
        finally:
            del self._clients[task_id]
            live.lose("the node stopped the session")  # cancelled: no-op once it ended
            start.failed("the node stopped before the session started")
        self.metrics.sessions_streamed += 1
        self.route(origin, [ReportProgress(task_id, Stage.DELIVERED,
                                           f"live session {live.ended}: {protocol.answered} items answered, "
                                           f"every one signed")])

    def _live_lost(self, session: _ClientSession, live: LiveSession, start: LiveStart, reason: str) -> None:
        task_id = live.task_id
        self.metrics.client_failures += 1
        log(logger, logging.WARNING, "stream_failed", task=task_id.hex()[:16], live=True, error=reason,
            answered=session.protocol.answered, in_flight=live.in_flight)
        if start.session is None:
            start.failed(reason)
        live.lose(reason)
        self.route(session.origin, [Report(task_id, f"live session lost after {session.protocol.answered} "
                                                    f"answers: {reason}")])

    async def _serve_live(self, stream: FramedStream, session: _ClientSession, *, live: LiveSession,
                          start: LiveStart, inbox: trio.MemoryReceiveChannel[_LiveMessage],
                          send: trio.MemorySendChannel[_LiveMessage], kept: KeptItems,
                          first: _LiveMessage | None = None) -> list[np.ndarray]:
        """The provider is ready: hand the session to its opener, then serve it (a reader child only receives).

        ``first``: a message taken from the inbox before this connection (the one that made us reconnect)."""
        protocol = session.protocol
        live.receipt_every = protocol.session.receipt_every
        start.started(live)
        if start.session is not live:  # the opener gave up meanwhile: nobody will feed it; end it properly
            live.end("abandoned")
            protocol.finish()
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_live, stream, send)
            try:
                await self._live_loop(stream, session, live, inbox, kept, first)
            except Exception as exc:  # raised after the reader stops (a nursery would wrap it in a group)
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return []

    async def _live_loop(self, stream: FramedStream, session: _ClientSession, live: LiveSession,
                         inbox: trio.MemoryReceiveChannel[_LiveMessage], kept: KeptItems,
                         first: _LiveMessage | None = None) -> None:
        """Items in as callers feed them, answers back to their callers, until the session is done."""
        protocol = session.protocol
        cs = protocol.session
        timeout = self.config.answer_timeout
        deadline = math.inf  # while items are unanswered: the provider must answer one by then
        while not protocol.done:
            with trio.move_on_at(deadline if cs.in_flight else math.inf) as waited:
                message = first if first is not None else await inbox.receive()
                first = None
            if waited.cancelled_caught:
                raise StreamTransportError(f"provider {stream.peer} answered nothing for {timeout} s with "
                                           f"{cs.in_flight} items unanswered")
            if isinstance(message, Fed):
                index = protocol.feed(message.item)
                if index != message.index:  # our own bookkeeping: never send an item under another's index
                    raise StreamTransportError(f"item {message.index} would go out as item {index}")
                kept.add(index, message.item)
                if protocol.total >= cs.units:
                    protocol.finish()  # the cap is reached: end once these are answered
            elif isinstance(message, Finish):
                protocol.finish()
            else:
                if message.error is not None and cs.in_flight == 0 and isinstance(message.error, RemoteError) \
                        and refusal_code(str(message.error)) == "idle":
                    raise _IdleDropped(str(message.error))
                index, output, actions = protocol.receive_live_answer(_live_frame(message))
                self.metrics.items_answered += 1
                kept.answer(index, output)
                live.deliver(index, output)
                deadline = trio.current_time() + timeout
                self.route(session.origin, actions)
                await self._flush(stream, protocol)
            idle = cs.in_flight == 0
            frames = protocol.item_frames()
            if frames and idle:
                deadline = trio.current_time() + timeout
            for frame in frames:
                await stream.send(frame)
                self.metrics.items_streamed += 1
        self.route(session.origin, protocol.close())
        await self._flush(stream, protocol)
        await stream.send_end()
        with trio.move_on_after(timeout):
            while not isinstance(message := await inbox.receive(), _Received):
                pass  # nothing else comes once finished: the handle refuses items then
            protocol.receive_end(_live_frame(message))
            live.end("exhausted" if protocol.total >= cs.units else "closed")
            return
        raise StreamTransportError(f"peer {stream.peer} sent no END within {timeout} s")

    async def _client_session(self, session: _ClientSession, provider: bytes,
                              serve: Callable[[FramedStream, _ClientSession], Awaitable[list[np.ndarray]]]
                              | None = None) -> list[np.ndarray]:
        """Connect (retrying while the provider is not ready), say hello, then ``serve`` the session
        (:meth:`_stream_items` unless given)."""
        serve = serve or self._stream_items
        protocol = session.protocol
        task_id = protocol.task_id
        give_up = trio.current_time() + self.config.connect_timeout
        last = "the provider is not connected"
        while True:
            peer = self.peer_of(provider)
            if peer is not None:
                try:
                    async with self.network.open_stream(peer, STREAM_PROTOCOL) as stream:
                        await self._hello(stream, protocol)
                        self.metrics.sessions_started += 1
                        what = "live session open" if protocol.live else f"streaming {len(protocol.items)} items"
                        self.route(session.origin, [ReportProgress(task_id, Stage.RUNNING, what)])
                        return await serve(stream, session)
                except PeerUnreachable as exc:
                    if protocol.started:
                        raise
                    last = str(exc)
                except StreamRefused as exc:
                    if protocol.started or exc.code not in ("not_ready", "busy"):
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

    async def _hello(self, stream: FramedStream, protocol: ClientProtocol) -> None:
        cs = protocol.session
        await stream.send(protocol.hello_frame())
        raw = await self._receive(stream, "StreamReady")  # answer_timeout > ready_timeout: the provider decides
        wanted = cs.receipt_every
        ready = protocol.receive_ready(raw, stream.peer)
        if cs.receipt_every != wanted:
            log(logger, logging.INFO, "stream_receipt_interval", task=cs.task_id.hex()[:16], ours=wanted,
                provider_k=ready.receipt_every)

    async def _stream_items(self, stream: FramedStream, session: _ClientSession) -> list[np.ndarray]:
        protocol = session.protocol
        while not protocol.done:
            for frame in protocol.item_frames():
                await stream.send(frame)
                self.metrics.items_streamed += 1
            raw = await self._receive(stream, f"answer to item {protocol.session.answered}")
            actions = protocol.receive_answer(raw)  # StreamFault: a bad signature or hash ends it
            self.metrics.items_answered += 1
            self.route(session.origin, actions)
            await self._flush(stream, protocol)
        self.route(session.origin, protocol.close())
        await self._flush(stream, protocol)
        await stream.send_end()
        protocol.receive_end(await self._receive(stream, "END"))
        return protocol.outputs

    async def _flush(self, stream: FramedStream, protocol: ClientProtocol) -> None:
        for frame in protocol.receipt_frames():
            await stream.send(frame)
            self.metrics.receipts_sent += 1


async def _read_frames(stream: FramedStream, session: _ProviderSession) -> None:
    """A connection's reader: receives frames one at a time into the session's inbox; changes nothing itself."""
    while True:
        try:
            frame = _Frame(stream, await stream.receive())
        except Exception as exc:  # handed to the owner, which maps it (_stream_error) where it enters
            frame = _Frame(stream, None, exc)
        session.post(frame)
        if frame.error is not None or frame.raw is None:
            return
        await frame.taken.wait()  # one frame at a time, as the owner takes them


async def _read_live(stream: FramedStream, send: trio.MemorySendChannel[_LiveMessage]) -> None:
    """A live client connection's reader: the provider's frames into the session's inbox; changes nothing."""
    while True:
        try:
            raw = await stream.receive()
        except Exception as exc:  # handed to the owner, which raises it as the session's loss
            send.send_nowait(_Received(None, exc))
            return
        send.send_nowait(_Received(raw))
        if raw is None:
            return


def _live_frame(message: _Received) -> bytes | None:
    """The frame, or the receive error as the client's own (a refusal with its code)."""
    if message.error is None:
        return message.raw
    if isinstance(message.error, RemoteError):
        raise StreamRefused(str(message.error), refusal_code(str(message.error))) from message.error
    raise message.error


def _stream_error(error: Exception) -> Exception:
    """A receive error as the stream's own: framing faults are rejections; a remote error stays as it is."""
    if isinstance(error, FrameTooLarge):
        return StreamRejected("oversized_item", str(error))
    if isinstance(error, ProtocolError) and not isinstance(error, RemoteError):
        return StreamRejected("malformed", str(error))
    return error
