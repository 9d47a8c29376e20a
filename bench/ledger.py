"""Ledger figures (issue 2). Prints one JSON object as its last line.

    python bench/ledger.py [--quick]

* ``cert_verify_ms``: commit-certificate check (FastAggregateVerify) by
  committee size, native backend; ``cert_verify_ms_py_ecc_64`` and the ratio
  (from bench/bls.py).
* ``block_1000_assign_validate_s``: ``apply_block`` on a block of 1,000
  ``Assign`` transactions, every signature checked (goal <= 1.0 s), beside
  the bare cost of its 2,000 Ed25519 verifications as a baseline ratio.
* ``tx_apply_per_s``: transfers applied per second with signatures already
  verified, beside a bare dict-update loop doing the same balance moves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bls import measure_cert_verify  # noqa: E402
from ledger.devtools import DevChain, make_dev_network, sign_bid  # noqa: E402
from ledger.keys import verify_ed25519  # noqa: E402
from ledger.params import Params  # noqa: E402
from ledger.signing import Domain, signing_bytes  # noqa: E402
from ledger.codec import encode  # noqa: E402
from ledger.transactions import Assign, Bid, PostTask, TaskKind, Transfer, compute_task_id  # noqa: E402
from ledger.transition import (  # noqa: E402
    apply_block,
    build_block,
    process_transaction,
    terms_hash_of_task,
    tx_signing_bytes,
)

N_ASSIGN = 1000
CLIENTS = [f"client{i}" for i in range(10)]
PROVIDERS = ("p0", "p1", "p2", "p3")


def _assign_block_setup():
    params = Params(max_bid_window=100, epoch_length=1000)
    net = make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=PROVIDERS, clients=CLIENTS,
                           balance=10**12, params=params)
    chain = DevChain(net)
    posts = []
    for i in range(N_ASSIGN):
        client = CLIENTS[i % len(CLIENTS)]
        nonce = i // len(CLIENTS)
        posts.append(chain.sign(client, PostTask(
            sender=net.address(client), nonce=nonce, fee=1, kind=TaskKind.BATCH, spec_hash=b"\x01" * 32,
            requirements=b"", max_unit_price=1000, units=1, bid_window=50, exec_blocks=50, audit_rate_bps=0)))
    block, rejected = chain.produce(posts)
    assert not rejected and len(block.transactions) == N_ASSIGN
    assigns = []
    for i in range(N_ASSIGN):
        client = CLIENTS[i % len(CLIENTS)]
        task_id = compute_task_id(net.address(client), i // len(CLIENTS))
        provider = PROVIDERS[i % len(PROVIDERS)]
        bid = sign_bid(net.key(provider), chain.chain_id, Bid(task_id=task_id, provider=net.address(provider),
                                                             unit_price=900, est_seconds=3, expiry_height=40,
                                                             terms_hash=terms_hash_of_task(chain.state.tasks[task_id])))
        assigns.append(chain.sign(client, Assign(sender=net.address(client), nonce=chain.nonce(client) + i // len(CLIENTS),
                                                 fee=1, task_id=task_id, bid=bid)))
    last = chain.blocks[-1].certificate
    block, _, rejected = build_block(chain.state, assigns, proposer=chain.next_proposer(), last_commit=last,
                                     check_signatures=False)
    assert not rejected and len(block.transactions) == N_ASSIGN, rejected[:1]
    return chain, block


def measure_assign_block(reps: int) -> dict:
    chain, block = _assign_block_setup()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        post = apply_block(chain.state, block, check_signatures=True)
        times.append(time.perf_counter() - t0)
    assert post.height == chain.state.height + 1
    # baseline: the 2,000 Ed25519 verifications alone
    jobs = []
    for stx in block.transactions:
        jobs.append((stx.public_key, tx_signing_bytes(chain.chain_id, stx.body), stx.signature))
        sb = stx.body.bid
        jobs.append((sb.public_key, signing_bytes(Domain.BID, chain.chain_id, encode(sb.bid)), sb.signature))
    base = []
    for _ in range(reps):
        t0 = time.perf_counter()
        assert all(verify_ed25519(*j) for j in jobs)
        base.append(time.perf_counter() - t0)
    total, sigs = statistics.median(times), statistics.median(base)
    return {
        "block_1000_assign_validate_s": round(total, 4),
        "block_1000_assign_ed25519_only_s": round(sigs, 4),
        "block_1000_assign_over_sig_ratio": round(total / sigs, 2),
    }


def measure_transfers(n: int) -> dict:
    names = [f"acct{i}" for i in range(50)]
    net = make_dev_network(validators=("v0",), providers=(), clients=names, balance=10**12)
    chain = DevChain(net)
    txs = [
        chain.sign(names[i % 50], Transfer(sender=net.address(names[i % 50]), nonce=i // 50, fee=1,
                                           to=net.address(names[(i + 1) % 50]), amount=7))
        for i in range(n)
    ]
    state = chain.state.copy()
    state.height += 1
    t0 = time.perf_counter()
    for stx in txs:
        process_transaction(state, stx, check_signatures=False)
    ledger_s = time.perf_counter() - t0
    balances = {net.address(a): 10**12 for a in names}
    t0 = time.perf_counter()
    for stx in txs:
        b = stx.body
        balances[b.sender] -= b.amount + b.fee
        balances[b.to] += b.amount
    bare_s = time.perf_counter() - t0
    return {
        "tx_apply_per_s": round(n / ledger_s),
        "tx_bare_dict_update_per_s": round(n / bare_s),
        "tx_apply_over_bare_ratio": round(ledger_s / bare_s, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 40 s)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures: dict = {}
    figures.update(measure_cert_verify(args.quick))
    figures.update(measure_assign_block(reps=2 if args.quick else 5))
    figures.update(measure_transfers(5_000 if args.quick else 20_000))
    figures["goals"] = {"cert_verify_ms_64_native": 5.0, "block_1000_assign_validate_s": 1.0}
    figures["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
