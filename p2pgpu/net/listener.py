"""A TCP listener that owns its port: a second node on the same port fails instead of sharing it.

py-libp2p 0.8.1's ``TCPListener`` binds with ``SO_REUSEPORT`` (for TCP hole
punching, where dials leave from the listen port). On Linux that lets any
number of sockets of the same user listen on one port, the kernel spreading
connections between them: two nodes started on one port (the preflight
check passes for both if they start within its check-to-bind window) both
"listen", and each gets a share of the other's peers. We use no hole
punching or relay, so our listener binds the way ``trio.open_tcp_listeners``
does: ``SO_REUSEADDR`` only (a restart over connections in TIME_WAIT still
binds), never ``SO_REUSEPORT``. Everything else -- the lifecycle, the
handler, ``close`` -- is the stock listener's.

The swarm swallows a listener's failure (``Swarm.listen`` logs it at debug
and returns ``False``, which ``BasicHost.run`` ignores), so a node whose
port was taken used to run with no listener at all. :func:`install` hands
back the per-host record of failures that ``open_network`` turns into
:class:`~p2pgpu.net.errors.ListenFailed`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import THandler
from libp2p.io.trio import TrioTCPStream
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener
from libp2p.utils.multiaddr_utils import extract_ip_from_multiaddr
from multiaddr import Multiaddr

__all__ = ["ExclusiveTCPListener", "ListenFailures", "install"]

logger = logging.getLogger(__name__)

ListenFailures = dict[str, OSError]
"""Listen address (as text) -> why it could not be bound, filled by the listeners of one host."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in ``exc`` (itself, its cause, or inside an exception group)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error_in(inner)
            if found is not None:
                return found
    if exc.__cause__ is not None:
        return _os_error_in(exc.__cause__)
    return None


class ExclusiveTCPListener(TCPListener):
    """``TCPListener`` whose sockets are bound without ``SO_REUSEPORT`` (see the module docstring)."""

    def __init__(self, handler_function: THandler, failures: ListenFailures) -> None:
        super().__init__(handler_function)
        self._failures = failures

    async def listen(self, maddr: Multiaddr) -> None:
        try:
            port = int(maddr.value_for_protocol("tcp") or "")
        except Exception as exc:  # the multiaddr package raises several types for a missing protocol
            raise OpenConnectionError(f"Cannot listen: no valid TCP port in multiaddress {maddr}") from exc
        host = extract_ip_from_multiaddr(maddr)

        async def accepted(stream: trio.SocketStream) -> None:
            try:
                await self.handler(TrioTCPStream(stream))
            except Exception:  # one inbound connection's failure is that connection's (as in the stock listener)
                logger.debug("inbound connection on %s failed", maddr, exc_info=True)

        async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            listeners = await trio.open_tcp_listeners(port, host=host)
            await trio.serve_listeners(accepted, listeners, task_status=task_status)

        async with self._lifecycle_lock:
            if self._closed:
                raise OpenConnectionError(f"Cannot listen on {maddr}: listener is closed")
            if self._nursery is None:
                await self._spawn_background_task()
            nursery = self._nursery
            if nursery is None:
                raise OpenConnectionError(f"Cannot listen on {maddr}: background task is not running")
            try:
                started = await nursery.start(serve)
            except BaseException as exc:
                cause = _os_error_in(exc)
                if cause is None:
                    raise
                self._failures[str(maddr)] = cause
                raise OpenConnectionError(f"Failed to start TCP listener for {maddr}: {cause}") from cause
            self.listeners.extend(started)


def install(host: IHost) -> ListenFailures:
    """Give ``host``'s TCP transport exclusive listeners (this host only); returns where their failures go."""
    failures: ListenFailures = {}
    manager = host.get_network().transport_manager  # type: ignore[attr-defined]
    tcp = [t for t in manager.get_transports() if isinstance(t, TCP)]
    if not tcp:
        raise RuntimeError("the host has no TCP transport to make exclusive")

    def create_listener(handler_function: THandler) -> TCPListener:
        return ExclusiveTCPListener(handler_function, failures)

    for transport in tcp:
        transport.create_listener = create_listener  # type: ignore[method-assign]
    return failures
