"""Chaos benchmark: a devnet under steady task load while nodes are killed, paused and restarted, and attacked.

Starts 4 validators, 3 providers and 1 client, waits until the providers
can bid, then runs a steady open-loop load of small matmuls through the
client (:mod:`devnet.load`, in a thread) while the perturbation matrix runs
beside it, one perturbation at a time:

* validators: ``kill -9`` + restart (v1), pause + resume (v2), graceful restart (v3);
* providers: a provider killed mid-job (the failover measurement, below) and
  restarted, one paused for a few seconds;
* the client: ``kill -9`` + restart (the recovery measurement), paused,
  restarted gracefully;
* a follower (p2) paused until the chain is far ahead, then woken;
* a stock py-libp2p peer flooding ``/tx`` with validly signed transactions
  from unfunded keys, and holding idle inbound streams open on the client
  and the providers.

The last line of output is one JSON object:

  tasks_lost -- accepted by the client node, but neither a final outcome nor
      a result by the timeout, or forgotten by it (goal 0).
  supply_conserved -- every live node's books add up at the end (goal true).
  follower_catchup_s -- from waking the follower to its head reaching the
      network's (goal <= 10); follower_blocks_behind says how far behind
      it was (300; --quick: 120).
  failover_s -- a provider killed mid-job (a ~2 s training job, killed once
      the ledger assigns it to that provider, which has been running it
      since the client pushed the inputs) until the result from another
      provider is in the client's hands (goal <= 10).
  client_recovery_s -- from restarting the killed client until every task it
      had accepted answers ``GET /tasks/{id}`` again (goal <= 5).
  spam_finality_ratio -- heights per second during the unfunded-transaction
      flood divided by the same just before it (goal >= 0.8).
  honest_slashed -- fraud slashes (``failed``) of the providers, none of which
      cheats, over the whole run (goal 0); providers_missed counts the
      missed deadlines and reopened tasks (a killed provider is at fault).

Every process it starts is stopped on the way out (also on Ctrl-C or SIGTERM).

Usage: python bench/chaos.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # keep bench/ from shadowing packages
sys.path.insert(0, os.path.dirname(_HERE))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402

from bench.common import say, wait_for  # noqa: E402
from bench.load import Terminated, goals_met, on_sigterm  # noqa: E402
from bench.market import wait_caught_up  # noqa: E402
from devnet.demo import wait_providers_ready  # noqa: E402
from devnet.launcher import Devnet, DevnetSpec, NodeRecord, plan_devnet, write_devnet  # noqa: E402
from devnet.load import LoadConfig, run_load  # noqa: E402
from ledger.params import Params  # noqa: E402

FAILOVER_TRAIN_STEPS = 2500
"""Steps of the failover scenario's training job (~0.9 ms each on a warm CPU worker here)."""

GOALS: dict[str, tuple[str, float | bool]] = {
    "tasks_lost": ("<=", 0),
    "supply_conserved": ("==", True),
    "follower_catchup_s": ("<=", 10.0),
    "failover_s": ("<=", 10.0),
    "client_recovery_s": ("<=", 5.0),
    "spam_finality_ratio": (">=", 0.8),
    "honest_slashed": ("<=", 0),
}
BLOCK_S = 0.5
PARAMS = Params(epoch_length=32, challenge_window=10, audit_window=40, verifier_count=1, audit_fee=10,
                min_provider_bond=100)


def _get(http: httpx.Client, rec: NodeRecord, path: str) -> Any:
    resp = http.get(f"{rec.api_url}{path}", timeout=5.0)
    resp.raise_for_status()
    return resp.json()


