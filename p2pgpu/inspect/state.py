"""The inspector's aggregation: trace events in, a summary out (pure; no clock, no I/O).

The live view and ``inspect replay`` feed the same :class:`InspectorState`
with the same events, so a recording replays to the very summary the live
session ended with. Nothing here reads the time: every figure is computed
from event timestamps, and "now" is an argument.

Delays (tracestat's delivery-delay CDF, adapted to what a passive observer
can time -- it never sees the publish instant of someone else's message):

* ``vote_spread``   -- a vote's arrival after the first vote of the same
  (height, round, step): how far apart the committee's votes land;
* ``finality``      -- first proposal of a height to the first finalized
  block of that height on ``/block``;
* ``block_delay``   -- a block's arrival after its header timestamp (the
  proposer's clock; on one machine the clocks agree, across machines skew
  shows up, and arrivals "before" the timestamp are left out);
* ``duplicate_lag`` -- a duplicate's arrival after the first delivery of the
  same message: how long the mesh keeps sending copies.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pgpu.inspect.events import EventType, FieldValue, TraceEvent

__all__ = [
    "CDF_THRESHOLDS_MS",
    "DelayStats",
    "Head",
    "InspectorState",
    "Summary",
    "TimelineEntry",
    "TopicSummary",
    "delay_stats",
]

TOPIC_ORDER = ("tx", "task", "bid", "consensus", "block")
CDF_THRESHOLDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MAX_SAMPLES = 100_000
"""Delay samples kept per metric (the newest): bounds memory in a long live session."""
MAX_KEYS = 50_000
"""First-arrival times remembered (per vote key, height, message id), oldest forgotten first."""
MAX_TIMELINE = 1_000


@dataclass(frozen=True, slots=True)
class DelayStats:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cdf: tuple[tuple[int, float], ...]
    """(threshold ms, fraction of samples at or below it)."""

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
                "max_ms": self.max_ms, "cdf": [[t, f] for t, f in self.cdf]}


def delay_stats(samples_s: Iterable[float]) -> DelayStats | None:
    """Nearest-rank percentiles and a cumulative distribution over fixed millisecond buckets."""
    ms = sorted(s * 1000.0 for s in samples_s)
    if not ms:
        return None
    n = len(ms)

    def pct(p: float) -> float:
        return round(ms[max(0, -(-int(p * n * 1000) // 100_000) - 1)], 3)

    cdf = []
    i = 0
    for t in CDF_THRESHOLDS_MS:
        while i < n and ms[i] <= t:
            i += 1
        cdf.append((t, round(i / n, 4)))
    return DelayStats(count=n, p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99), max_ms=round(ms[-1], 3),
                      cdf=tuple(cdf))


@dataclass(frozen=True, slots=True)
class TopicSummary:
    name: str
    delivered: int
    rejected: Mapping[str, int]
    duplicates: int
    bytes: int
    rate_window: float
    """Delivered messages per second over the sliding window ending at the summary time."""
    rate_avg: float
    """Delivered messages per second over the whole observation."""
    kinds: Mapping[str, int]
    peers: int
    mesh: int

    def to_dict(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "rejected": dict(self.rejected), "duplicates": self.duplicates,
                "bytes": self.bytes, "rate_window": self.rate_window, "rate_avg": self.rate_avg,
                "kinds": dict(self.kinds), "peers": self.peers, "mesh": self.mesh}


@dataclass(frozen=True, slots=True)
class Head:
    finalized: int
    """Highest block height seen on ``/block``."""
    consensus_height: int
    consensus_round: int
    """Highest (height, round) seen in proposals and votes: the round in progress."""

    def to_dict(self) -> dict[str, int]:
        return {"finalized": self.finalized, "consensus_height": self.consensus_height,
                "consensus_round": self.consensus_round}


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    ts: float
    offset_s: float
    """Seconds since the task's first sighting."""
    delta_s: float
    """Seconds since the previous entry."""
    topic: str
    kind: str
    what: str
    peer: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "offset_s": self.offset_s, "delta_s": self.delta_s, "topic": self.topic,
                "kind": self.kind, "what": self.what, "peer": self.peer}


@dataclass(frozen=True, slots=True)
class Summary:
    start_ts: float
    end_ts: float
    events: int
    window_s: float
    topics: tuple[TopicSummary, ...]
    peers: int
    grafts: int
    prunes: int
    head: Head
    delays: Mapping[str, DelayStats]
    follow_task: str | None
    timeline: tuple[TimelineEntry, ...]

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_ts - self.start_ts)

    def topic(self, name: str) -> TopicSummary:
        for t in self.topics:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_ts": self.start_ts, "end_ts": self.end_ts, "duration_s": round(self.duration_s, 6),
            "events": self.events, "window_s": self.window_s,
            "topics": {t.name: t.to_dict() for t in self.topics},
            "peers": self.peers, "grafts": self.grafts, "prunes": self.prunes, "head": self.head.to_dict(),
            "delays": {k: v.to_dict() for k, v in self.delays.items()},
            "follow_task": self.follow_task, "timeline": [e.to_dict() for e in self.timeline],
        }


