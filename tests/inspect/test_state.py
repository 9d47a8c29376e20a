"""InspectorState from synthetic event sequences: rates, rejects, duplicates, delays, peers, task timeline."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from p2pgpu.inspect import EventType, InspectorState, TraceEvent, delay_stats
from p2pgpu.inspect.render import render_plain_line, render_summary

E = EventType
T0 = 1_700_000_000.0
TASK = "ab" * 32
OTHER_TASK = "cd" * 32


def ev(dt: float, event: EventType, topic: str = "", **kw) -> TraceEvent:
    return TraceEvent(ts=T0 + dt, event=event, topic=topic, **kw)


def deliver(dt: float, topic: str, kind: str, msg_id: str = "", **fields) -> TraceEvent:
    return ev(dt, E.DELIVER, topic, peer="peerA", msg_id=msg_id, size=100, kind=kind, fields=fields)


def task_life() -> list[TraceEvent]:
    """One task across every topic, interleaved with another task's traffic and consensus."""
    return [
        deliver(0.0, "tx", "PostTask", "01", tx="PostTask", sender="c0" * 20, nonce=0, task_id=TASK),
        deliver(0.1, "tx", "PostTask", "02", tx="PostTask", sender="c0" * 20, nonce=1, task_id=OTHER_TASK),
        deliver(0.5, "consensus", "SignedProposal", "03", height=5, round=0, tasks=[[TASK, "PostTask"]]),
        deliver(1.0, "block", "FinalizedBlock", "04", height=5, round=0, timestamp_ms=int((T0 + 0.6) * 1000),
                tasks=[[TASK, "PostTask"], [OTHER_TASK, "PostTask"]]),
        deliver(1.5, "task", "SignedAnnounce", "05", task_id=TASK, kernel="matmul", max_unit_price=500,
                bid_deadline=10),
        deliver(2.0, "bid", "BidMessage", "06", task_id=TASK, provider="p0" * 20, unit_price=100, est_seconds=3),
        deliver(2.1, "bid", "SignedDecline", "07", task_id=TASK, provider="p1" * 20, decline="busy"),
        deliver(3.0, "tx", "Assign", "08", tx="Assign", sender="c0" * 20, nonce=2, task_id=TASK,
                provider="p0" * 20, unit_price=100),
        deliver(4.0, "block", "FinalizedBlock", "09", height=6, round=1, tasks=[[TASK, "Assign"]]),
    ]


def test_task_timeline_follows_one_task_across_topics_with_timings():
    state = InspectorState(follow_task=TASK[:12])
    state.apply_all(task_life())
    timeline = state.summary().timeline
    assert [(e.offset_s, e.topic, e.what) for e in timeline] == [
        (0.0, "tx", "PostTask tx from c0c0c0c0c0c0c0c0 nonce 0"),
        (0.5, "consensus", "PostTask proposed for height 5 round 0"),
        (1.0, "block", "PostTask in block 5"),
        (1.5, "task", "announced: matmul, max unit price 500, bids until 10"),
        (2.0, "bid", "bid 100 from p0p0p0p0p0p0p0p0, ~3 s"),
        (2.1, "bid", "declined by p1p1p1p1p1p1p1p1: busy"),
        (3.0, "tx", "Assign tx from c0c0c0c0c0c0c0c0 nonce 2 to provider p0p0p0p0p0p0p0p0 at 100"),
        (4.0, "block", "Assign in block 6"),
    ]
    assert [e.delta_s for e in timeline][:3] == [0.0, 0.5, 0.5]


def test_without_follow_task_there_is_no_timeline():
    state = InspectorState()
    state.apply_all(task_life())
    assert state.summary().timeline == ()


def test_follow_task_must_be_hex():
    with pytest.raises(ValueError, match="8 hex digits"):
        InspectorState(follow_task="xyz")


def test_counts_rejects_by_reason_and_duplicates_per_topic():
    state = InspectorState()
    state.apply_all([
        deliver(0.0, "tx", "Transfer", "aa"),
        ev(0.1, E.REJECT, "tx", peer="peerB", reason="malformed"),
        ev(0.2, E.REJECT, "tx", peer="peerB", reason="malformed"),
        ev(0.3, E.REJECT, "tx", peer="peerC", reason="bad-signature"),
        ev(0.4, E.DUPLICATE, "tx", peer="peerC", msg_id="aa"),
        ev(0.5, E.DUPLICATE, "consensus", peer="peerC", msg_id="bb"),
    ])
    s = state.summary()
    tx = s.topic("tx")
    assert (tx.delivered, tx.duplicates, dict(tx.rejected)) == (1, 1, {"bad-signature": 1, "malformed": 2})
    assert tx.kinds == {"Transfer": 1}
    assert s.topic("consensus").duplicates == 1
    assert s.delays["duplicate_lag"].count == 1
    assert s.delays["duplicate_lag"].max_ms == pytest.approx(400.0)


