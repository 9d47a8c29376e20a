"""The consensus driver stores blocks in a worker thread, without giving up persist-before-adopt.

A gated store holds the first block's write until the event loop has shown it is still running (a
heartbeat task beats while the write waits); had the write run on the loop, the heartbeat could never
beat and the gate would time out. The log of writes, adoptions and engine events shows the order: each
block is durable before the chain adopts it, before the commit hook runs, and before the engine takes
its next event; the writes never overlap.
"""

from __future__ import annotations

import threading
from collections import Counter


from ledger.chain import Chain
from ledger.consensus import BlocksSynced, ConsensusConfig, ConsensusEngine, SignatureVerifier
from ledger.devtools import DevChain, make_dev_network
from ledger.params import Params
from p2pgpu.consensus_driver import ConsensusDriver
from p2pgpu.topics import Topics
from tests.driver_harness import beat_while_writing, running_driver, wait_until

GATE_TIMEOUT_S = 20.0  # how long the gated write waits for the heartbeat (only reached when the test fails)


class GatedStore:
    """A ChainStore whose block writes log themselves and, for ``gated_height``, wait for ``release``."""

    def __init__(self, store, log: list, gated_height: int) -> None:
        self._store = store
        self._log = log
        self.gated_height = gated_height
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self.writer_threads: set[int] = set()
        self.writing = 0
        self.overlaps = 0

    def append_block(self, height: int, record: bytes, *, sync: bool = True) -> None:
        self.writer_threads.add(threading.get_ident())
        self.writing += 1
        self.overlaps += self.writing > 1
        try:
            if height == self.gated_height:
                self.entered.set()
                self.released_in_time = self.release.wait(GATE_TIMEOUT_S)
            self._store.append_block(height, record, sync=sync)
            self._log.append(("persist", height))
        finally:
            self.writing -= 1

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class QuietMempool:
    def update(self, state, txs) -> None:
        pass

    def has_ready(self) -> bool:
        return False


class QuietNetwork:
    def __init__(self) -> None:
        self.metrics = type("Metrics", (), {"rejected": Counter()})()

    async def publish(self, topic: str, data: bytes) -> None:
        pass

    def report_rejection(self, topic: str, peer: str, reason: str, detail: str) -> None:
        pass

    def connected_peers(self) -> set[str]:
        return set()


async def test_commits_run_off_the_event_loop_and_each_block_is_durable_before_anything_acts_on_it(tmp_path):
    net = make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("c0",),
                           params=Params(epoch_length=16, committee_size=4))
    dev = DevChain(net)
    for _ in range(3):
        dev.produce()
    log: list[tuple] = []
    chain = Chain.open(tmp_path / "data", net.genesis, snapshot_interval=2)
    store = GatedStore(chain.store, log, gated_height=1)
    chain.store = store
    engine = ConsensusEngine(ConsensusConfig(), chain.state, None, verifier=SignatureVerifier())
    handle = engine.handle

    def logged_handle(event, **kw):
        if isinstance(event, BlocksSynced):
            log.append(("handle", [fb.block.height for fb in event.blocks], store.head_height, chain.height))
        return handle(event, **kw)

    engine.handle = logged_handle
    driver = ConsensusDriver(
        engine, chain, QuietMempool(), QuietNetwork(), Topics.for_chain(chain.chain_id), net.key("c0"),
        on_commit=lambda fb, state: log.append(("hook", fb.block.height, chain.height)),
    )
    loop_thread = threading.get_ident()
    beats_while_writing = 0
    heads_seen_while_writing: set[int] = set()

    def beat() -> None:
        nonlocal beats_while_writing
        beats_while_writing += 1
        heads_seen_while_writing.add(chain.height)

    try:
        async with running_driver(driver) as nursery:
            nursery.start_soon(beat_while_writing, store.entered, store.release, beat)
            await driver.submit_event(BlocksSynced(tuple(dev.blocks[:2]), peer="p", solicited=False))
            await driver.submit_event(BlocksSynced(tuple(dev.blocks[2:]), peer="p", solicited=False))
            await wait_until(lambda: chain.height >= 3)
    finally:
        chain.close()

    # off the loop: the loop kept running while block 1 was written, in another thread
    assert store.released_in_time is True and beats_while_writing >= 3
    assert loop_thread not in store.writer_threads and store.overlaps == 0
    # while block 1 was being written, nobody saw it adopted
    assert heads_seen_while_writing == {0}
    # persist before adopt, before the hook, before the engine's next event
    assert log == [
        ("handle", [1, 2], None, 0),
        ("persist", 1), ("hook", 1, 1),
        ("persist", 2), ("hook", 2, 2),
        ("handle", [3], 2, 2),
        ("persist", 3), ("hook", 3, 3),
    ]
    # the snapshot due at height 2 was written (in the worker thread too)
    reopened = Chain.open(tmp_path / "data", net.genesis)
    try:
        assert reopened.height == 3 and reopened.store.latest_snapshot().height == 2
    finally:
        reopened.close()
