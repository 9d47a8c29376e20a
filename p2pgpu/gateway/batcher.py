"""Dynamic batching for the inference gateway: which waiting requests go out together, and when.

Concurrent inference requests for one model are joined into one stream item
(a ``stream_infer`` session with ``rows``: each item is a batch of up to
``rows`` samples), as TF Serving's batching and Triton's dynamic batcher do.
The rule here is "batch when busy": while the session has room in its window
(fewer than its K items unanswered) a request goes out at once, so a lone
caller pays no batching delay; while every slot of the window is taken,
requests queue, and the next free slot takes as many as fit in one item.
Under load items grow toward ``max_rows``; at light load they stay small.
``max_delay_s`` (0 by default) holds a non-full item back that long for
company even when there is room, for operators who trade latency for
fewer, fuller units (a unit is one item, whatever its rows).

Pure and clock-free: the shell passes ``now`` and asks :meth:`take` whenever
something changed (a request arrived, an answer freed a slot, the deadline
from :meth:`next_deadline` passed). Requests keep their order; a batch that
failed on a lost session is put back at the front (:meth:`requeue`), so
failover does not send anyone to the back of the line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BatchPolicy", "DynamicBatcher", "QueueFull"]


class QueueFull(Exception):
    """More rows are waiting than the gateway queues for one model: the caller should back off."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How big an item may get, how long a non-full one may wait, how much may queue."""

    max_rows: int = 32
    """Samples per stream item at most (the session's ``rows``)."""
    max_delay_s: float = 0.0
    """Hold a non-full item this long for more requests, even with room in the window."""
    max_queued_rows: int = 8192
    """Rows waiting for one model beyond which new requests are refused (429), not queued."""

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {self.max_delay_s}")
        if self.max_queued_rows < self.max_rows:
            raise ValueError(f"max_queued_rows ({self.max_queued_rows}) must be at least max_rows ({self.max_rows})")


@dataclass(frozen=True, slots=True)
class _Waiting:
    key: int
    rows: int
    since: float


class DynamicBatcher:
    """A FIFO of requests (``key``, ``rows``) that :meth:`take` cuts into batches of at most ``max_rows`` rows."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._queue: deque[_Waiting] = deque()
        self._rows = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return self._rows

    def add(self, key: int, rows: int, now: float) -> None:
        """Queue a request of ``rows`` samples; raises :class:`QueueFull` past ``max_queued_rows``.

        A request larger than one item is a caller's bug: the codecs refuse
        batches above ``max_rows`` before they get here.
        """
        if not 1 <= rows <= self.policy.max_rows:
            raise ValueError(f"a request carries 1 to {self.policy.max_rows} rows, got {rows}")
        if self._rows + rows > self.policy.max_queued_rows:
            raise QueueFull(f"{self._rows} rows already wait for this model (limit {self.policy.max_queued_rows})")
        self._queue.append(_Waiting(key, rows, now))
        self._rows += rows

    def requeue(self, keys_rows: Iterable[tuple[int, int]], now: float) -> None:
        """Put a failed batch back at the front, in its order (it is not refused for the queue limit)."""
        for key, rows in reversed(list(keys_rows)):
            self._queue.appendleft(_Waiting(key, rows, now))
            self._rows += rows

    def drop(self, key: int) -> bool:
        """Forget a waiting request (its caller gave up); False if it is not waiting."""
        for waiting in self._queue:
            if waiting.key == key:
                self._queue.remove(waiting)
                self._rows -= waiting.rows
                return True
        return False

    def drain(self) -> list[int]:
        """Every waiting key, oldest first, and an empty queue (the model cannot be served)."""
        keys = [w.key for w in self._queue]
        self._queue.clear()
        self._rows = 0
        return keys

    def next_deadline(self) -> float | None:
        """When the oldest waiting request stops waiting for company (None: nothing waits)."""
        if not self._queue:
            return None
        return self._queue[0].since + self.policy.max_delay_s

    def take(self, now: float, *, room: bool) -> list[tuple[int, int]] | None:
        """The next batch as (key, rows) pairs, oldest first, or None if nothing should go out yet.

        ``room``: the session can take an item now. Without room nothing goes
        out (requests gather for the next slot). With room, a batch goes out
        if it is full or its oldest request has waited ``max_delay_s``.
        """
        if not room or not self._queue:
            return None
        full = self._rows >= self.policy.max_rows
        if not full and now < self._queue[0].since + self.policy.max_delay_s:
            return None
        batch: list[tuple[int, int]] = []
        rows = 0
        while self._queue and rows + self._queue[0].rows <= self.policy.max_rows:
            waiting = self._queue.popleft()
            batch.append((waiting.key, waiting.rows))
            rows += waiting.rows
        self._rows -= rows
        return batch
