"""A map bounded by entries and by bytes, the oldest entry going first: for data held briefly for one reader.

The data plane holds an accepted push's plaintext for the one fetch behind
it; a provider holds a result push made ahead of its commitment. Either
may never be read (the fetch opened the stored copy, the task went to
someone else), so each is bounded by count and by the bytes it holds, and
what is taken is taken once. Not thread-safe: the event loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["BoundedBytesMap"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedBytesMap(Generic[K, V]):
    """At most ``max_entries`` values of at most ``max_bytes`` in all (each put with its size)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 0:
            raise ValueError(f"a bounded map needs max_entries >= 1 and max_bytes >= 0, got {max_entries}, {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def put(self, key: K, value: V, size: int) -> None:
        """Hold ``value`` (``size`` bytes) under ``key``, replacing what was there; then drop the oldest entries
        until both bounds hold (a value over ``max_bytes`` on its own is not kept)."""
        self.pop(key)
        self._items[key] = (value, size)
        self.nbytes += size
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped

    def pop(self, key: K) -> V | None:
        """The value held under ``key``, taken out; None if none is."""
        held = self._items.pop(key, None)
        if held is None:
            return None
        self.nbytes -= held[1]
        return held[0]
