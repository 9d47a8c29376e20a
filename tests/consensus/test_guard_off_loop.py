"""The consensus driver makes the signer guard's record durable off the event loop, and before it publishes.

A gated guard store holds a write until the test releases it. While it waits, a heartbeat task shows the
loop still runs (had the write run on the loop, it could not beat and the gate would time out) and nothing
has been published; the vote goes out only after its record is durable. A store that "crashes" in the
middle of a write shows the other half: what was signed but never made durable was never sent, and the
guard reopened from the file lets the validator sign only what it could have signed before that signature.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import trio

from ledger.chain import Chain
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    ConsensusConfig,
    MessageReceived,
    TimeoutFired,
    TimeoutStep,
    VoteMessage,
)
from ledger.consensus.engine import ConsensusEngine
from ledger.signer_guard import GuardFile, SignedPosition, SignerGuard, SignRefused, SignStep
from ledger.votes import NIL_BLOCK, VoteStep
from p2pgpu.consensus_driver import ConsensusDriver
from p2pgpu.topics import Topics

from tests.driver_harness import beat_while_writing, running_driver, wait_until

from .conftest import Harness
from .test_engine import bystander

GATE_TIMEOUT_S = 20.0  # how long a gated write waits (only reached when the test fails)
# no timeout or rebroadcast fires during a test: every signature comes from an event the test sends
QUIET_TIMERS = ConsensusConfig(timeout_propose_s=3600, timeout_prevote_s=3600, timeout_precommit_s=3600,
                               rebroadcast_s=3600)


class SimulatedCrash(Exception):
    """The process died in the middle of the guard's write: nothing after it ran, the file is unchanged."""


class GatedGuardStore:
    """A GuardFile whose writes log themselves and wait for ``release``; with ``crash`` set, a write dies."""

    def __init__(self, inner: GuardFile, log: list[tuple]) -> None:
        self._inner = inner
        self._log = log
        self.entered = threading.Event()
        self.release = threading.Event()
        self.crash = False
        self.released_in_time: bool | None = None
        self.writer_threads: set[int] = set()
        self.writes = 0

    def load(self) -> SignedPosition | None:
        return self._inner.load()

    def write(self, record: SignedPosition) -> None:
        self.writer_threads.add(threading.get_ident())
        self.entered.set()
        self.released_in_time = self.release.wait(GATE_TIMEOUT_S)
        self.release.clear()
        self.entered.clear()
        if self.crash:
            raise SimulatedCrash(f"killed while writing {record.position}")
        self._inner.write(record)
        self.writes += 1
        self._log.append(("durable", record.position))


class RecordingNetwork:
    def __init__(self, log: list[tuple]) -> None:
        self.metrics = type("Metrics", (), {"rejected": Counter()})()
        self._log = log

    async def publish(self, topic: str, data: bytes) -> None:
        message = CONSENSUS_MESSAGES.decode(data)
        assert isinstance(message, VoteMessage)
        vote = message.signed.vote
        self._log.append(("published", (vote.height, vote.round, int(vote.step)), vote.block_hash))

    def report_rejection(self, topic: str, peer: str, reason: str, detail: str) -> None:
        pass

    def connected_peers(self) -> set[str]:
        return set()


class QuietMempool:
    def update(self, state, txs) -> None:
        pass

    def has_ready(self) -> bool:
        return False


def make_driver(harness: Harness, name: str, guard: SignerGuard, chain: Chain, log: list[tuple]) -> ConsensusDriver:
    engine: ConsensusEngine = harness.engine(name, guard=guard, config=QUIET_TIMERS)
    return ConsensusDriver(engine, chain, QuietMempool(), RecordingNetwork(log),  # type: ignore[arg-type]
                           Topics.for_chain(chain.chain_id), harness.net.key("c0"))


