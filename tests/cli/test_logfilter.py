"""Third-party warnings repeated per message or peer are folded into one line a window, with a count."""

from __future__ import annotations

import logging

from p2pgpu.logfilter import RepeatFolder


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_repeats_within_the_window_are_folded_and_counted() -> None:
    now = [0.0]
    folder = RepeatFolder(60.0, clock=lambda: now[0])
    template = "pending message queue for peer %s exceeded limit (%d > %d), dropping oldest messages"
    assert folder.filter(_record("libp2p.pubsub.gossipsub", template, "peerA", 101, 100))
    for i in range(500):
        now[0] = i * 0.1
        assert not folder.filter(_record("libp2p.pubsub.gossipsub", template, f"peer{i}", 101, 100))
    now[0] = 61.0
    again = _record("libp2p.pubsub.gossipsub", template, "peerZ", 101, 100)
    assert folder.filter(again)
    assert "[and 500 more like it in the last 60 s]" in again.getMessage() and "peerZ" in again.getMessage()
    assert folder.filter(_record("libp2p.pubsub.gossipsub", "another kind %s", "x"))


def test_our_own_events_are_never_folded() -> None:
    folder = RepeatFolder(60.0, clock=lambda: 0.0)
    for _ in range(3):
        assert folder.filter(_record("p2pgpu.roles", "event=task_progress task=%s", "ab"))
