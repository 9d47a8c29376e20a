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


class Outcome(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPT


ACCEPT = Verdict(Outcome.ACCEPT)


def accept() -> Verdict:
    return ACCEPT


def reject(reason: str) -> Verdict:
    """An invalid message; ``reason`` is a short stable label used as a metric key."""
    if not reason:
        raise ValueError("a rejection needs a reason (it becomes a metric label)")
    return Verdict(Outcome.REJECT, reason)


def ignore(reason: str) -> Verdict:
    """A valid-looking message not worth delivering; the sender is not penalised."""
    if not reason:
        raise ValueError("an ignore verdict needs a reason (it becomes a metric label)")
    return Verdict(Outcome.IGNORE, reason)


Validator = Callable[[str, bytes], Verdict]
"""``(from_peer, data) -> Verdict``: a plain synchronous function.

``from_peer`` is the peer that handed us the message (the one held
responsible), as a base58 peer id. It is not necessarily the author: the
author's identity belongs inside ``data`` and is checked by its signature.
"""