@dataclass
class _Topic:
    delivered: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    bytes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    recent: deque[float] = field(default_factory=deque)
    peers: set[str] = field(default_factory=set)
    mesh: set[str] = field(default_factory=set)


class _FirstSeen(OrderedDict[Any, float]):
    """Bounded map key -> first arrival time; the oldest keys go first."""

    def first(self, key: Any, ts: float) -> float | None:
        """The earlier arrival for ``key`` (None if this is the first, which is then remembered)."""
        if key in self:
            return self[key]
        self[key] = ts
        if len(self) > MAX_KEYS:
            self.popitem(last=False)
        return None


class InspectorState:
    """Aggregates :class:`TraceEvent` values; :meth:`summary` reads the figures at any time."""

    def __init__(self, *, window_s: float = 10.0, follow_task: str | None = None) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if follow_task is not None:
            follow_task = follow_task.lower()
            if len(follow_task) < 8 or any(c not in "0123456789abcdef" for c in follow_task):
                raise ValueError(f"task id must be at least 8 hex digits, got {follow_task!r}")
        self.window_s = window_s
        self.follow_task = follow_task
        self.events = 0
        self.start_ts: float | None = None
        self.end_ts = 0.0
        self._topics: dict[str, _Topic] = {name: _Topic() for name in TOPIC_ORDER}
        self._connected: set[str] = set()
        self.grafts = 0
        self.prunes = 0
        self._finalized = 0
        self._consensus = (0, 0)
        self._delays: dict[str, deque[float]] = {
            name: deque(maxlen=MAX_SAMPLES) for name in ("vote_spread", "finality", "block_delay", "duplicate_lag")
        }
        self._first_vote = _FirstSeen()
        self._first_proposal = _FirstSeen()
        self._final_seen = _FirstSeen()
        self._first_delivery = _FirstSeen()
        self._timeline: list[tuple[float, str, str, str, str]] = []

    # ------------------------------------------------------------ input

    def apply_all(self, events: Iterable[TraceEvent]) -> None:
        for ev in events:
            self.apply(ev)

    def apply(self, ev: TraceEvent) -> None:
        self.events += 1
        if self.start_ts is None:
            self.start_ts = ev.ts
        self.end_ts = max(self.end_ts, ev.ts)
        kind = ev.event
        if kind is EventType.ADD_PEER:
            self._connected.add(ev.peer)
            return
        if kind is EventType.REMOVE_PEER:
            self._connected.discard(ev.peer)
            for t in self._topics.values():
                t.peers.discard(ev.peer)
                t.mesh.discard(ev.peer)
            return
        topic = self._topics.setdefault(ev.topic, _Topic())
        if kind is EventType.JOIN:
            if ev.peer:
                topic.peers.add(ev.peer)
        elif kind is EventType.LEAVE:
            if ev.peer:
                topic.peers.discard(ev.peer)
                topic.mesh.discard(ev.peer)
        elif kind is EventType.GRAFT:
            topic.mesh.add(ev.peer)
            self.grafts += 1
        elif kind is EventType.PRUNE:
            topic.mesh.discard(ev.peer)
            self.prunes += 1
        elif kind is EventType.REJECT:
            topic.rejected[ev.reason] += 1
        elif kind is EventType.DUPLICATE:
            topic.duplicates += 1
            if ev.msg_id:
                first = self._first_delivery.get(ev.msg_id)
                if first is not None and ev.ts >= first:
                    self._delays["duplicate_lag"].append(ev.ts - first)
        elif kind is EventType.DELIVER:
            self._deliver(topic, ev)

    def _deliver(self, topic: _Topic, ev: TraceEvent) -> None:
        topic.delivered += 1
        topic.bytes += ev.size
        topic.kinds[ev.kind or "?"] += 1
        topic.recent.append(ev.ts)
        while topic.recent and topic.recent[0] <= ev.ts - self.window_s:
            topic.recent.popleft()
        if ev.msg_id:
            self._first_delivery.first(ev.msg_id, ev.ts)
        f = ev.fields
        height, round_ = _int(f.get("height")), _int(f.get("round"))
        if ev.kind == "VoteMessage" and height is not None and round_ is not None:
            self._see_consensus(height, round_)
            first = self._first_vote.first((height, round_, f.get("step")), ev.ts)
            if first is not None:
                self._delays["vote_spread"].append(max(0.0, ev.ts - first))
        elif ev.kind == "SignedProposal" and height is not None and round_ is not None:
            self._see_consensus(height, round_)
            self._first_proposal.first(height, ev.ts)
        elif ev.kind == "FinalizedBlock" and height is not None:
            self._finalized = max(self._finalized, height)
            if self._final_seen.first(height, ev.ts) is None:
                proposed = self._first_proposal.get(height)
                if proposed is not None and ev.ts >= proposed:
                    self._delays["finality"].append(ev.ts - proposed)
                stamp = _int(f.get("timestamp_ms"))
                if stamp is not None and ev.ts * 1000.0 >= stamp:
                    self._delays["block_delay"].append(ev.ts - stamp / 1000.0)
        if self.follow_task is not None:
            self._follow(ev)

    def _see_consensus(self, height: int, round_: int) -> None:
        if (height, round_) > self._consensus:
            self._consensus = (height, round_)

    def _follow(self, ev: TraceEvent) -> None:
        assert self.follow_task is not None
        f = ev.fields
        task = f.get("task_id")
        if isinstance(task, str) and task.startswith(self.follow_task):
            self._add_entry(ev, _describe(ev))
        touches = f.get("tasks")
        if isinstance(touches, list):
            if ev.kind == "FinalizedBlock":
                where = f"in block {f.get('height')}"
            elif ev.kind == "TxBatch":
                where = f"tx, in a batch of {f.get('count')}"
            else:
                where = f"proposed for height {f.get('height')} round {f.get('round')}"
            for touch in touches:
                if (isinstance(touch, list) and len(touch) == 2 and isinstance(touch[0], str)
                        and touch[0].startswith(self.follow_task)):
                    self._add_entry(ev, f"{touch[1]} {where}")

    def _add_entry(self, ev: TraceEvent, what: str) -> None:
        if len(self._timeline) < MAX_TIMELINE:
            self._timeline.append((ev.ts, ev.topic, ev.kind, what, ev.peer))

    # ------------------------------------------------------------ output

    def summary(self, now: float | None = None) -> Summary:
        """Figures as of ``now`` (default: the last event's time, which is what a replay uses)."""
        now = self.end_ts if now is None else now
        start = self.start_ts if self.start_ts is not None else now
        elapsed = max(0.0, now - start)
        span = max(1.0, min(self.window_s, elapsed))
        topics = []
        for name, t in self._topics.items():
            in_window = sum(1 for ts in t.recent if now - self.window_s < ts <= now)
            topics.append(TopicSummary(
                name=name, delivered=t.delivered, rejected=dict(sorted(t.rejected.items())),
                duplicates=t.duplicates, bytes=t.bytes, rate_window=round(in_window / span, 3),
                rate_avg=round(t.delivered / max(1.0, elapsed), 3), kinds=dict(sorted(t.kinds.items())),
                peers=len(t.peers), mesh=len(t.mesh),
            ))
        delays = {name: s for name, samples in self._delays.items() if (s := delay_stats(samples)) is not None}
        timeline: list[TimelineEntry] = []
        entries = sorted(self._timeline, key=lambda e: e[0])
        for i, (ts, topic, kind, what, peer) in enumerate(entries):
            prev = entries[i - 1][0] if i else ts
            timeline.append(TimelineEntry(ts=ts, offset_s=round(ts - entries[0][0], 6), delta_s=round(ts - prev, 6),
                                          topic=topic, kind=kind, what=what, peer=peer))
        return Summary(
            start_ts=start, end_ts=now, events=self.events, window_s=self.window_s, topics=tuple(topics),
            peers=len(self._connected), grafts=self.grafts, prunes=self.prunes,
            head=Head(self._finalized, *self._consensus), delays=delays, follow_task=self.follow_task,
            timeline=tuple(timeline),
        )


def _int(value: FieldValue | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _short(value: FieldValue | None) -> str:
    return str(value)[:16] if value is not None else "?"


def _describe(ev: TraceEvent) -> str:
    """One line saying what a task-related message was."""
    f = ev.fields
    if ev.topic == "tx":
        extra = ""
        if ev.kind == "Assign":
            extra = f" to provider {_short(f.get('provider'))} at {f.get('unit_price')}"
        return f"{ev.kind} tx from {_short(f.get('sender'))} nonce {f.get('nonce')}{extra}"
    if ev.kind == "SignedAnnounce":
        return (f"announced: {f.get('kernel')}, max unit price {f.get('max_unit_price')}, "
                f"bids until {f.get('bid_deadline')}")
    if ev.kind == "BidMessage":
        return f"bid {f.get('unit_price')} from {_short(f.get('provider'))}, ~{f.get('est_seconds')} s"
    if ev.kind == "SignedDecline":
        return f"declined by {_short(f.get('provider'))}: {f.get('decline')}"
    return ev.kind or ev.event.value
