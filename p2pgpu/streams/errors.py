"""Errors of ``/p2pgpu/stream/1``, split by who is at fault, and the provider's rejection codes.

The tree::

    StreamTransportError      client side: our session could not go on (names the peer and the task)
    └── StreamRefused         the provider ended it with an ERROR frame; ``code`` is its rejection code
    ProtocolError (p2pgpu.net)
    └── StreamRejected        provider side: the peer's connection is refused with ``"<code>: <reason>"``

The protocol cores raise these; the Trio shell counts them, charges the peer
for the codes in :data:`PENALIZED_CODES`, and lets the network layer send the
ERROR frame.
"""

from __future__ import annotations

import re
from typing import Final

from ..net.errors import ProtocolError

__all__ = [
    "PENALIZED_CODES",
    "REJECTION_CODES",
    "StreamRefused",
    "StreamRejected",
    "StreamTransportError",
    "refusal_code",
]

REJECTION_CODES: Final = frozenset({
    "malformed",        # undecodable frame, or the stream ended before StreamHello
    "unexpected",       # a message that has no place at this point of the exchange
    "not_entitled",     # the peer is not the task's client (or its peer id names no account)
    "not_stream",       # the task is not a STREAM task
    "not_assigned",     # the task is not assigned to us
    "task_closed",      # the task is settled or otherwise no longer ASSIGNED
    "not_ready",        # our role has not handed us the session (or the model is loading) in time
    "model_failed",     # the model could not be loaded, or its worker died
    "model_unavailable",  # the registered model a by-model task names could not be fetched (no holder gave it)
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

PENALIZED_CODES: Final = frozenset({"malformed", "unexpected", "not_entitled", "bad_index", "oversized_item",
                                    "flooding", "bad_receipt"})
"""Rejections where the peer broke the protocol (rather than came too early): each charges its peer score."""


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
        if code not in REJECTION_CODES:
            raise ValueError(f"unknown stream rejection code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message

    @property
    def penalized(self) -> bool:
        """Whether the peer broke the protocol (charged a peer-score rejection), not merely came too early."""
        return self.code in PENALIZED_CODES


_CODE_IN_ERROR = re.compile(r"bad request: ([a-z_]+): ")


def refusal_code(error_text: str) -> str | None:
    """The rejection code inside a RemoteError's text, if the provider sent one of ours."""
    match = _CODE_IN_ERROR.search(error_text)
    return match.group(1) if match and match.group(1) in REJECTION_CODES else None