def _height(http: httpx.Client, rec: NodeRecord) -> int | None:
    try:
        return int(_get(http, rec, "/ledger/head")["height"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


class Chaos:
    """The perturbations and measurements, run from one thread while the load runs in another."""

    def __init__(self, devnet: Devnet, quick: bool) -> None:
        self.devnet = devnet
        self.quick = quick
        self.http = httpx.Client(timeout=5.0)
        self.node = devnet.manifest.node
        self.figures: dict[str, Any] = {}
        self.log: list[str] = []
        self.paused_at = 0
        self.crash_lost = 0  # tasks accepted just before the client's kill -9 and never back or settled

    def close(self) -> None:
        self.http.close()

    def _note(self, text: str) -> None:
        self.log.append(text)
        say("chaos", text)

    def head(self) -> int:
        return max(h for v in ("v0", "v1", "v2", "v3") if (h := _height(self.http, self.node(v))) is not None)

    # -- perturbations -----------------------------------------------------------------------------

    def kill_restart(self, name: str, down_s: float = 2.0) -> None:
        self.devnet.kill(name)
        self._note(f"kill -9 {name}")
        time.sleep(down_s)
        self.devnet.restart(name, timeout=180)
        self._note(f"restarted {name}")

    def pause_resume(self, name: str, paused_s: float = 4.0) -> None:
        self.devnet.pause(name)
        self._note(f"paused {name}")
        time.sleep(paused_s)
        self.devnet.resume(name)
        self._note(f"resumed {name}")

    def graceful_restart(self, name: str) -> None:
        self.devnet.restart(name, timeout=180)  # SIGTERM, wait, start again
        self._note(f"restarted {name} (graceful)")

    # -- measurements ------------------------------------------------------------------------------

    def failover(self) -> None:
        """Kill the provider of a ~2 s training job once the ledger assigns it (it runs since the push of its
        inputs); time until the result, from another provider, is here."""
        from kernels.spec import make_spec
        from p2pgpu.api.client import ApiClient
        from p2pgpu.api.types import NotReady, SubmitRequest
        from tests.kernels.helpers import dense_model

        client = self.node("c0")
        model, _ = dense_model(8, [(16, "relu"), (2, "linear")], seed=7)
        rng = np.random.default_rng(7)
        data = {**model, "x": rng.standard_normal((64, 8)).astype(np.float32),
                "y": rng.standard_normal((64, 2)).astype(np.float32)}
        # Long enough (~2 s on this machine) to still be running once the assignment is final: a provider
        # starts on the inputs its client pushes with the Assign, and a shorter job was done -- its result
        # committed at the assigning block -- before there was a "running" provider to kill.
        spec = make_spec("keras_train", 1, {"steps": FAILOVER_TRAIN_STEPS, "batch_size": 16}, data, device="cpu",
                         memory_bytes=256 << 20, seconds=60)
        with ApiClient(client.api_url, timeout=30.0) as api:
            task_id = api.submit(SubmitRequest(spec=spec, inputs=data, max_unit_price=100_000, bid_window=20,
                                               audit_rate_bps=0))

            def running() -> str | None:
                view = api.task(task_id)
                if view.provider is not None and view.stage in ("assigned", "running"):
                    return next(n.name for n in self.devnet.manifest.nodes if n.address == view.provider.hex())
                return None

            victim = wait_for("the training job running", running, timeout=120, interval=0.05)
            killed = time.monotonic()
            self.devnet.kill(victim)
            self._note(f"kill -9 {victim} mid-job (failover)")

            def result() -> bool:
                try:
                    api.task_result(task_id)
                    return True
                except NotReady:
                    view = api.task(task_id)
                    if view.stage == "settled":  # closed with no result: say how, not "timed out" 180 s later
                        raise RuntimeError(f"chaos: the failover task settled without a result: {view.outcome} "
                                           f"({view.detail}); timeline {list(view.timings)}") from None
                    return False

            wait_for("the failover result", result, timeout=180, interval=0.1)
            self.figures["failover_s"] = round(time.monotonic() - killed, 2)
            self.figures["failover_provider"] = str(api.task(task_id).provider.hex())[:16]  # type: ignore[union-attr]
        self._note(f"failover result after {self.figures['failover_s']} s")
        self.devnet.restart(victim, timeout=180)
        self._note(f"restarted {victim}")

    def client_crash(self) -> None:
        """kill -9 the client right after it accepted a batch of tasks; time from its restart until every one
        of them answers ``GET /tasks/{id}`` again, then check that each still ends with its outcome."""
        from devnet.load import make_load_job
        from p2pgpu.api.client import ApiClient
        from p2pgpu.api.types import SubmitRequest

        client = self.node("c0")
        jobs = [make_load_job(10_000 + i, 32, 1) for i in range(8)]
        with ApiClient(client.api_url, timeout=60.0) as api:
            answers = api.submit_many([SubmitRequest(spec=j.spec, inputs=j.inputs, max_unit_price=1_000,
                                                     bid_window=20, audit_rate_bps=0) for j in jobs])
        known = [a.hex() for a in answers if isinstance(a, bytes)]
        self.devnet.kill("c0")
        self._note(f"kill -9 c0 just after it accepted {len(known)} task(s)")
        time.sleep(1.0)
        started = time.monotonic()
        self.devnet.restart("c0", timeout=180)
        client = self.node("c0")

        def status(task_id: str) -> dict[str, Any] | None:
            try:
                resp = self.http.get(f"{client.api_url}/tasks/{task_id}", timeout=5.0)
            except httpx.HTTPError:
                return None
            return resp.json() if resp.status_code == 200 else None

        try:
            wait_for("every task back after the client restart", lambda: all(status(t) for t in known), timeout=60,
                     interval=0.1)
            self.figures["client_recovery_s"] = round(time.monotonic() - started, 2)
        except TimeoutError:
            self.figures["client_recovery_s"] = None
        missing = [t for t in known if status(t) is None]
        unsettled = [t for t in known if t not in missing]
        with contextlib.suppress(TimeoutError):
            wait_for("the recovered tasks settled", lambda: all((status(t) or {}).get("stage") == "settled"
                                                             for t in unsettled), timeout=120, interval=0.5)
        self.figures["client_crash_tasks"] = {
            "accepted": len(known), "forgotten": len(missing),
            "outcomes": sorted(str((status(t) or {}).get("outcome")) for t in unsettled)}
        self.crash_lost = len(missing) + sum(1 for t in unsettled if (status(t) or {}).get("stage") != "settled")
        self._note(f"client back: {self.figures.get('client_recovery_s')} s; {len(missing)} task(s) forgotten")

    def follower_pause(self, behind: int) -> tuple[str, int]:
        self.devnet.pause("p2")
        at = self.paused_at = self.head()
        self._note(f"paused follower p2 at height {at}; waking it {behind} blocks later")
        return "p2", at + behind

    def follower_wake(self, name: str, target: int) -> None:
        wait_for(f"the chain at height {target}", lambda: self.head() >= target, timeout=600, interval=0.5)
        self.devnet.resume(name)
        woke = time.monotonic()
        head = self.head()
        behind = head - self.paused_at
        rec = self.node(name)
        wait_for(f"{name} caught up", lambda: (_height(self.http, rec) or 0) >= head, timeout=120, interval=0.05)
        self.figures["follower_catchup_s"] = round(time.monotonic() - woke, 2)
        self._note(f"{name} caught up {behind} blocks in {self.figures['follower_catchup_s']} s")

    def spam(self, seconds: float, per_s: float) -> None:
        """Heights/s during a flood of validly signed, unfunded transactions, over the same just before it."""
        v0 = self.node("v0")
        h0 = _height(self.http, v0) or 0
        time.sleep(seconds)
        h1 = _height(self.http, v0) or 0
        before = (h1 - h0) / seconds
        sent = trio.run(_flood, v0, self.devnet.manifest.chain_id, seconds, per_s)
        h2 = _height(self.http, v0) or 0
        during = (h2 - h1) / max(seconds, 1e-9)
        self.figures["spam_heights_per_s"] = {"before": round(before, 2), "during": round(during, 2)}
        self.figures["spam_transactions_sent"] = sent
        self.figures["spam_finality_ratio"] = round(during / before, 2) if before > 0 else None
        self._note(f"spam: {sent} unfunded transactions; heights/s {before:.2f} -> {during:.2f}")

    def hold_streams(self, seconds: float, per_node: int = 64) -> None:
        """A peer holding idle inbound streams open on the client and every provider."""
        targets = [r for r in self.devnet.manifest.nodes if r.name.startswith(("c", "p")) and r.name != "p2"]
        held = trio.run(_hold_streams, targets, seconds, per_node)
        self.figures["idle_streams_opened"] = held
        self._note(f"held {held} idle streams for {seconds:g} s")

    def books(self) -> None:
        from devnet.load import supply_check

        ok = True
        for rec in self.devnet.manifest.nodes:
            if rec.pid is None:
                continue
            try:
                check = supply_check(_get(self.http, rec, "/ledger/supply"))
            except httpx.HTTPError:
                continue
            ok = ok and check.conserved
        self.figures["supply_conserved"] = ok
        failed = missed = 0
        try:
            providers = _get(self.http, self.node("v0"), "/ledger/providers")["providers"]
        except (httpx.HTTPError, KeyError):
            providers = []
        for p in providers:
            failed += int(p.get("failed", 0))
            missed += int(p.get("missed", 0))
        self.figures["honest_slashed"] = failed
        self.figures["providers_missed"] = missed


async def _flood(v0: NodeRecord, chain_id_hex: str, seconds: float, per_s: float) -> int:
    from ledger.codec import encode
    from ledger.keys import AccountKey
    from ledger.transactions import Transfer
    from ledger.transition import sign_transaction
    from p2pgpu.net import NetConfig, accept, open_network
    from p2pgpu.topics import Topics

    chain_id = bytes.fromhex(chain_id_hex)
    topic = Topics.for_chain(chain_id).tx
    boot = next(a for a in v0.addrs if a.startswith("/ip4/127.0.0.1/tcp/"))
    sent = 0
    async with open_network(NetConfig(bootstrap_peers=(boot,)), secrets.token_bytes(32)) as peer:
        await peer.subscribe(topic, lambda _p, _d: accept())
        with trio.move_on_after(10):
            while not peer.gossip.mesh_peers(topic):
                await trio.sleep(0.1)
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            key = AccountKey.generate()
            body = Transfer(sender=key.address, nonce=0, fee=1, to=key.address, amount=1)
            try:
                await peer.publish(topic, encode(sign_transaction(key, chain_id, body)))
                sent += 1
            except Exception:
                pass
            await trio.sleep(1.0 / per_s)
    return sent


async def _hold_streams(targets: list[NodeRecord], seconds: float, per_node: int) -> int:
    from p2pgpu.net import NetConfig, open_network
    from p2pgpu.topics import DATA_PROTOCOL

    boots = tuple(next(a for a in r.addrs if a.startswith("/ip4/127.0.0.1/tcp/")) for r in targets)
    opened = 0
    async with open_network(NetConfig(bootstrap_peers=boots), secrets.token_bytes(32)) as peer:
        async with trio.open_nursery() as nursery:
            async def hold(rec: NodeRecord) -> None:
                nonlocal opened
                with contextlib.suppress(Exception):
                    async with peer.open_stream(rec.peer_id, DATA_PROTOCOL):
                        opened += 1
                        await trio.sleep(seconds)  # never send a request

            for rec in targets:
                for _ in range(per_node):
                    nursery.start_soon(hold, rec)
    return opened


def run_chaos(root: Path, *, quick: bool) -> dict[str, Any]:
    """Plan a devnet in ``root`` (empty), run the load and the perturbation matrix, stop everything; the figures.

    Used by :func:`main` and by the slow end-to-end test (``tests/e2e/test_chaos_e2e.py``).
    """
    t_begin = time.monotonic()
    behind = 120 if quick else 300
    tasks, rate = (40, 0.5) if quick else (120, 0.5)
    config = LoadConfig(tasks=tasks, rate=rate, size=32, timeout=tasks / rate + 120.0, audit_rate_bps=1_000,
                        bid_window=20)
    spec = DevnetSpec(validators=4, providers=3, clients=1, block_interval=BLOCK_S, params=PARAMS,
                      log_level=os.environ.get("BENCH_LOG_LEVEL", "warning"))
    figures: dict[str, Any] = {}
    plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
    devnet = Devnet(write_devnet(plan, root, scrypt_n=2**14))
    seen: set[int] = set()
    chaos = Chaos(devnet, quick)
    try:
        devnet.start_all(timeout=180)
        devnet.wait_finalized(2, timeout=120)
        wait_providers_ready(devnet.manifest, timeout=300)
        with httpx.Client(timeout=5) as http:
            wait_caught_up(devnet, http, timeout=120)
        say("chaos", f"devnet ready in {time.monotonic() - t_begin:.0f} s; load: {config.describe()}")
        summary_box: dict[str, Any] = {}

        def load() -> None:
            summary_box["summary"] = run_load(devnet.manifest, config, wait_ready=False)

        import threading

        loader = threading.Thread(target=load, name="chaos-load", daemon=True)
        loader.start()
        follower, target = chaos.follower_pause(behind)
        chaos.kill_restart("v1")
        chaos.pause_resume("v2")
        chaos.failover()
        chaos.pause_resume("p1")
        chaos.client_crash()
        chaos.pause_resume("c0", 3.0)
        chaos.hold_streams(8.0)
        chaos.spam(6.0 if quick else 10.0, per_s=73.0)
        chaos.graceful_restart("v3")
        chaos.graceful_restart("c0")
        chaos.follower_wake(follower, target)
        loader.join(timeout=config.timeout + 180)
        seen |= {p.pid for p in devnet.procs.values()}
        summary = summary_box.get("summary")
        chaos.books()
        figures.update(chaos.figures)
        figures["tasks_lost"] = None
        if summary is not None:
            load_figures = summary.to_json()
            lost = load_figures.get("tasks_lost")
            figures["tasks_lost"] = None if lost is None else int(lost) + chaos.crash_lost
            figures["load"] = {k: load_figures.get(k) for k in (
                "accepted", "delivered", "failed_by_reason", "lost_by_reason",
                "time_to_result_ms_p50", "time_to_result_ms_p99") if k in load_figures}
        figures["follower_blocks_behind"] = behind
        figures["perturbations"] = chaos.log
    finally:
        chaos.close()
        seen |= {p.pid for p in devnet.procs.values()}
        devnet.stop_all(grace=8.0)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    figures["wall_s"] = round(time.monotonic() - t_begin, 1)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a shorter load and a follower 120 blocks behind")
    ap.add_argument("--keep", type=Path, help="run the devnet in this (empty) directory and keep it afterwards")
    args = ap.parse_args()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    tmp = None
    try:
        tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="p2pgpu-bench-chaos-")
        root = args.keep if args.keep else Path(tmp.name) / "devnet"  # type: ignore[union-attr]
        figures = run_chaos(root, quick=args.quick)
    finally:
        if tmp is not None:
            tmp.cleanup()
        signal.signal(signal.SIGTERM, previous)
    out = {"bench": "chaos", "quick": args.quick, "cpu_count": os.cpu_count(), **figures}
    out["goals_met"] = goals_met(out, GOALS)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Terminated):
        print("interrupted: every process this bench started was stopped", file=sys.stderr)
        sys.exit(130)
