"""The catch-up machine on its own: proof and claims in, sync requests and its own timer out.

The engine tests drive catch-up through whole engines; these drive :class:`CatchUp` directly with a
judge the test controls, step by step, as h11's tests drive one side of a connection.
"""

from __future__ import annotations

from ledger.codec import Record
from ledger.consensus import (
    UNKNOWN_COMMITTEE,
    CatchUp,
    Claim,
    ConsensusConfig,
    RejectMessage,
    RequestSync,
    ScheduleSync,
    ScheduleTimeout,
    SyncTimerFired,
    TimeoutFired,
    TimeoutStep,
)

CONFIG = ConsensusConfig(sync_wait_s=0.2, sync_retry_s=0.5, sync_retry_max_s=4.0, max_claim_requests=2, sync_batch=8)
NOTHING = Record  # a claim's message is only handed to the judge: any value will do


class Judge:
    """Says what the test tells it to of every claim (UNKNOWN_COMMITTEE until told otherwise)."""

    def __init__(self) -> None:
        self.verdict: str | None = UNKNOWN_COMMITTEE
        self.asked: list[Claim] = []

    def __call__(self, claim: Claim) -> str | None:
        self.asked.append(claim)
        return self.verdict


def timers(out) -> list[ScheduleSync]:
    return [a for a in out if isinstance(a, ScheduleSync)]


def requests(out) -> list[RequestSync]:
    return [a for a in out if isinstance(a, RequestSync)]


def test_each_timer_kind_fires_its_own_event() -> None:
    assert ScheduleTimeout(3, 1, TimeoutStep.PREVOTE, 0.5).fired() == TimeoutFired(3, 1, TimeoutStep.PREVOTE)
    assert ScheduleSync(7, 0.5).fired() == SyncTimerFired(7)


def test_proof_one_height_ahead_waits_a_moment_and_two_ahead_asks_at_once() -> None:
    for ahead, delay in ((1, CONFIG.sync_wait_s), (2, 0.0)):
        machine, out = CatchUp(CONFIG, 5, Judge()), []
        machine.note_proven(5 + ahead, "p", out)
        assert [t.delay_s for t in timers(out)] == [delay] and machine.proven == 5 + ahead
        fired, out = timers(out)[0].fired(), []
        machine.on_timer(fired, out)
        assert requests(out) == [RequestSync(5, "p", CONFIG.sync_batch)]


def test_only_the_newest_arming_counts_and_generations_never_repeat() -> None:
    machine, out = CatchUp(CONFIG, 1, Judge()), []
    machine.note_claim(Claim(9, "a", NOTHING), out)  # arms a claim timer
    machine.note_proven(3, "b", out)  # proof does not wait for the claim's: re-arms
    first, second = timers(out)
    assert first.generation != second.generation
    out = []
    machine.on_timer(first.fired(), out)
    assert out == []  # superseded
    machine.on_timer(second.fired(), out)
    assert requests(out) == [RequestSync(1, "b", CONFIG.sync_batch)]
    machine.on_timer(second.fired(), out := [])
    assert out == []  # fired once already: nothing pending under that generation


def test_an_unproven_claim_is_asked_about_a_few_times_with_backoff_then_dropped() -> None:
    machine, out = CatchUp(CONFIG, 1, Judge()), []
    machine.note_claim(Claim(100, "liar", NOTHING), out)
    delays, made = [], []
    timer = timers(out)[-1]
    while timer is not None:
        delays.append(timer.delay_s)
        machine.on_timer(timer.fired(), out := [])
        made += requests(out)
        machine.on_answer(0, 0, None, out)  # nobody had anything
        timer = timers(out)[-1] if timers(out) else None
    assert made == [RequestSync(1, "liar", CONFIG.sync_batch)] * CONFIG.max_claim_requests
    assert delays == [0.0, 0.5, 1.0] and machine.claims_dropped == 1 and machine.proven == 1


def test_a_claim_is_judged_when_a_commit_makes_its_committee_known() -> None:
    for verdict, rejected, proven in ((None, [], 7), ("bad_signature", [("liar", "bad_signature")], 1)):
        judge = Judge()
        machine, out = CatchUp(CONFIG, 1, judge), []
        machine.note_claim(Claim(7, "liar", NOTHING), out)
        machine.on_commit(2, out := [])
        assert out == [] and machine.proven == 1  # still unknown: kept
        judge.verdict = verdict
        machine.on_commit(3, out := [])
        assert [(r.peer, r.reason) for r in out if isinstance(r, RejectMessage)] == rejected
        assert machine.proven == proven


def test_a_full_batch_keeps_asking_for_the_rest_until_an_answer_is_lost() -> None:
    machine, out = CatchUp(CONFIG, 1, Judge()), []
    machine.on_commit(9, out)  # the engine applied the 8 blocks of the answer, then reports the answer
    machine.on_answer(CONFIG.sync_batch, CONFIG.sync_batch, "server", out)
    assert machine.catching_up and [t.delay_s for t in timers(out)] == [0.0]
    machine.on_timer(timers(out)[-1].fired(), out := [])
    assert requests(out) == [RequestSync(9, "server", CONFIG.sync_batch)]
    assert [t.delay_s for t in timers(out)] == [CONFIG.sync_retry_max_s]
    machine.on_timer(timers(out)[-1].fired(), out := [])  # ... and the answer never came
    assert out == [] and not machine.catching_up
