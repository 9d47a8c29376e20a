"""Consensus figures from the deterministic simulator (virtual time) and the BLS vote path (wall time).

* ``sim_finality_ms_p50/_p99_{4,16}v``: commit time at each honest node minus
  the proposal's broadcast, at 10 ms one-way links (virtual ms), also as
  link round trips (goal: p50 <= 3 round trips).
* ``sim_heights_per_wall_s_100v``: 100 validators, committee 64, gossip mesh
  of degree 8: how many heights the simulator finalizes per real second
  (``sim_cpu_s_per_height_100v``: the same in process CPU time, which other
  load on the machine disturbs less). ``_200v``: the same with 200 validators.
* ``sim_speedup_100v``: against the same run with the simulator's own
  speed-ups off (``SimConfig(shared_execution=False, elide_duplicates=False)``:
  every engine executes every block, every gossip copy goes through the event
  heap), which gives event-for-event the same run (``sim_runs_identical``).
  The engine's own savings (quiet messages, remembered signing bytes) are in
  both, so this understates the gain over the simulator before them.
* ``vote_verify_speedup``: verifying 64 precommits one by one vs. the engine's
  batch path (the same run, a ratio). The batch is a random linear
  combination since it stopped trusting plain aggregates (split forged
  pairs): ~8x here, not the ~50x a plain FastAggregateVerify gave.
* ``safety_violations``: over every seed run (must be 0).

Node data directories (stores, slashing-protection files; written for real)
go to a tmpfs when there is one (``sim_data_dir``): on a disk, the atomic
rename per signature costs more than the signature, and this measures the
simulator, not the disk.

Prints one JSON object as its last line; ``--quick`` finishes in well under 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devnet.sim import LinkConfig, SimConfig, Simulation, percentile  # noqa: E402
from ledger.committee import vote_signing_bytes  # noqa: E402
from ledger.consensus import SignatureVerifier  # noqa: E402
from ledger.devtools import dev_validator_key, make_dev_network, sign_vote  # noqa: E402
from ledger.params import Params  # noqa: E402
from ledger.votes import Vote, VoteStep  # noqa: E402

LATENCY_S = 0.010


def run_finality(n: int, seeds: list[int], heights: int) -> tuple[list[float], int]:
    net = make_dev_network(validators=[f"v{i}" for i in range(n)], providers=(), clients=(),
                           params=Params(epoch_length=8, committee_size=64))
    values: list[float] = []
    violations = 0
    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            sim = Simulation(net, d, SimConfig(seed=seed, link=LinkConfig(latency_s=LATENCY_S, jitter_s=0.001),
                                               fsync=False))
            try:
                sim.start()
                sim.run(until_height=heights, until=600)
                values += sim.finality_ms()
                violations += len(sim.safety_violations()) + len(sim.double_signers())
            finally:
                sim.close()
    return values, violations


def data_root() -> str | None:
    """A tmpfs to put node data in, if the machine has one (None: the default temporary directory)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run_large(n: int, heights: int, seed: int, *, fast: bool = True) -> dict[str, object]:
    """Run ``n`` validators (committee 64, mesh degree 8); time ``heights`` heights after the first."""
    net = make_dev_network(validators=[f"v{i}" for i in range(n)], providers=(), clients=(),
                           params=Params(epoch_length=8, committee_size=64))
    config = SimConfig(seed=seed, link=LinkConfig(latency_s=LATENCY_S, jitter_s=0.002), mesh_degree=8, fsync=False,
                       shared_execution=fast, elide_duplicates=fast)
    with tempfile.TemporaryDirectory(dir=data_root()) as d:
        sim = Simulation(net, d, config)
        try:
            sim.start()
            sim.run(until_height=1, until=600)  # first height includes warm-up (key decompression, imports)
            start_h = sim.min_honest_height()
            t0, c0 = time.perf_counter(), time.process_time()
            sim.run(until_height=start_h + heights, until=600)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            done = sim.min_honest_height() - start_h
            return {
                "rate": done / wall,
                "cpu_per_height": cpu / done,
                "violations": len(sim.safety_violations()) + len(sim.double_signers()),
                "done": done,
                "committed": {name: node.committed for name, node in sim.nodes.items()},
                "times": {name: node.commit_time for name, node in sim.nodes.items()},
            }
        finally:
            sim.close()


