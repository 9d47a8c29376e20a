"""One engine at a time, driven through Algorithm 1's cases by hand (the test plays the other validators)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ledger.committee import verify_certificate
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    BlocksSynced,
    Broadcast,
    Commit,
    ConsensusConfig,
    MessageReceived,
    RejectMessage,
    ReportEvidence,
    RequestSync,
    ScheduleSync,
    ScheduleTimeout,
    SignedProposal,
    Step,
    SyncTimerFired,
    TimeoutFired,
    TimeoutStep,
    VoteMessage,
    precheck_message,
)
from ledger.signer_guard import SignerGuard
from ledger.transition import committee_for_height
from ledger.votes import NIL_BLOCK, Vote, VoteStep

from .conftest import Harness


def sent_votes(actions, step: VoteStep) -> list[bytes]:
    return [
        a.message.signed.vote.block_hash
        for a in actions
        if isinstance(a, Broadcast) and isinstance(a.message, VoteMessage) and a.message.signed.vote.step == step
    ]


def timeouts(actions, step: TimeoutStep) -> list[ScheduleTimeout]:
    return [a for a in actions if isinstance(a, ScheduleTimeout) and a.step == step]


def sync_timers(actions) -> list[ScheduleSync]:
    return [a for a in actions if isinstance(a, ScheduleSync)]


def deliver(engine, *messages) -> list:
    out = []
    for m in messages:
        out += engine.handle(MessageReceived(m, "peer"))
    return out


def bystander(h: Harness, rounds: int = 3) -> str:
    """A validator that proposes in none of the first ``rounds`` rounds (so the test plays every proposer)."""
    proposers = {h.proposer(r) for r in range(rounds)}
    for name in ("v0", "v1", "v2", "v3"):
        if name not in proposers:
            return name
    pytest.skip("every validator proposes in the first rounds with this genesis")


def others(h: Harness, me: str) -> list[str]:
    return [n for n in ("v0", "v1", "v2", "v3") if n != me]


def test_prevote_for_valid_proposal_then_lock_on_polka(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    block = harness.block(0)
    out = deliver(e, harness.proposal(0, block))
    assert sent_votes(out, VoteStep.PREVOTE) == [block.block_hash()]
    assert e.step == Step.PREVOTE and e.locked_round == -1
    a, b, _c = others(harness, me)
    out = deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, block.block_hash()))
    assert sent_votes(out, VoteStep.PRECOMMIT) == []  # 2 of 4 is no polka
    out = deliver(e, harness.vote(b, 0, VoteStep.PREVOTE, block.block_hash()))
    assert sent_votes(out, VoteStep.PRECOMMIT) == [block.block_hash()]
    assert e.locked_round == 0 and e.locked_value == block
    assert e.valid_round == 0 and e.step == Step.PRECOMMIT


def test_prevote_nil_on_invalid_proposal(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    good = harness.block(0)
    bad = replace(good, header=replace(good.header, state_root=b"\x13" * 32))
    out = deliver(e, harness.proposal(0, bad))
    assert sent_votes(out, VoteStep.PREVOTE) == [NIL_BLOCK]
    assert "state root" in e.verdicts[bad.block_hash()].reason


def test_proposal_from_the_wrong_validator_is_rejected(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    sp = harness.proposal(0, harness.block(0))
    impostor = next(n for n in others(harness, me) if n != harness.proposer(0))
    out = deliver(e, replace(sp, proposer=harness.net.address(impostor)))
    assert any(isinstance(a, RejectMessage) for a in out)
    assert sent_votes(out, VoteStep.PREVOTE) == []
    out = deliver(e, replace(sp, signature=harness.vote(me, 0, VoteStep.PREVOTE, NIL_BLOCK).signed.signature))
    assert any(isinstance(a, RejectMessage) and "signature" in a.reason for a in out)


def test_timeouts_grow_per_round_and_f_plus_one_skips_rounds(harness: Harness) -> None:
    cfg = ConsensusConfig()
    me = bystander(harness, 3)
    e = harness.engine(me, config=cfg)
    out = e.start()
    assert [t.delay_s for t in timeouts(out, TimeoutStep.PROPOSE)] == [cfg.timeout_propose(0)]
    # propose timeout -> prevote nil
    out = e.handle(TimeoutFired(1, 0, TimeoutStep.PROPOSE))
    assert sent_votes(out, VoteStep.PREVOTE) == [NIL_BLOCK]
    a, b, c = others(harness, me)
    out = deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK), harness.vote(b, 0, VoteStep.PREVOTE, b"\x01" * 32))
    prevote_timeouts = timeouts(out, TimeoutStep.PREVOTE)
    assert [t.delay_s for t in prevote_timeouts] == [cfg.timeout_prevote(0)]  # 2/3 of anything: line 34
    out = e.handle(TimeoutFired(1, 0, TimeoutStep.PREVOTE))
    assert sent_votes(out, VoteStep.PRECOMMIT) == [NIL_BLOCK]
    out = deliver(e, harness.vote(a, 0, VoteStep.PRECOMMIT, NIL_BLOCK), harness.vote(b, 0, VoteStep.PRECOMMIT, NIL_BLOCK))
    assert [t.delay_s for t in timeouts(out, TimeoutStep.PRECOMMIT)] == [cfg.timeout_precommit(0)]
    out = e.handle(TimeoutFired(1, 0, TimeoutStep.PRECOMMIT))
    assert e.round == 1
    assert [t.delay_s for t in timeouts(out, TimeoutStep.PROPOSE)] == [cfg.timeout_propose(1)]
    assert cfg.timeout_propose(1) > cfg.timeout_propose(0)
    # a stale timeout from round 0 changes nothing
    assert e.handle(TimeoutFired(1, 0, TimeoutStep.PROPOSE)) == [] and e.step == Step.PROPOSE
    # f+1 (by stake: more than 1/3) in round 3 -> jump there (line 55)
    out = deliver(e, harness.vote(a, 3, VoteStep.PREVOTE, NIL_BLOCK))
    assert e.round == 1
    out = deliver(e, harness.vote(c, 3, VoteStep.PRECOMMIT, NIL_BLOCK))
    assert e.round == 3
    assert [t.delay_s for t in timeouts(out, TimeoutStep.PROPOSE)] == [cfg.timeout_propose(3)]
    assert cfg.timeout_precommit(3) > cfg.timeout_precommit(0) and cfg.timeout_prevote(3) > cfg.timeout_prevote(0)


def _to_round(e, h: Harness, me: str, target: int) -> None:
    """Move ``e`` to ``target`` with f+1 nil precommits in that round from others."""
    a, b, _ = others(h, me)
    deliver(e, h.vote(a, target, VoteStep.PRECOMMIT, NIL_BLOCK), h.vote(b, target, VoteStep.PRECOMMIT, NIL_BLOCK))
    assert e.round == target


def test_locked_validator_prevotes_nil_for_other_block_then_unlocks_on_later_polka(harness: Harness) -> None:
    me = bystander(harness, 3)
    e = harness.engine(me)
    e.start()
    a, b, c = others(harness, me)
    block0 = harness.block(0)
    deliver(e, harness.proposal(0, block0))
    deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, block0.block_hash()), harness.vote(b, 0, VoteStep.PREVOTE, block0.block_hash()))
    assert e.locked_round == 0
    # round 1: a different block, no justification -> we stay locked and prevote nil (line 22)
    e.handle(TimeoutFired(1, 0, TimeoutStep.PRECOMMIT))
    assert e.round == 1
    block1 = harness.block(1, timestamp_ms=7)
    assert block1.block_hash() != block0.block_hash()
    out = deliver(e, harness.proposal(1, block1))
    assert sent_votes(out, VoteStep.PREVOTE) == [NIL_BLOCK]
    # we move on to round 2 before the others' round-1 polka on block1 reaches us
    _to_round(e, harness, me, 2)
    for n in (a, b, c):
        deliver(e, harness.vote(n, 1, VoteStep.PREVOTE, block1.block_hash()))
    assert e.locked_round == 0 and e.locked_value == block0
    # round 2 re-proposes block1 justified by the round-1 polka: we unlock and prevote it (line 28)
    out = deliver(e, harness.proposal(2, block1, pol_round=1))
    assert sent_votes(out, VoteStep.PREVOTE) == [block1.block_hash()]
    # and with the round-2 polka we lock on it (line 36)
    deliver(e, harness.vote(a, 2, VoteStep.PREVOTE, block1.block_hash()), harness.vote(b, 2, VoteStep.PREVOTE, block1.block_hash()))
    assert e.locked_round == 2 and e.locked_value == block1 and e.valid_round == 2


def test_polka_seen_while_prevoting_locks_on_the_new_block(harness: Harness) -> None:
    me = bystander(harness, 2)
    e = harness.engine(me)
    e.start()
    a, b, c = others(harness, me)
    block0 = harness.block(0)
    deliver(e, harness.proposal(0, block0))
    deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, block0.block_hash()), harness.vote(b, 0, VoteStep.PREVOTE, block0.block_hash()))
    e.handle(TimeoutFired(1, 0, TimeoutStep.PRECOMMIT))
    block1 = harness.block(1, timestamp_ms=7)
    out = deliver(e, harness.proposal(1, block1))
    assert sent_votes(out, VoteStep.PREVOTE) == [NIL_BLOCK]  # locked on block0
    out = []
    for n in (a, b, c):
        out += deliver(e, harness.vote(n, 1, VoteStep.PREVOTE, block1.block_hash()))
    # still in the prevote step when the polka completes: lock moves to block1 and we precommit it
    assert sent_votes(out, VoteStep.PRECOMMIT) == [block1.block_hash()]
    assert e.locked_round == 1 and e.valid_round == 1


def test_locked_validator_rejects_reproposal_with_older_polka(harness: Harness) -> None:
    me = bystander(harness, 3)
    e = harness.engine(me)
    e.start()
    a, b, c = others(harness, me)
    block0 = harness.block(0)
    block1 = harness.block(1, timestamp_ms=7)
    # a polka for block1 in round 0 is impossible here, so justify with a round-0 polka on another block
    deliver(e, harness.proposal(0, block0))
    deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, block0.block_hash()), harness.vote(b, 0, VoteStep.PREVOTE, block0.block_hash()))
    assert e.locked_round == 0
    _to_round(e, harness, me, 2)
    # block1 re-proposed with pol_round 1 but no polka for it in round 1 was seen: the rule waits
    out = deliver(e, harness.proposal(2, block1, pol_round=1))
    assert sent_votes(out, VoteStep.PREVOTE) == []
    assert e.step == Step.PROPOSE
    out = e.handle(TimeoutFired(1, 2, TimeoutStep.PROPOSE))
    assert sent_votes(out, VoteStep.PREVOTE) == [NIL_BLOCK]
    del c


def test_commit_on_precommits_arriving_in_a_later_round(harness: Harness) -> None:
    me = bystander(harness, 3)
    e = harness.engine(me)
    e.start()
    a, b, c = others(harness, me)
    block0 = harness.block(0)
    deliver(e, harness.proposal(0, block0))
    _to_round(e, harness, me, 2)
    out = deliver(
        e,
        harness.vote(a, 0, VoteStep.PRECOMMIT, block0.block_hash()),
        harness.vote(b, 0, VoteStep.PRECOMMIT, block0.block_hash()),
    )
    assert not any(isinstance(x, Commit) for x in out)
    out = deliver(e, harness.vote(c, 0, VoteStep.PRECOMMIT, block0.block_hash()))
    commits = [x for x in out if isinstance(x, Commit)]
    assert len(commits) == 1
    fb = commits[0].finalized
    assert fb.block == block0 and fb.certificate.round == 0
    verify_certificate(committee_for_height(harness.state, 1), harness.state.chain_id, fb.certificate,
                       height=1, block_hash=block0.block_hash())
    assert e.height == 2 and e.round == 0 and e.state.height == 1


def test_duplicates_are_idempotent_and_votes_verify_in_aggregate(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    block = harness.block(0)
    sp = harness.proposal(0, block)
    deliver(e, sp, sp)
    a, b, c = others(harness, me)
    pv = [harness.vote(n, 0, VoteStep.PREVOTE, block.block_hash()) for n in (a, b, c)]
    out = deliver(e, *pv, *pv)
    assert sent_votes(out, VoteStep.PRECOMMIT) == [block.block_hash()]
    assert harness.verifier.aggregate_checks >= 1
    assert harness.verifier.single_checks <= 1  # the proposal's signature; votes went through the aggregate
    pc = [harness.vote(n, 0, VoteStep.PRECOMMIT, block.block_hash()) for n in (a, b)]
    out = deliver(e, *pc, *pc)
    assert len([x for x in out if isinstance(x, Commit)]) == 1


def test_bad_vote_signature_is_found_by_fallback_and_dropped(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    block = harness.block(0)
    deliver(e, harness.proposal(0, block))
    a, b, c = others(harness, me)
    forged = harness.vote(a, 0, VoteStep.PREVOTE, block.block_hash())
    forged = VoteMessage(replace(forged.signed, signature=harness.vote(b, 0, VoteStep.PREVOTE, block.block_hash()).signed.signature))
    out = deliver(e, forged, harness.vote(b, 0, VoteStep.PREVOTE, block.block_hash()))
    # 3 of 4 counted until checked: the aggregate fails, singles find the forgery, no polka
    assert sent_votes(out, VoteStep.PRECOMMIT) == []
    assert harness.verifier.aggregate_failures == 1
    out = deliver(e, harness.vote(c, 0, VoteStep.PREVOTE, block.block_hash()))
    assert sent_votes(out, VoteStep.PRECOMMIT) == [block.block_hash()]


def test_equivocation_becomes_evidence_once(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    a = others(harness, me)[0]
    v1 = harness.vote(a, 0, VoteStep.PREVOTE, b"\x05" * 32)
    v2 = harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK)
    out = deliver(e, v1, v2, v2)
    ev = [x for x in out if isinstance(x, ReportEvidence)]
    assert len(ev) == 1
    assert {ev[0].vote_a.vote.block_hash, ev[0].vote_b.vote.block_hash} == {b"\x05" * 32, NIL_BLOCK}
    v3 = harness.vote(a, 0, VoteStep.PREVOTE, b"\x06" * 32)
    assert not [x for x in deliver(e, v3) if isinstance(x, ReportEvidence)]


def test_future_height_messages_are_buffered_and_far_ones_trigger_sync(harness: Harness) -> None:
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    a = others(harness, me)[0]
    out = deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK, height=2))
    syncs = sync_timers(out)
    assert syncs and syncs[0].delay_s > 0
    out = e.handle(SyncTimerFired(0))
    assert [x for x in out if isinstance(x, RequestSync)] == [RequestSync(1, "peer")]


def test_block_sync_applies_certified_blocks_and_rejects_bad_certificates(harness: Harness, net4) -> None:
    from ledger.blocks import FinalizedBlock
    from ledger.devtools import certify

    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    block = harness.block(0)
    committee = committee_for_height(harness.state, 1)
    keys = net4.validator_keys()
    bad = certify(committee, keys, harness.state.chain_id, 1, 0, block.block_hash(), signers=list(keys)[:2])
    out = e.handle(BlocksSynced((FinalizedBlock(block, bad),), "p"))
    assert any(isinstance(x, RejectMessage) and x.reason == "bad_certificate" and "2/3" in x.detail for x in out)
    assert e.height == 1
    good = certify(committee, keys, harness.state.chain_id, 1, 0, block.block_hash())
    out = e.handle(BlocksSynced((FinalizedBlock(block, good),), "p"))
    assert [x.finalized.block for x in out if isinstance(x, Commit)] == [block]
    assert e.height == 2


def test_restarted_engine_refuses_to_sign_conflicting_vote(harness: Harness, tmp_path) -> None:
    me = bystander(harness, 1)
    path = tmp_path / "guard"
    e = harness.engine(me, guard=SignerGuard(harness.state.chain_id, path))
    e.start()
    block = harness.block(0)
    out = deliver(e, harness.proposal(0, block))
    assert sent_votes(out, VoteStep.PREVOTE) == [block.block_hash()]
    # "killed" before anything else reached the network; a new engine from the same file
    e2 = harness.engine(me, guard=SignerGuard(harness.state.chain_id, path))
    e2.start()
    out = e2.handle(TimeoutFired(1, 0, TimeoutStep.PROPOSE))  # would prevote nil at (1, 0)
    assert sent_votes(out, VoteStep.PREVOTE) == [] and e2.refused_signatures == 1
    # the same vote again is fine (deterministic BLS: the same bytes the dead process may have sent)
    e3 = harness.engine(me, guard=SignerGuard(harness.state.chain_id, path))
    e3.start()
    out = deliver(e3, harness.proposal(0, block))
    assert sent_votes(out, VoteStep.PREVOTE) == [block.block_hash()]


def test_wire_messages_round_trip(harness: Harness) -> None:
    block = harness.block(0)
    for m in (harness.proposal(0, block), harness.vote("v1", 0, VoteStep.PRECOMMIT, block.block_hash())):
        assert CONSENSUS_MESSAGES.decode(CONSENSUS_MESSAGES.encode(m)) == m
    assert isinstance(CONSENSUS_MESSAGES.decode(CONSENSUS_MESSAGES.encode(harness.proposal(0, block))), SignedProposal)


def test_timeout_commit_delays_only_the_next_proposal(harness: Harness) -> None:
    """After a commit, the next proposer waits ``timeout_commit_s`` before proposing; then it proposes."""
    from ledger.committee import compute_proposer

    committee = committee_for_height(harness.state, 2)
    me = harness.name_of(compute_proposer(committee, 2, 0))
    e = harness.engine(me, config=ConsensusConfig(timeout_commit_s=0.7))
    started = e.start()
    own = [a.message for a in started if isinstance(a, Broadcast) and isinstance(a.message, SignedProposal)]
    proposal = own[0] if own else harness.proposal(0, harness.block(0))
    block_hash = proposal.block.block_hash()
    if not own:
        deliver(e, proposal)
    out = deliver(e, *(harness.vote(n, 0, VoteStep.PRECOMMIT, block_hash) for n in others(harness, me)))
    assert any(isinstance(x, Commit) for x in out) and e.height == 2
    assert not [x for x in out if isinstance(x, Broadcast) and isinstance(x.message, SignedProposal)]
    pause = timeouts(out, TimeoutStep.COMMIT)
    assert [(t.height, t.round, t.delay_s) for t in pause] == [(2, 0, 0.7)]
    assert timeouts(out, TimeoutStep.PROPOSE)[0].delay_s == pytest.approx(0.7 + e.config.timeout_propose(0))
    fired = e.handle(TimeoutFired(2, 0, TimeoutStep.COMMIT))
    proposals = [x.message for x in fired if isinstance(x, Broadcast) and isinstance(x.message, SignedProposal)]
    assert len(proposals) == 1 and proposals[0].proposal.height == 2
    assert not e.handle(TimeoutFired(2, 0, TimeoutStep.COMMIT))  # a second firing proposes nothing more


def test_engine_reports_the_highest_height_proven_to_exist(harness: Harness) -> None:
    """A node behind must know it (its health says syncing), even before it syncs; but only on proof.

    Heights 1..4 are epoch 0, whose committee the engine knows: a vote there is checked when it would
    raise the figure, and a forged one is rejected. Height 9 is in an epoch it cannot check yet: a
    vote there, forged or not, proves nothing (anyone can send one).
    """
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    assert e.highest_seen_height == 1
    a, b, _ = others(harness, me)
    out = deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, b"\x07" * 32, height=3))
    assert e.highest_seen_height == 3 and e.height == 1
    assert [t.delay_s for t in sync_timers(out)] == [0.0]  # two heights ahead: sync now
    real = harness.vote(a, 0, VoteStep.PREVOTE, b"\x07" * 32, height=4).signed
    forged = VoteMessage(replace(harness.vote(b, 0, VoteStep.PREVOTE, b"\x07" * 32, height=4).signed,
                                 signature=real.signature))
    out = deliver(e, forged)
    assert [(x.peer, x.reason) for x in out if isinstance(x, RejectMessage)] == [("peer", "bad_signature")]
    assert e.highest_seen_height == 3
    for vote in (harness.vote(a, 0, VoteStep.PREVOTE, b"\x07" * 32, height=9), VoteMessage(replace(real, vote=replace(
            real.vote, height=10**12)))):
        out = deliver(e, vote)
        assert not [x for x in out if isinstance(x, RejectMessage)]  # no committee to judge it by: no fault
        assert e.highest_seen_height == 3


def armed_sync(actions) -> ScheduleSync | None:
    """The SYNC timer the engine armed last in ``actions`` (the one that counts: earlier ones are stale)."""
    armed = sync_timers(actions)
    return armed[-1] if armed else None


def play_sync(e, actions, answer=lambda request: (), limit: int = 100) -> tuple[list[tuple[float, RequestSync]], list]:
    """Play the host: fire each SYNC timer the engine arms and answer each request with ``answer(request)``.

    Returns each request with the delay of the timer that led to it, and every action on the way. Stops
    when the engine arms no timer, or after ``limit`` requests.
    """
    made, actions = [], list(actions)
    timer = armed_sync(actions)
    while timer is not None and len(made) < limit:
        out = e.handle(SyncTimerFired(timer.generation))
        for request in [x for x in out if isinstance(x, RequestSync)]:
            made.append((timer.delay_s, request))
            out += e.handle(BlocksSynced(answer(request), None))
        actions += out
        timer = armed_sync(out)
    return made, actions


def test_an_unproven_claim_costs_a_few_spaced_sync_requests_then_is_dropped(harness: Harness) -> None:
    """One garbage vote for a far height must not keep a node polling its peers (nor think itself behind)."""
    me = bystander(harness, 1)
    config = ConsensusConfig(sync_retry_s=0.5, sync_retry_max_s=4.0, max_claim_requests=3)
    e = harness.engine(me, config=config)
    e.start()
    a = others(harness, me)[0]
    garbage = VoteMessage(replace(harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK).signed,
                                  vote=Vote(height=2**60, round=0, step=VoteStep.PREVOTE, block_hash=NIL_BLOCK)))
    made, _ = play_sync(e, deliver(e, garbage))
    assert [r for _, r in made] == [RequestSync(1, "peer", config.sync_batch)] * 3
    assert [d for d, _ in made] == [0.0, 0.5, 1.0]  # nobody had a block: each retry waits twice as long
    assert e.claims_dropped == 1 and e.highest_seen_height == 1 and not e.catching_up
    # a new claim does not reset the pace: its first request waits where the last one left off
    made, _ = play_sync(e, deliver(e, VoteMessage(replace(garbage.signed, vote=replace(garbage.signed.vote,
                                                                                     height=2**61)))))
    assert [d for d, _ in made] == [2.0, 4.0, 4.0]
    assert e.claims_dropped == 2 and e.highest_seen_height == 1
    # nothing else of the engine's asks for blocks meanwhile (the rebroadcast timer used to)
    out = e.handle(TimeoutFired(1, e.round, TimeoutStep.REBROADCAST))
    assert not [x for x in out if isinstance(x, RequestSync)] and armed_sync(out) is None


def test_a_claim_is_judged_once_its_committee_is_known(harness: Harness, net4) -> None:
    """A node an epoch behind syncs on a claim; once its state knows the claim's epoch, the claim is judged.

    Peers serve blocks 1-4 in batches of two; the claim is a vote for height 6 (epoch 1), which the
    engine cannot check at genesis. After block 4 it can: a real vote proves the network is ahead (health
    says syncing, and the engine keeps asking, ever more patiently); a forged one charges its sender.
    """
    from ledger.devtools import DevChain

    chain = DevChain(net4)
    while chain.state.height < 4:
        chain.produce()

    def answer(request: RequestSync) -> tuple:
        return tuple(chain.blocks[request.from_height - 1 : request.from_height - 1 + request.max_blocks])

    me = bystander(harness, 1)
    for forged in (False, True):
        e = harness.engine(me, config=ConsensusConfig(sync_batch=2, sync_retry_s=0.5, sync_retry_max_s=2.0))
        e.start()
        a, b, _ = others(harness, me)
        vote = harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK, height=6)
        if forged:  # a's signature on a vote in b's name
            vote = VoteMessage(replace(vote.signed, validator=harness.net.address(b)))
        out = deliver(e, vote)
        assert e.highest_seen_height == 1 and not [x for x in out if isinstance(x, RejectMessage)]
        made, actions = play_sync(e, out, answer, limit=8)
        assert e.height == 5  # blocks 1-4 applied
        rejected = [(x.peer, x.reason) for x in actions if isinstance(x, RejectMessage)]
        # full batches go on at once, and then the engine asks once more (the peer may have had more)
        assert [(d, r.from_height) for d, r in made[:3]] == [(0.0, 1), (0.0, 3), (0.0, 5)]
        if forged:
            assert rejected == [("peer", "bad_signature")] and e.highest_seen_height == 5
            assert len(made) == 3 and not e.catching_up
        else:
            assert rejected == [] and e.highest_seen_height == 6
            # proven, so never dropped: retried from block 5 with a growing wait, up to the cap
            assert [(d, r.from_height) for d, r in made[3:]] == [(0.5, 5), (1.0, 5), (2.0, 5), (2.0, 5), (2.0, 5)]


def test_a_full_batch_means_catching_up_until_an_answer_says_otherwise(harness: Harness, net4) -> None:
    """Health says syncing while full batches come in; a lost answer does not leave it saying so for ever."""
    from ledger.devtools import DevChain

    chain = DevChain(net4)
    while chain.state.height < 2:
        chain.produce()
    me = bystander(harness, 1)
    e = harness.engine(me, config=ConsensusConfig(sync_batch=2, sync_retry_max_s=3.0))
    e.start()
    a = others(harness, me)[0]
    out = deliver(e, harness.vote(a, 0, VoteStep.PREVOTE, NIL_BLOCK, height=3))  # proof: the network is at 3
    timer = armed_sync(out)
    out = e.handle(SyncTimerFired(timer.generation))
    assert [x for x in out if isinstance(x, RequestSync)] == [RequestSync(1, "peer", 2)]
    out = e.handle(BlocksSynced(tuple(chain.blocks), "server"))
    assert e.height == 3 and e.catching_up  # a full batch: the server may well have more
    timer = armed_sync(out)
    out = e.handle(SyncTimerFired(timer.generation))
    assert [x for x in out if isinstance(x, RequestSync)] == [RequestSync(3, "server", 2)]
    timer = armed_sync(out)
    assert timer.delay_s == 3.0 and e.catching_up  # the answer never comes...
    out = e.handle(SyncTimerFired(timer.generation))
    assert not e.catching_up and not [x for x in out if isinstance(x, RequestSync)] and armed_sync(out) is None


def test_a_vote_found_forged_later_is_reported_with_its_sender(harness: Harness) -> None:
    """Votes are stored unchecked; when another message makes them matter and one fails, its sender is named."""
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    a, b, _c = others(harness, me)
    good = harness.vote(a, 3, VoteStep.PREVOTE, NIL_BLOCK)
    # b's vote carrying a's signature: well formed, in a member's name, and forged
    b_vote = harness.vote(b, 3, VoteStep.PREVOTE, NIL_BLOCK).signed
    forged = VoteMessage(replace(b_vote, signature=good.signed.signature))
    out = e.handle(MessageReceived(forged, "mallory"))
    assert not [x for x in out if isinstance(x, RejectMessage)]  # a quarter of the stake: not checked yet
    out = e.handle(MessageReceived(good, "honest"))  # half the stake in round 3: worth checking now
    assert [(x.peer, x.reason) for x in out if isinstance(x, RejectMessage)] == [("mallory", "bad_signature")]
    assert e.round == 0  # only a's real vote is left in round 3: no f+1, no jump


def test_precheck_rejects_what_a_relay_can_tell_is_wrong(harness: Harness) -> None:
    state, verifier = harness.state, harness.verifier
    good = harness.proposal(0, harness.block(0))
    vote = harness.vote("v1", 0, VoteStep.PREVOTE, NIL_BLOCK)
    assert precheck_message(state, good, verifier) is None
    assert precheck_message(state, vote, verifier) is None
    impostor = next(n for n in ("v0", "v1", "v2", "v3") if n != harness.proposer(0))
    assert precheck_message(state, replace(good, proposer=harness.net.address(impostor)), verifier) == "not_proposer"
    assert precheck_message(state, replace(good, signature=vote.signed.signature), verifier) == "bad_signature"
    outsider = VoteMessage(replace(vote.signed, validator=harness.net.address("c0")))
    assert precheck_message(state, outsider, verifier) == "not_validator"
    bad_step = VoteMessage(replace(vote.signed, vote=replace(vote.signed.vote, step=9)))
    assert precheck_message(state, bad_step, verifier) == "unknown_vote_step"
    # what the relay cannot judge passes: old heights, and epochs whose committee it does not know yet
    old = VoteMessage(replace(outsider.signed, vote=replace(vote.signed.vote, height=0)))
    assert precheck_message(state, old, verifier) is None
    far = VoteMessage(replace(outsider.signed, vote=replace(vote.signed.vote, height=10 * state.params.epoch_length)))
    assert precheck_message(state, far, verifier) is None


def test_a_certificate_the_engine_aggregated_is_not_checked_again_at_commit(harness: Harness) -> None:
    """Chain.commit checks the certificate through the engine's verifier: one it built from verified
    precommits is a cache hit, not another pairing check; a tampered one still fails."""
    from ledger import exceptions as ex

    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    proposal = harness.proposal(0, harness.block(0))
    block_hash = proposal.block.block_hash()
    deliver(e, proposal)
    out = deliver(e, *(harness.vote(n, 0, VoteStep.PRECOMMIT, block_hash) for n in others(harness, me)))
    commit = next(x for x in out if isinstance(x, Commit))
    cert = commit.finalized.certificate
    committee = committee_for_height(harness.state, 1)
    checks = e.verifier.aggregate_checks
    e.verifier.verify_certificate(committee, harness.state.chain_id, cert, height=1, block_hash=block_hash)
    assert e.verifier.aggregate_checks == checks
    forged = replace(cert, aggregate_signature=harness.vote(me, 0, VoteStep.PRECOMMIT, block_hash).signed.signature)
    with pytest.raises(ex.InvalidCertificate):
        e.verifier.verify_certificate(committee, harness.state.chain_id, forged, height=1, block_hash=block_hash)
