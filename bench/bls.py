"""What a commit certificate and a block's signatures cost to verify.

Figures (one JSON object on the last line):

* ``cert_verify_ms``: FastAggregateVerify of N committee signatures over one
  message, native backend, committee keys already parsed (the steady state:
  keys recur in every certificate of an epoch), for N in 4, 16, 64, 128;
* ``cert_verify_cold_ms``: the same with the parsed-key cache emptied first
  (the first certificate after an epoch change): decompression and subgroup
  checks of every key;
* ``cert_verify_ms_py_ecc_64`` and ``py_ecc_over_native_ratio_64``: the pure
  Python reference on the same 64-key certificate, the baseline;
* the parts: aggregating 64 signatures, aggregating 64 public keys, and one
  single-key verify (the pairing cost a certificate cannot avoid);
* ``ed25519``: per-signature verify cost through ``ledger.keys.verify_ed25519``,
  how much of it is loading the key (whether caching key objects would pay),
  and pycryptodome's verify as the baseline.

    python bench/bls.py [--quick]

``--quick`` runs fewer repetitions and a single py_ecc verification; it
finishes in well under 40 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import bls  # noqa: E402
from ledger.keys import AccountKey, verify_ed25519  # noqa: E402

COMMITTEE_SIZES = (4, 16, 64, 128)
MESSAGE = b"precommit" + hashlib.sha256(b"block").digest()


def _median_ms(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"bench/bls.py: {what} failed to verify; the figures would be meaningless")


def measure_cert_verify(quick: bool) -> dict[str, Any]:
    """Certificate verification costs, native against the py_ecc reference (see module docstring)."""
    native = bls.get_backend("blspy")
    reference = bls.get_backend("py_ecc")
    reps = 20 if quick else 200
    secrets = [bls.keygen(hashlib.sha256(b"bench-validator-%d" % i).digest()) for i in range(max(COMMITTEE_SIZES))]
    pubkeys = [native.sk_to_pk(sk) for sk in secrets]
    signatures = [native.sign(sk, MESSAGE) for sk in secrets]
    clear_key_cache = bls._blspy_pubkey.cache_clear  # the cold figure measures exactly this cache's effect

    warm: dict[str, float] = {}
    cold: dict[str, float] = {}
    for n in COMMITTEE_SIZES:
        keys, aggregate = pubkeys[:n], native.aggregate(signatures[:n])
        _check(native.fast_aggregate_verify(keys, MESSAGE, aggregate), f"{n}-key certificate")
        warm[str(n)] = round(_median_ms(lambda: native.fast_aggregate_verify(keys, MESSAGE, aggregate), reps), 3)
        cold[str(n)] = round(
            _median_ms(
                lambda: native.fast_aggregate_verify(keys, MESSAGE, aggregate),
                max(3, reps // 10),
                before=clear_key_cache,
            ),
            3,
        )
    native.fast_aggregate_verify(pubkeys, MESSAGE, native.aggregate(signatures))  # leave the cache warm

    keys64, sigs64 = pubkeys[:64], signatures[:64]
    aggregate64 = native.aggregate(sigs64)
    aggregate_pk64 = native.aggregate_pubkeys(keys64)
    parts = {
        "sig_aggregate_ms_64": round(_median_ms(lambda: native.aggregate(sigs64), reps), 3),
        "pubkey_aggregate_ms_64": round(_median_ms(lambda: native.aggregate_pubkeys(keys64), reps), 3),
        "single_verify_ms": round(_median_ms(lambda: native.verify(aggregate_pk64, MESSAGE, aggregate64), reps), 3),
    }

    _check(reference.fast_aggregate_verify(keys64, MESSAGE, aggregate64), "py_ecc 64-key certificate")
    py_ecc_64 = _median_ms(lambda: reference.fast_aggregate_verify(keys64, MESSAGE, aggregate64), 1 if quick else 3)
    return {
        "cert_verify_ms": warm,
        "cert_verify_cold_ms": cold,
        "cert_verify_ms_py_ecc_64": round(py_ecc_64, 1),
        "py_ecc_n": 64,
        "py_ecc_over_native_ratio_64": round(py_ecc_64 / warm["64"], 1),
        **parts,
    }


def measure_ed25519_verify(quick: bool) -> dict[str, Any]:
    """Per-signature Ed25519 costs: verify, key loading share, pycryptodome baseline."""
    from Crypto.Signature import eddsa
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    count = 200 if quick else 1000
    keys = [AccountKey.from_seed(hashlib.sha256(b"bench-account-%d" % (i % 64)).digest()) for i in range(count)]
    messages = [b"tx" + i.to_bytes(4, "big") * 40 for i in range(count)]
    items = [(k.public_key, m, k.sign(m)) for k, m in zip(keys, messages)]

    def run_ours() -> None:
        for pk, msg, sig in items:
            _check(verify_ed25519(pk, msg, sig), "Ed25519 signature")

    loaded = [(Ed25519PublicKey.from_public_bytes(pk), msg, sig) for pk, msg, sig in items]

    def run_preloaded() -> None:
        for key, msg, sig in loaded:
            key.verify(sig, msg)

    def run_load_only() -> None:
        for pk, _, _ in items:
            Ed25519PublicKey.from_public_bytes(pk)

    baseline = items[: max(50, count // 10)]
    crypto_keys = {pk: eddsa.import_public_key(pk) for pk, _, _ in baseline}

    def run_pycryptodome() -> None:
        for pk, msg, sig in baseline:
            eddsa.new(crypto_keys[pk], "rfc8032").verify(msg, sig)

    # Other processes share the two cores: interleave the variants so they
    # see the same load, and keep each one's best round.
    runs: dict[str, tuple[Callable[[], None], int]] = {
        "ours": (run_ours, count),
        "preloaded": (run_preloaded, count),
        "load": (run_load_only, count),
        "pycryptodome": (run_pycryptodome, len(baseline)),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(5 if quick else 9):
        for name, (fn, n) in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e6 / n)
    ours_us, preloaded_us, load_us, pycryptodome_us = (
        best["ours"],
        best["preloaded"],
        best["load"],
        best["pycryptodome"],
    )
    return {
        "ed25519_verify_us": round(ours_us, 1),
        "ed25519_verify_preloaded_key_us": round(preloaded_us, 1),
        "ed25519_key_load_us": round(load_us, 2),
        "ed25519_key_cache_max_gain": round(ours_us / preloaded_us, 3),  # ~1.0: not worth a cache
        "ed25519_verify_us_pycryptodome": round(pycryptodome_us, 1),
        "pycryptodome_over_cryptography_ratio": round(pycryptodome_us / ours_us, 2),
        "ed25519_verifies_per_s": round(1e6 / ours_us),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, one py_ecc verification")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    figures: dict[str, Any] = {"bench": "bls", "quick": args.quick}
    figures.update(measure_cert_verify(args.quick))
    figures.update(measure_ed25519_verify(args.quick))
    figures["elapsed_s"] = round(time.perf_counter() - start, 1)
    cert = figures["cert_verify_ms"]
    print(
        "certificate verify (native, warm keys): "
        + ", ".join(f"{n} keys {ms} ms" for n, ms in cert.items())
        + f"; py_ecc 64 keys {figures['cert_verify_ms_py_ecc_64']} ms"
        + f" ({figures['py_ecc_over_native_ratio_64']}x slower)"
    )
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
