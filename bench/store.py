"""How fast the block log appends and recovers, against raw file writes in the same run.

Figures: appends/s with and without fsync through ``ChainStore``, the same
for a bare ``os.write`` (+ ``fsync``) of equally sized unframed records (the
baseline: what framing, checksums and bookkeeping cost), and the recovery scan
rate on reopen. Prints one JSON object as the last line.

    python bench/store.py [--quick] [--record-bytes N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger.store import ChainStore  # noqa: E402


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_store(data_dir: Path, record: bytes, count: int, *, sync: bool) -> float:
    with ChainStore.open(data_dir) as cs:
        start = time.perf_counter()
        for height in range(count):
            cs.append_block(height, record, sync=sync)
        if not sync:
            cs.sync()
        return _rate(count, time.perf_counter() - start)


def bench_raw(path: Path, record: bytes, count: int, *, sync: bool) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, record)
            if sync:
                os.fdatasync(fd)
        if not sync:
            os.fdatasync(fd)
        return _rate(count, time.perf_counter() - start)
    finally:
        os.close(fd)


def bench_recovery(data_dir: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with ChainStore.open(data_dir) as cs:
        elapsed = time.perf_counter() - start
        return (0 if cs.head_height is None else cs.head_height + 1), elapsed


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, under 10 s")
    parser.add_argument("--record-bytes", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    synced = 200 if args.quick else 2000
    unsynced = 20_000 if args.quick else 200_000
    record = os.urandom(args.record_bytes)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        raw_sync = bench_raw(root / "raw-sync", record, synced, sync=True)
        store_sync = bench_store(root / "store-sync", record, synced, sync=True)
        raw_nosync = bench_raw(root / "raw-nosync", record, unsynced, sync=False)
        store_nosync = bench_store(root / "store-nosync", record, unsynced, sync=False)
        recovered, recovery_s = bench_recovery(root / "store-nosync")
        log_mib = (root / "store-nosync" / ChainStore.LOG_NAME).stat().st_size / (1 << 20)

    result: dict[str, object] = {
        "bench": "ledger.store",
        "record_bytes": args.record_bytes,
        "synced_appends": synced,
        "unsynced_appends": unsynced,
        "store_sync_appends_per_s": round(store_sync, 1),
        "raw_fsync_writes_per_s": round(raw_sync, 1),
        "store_vs_raw_sync_ratio": round(store_sync / raw_sync, 3),
        "store_nosync_appends_per_s": round(store_nosync, 1),
        "raw_nosync_writes_per_s": round(raw_nosync, 1),
        "store_vs_raw_nosync_ratio": round(store_nosync / raw_nosync, 3),
        "nosync_vs_sync_ratio": round(store_nosync / store_sync, 1),
        "recovery_records": recovered,
        "recovery_records_per_s": round(_rate(recovered, recovery_s), 1),
        "recovery_mib_per_s": round(log_mib / recovery_s, 1) if recovery_s > 0 else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
