"""The outcome of validating one gossip message.

libp2p validators answer yes/no; the node needs to know *why* (for counters
and logs) and whether the sender is to blame. ``reject`` means the message is
invalid and whoever sent it misbehaved (its score drops); ``ignore`` means the
message is not useful right now (expired, already known, from the future) but
the sender is not at fault. Neither is delivered to the application nor
forwarded to other peers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")


class Outcome(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class Verdict(Generic[R]):
    outcome: Outcome
    reason: str = ""
    record: R | None = None
    """What an accepting validator decoded and verified: delivered with the message
    (``GossipMessage.record``), so the consumer never decodes or verifies it again."""

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPT


ACCEPT: Verdict[Any] = Verdict(Outcome.ACCEPT)


def accept(record: R | None = None) -> Verdict[R]:
    """A message worth delivering and forwarding; ``record`` is its decoded, verified form."""
    return ACCEPT if record is None else Verdict(Outcome.ACCEPT, "", record)


def reject(reason: str) -> Verdict[Any]:
    """An invalid message; ``reason`` is a short stable label used as a metric key."""
    if not reason:
        raise ValueError("a rejection needs a reason (it becomes a metric label)")
    return Verdict(Outcome.REJECT, reason)


def ignore(reason: str) -> Verdict[Any]:
    """A valid-looking message not worth delivering; the sender is not penalised."""
    if not reason:
        raise ValueError("an ignore verdict needs a reason (it becomes a metric label)")
    return Verdict(Outcome.IGNORE, reason)


Validator = Callable[[str, bytes], Verdict[Any]]
"""``(from_peer, data) -> Verdict``: a plain synchronous function.

An accepting verdict carries the record the validator decoded and verified
(``accept(record)``); the subscription delivers it as ``GossipMessage.record``.

``from_peer`` is the peer that handed us the message (the one held
responsible), as a base58 peer id. It is not necessarily the author: the
author's identity belongs inside ``data`` and is checked by its signature.
"""
