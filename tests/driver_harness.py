"""Running a real ``ConsensusDriver`` in a test's nursery, for the tests that hold a write in a worker thread
(block commits, the signer guard) and check what the event loop does meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from p2pgpu.consensus_driver import ConsensusDriver


@asynccontextmanager
async def running_driver(driver: ConsensusDriver, *, timeout: float = 60.0) -> AsyncIterator[trio.Nursery]:
    """``driver`` running (no consensus gossip, an idle block channel) for the body, cancelled after it; the
    nursery is yielded so the body can start tasks beside the driver (a heartbeat)."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            _, blocks = trio.open_memory_channel(0)
            nursery.start_soon(driver.run, None, blocks)
            await driver.started.wait()
            yield nursery
            nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.001)


async def beat_while_writing(entered: trio.Event, release: trio.Event, on_beat: Callable[[], None],
                             beats: int = 3) -> None:
    """A heartbeat of the event loop: once a worker thread's write has ``entered``, call ``on_beat`` on each
    beat, and after ``beats`` of them let the write go (``release``). Beats prove the loop ran meanwhile."""
    seen = 0
    while not release.is_set():
        await trio.sleep(0.001)
        if entered.is_set():
            seen += 1
            on_beat()
            if seen >= beats:
                release.set()
