"""Who may hold how many of our inbound request/response streams: a pure policy, no I/O.

Before this, one node-wide limit (64) was shared by every peer and protocol.
One peer that opened 64 streams and sent nothing on them had every other
peer's requests refused ``busy`` -- the client's and the verifiers' result
fetches included, so an honest provider was taken for one that withholds its
result (issue 13) -- and was never charged for it. Now:

* **per peer** at most ``per_peer`` streams at once, whatever the protocol:
  no single peer can take the room another peer's fetch needs;
* **per protocol** a budget (``per_protocol`` unless the protocol was given
  its own), so one kind of traffic (long stream sessions, sync) cannot crowd
  out another (data fetches);
* **node-wide** ``total`` stays as the last resort;
* a **banned** peer gets nothing (the connection layer disconnects it, but a
  peer that got back in before that, or whose disconnect failed, must not be
  answered meanwhile).

A stream refused because its *peer* is over its own quota is that peer's
doing, so it may cost score; a stream refused for a full protocol budget or a
full node is nobody's fault in particular and is only counted. Refusals at
the quota are charged at most once per peer per ``charge_interval``
seconds: an honest peer can overshoot for a moment (our count drops when our
handler finishes, its count when its side closes), and that must not add up
to a ban, while a peer that keeps pushing past its quota is charged every
interval and banned within a few. Holding streams idle is charged by the
shell per stream (see :class:`~p2pgpu.net.reqresp.RequestResponse`).

Time is passed in (``now``) so the policy runs under any clock, including a
test's.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["Admitted", "InboundQuota", "QuotaError", "Refused", "Refusal", "Slot", "StreamLimits"]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Inbound stream quotas and the matching outbound politeness limit (:attr:`NetConfig.streams`)."""

    total: int = 256
    """Node-wide ceiling of inbound streams, the last resort. One task and a few small buffers each."""
    per_peer: int = 16
    """Inbound streams one peer may hold at once, over all protocols."""
    per_protocol: int = 128
    """Default budget of one protocol over all peers (half the node), unless it was given its own."""
    outbound_per_peer: int = 12
    """Streams we open to one peer at once; more wait for one of ours to close. Kept below ``per_peer``
    (peers run the same defaults) so that our own bursts never reach a peer's quota, even while the
    peer still counts streams we already closed."""
    idle_timeout: float = 5.0
    """Seconds an inbound stream may stay silent before its request (first frame; a unary exchange's
    whole request) arrives: then it is reset, counted as ``idle`` and its peer charged. Honest peers
    send the request in the same breath as they open the stream."""
    charge_interval: float = 1.0
    """At most one quota charge per peer per this many seconds."""

    def __post_init__(self) -> None:
        for name in ("total", "per_peer", "per_protocol", "outbound_per_peer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"streams.{name} must be >= 1, got {getattr(self, name)}")
        if not self.per_peer <= self.per_protocol <= self.total:
            raise ConfigError(
                f"stream limits must satisfy per_peer <= per_protocol <= total, got "
                f"{self.per_peer}, {self.per_protocol}, {self.total}"
            )
        if self.outbound_per_peer > self.per_peer:
            raise ConfigError(
                f"streams.outbound_per_peer ({self.outbound_per_peer}) over per_peer ({self.per_peer}): "
                "our own bursts would be refused (and charged) by peers running the same limits"
            )
        for name in ("idle_timeout", "charge_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"streams.{name} must be > 0, got {getattr(self, name)}")


class Refusal(enum.Enum):
    """Why an inbound stream was refused; the values are metric labels."""

    BANNED = "banned"
    PEER_QUOTA = "peer_quota"
    PROTOCOL_BUDGET = "protocol_budget"
    NODE_LIMIT = "node_limit"


class QuotaError(RuntimeError):
    """A slot released twice or never admitted: a bug in the shell, never a peer's doing."""


@dataclass(frozen=True, slots=True)
class Slot:
    """One admitted inbound stream; give it back with :meth:`InboundQuota.release`."""

    peer: str
    protocol: str
    serial: int


@dataclass(frozen=True, slots=True)
class Admitted:
    slot: Slot


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal
    charge: bool
    """Whether the shell should charge the peer (its own quota, not charged within ``charge_interval``)."""
    detail: str


@dataclass(slots=True)
class InboundQuota:
    """Counts of inbound streams by peer and protocol, and the admission rule."""

    limits: StreamLimits = field(default_factory=StreamLimits)
    _budgets: dict[str, int] = field(default_factory=dict)
    _by_peer: dict[str, int] = field(default_factory=dict)
    _by_protocol: dict[str, int] = field(default_factory=dict)
    _live: set[Slot] = field(default_factory=set)
    _last_charge: dict[str, float] = field(default_factory=dict)
    _serials: itertools.count = field(default_factory=itertools.count)

    def set_budget(self, protocol: str, budget: int | None) -> None:
        """Give ``protocol`` its own budget (None: the default ``per_protocol``)."""
        if budget is None:
            self._budgets.pop(protocol, None)
            return
        if not 1 <= budget <= self.limits.total:
            raise ConfigError(f"budget of {protocol} must be in 1..{self.limits.total}, got {budget}")
        self._budgets[protocol] = budget

    def budget(self, protocol: str) -> int:
        return self._budgets.get(protocol, self.limits.per_protocol)

    @property
    def total(self) -> int:
        return len(self._live)

    def of_peer(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def of_protocol(self, protocol: str) -> int:
        return self._by_protocol.get(protocol, 0)

    def by_protocol(self) -> Mapping[str, int]:
        return dict(self._by_protocol)

    def admit(self, peer: str, protocol: str, now: float, *, banned: bool = False) -> Admitted | Refused:
        """Take a slot for a new stream of ``peer`` on ``protocol``, or say why not.

        Checked in order of whose fault a refusal is: a banned peer, then the
        peer's own quota (chargeable), then the protocol's budget and the node
        ceiling (load from everyone, not charged).
        """
        if banned:
            return Refused(Refusal.BANNED, False, f"peer {peer} is banned")
        held = self.of_peer(peer)
        if held >= self.limits.per_peer:
            return Refused(Refusal.PEER_QUOTA, self._charge_due(peer, now),
                           f"peer {peer} already holds {held} inbound streams (quota {self.limits.per_peer})")
        budget = self.budget(protocol)
        if self.of_protocol(protocol) >= budget:
            return Refused(Refusal.PROTOCOL_BUDGET, False, f"{protocol} is at its budget of {budget} streams")
        if self.total >= self.limits.total:
            return Refused(Refusal.NODE_LIMIT, False, f"node is at its ceiling of {self.limits.total} streams")
        slot = Slot(peer, protocol, next(self._serials))
        self._live.add(slot)
        self._by_peer[peer] = held + 1
        self._by_protocol[protocol] = self.of_protocol(protocol) + 1
        return Admitted(slot)

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back; counts that reach zero are forgotten (no entry per peer ever seen)."""
        try:
            self._live.remove(slot)
        except KeyError:
            raise QuotaError(f"slot {slot} released twice or never admitted") from None
        _decrement(self._by_peer, slot.peer)
        _decrement(self._by_protocol, slot.protocol)

    def _charge_due(self, peer: str, now: float) -> bool:
        last = self._last_charge.get(peer)
        if last is not None and now - last < self.limits.charge_interval:
            return False
        self._last_charge[peer] = now
        return True

    def expire(self, now: float) -> None:
        """Forget charge times older than ``charge_interval`` (called from time to time; bounds memory)."""
        cutoff = now - self.limits.charge_interval
        for peer in [p for p, t in self._last_charge.items() if t <= cutoff]:
            del self._last_charge[peer]

    def peers_tracked(self) -> int:
        """Peers with a live stream or a recent charge (what this object keeps memory for)."""
        return len(set(self._by_peer) | set(self._last_charge))


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
