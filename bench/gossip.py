"""Gossip throughput, latency and loss: p2pgpu.net's tuned GossipSub vs py-libp2p defaults.

N nodes in one Trio process on 127.0.0.1 (a chain of bootstrap links, peer
exchange fills in the rest). Node 0 publishes M messages as fast as publish()
returns (a burst: throughput and loss; its latencies are mostly queueing),
then 30 messages at 20 per second (latency without queueing). Every other
node counts what it receives. Latency is measured from the publish call to
delivery (one clock, one process): "one hop" for nodes directly connected to
the publisher, "mesh" over all deliveries.

The baseline runs the same workload on plain ``Pubsub`` + ``GossipSub`` with
py-libp2p 0.8.1's default parameters (120 s heartbeat, 10 msg/s rate limit,
32-slot outbound and subscription queues) and a subscription drained by a
dedicated task, as its own docs suggest.

    python bench/gossip.py            # N = 4 and 8, M = 300
    python bench/gossip.py --quick    # N = 4, M = 150 (< 30 s)

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import multiaddr
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402
from libp2p.pubsub.gossipsub import GossipSub  # noqa: E402
from libp2p.pubsub.pubsub import Pubsub  # noqa: E402
from libp2p.tools.anyio_service import background_trio_service  # noqa: E402

from p2pgpu.net import NetConfig, accept, open_network  # noqa: E402

TOPIC = "/p2pgpu/bench/tx"
SETTLE_TIMEOUT = 60.0
IDLE_GIVE_UP = 3.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def payload(k: int) -> bytes:
    return f"{time.perf_counter():.9f}|{k:06d}|".encode() + b"x" * 200


class Tally:
    def __init__(self, receivers: int, messages: int) -> None:
        self.expected = receivers * messages
        self.received = 0
        self.one_hop: list[float] = []
        self.mesh: list[float] = []
        self.last_progress = time.perf_counter()
        self.done = trio.Event()

    def record(self, data: bytes, direct: bool) -> None:
        now = time.perf_counter()
        latency = now - float(data.split(b"|", 1)[0])
        self.received += 1
        self.last_progress = now
        self.mesh.append(latency)
        if direct:
            self.one_hop.append(latency)
        if self.received >= self.expected:
            self.done.set()

    async def wait(self) -> None:
        with trio.move_on_after(SETTLE_TIMEOUT):
            while not self.done.is_set():
                with trio.move_on_after(0.2):
                    await self.done.wait()
                if time.perf_counter() - self.last_progress > IDLE_GIVE_UP:
                    return


def summary(tally: Tally, messages: int, elapsed: float, drops: int) -> dict[str, Any]:
    ms = 1000.0
    return {
        "delivered": tally.received,
        "expected": tally.expected,
        "delivered_ratio": round(tally.received / tally.expected, 4),
        "drops_counted": drops,
        "msgs_per_s_delivered": round(tally.received / elapsed, 1),
        "latency_one_hop_ms_p50": round(percentile(tally.one_hop, 0.5) * ms, 2),
        "latency_one_hop_ms_p99": round(percentile(tally.one_hop, 0.99) * ms, 2),
        "latency_mesh_ms_p50": round(percentile(tally.mesh, 0.5) * ms, 2),
        "latency_mesh_ms_p99": round(percentile(tally.mesh, 0.99) * ms, 2),
        "seconds": round(elapsed, 2),
    }


async def run_tuned(n: int, m: int, pause: float = 0.0) -> dict[str, Any]:
    base = NetConfig(discovery_interval=0.2, bootstrap_backoff_initial=0.05, target_peers=3)
    async with AsyncExitStack() as stack:
        nets = []
        for i in range(n):
            boot = (nets[i - 1].addrs[0],) if i else ()
            nets.append(await stack.enter_async_context(open_network(replace(base, bootstrap_peers=boot), bytes([i + 1]) * 32)))
        channels = [await net.subscribe(TOPIC, lambda p, d: accept()) for net in nets]
        with trio.fail_after(30):
            while not all(net.gossip.mesh_peers(TOPIC) for net in nets) or not nets[0].gossip.topic_peers(TOPIC):
                await trio.sleep(0.05)
            await trio.sleep(1.5)  # a heartbeat or two so meshes settle
        direct = nets[0].connected_peers()
        tally = Tally(n - 1, m)
        async with trio.open_nursery() as nursery:
            for net, channel in zip(nets[1:], channels[1:]):
                nursery.start_soon(_drain_channel, channel, tally, net.peer_id in direct)
            started = time.perf_counter()
            for k in range(m):
                await nets[0].publish(TOPIC, payload(k))
                if pause:
                    await trio.sleep(pause)
            await tally.wait()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        drops = sum(sum(net.metrics.dropped.values()) for net in nets)
        return summary(tally, m, elapsed, drops)


async def _drain_channel(channel: Any, tally: Tally, direct: bool) -> None:
    async for message in channel:
        tally.record(message.data, direct)


async def run_default(n: int, m: int) -> dict[str, Any]:
    """The same workload on py-libp2p's defaults, wired like its examples."""
    async with AsyncExitStack() as stack:
        hosts, pubsubs, subs = [], [], []
        for i in range(n):
            host = new_host(key_pair=create_new_key_pair(bytes([100 + i]) * 32))
            router = GossipSub(protocols=[TProtocol("/meshsub/1.0.0")], degree=6, degree_low=4, degree_high=12)
            pubsub = Pubsub(host, router)
            await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await pubsub.wait_until_ready()
            hosts.append(host)
            pubsubs.append(pubsub)
        for i in range(1, n):
            for j in {i - 1, max(0, i - 2)} - {i}:
                await hosts[i].connect(info_from_p2p_addr(hosts[j].get_addrs()[0]))
        for pubsub in pubsubs:
            subs.append(await pubsub.subscribe(TOPIC))
        with trio.fail_after(30):
            while not all(p.peer_topics.get(TOPIC) for p in pubsubs):
                await trio.sleep(0.05)
            await trio.sleep(1.5)
        direct = set(hosts[0].get_connected_peers())
        tally = Tally(n - 1, m)
        async with trio.open_nursery() as nursery:
            for host, sub in zip(hosts[1:], subs[1:]):
                nursery.start_soon(_drain_sub, sub, tally, host.get_id() in direct)
            started = time.perf_counter()
            for k in range(m):
                await pubsubs[0].publish(TOPIC, payload(k))
                await trio.lowlevel.checkpoint()
            await tally.wait()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return summary(tally, m, elapsed, drops=0)


async def _drain_sub(sub: Any, tally: Tally, direct: bool) -> None:
    while True:
        message = await sub.get()
        tally.record(message.data, direct)


async def main(quick: bool) -> dict[str, Any]:
    sizes = [4] if quick else [4, 8]
    m = 150 if quick else 300
    results: dict[str, Any] = {"messages": m, "runs": {}}
    for n in sizes:
        tuned = await run_tuned(n, m)
        paced = await run_tuned(n, 30, pause=0.05)
        default = await run_default(n, m)
        results["runs"][f"n{n}"] = {
            "tuned": tuned,
            "tuned_paced_20_per_s": paced,
            "default": default,
            "delivered_ratio_tuned_vs_default": round(tuned["delivered"] / max(1, default["delivered"]), 2),
        }
    first = results["runs"][f"n{sizes[0]}"]
    results["gossip_drops"] = sum(r["tuned"]["expected"] - r["tuned"]["delivered"] for r in results["runs"].values())
    results["delivered_ratio_tuned_vs_default"] = first["delivered_ratio_tuned_vs_default"]
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 4 only, fewer messages (< 30 s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    print(json.dumps(trio.run(main, args.quick)))