def test_rate_is_over_the_sliding_window_and_average_over_the_whole_run():
    state = InspectorState(window_s=10.0)
    # 20 messages in the first 2 s, then 5 in the last 10 s of a 30 s run
    state.apply_all([deliver(i * 0.1, "consensus", "VoteMessage", height=1, round=0, step="prevote")
                     for i in range(20)])
    state.apply_all([deliver(21.0 + 2 * i, "consensus", "VoteMessage", height=2, round=0, step="prevote")
                     for i in range(5)])
    s = state.summary(now=T0 + 30.0)
    c = s.topic("consensus")
    assert c.rate_window == pytest.approx(0.5)  # 5 in (20, 30]
    assert c.rate_avg == pytest.approx(25 / 30, abs=1e-3)
    assert s.topic("tx").rate_window == 0.0


def test_rate_in_the_first_second_is_not_inflated():
    state = InspectorState(window_s=10.0)
    state.apply_all([deliver(0.0, "tx", "Transfer"), deliver(0.2, "tx", "Transfer")])
    assert state.summary().topic("tx").rate_window == pytest.approx(2.0)  # over at least one second


def test_head_and_delays_from_consensus_and_blocks():
    state = InspectorState()
    state.apply_all([
        deliver(0.00, "consensus", "SignedProposal", height=7, round=0),
        deliver(0.01, "consensus", "VoteMessage", height=7, round=0, step="prevote"),
        deliver(0.03, "consensus", "VoteMessage", height=7, round=0, step="prevote"),
        deliver(0.05, "consensus", "VoteMessage", height=7, round=0, step="prevote"),
        deliver(0.06, "consensus", "VoteMessage", height=7, round=0, step="precommit"),
        deliver(0.07, "consensus", "VoteMessage", height=7, round=0, step="precommit"),
        deliver(0.50, "block", "FinalizedBlock", height=7, round=0, timestamp_ms=int(T0 * 1000) + 300),
        deliver(0.60, "block", "FinalizedBlock", height=7, round=0),  # a second copy of height 7: not timed
        deliver(0.70, "consensus", "VoteMessage", height=8, round=2, step="prevote"),
    ])
    s = state.summary()
    assert (s.head.finalized, s.head.consensus_height, s.head.consensus_round) == (7, 8, 2)
    spread = s.delays["vote_spread"]
    assert spread.count == 3  # two later prevotes, one later precommit
    assert spread.max_ms == pytest.approx(40.0)
    assert s.delays["finality"].count == 1 and s.delays["finality"].p50_ms == pytest.approx(500.0)
    assert s.delays["block_delay"].p50_ms == pytest.approx(200.0, abs=1.0)


def test_delay_stats_percentiles_and_cdf():
    d = delay_stats([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert d is not None
    assert (d.count, d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms) == (100, 50.0, 90.0, 99.0, 100.0)
    cdf = dict(d.cdf)
    assert (cdf[1], cdf[10], cdf[50], cdf[100], cdf[10000]) == (0.01, 0.1, 0.5, 1.0, 1.0)
    assert delay_stats([]) is None


def test_peers_and_mesh_follow_peer_events():
    state = InspectorState()
    state.apply_all([
        ev(0, E.ADD_PEER, peer="A"), ev(0, E.ADD_PEER, peer="B"),
        ev(0, E.JOIN, "tx"),  # our own subscription: no peer
        ev(0, E.JOIN, "tx", peer="A"), ev(0, E.JOIN, "tx", peer="B"),
        ev(1, E.GRAFT, "tx", peer="A"), ev(1, E.GRAFT, "tx", peer="B"),
        ev(2, E.PRUNE, "tx", peer="A"),
        ev(3, E.REMOVE_PEER, peer="B"),
    ])
    s = state.summary()
    assert (s.peers, s.topic("tx").peers, s.topic("tx").mesh, s.grafts, s.prunes) == (1, 1, 0, 2, 1)


def test_rich_rendering_shows_topics_rejects_head_and_timeline():
    state = InspectorState(follow_task=TASK)
    state.apply_all(task_life())
    state.apply(ev(4.5, E.REJECT, "tx", peer="peerB", reason="malformed"))
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render_summary(state.summary(), title="test"))
    text = out.getvalue()
    assert "finalized 6, consensus at 5/0" in text
    assert "malformed 1" in text
    assert "Assign in block 6" in text
    assert f"task {TASK}" in text
    for topic in ("tx", "task", "bid", "consensus", "block"):
        assert f"\n {topic} " in text or f"\n{topic} " in text


def test_plain_line_is_one_line_with_every_topic():
    state = InspectorState()
    state.apply_all(task_life())
    line = render_plain_line(state.summary())
    assert "\n" not in line
    assert "head=6" in line and "tx=" in line and "block=" in line