def vote_verify_speedup(n: int = 64) -> tuple[float, float]:
    keys = [dev_validator_key(f"bench{i}") for i in range(n)]
    chain_id = b"\x01" * 32
    vote = Vote(height=7, round=0, step=VoteStep.PRECOMMIT, block_hash=b"\x02" * 32)
    msg = vote_signing_bytes(chain_id, vote)
    sigs = [sign_vote(k, b"\x00" * 20, chain_id, vote).signature for k in keys]
    items = [(k.public_key, s) for k, s in zip(keys, sigs)]
    single = SignatureVerifier(cache_size=0)
    single.verify(items[0][0], msg, items[0][1])  # warm the pubkey cache for both paths
    t0 = time.perf_counter()
    ok1 = all(single.backend.verify(pk, msg, s) for pk, s in items)  # type: ignore[attr-defined]
    t_single = time.perf_counter() - t0
    agg = SignatureVerifier()
    t0 = time.perf_counter()
    ok2 = all(agg.verify_same_message(msg, items))
    t_agg = time.perf_counter() - t0
    assert ok1 and ok2
    return t_single / t_agg, t_agg * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seeds = [1, 2] if args.quick else [1, 2, 3, 4]
    heights = 8 if args.quick else 30
    t_start = time.perf_counter()
    out: dict[str, float | int | str] = {}
    violations = 0
    for n in (4, 16):
        values, v = run_finality(n, seeds if n == 4 else seeds[:2], heights if n == 4 else heights // 2)
        violations += v
        p50, p99 = percentile(values, 50), percentile(values, 99)
        out[f"sim_finality_ms_p50_{n}v"] = round(p50, 2)
        out[f"sim_finality_ms_p99_{n}v"] = round(p99, 2)
        out[f"sim_finality_rtts_p50_{n}v"] = round(p50 / (2 * LATENCY_S * 1000), 2)
        print(f"{n} validators: finality p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(values)} commits", file=sys.stderr)
    heights_large = 2 if args.quick else 6
    fast = run_large(100, heights_large, seed=5)
    base = run_large(100, heights_large, seed=5, fast=False)
    violations += fast["violations"] + base["violations"]  # type: ignore[operator]
    out["sim_heights_per_wall_s_100v"] = round(fast["rate"], 3)  # type: ignore[arg-type]
    out["sim_cpu_s_per_height_100v"] = round(fast["cpu_per_height"], 3)  # type: ignore[arg-type]
    out["sim_heights_measured_100v"] = fast["done"]  # type: ignore[assignment]
    out["sim_heights_per_wall_s_100v_baseline"] = round(base["rate"], 3)  # type: ignore[arg-type]
    out["sim_speedup_100v"] = round(base["cpu_per_height"] / fast["cpu_per_height"], 2)  # type: ignore[operator]
    out["sim_runs_identical"] = fast["committed"] == base["committed"] and fast["times"] == base["times"]
    print(f"100 validators: {fast['rate']:.2f} heights/s ({fast['cpu_per_height']:.2f} CPU s per height), "
          f"speed-ups off: {base['rate']:.2f} heights/s", file=sys.stderr)
    big = run_large(200, heights_large, seed=5)
    violations += big["violations"]  # type: ignore[operator]
    out["sim_heights_per_wall_s_200v"] = round(big["rate"], 3)  # type: ignore[arg-type]
    out["sim_cpu_s_per_height_200v"] = round(big["cpu_per_height"], 3)  # type: ignore[arg-type]
    out["sim_heights_measured_200v"] = big["done"]  # type: ignore[assignment]
    out["sim_data_dir"] = "tmpfs" if data_root() else "default temporary directory"
    speedup, agg_ms = vote_verify_speedup()
    out["vote_verify_speedup_64"] = round(speedup, 2)
    out["vote_verify_aggregate_ms_64"] = round(agg_ms, 2)
    out["safety_violations"] = violations
    out["link_latency_ms"] = LATENCY_S * 1000
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    out["mode"] = "quick" if args.quick else "full"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
