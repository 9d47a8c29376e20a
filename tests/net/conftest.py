"""Helpers for network tests: real libp2p hosts on 127.0.0.1, bounded waits."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio

from p2pgpu.net import NetConfig, Network, open_network

FAST = NetConfig(discovery_interval=0.2, bootstrap_backoff_initial=0.05, bootstrap_backoff_max=0.3, dial_timeout=3.0)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Show the real exceptions of a failure that ends in nested exception groups.

    An exception raised in a test body under ``nodes(...)`` leaves through
    every node's nurseries (ours and libp2p's, about five per node), so with three
    nodes it sits 16 groups deep and trio's traceback stops at depth 10: the
    log showed host and pubsub services "failing" and never the test's own
    error.
    """
    outcome = yield
    if call.excinfo is None or not isinstance(call.excinfo.value, BaseExceptionGroup):
        return
    text = "\n".join("".join(traceback.format_exception(leaf)) for leaf in _leaves(call.excinfo.value))
    outcome.get_result().sections.append(("exception group leaves", text))


def seed(i: int) -> bytes:
    return bytes([i]) * 32


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` (cheap, in-memory) until true; fail after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@asynccontextmanager
async def nodes(
    configs: list[NetConfig], boot: dict[int, list[int]] | None = None, first_seed: int = 1
) -> AsyncIterator[list[Network]]:
    """Start one node per config, in order; ``boot[i]`` lists earlier nodes node i bootstraps from.

    Returns once every bootstrap connection is up.
    """
    boot = boot or {}
    async with AsyncExitStack() as stack:
        started: list[Network] = []
        for i, config in enumerate(configs):
            peers = config.bootstrap_peers + tuple(started[j].addrs[0] for j in boot.get(i, []))
            net = await stack.enter_async_context(open_network(replace(config, bootstrap_peers=peers), seed(first_seed + i)))
            started.append(net)
        for i, sources in boot.items():
            for j in sources:
                await wait_until(
                    lambda i=i, j=j: started[j].peer_id in started[i].connected_peers(),
                    what=f"node {i} to reach its bootstrap node {j}",
                )
        yield started


async def mesh_ready(a: Network, b: Network, topic: str) -> None:
    """Both know the other subscribes to ``topic`` (gossip can flow between them)."""
    await wait_until(
        lambda: b.peer_id in a.gossip.topic_peers(topic) and a.peer_id in b.gossip.topic_peers(topic),
        what=f"{topic} subscription exchange",
    )
