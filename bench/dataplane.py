"""Sealing and data plane throughput, each against a same-run baseline.

Figures:

* seal / open MiB/s through :mod:`p2pgpu.sealed` (pycryptodome), against bare
  ChaCha20-Poly1305 over the same bytes from pycryptodome and from
  ``cryptography`` (OpenSSL): what the envelope costs, and what switching the
  bulk cipher would buy;
* ``/p2pgpu/data/1`` fetch MiB/s between two real hosts on 127.0.0.1 (store,
  entitlement, SHA-256 and fsync included), against the same bytes pushed as
  bare frames over a :class:`~p2pgpu.net.FramedStream` between the same hosts:
  what the data plane adds on top of the transport.

Prints one JSON object as the last line.

    python bench/dataplane.py [--quick] [--mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Crypto.Cipher import ChaCha20_Poly1305  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from p2pgpu.blobstore import BlobStore  # noqa: E402
from p2pgpu.dataplane import DataPlane  # noqa: E402
from p2pgpu.net import FramedStream, NetConfig, open_network  # noqa: E402
from p2pgpu.sealed import EncryptionKey, Purpose, open_sealed, seal, task_context  # noqa: E402

MIB = 1 << 20
RAW_PROTOCOL = "/p2pgpu/bench/raw/1"


def _mib_per_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / MIB / seconds, 1) if seconds > 0 else float("inf")


def bench_sealing(data: bytes, rounds: int) -> dict[str, float]:
    keys = [EncryptionKey.generate() for _ in range(3)]
    context = task_context(b"\x01" * 32, b"\x02" * 32, Purpose.INPUT)
    start = time.perf_counter()
    for _ in range(rounds):
        blob = seal(data, [k.public_key for k in keys], context=context)
    seal_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        open_sealed(blob, keys[1], context=context)
    open_s = time.perf_counter() - start

    key, nonce = os.urandom(32), bytes(12)
    chunks = [data[i : i + MIB] for i in range(0, len(data), MIB)]
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            ChaCha20_Poly1305.new(key=key, nonce=nonce).encrypt_and_digest(chunk)
    pycryptodome_s = time.perf_counter() - start
    aead = ChaCha20Poly1305(key)
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            aead.encrypt(nonce, chunk, None)
    openssl_s = time.perf_counter() - start
    total = len(data) * rounds
    return {
        "seal_mib_per_s": _mib_per_s(total, seal_s),
        "open_mib_per_s": _mib_per_s(total, open_s),
        "bare_pycryptodome_chacha_mib_per_s": _mib_per_s(total, pycryptodome_s),
        "bare_cryptography_chacha_mib_per_s": _mib_per_s(total, openssl_s),
        "seal_vs_bare_pycryptodome_ratio": round(pycryptodome_s / seal_s, 3),
        "cryptography_vs_pycryptodome_ratio": round(pycryptodome_s / openssl_s, 2),
    }


async def bench_transfer(data: bytes, rounds: int, root: Path) -> dict[str, float]:
    config = NetConfig(target_peers=1)
    async with open_network(config, b"\x61" * 32) as server_net, open_network(config, b"\x62" * 32) as client_net:
        await client_net.connect(server_net.addrs[0])
        server = DataPlane(server_net, BlobStore(root / "server"))
        server.serve(lambda peer, address, blob_hash: True)
        blob_hash = server.store.put(data)

        async def raw_push(stream: FramedStream) -> None:
            await stream.receive_exactly_one()
            for i in range(0, len(data), server.config.frame_size):
                await stream.send(data[i : i + server.config.frame_size])
            await stream.send_end()

        server_net.set_stream_handler(RAW_PROTOCOL, raw_push)
        fetch_s = raw_s = 0.0
        for i in range(rounds):
            client = DataPlane(client_net, BlobStore(root / f"client{i}"))
            start = time.perf_counter()
            with trio.fail_after(300):
                await client.fetch_to_store(server_net.peer_id, blob_hash, max_bytes=len(data), timeout=290)
            fetch_s += time.perf_counter() - start
            start = time.perf_counter()
            with trio.fail_after(300):
                async with client_net.open_stream(server_net.peer_id, RAW_PROTOCOL) as stream:
                    await stream.send(b"go")
                    await stream.send_end()
                    received = 0
                    async for frame in stream:
                        received += len(frame)
            raw_s += time.perf_counter() - start
            if received != len(data):
                raise RuntimeError(f"raw transfer got {received} of {len(data)} bytes")
    total = len(data) * rounds
    return {
        "fetch_mib_per_s": _mib_per_s(total, fetch_s),
        "raw_frames_mib_per_s": _mib_per_s(total, raw_s),
        "fetch_vs_raw_ratio": round(raw_s / fetch_s, 3),
    }


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small payloads and one round (CI smoke run)")
    parser.add_argument("--mib", type=int, default=None, help="payload size in MiB")
    args = parser.parse_args()
    mib = args.mib or (4 if args.quick else 32)
    rounds = 1 if args.quick else 3
    data = os.urandom(mib * MIB)
    result: dict[str, object] = {"bench": "p2pgpu.dataplane", "payload_mib": mib, "rounds": rounds}
    result.update(bench_sealing(data, rounds))
    with tempfile.TemporaryDirectory() as tmp:
        result.update(trio.run(bench_transfer, data, rounds, Path(tmp)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
