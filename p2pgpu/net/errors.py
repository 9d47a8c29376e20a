"""Exceptions raised by the network layer.

The tree, so callers can catch at the level they care about::

    NetError
    ├── ConfigError          bad configuration (addresses, sizes, seeds)
    ├── ListenFailed         a listen address could not be bound (in use,
    │                        not ours); ``errno`` is the OS's
    ├── PeerUnreachable      could not dial / open a stream, or the
    │   │                    connection was lost mid-transfer
    │   └── PeerBusy         the peer refused a new stream for now (its
    │                        inbound quotas), or our own slots to it stayed full
    ├── StreamIdle           (server side) an inbound stream sent no request
    │                        within the idle timeout
    ├── RequestTimeout       the peer did not answer within the deadline
    ├── MessageTooLarge      we refused to send a message over its size limit
    ├── PublishRejected      our own validator refused a message we publish
    └── ProtocolError        the peer broke the framing rules
        ├── FrameTooLarge    a frame header announced more than the limit
        └── RemoteError      the peer's handler failed and said so

Every message names the peer and the protocol (or topic) involved, so a log
line is enough to know who misbehaved and where.
"""

from __future__ import annotations


class NetError(Exception):
    """Base of every error raised by :mod:`p2pgpu.net`."""


class ConfigError(NetError, ValueError):
    """The network configuration is unusable."""


class ListenFailed(NetError):
    """A listen address could not be bound, e.g. its port is another process's; the node must not start.

    ``errno`` is the operating system's (``errno.EADDRINUSE`` for a taken
    port), so a caller can say what to do without parsing the message.
    """

    def __init__(self, addr: str, cause: OSError | None) -> None:
        reason = (cause.strerror or str(cause)) if cause is not None else "the listener did not start"
        super().__init__(f"cannot listen on {addr}: {reason}")
        self.addr = addr
        self.errno = cause.errno if cause is not None else None


class PeerUnreachable(NetError):
    """The peer could not be reached, or went away mid-transfer."""


class PeerBusy(PeerUnreachable):
    """The peer refused a new stream for now, or all our stream slots to it stayed taken.

    A subclass of :class:`PeerUnreachable` because every caller already
    treats that as "try again later"; the peer is not broken and sent no bad
    data. The refusing side says why in an ERROR frame that starts with
    ``busy:`` (a prefix only the request/response layer itself uses).
    """


class StreamIdle(NetError):
    """An inbound stream sent no request within the idle timeout (it only held one of our slots)."""


class RequestTimeout(NetError):
    """The peer did not complete the exchange before the deadline."""


class MessageTooLarge(NetError, ValueError):
    """A message is over the size limit of its topic or protocol."""


class PublishRejected(NetError, ValueError):
    """Our own topic validator refused a message we were about to publish.

    Publishing it would only get it rejected (and us penalised) by every peer.
    """


class ProtocolError(NetError):
    """The remote side broke the request/response framing rules."""


class FrameTooLarge(ProtocolError):
    """A frame header announced a payload over the configured maximum."""


class RemoteError(ProtocolError):
    """The remote handler failed and sent an error frame instead of data."""
