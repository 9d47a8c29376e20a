"""BoundedBytesMap: held data bounded by entries and by bytes, the oldest going first, each taken once."""

from __future__ import annotations

import pytest

from p2pgpu.boundedmap import BoundedBytesMap


def test_the_oldest_entries_go_first_to_keep_both_bounds() -> None:
    held: BoundedBytesMap[str, bytes] = BoundedBytesMap(3, 10)
    for key in "abc":
        held.put(key, key.encode() * 3, 3)
    assert len(held) == 3 and held.nbytes == 9
    held.put("d", b"dd", 2)  # four entries: "a" goes
    assert "a" not in held and len(held) == 3 and held.nbytes == 8
    held.put("e", b"e" * 6, 6)  # 14 bytes: "b" and "c" go
    assert list(k for k in "abcde" if k in held) == ["d", "e"] and held.nbytes == 8
    held.put("big", b"x" * 11, 11)  # over max_bytes on its own: not kept, and everything older went too
    assert len(held) == 0 and held.nbytes == 0


def test_a_value_is_taken_once_and_a_replaced_one_counts_once() -> None:
    held: BoundedBytesMap[str, str] = BoundedBytesMap(4, 100)
    held.put("k", "first", 40)
    held.put("k", "second", 30)
    assert len(held) == 1 and held.nbytes == 30
    assert held.pop("k") == "second" and held.pop("k") is None and held.nbytes == 0


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_entries >= 1"):
        BoundedBytesMap(0, 10)
