"""Peer exchange pacing: rounds never come faster than ``discovery_interval``, and fruitless ones back off.

A network smaller than ``target_peers`` never reaches its target, so before
this pacing every node asked three peers every ``discovery_interval`` for ever,
and every connection change (both ends of each new connection) started an
extra round at once. In the seven in-process nodes of the stream-dispute test
that traffic took about a third of the process's CPU while start-up stream
negotiations timed out on a loaded host (see ``next_exchange_wait``).
"""

from __future__ import annotations

import pytest
import trio

from p2pgpu.net import NetConfig
from p2pgpu.net.discovery import Discovery, next_exchange_wait

BASE, CEILING = 2.0, 10.0


def test_a_fruitless_round_doubles_the_wait_up_to_the_ceiling() -> None:
    waits = [BASE]
    for _ in range(5):
        waits.append(next_exchange_wait(waits[-1], dialed=0, lost_peer=False, base=BASE, ceiling=CEILING))
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


@pytest.mark.parametrize(("dialed", "lost"), [(1, False), (0, True), (3, True)])
def test_a_new_dial_or_a_lost_peer_brings_the_wait_back_to_base(dialed: int, lost: bool) -> None:
    assert next_exchange_wait(CEILING, dialed=dialed, lost_peer=lost, base=BASE, ceiling=CEILING) == BASE


def test_a_ceiling_below_base_never_shortens_the_wait() -> None:
    assert next_exchange_wait(BASE, dialed=0, lost_peer=False, base=BASE, ceiling=0.5) == BASE


class _FakeId:
    def to_base58(self) -> str:
        return "12D3KooWSelf"


class _FakeHost:
    """What ``Discovery`` reads of a host: its id and the connected peers (set by the test)."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    def get_id(self) -> _FakeId:
        return _FakeId()

    def get_connected_peers(self) -> list:
        return [type("P", (), {"to_base58": lambda self, p=p: p})() for p in self.peers]


class _FakeReqResp:
    def set_handler(self, protocol: str, handler, *, max_streams: int | None = None) -> None:
        self.handler = handler


class _CountingDiscovery(Discovery):
    """Real ``exchange_forever``; each round is recorded (time) and dials what the test says."""

    def __init__(self, config: NetConfig, dials: list[int]) -> None:
        self.host = _FakeHost()
        super().__init__(self.host, _FakeReqResp(), config, scores=None)  # type: ignore[arg-type]
        self.rounds: list[float] = []
        self._dials = dials

    async def exchange_once(self) -> int:
        self.rounds.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return self._dials.pop(0) if self._dials else 0


async def test_connection_churn_never_runs_rounds_closer_than_the_interval(autojump_clock) -> None:
    disc = _CountingDiscovery(NetConfig(discovery_interval=BASE, discovery_interval_max=CEILING), dials=[1] * 100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(disc.exchange_forever)
        for _ in range(200):  # a connection change every 0.1 s for 20 s (every round "dials" someone)
            disc.on_connection_change()
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(disc.rounds, disc.rounds[1:])]
    assert len(disc.rounds) >= 9 and min(gaps) >= BASE - 1e-9, gaps


async def test_fruitless_rounds_in_a_quiet_network_back_off_to_the_ceiling(autojump_clock) -> None:
    disc = _CountingDiscovery(NetConfig(discovery_interval=BASE, discovery_interval_max=CEILING), dials=[])
    disc.host.peers = ["a", "b"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(disc.exchange_forever)
        await trio.sleep(60)
        first = len(disc.rounds)
        disc.host.peers = ["a"]  # "b" went away: look for a replacement at the base pace again
        disc.on_connection_change()
        changed_at = trio.current_time()
        await trio.sleep(2 * BASE + 0.5)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 6) for a, b in zip(disc.rounds, disc.rounds[1:first])]
    assert gaps[:4] == [4.0, 8.0, 10.0, 10.0], gaps  # was: a round every 2 s for ever
    after = disc.rounds[first:]
    assert after[0] - changed_at <= BASE and round(after[1] - after[0], 6) == BASE, (changed_at, after)