async def test_a_vote_is_published_only_after_its_guard_record_is_durable_and_the_loop_runs_meanwhile(
    harness: Harness, tmp_path
) -> None:
    me = bystander(harness, 1)
    log: list[tuple] = []
    store = GatedGuardStore(GuardFile(tmp_path / "guard", harness.state.chain_id), log)
    guard = SignerGuard(harness.state.chain_id, store=store)
    chain = Chain.open(tmp_path / "data", harness.net.genesis)
    driver = make_driver(harness, me, guard, chain, log)
    block = harness.block(0)
    prevote = (1, 0, int(VoteStep.PREVOTE))
    loop_thread = threading.get_ident()
    beats_while_writing = 0
    published_while_writing: list[tuple] = []

    def beat() -> None:
        nonlocal beats_while_writing
        beats_while_writing += 1
        published_while_writing.extend(e for e in log if e[0] == "published")
        if beats_while_writing >= 3:
            log.append(("released",))

    try:
        async with running_driver(driver) as nursery:
            nursery.start_soon(beat_while_writing, store.entered, store.release, beat)
            await driver.submit_event(MessageReceived(harness.proposal(0, block), "p"))
            await wait_until(lambda: any(e[0] == "published" for e in log))
    finally:
        chain.close()

    # the engine's mark moved at signing time; the write ran off the loop while the loop kept beating
    assert guard.last is not None and guard.last.position == prevote and guard.pending is None
    assert store.released_in_time is True and beats_while_writing >= 3 and published_while_writing == []
    assert loop_thread not in store.writer_threads and store.writes == 1
    # durable before published
    assert log == [("released",), ("durable", prevote), ("published", prevote, block.block_hash())]
    assert SignerGuard(harness.state.chain_id, tmp_path / "guard").last == guard.last


async def test_a_signature_lost_in_a_crash_before_its_record_was_durable_was_never_sent(
    harness: Harness, tmp_path
) -> None:
    me = bystander(harness, 1)
    chain_id = harness.state.chain_id
    log: list[tuple] = []
    store = GatedGuardStore(GuardFile(tmp_path / "guard", chain_id), log)
    guard = SignerGuard(chain_id, store=store)
    chain = Chain.open(tmp_path / "data", harness.net.genesis)
    driver = make_driver(harness, me, guard, chain, log)
    block = harness.block(0)
    prevote, precommit = (1, 0, int(VoteStep.PREVOTE)), (1, 0, int(VoteStep.PRECOMMIT))
    crashed = False
    try:
        async with running_driver(driver):
            # prevote for the block: durable, then published
            await driver.submit_event(MessageReceived(harness.proposal(0, block), "p"))
            await wait_until(store.entered.is_set)
            store.release.set()
            await wait_until(lambda: any(e[0] == "published" for e in log))
            # precommit nil on the prevote timeout: signed, and the process dies while its record is written
            await driver.submit_event(TimeoutFired(1, 0, TimeoutStep.PREVOTE))
            await wait_until(store.entered.is_set)
            assert guard.last is not None and guard.last.position == precommit  # refused again at once
            assert guard.pending == guard.last and guard.durable is not None
            assert guard.durable.position == prevote
            with pytest.raises(SignRefused):
                guard.approve(1, 0, SignStep.PRECOMMIT, block.block_hash())
            store.crash = True
            store.release.set()
            await trio.sleep_forever()
    except* SimulatedCrash:
        crashed = True
    finally:
        chain.close()

    assert crashed
    # the precommit never left the node: only the prevote, after its record was durable
    assert log == [("durable", prevote), ("published", prevote, block.block_hash())]
    # reopened from the file: what the node may sign at height 1 is what it could sign before the precommit
    reopened = SignerGuard(chain_id, tmp_path / "guard")
    assert reopened.last is not None and reopened.last.position == prevote
    assert reopened.last.block_hash == block.block_hash()
    with pytest.raises(SignRefused):
        reopened.approve(1, 0, SignStep.PREVOTE, NIL_BLOCK)  # a second prevote: it was sent
    reopened.approve(1, 0, SignStep.PREVOTE, block.block_hash())  # the same one again: fine
    # a precommit other than the lost one: nobody holds the lost one, so this contradicts nothing
    reopened.approve(1, 0, SignStep.PRECOMMIT, block.block_hash())
    assert SignerGuard(chain_id, tmp_path / "guard").last == reopened.last
