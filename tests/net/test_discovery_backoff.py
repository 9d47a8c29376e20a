"""Peer exchange backs off when it finds nobody new (a small network stays below target_peers for good)."""

from __future__ import annotations

from dataclasses import replace

import trio

from p2pgpu.net.discovery import Discovery

from .conftest import FAST, nodes, wait_until


async def test_fruitless_peer_exchange_rounds_back_off_until_connections_change(monkeypatch) -> None:
    rounds: list[float] = []
    original = Discovery.exchange_once

    async def counting(self: Discovery) -> int:
        rounds.append(trio.current_time())
        return await original(self)

    monkeypatch.setattr(Discovery, "exchange_once", counting)
    # FAST: rounds every 0.2 s without backoff, i.e. ~15 per node in 3 s
    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        await trio.sleep(0.5)
        rounds.clear()
        await trio.sleep(3.0)
        quiet = len(rounds)
        assert quiet <= 2 * 5, f"{quiet} peer-exchange rounds in 3 s by two nodes with nobody new to find"
        # a newcomer still finds everyone at once: its own rounds find new peers, so they do not back off
        async with nodes([replace(FAST, bootstrap_peers=(a.addrs[0],))], first_seed=7) as (c,):
            await wait_until(lambda: c.peer_id in b.connected_peers(), timeout=10,
                             what="the newcomer found through peer exchange")
