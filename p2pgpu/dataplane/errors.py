"""The data plane's own failures (transport failures are :mod:`p2pgpu.net` errors).

The tree::

    DataPlaneError
    ├── NotEntitled          the peer refused: the ledger does not let us have the blob
    ├── NotFound             the peer holds no usable copy
    ├── Oversized            over the caller's max_bytes or the server's limit
    ├── IntegrityError       the bytes do not hash to the blob, or overran the size
    │   └── SizeOverrun      more bytes than the reply announced
    ├── DataProtocolError    the peer broke /p2pgpu/data/1 (also a net ProtocolError)
    │   └── BadRequest       (server side) an undecodable request
    └── Truncated            the transfer stopped early (also a net PeerUnreachable); bytes kept

A sealed blob that does not open raises the :class:`~p2pgpu.sealed.SealedError`
subclass that names the problem instead (it is not a transfer failure).
"""

from __future__ import annotations

from ..net.errors import PeerUnreachable, ProtocolError

__all__ = [
    "BadRequest",
    "DataPlaneError",
    "DataProtocolError",
    "IntegrityError",
    "NotEntitled",
    "NotFound",
    "Oversized",
    "SizeOverrun",
    "Truncated",
]


class DataPlaneError(Exception):
    """Base of the data plane's own failures (transport failures are :mod:`p2pgpu.net` errors).

    A sealed blob that does not open raises the :class:`~p2pgpu.sealed.SealedError`
    subclass that names the problem instead (it is not a transfer failure).
    """


class NotEntitled(DataPlaneError):
    """The peer refused: the ledger does not let us have this blob (or our identity did not match)."""


class NotFound(DataPlaneError):
    """The peer does not hold this blob (or its copy was damaged)."""


class Oversized(DataPlaneError):
    """The blob is larger than the caller's ``max_bytes`` or the server's limit."""


class IntegrityError(DataPlaneError):
    """The bytes received do not hash to the blob's address, or overran the announced size."""


class SizeOverrun(IntegrityError):
    """The peer sent more bytes than the size its reply announced (the partial download is worthless)."""


class DataProtocolError(DataPlaneError, ProtocolError):
    """The peer's reply broke ``/p2pgpu/data/1`` (undecodable, wrong offset, …)."""


class BadRequest(DataProtocolError):
    """Server side: a request that does not decode; the network layer answers it with an ERROR frame."""


class Truncated(DataPlaneError, PeerUnreachable):
    """The transfer stopped before the last byte; the bytes so far are kept for a resume."""

    def __init__(self, message: str, *, received: int, size: int) -> None:
        super().__init__(message)
        self.received = received
        self.size = size
