"""Latency of the node's HTTP API per request: over real HTTP on 127.0.0.1, and the app alone (ASGI, no sockets).

The API server (``serve_api``: Hypercorn's Trio worker in front of the
app) runs in this process in front of the scripted node of the API tests
(``tests/api/fake_node.py``: answers at once, so what is timed is the HTTP
stack and the app, not a ledger). Requests go one at a time over one
keep-alive connection (httpx), so each figure is a round trip with no
queueing: GET /health (smallest answer), GET /tasks/{id} (a path parameter
and a task view), GET /ledger/blocks/{height} (a block rendered as JSON),
POST /tasks (a msgpack submission of two small tensors, decoded in a worker
thread) and GET /metrics. The "asgi" figures call the app directly with a
prepared request, without server or client: the app's own share.

The script only uses what both the hand-written app and the FastAPI app
offer (``serve_api``, ``ApiApp``), so it runs unchanged on either to compare
them:

    python bench/api.py               # 2000 requests per route (POST: 500)
    python bench/api.py --quick       # 300 per route

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pgpu.api.app import ApiApp  # noqa: E402
from p2pgpu.api.server import serve_api  # noqa: E402
from p2pgpu.api.types import MSGPACK, SubmitRequest, encode_submit  # noqa: E402
from tests.api.fake_node import FakeNode, matmul_job  # noqa: E402

WARMUP = 50
TASK_ID = bytes([1]) * 32


def submission_body() -> bytes:
    spec, inputs = matmul_job()
    return encode_submit(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=10, bid_window=5,
                                       audit_rate_bps=500))


def summarize(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "n": len(us),
        "median_us": round(statistics.median(us), 1),
        "p90_us": round(us[int(0.9 * (len(us) - 1))], 1),
        "p99_us": round(us[int(0.99 * (len(us) - 1))], 1),
        "mean_us": round(statistics.fmean(us), 1),
    }


def fresh_node() -> FakeNode:
    node = FakeNode(balances={bytes(range(20)): 10**9})
    return node


def reset_tasks(node: FakeNode) -> None:
    """Keep one known task (the fake numbers tasks by a byte, so it holds at most 255)."""
    task = node.tasks.get(TASK_ID)
    node.tasks.clear()
    node.submitted.clear()
    if task is not None:
        node.tasks[TASK_ID] = task


async def time_calls(call: Callable[[], Awaitable[int]], count: int, expect: int,
                     after: Callable[[], None]) -> list[float]:
    for _ in range(WARMUP):
        status = await call()
        after()
        if status != expect:
            raise SystemExit(f"unexpected status {status} (wanted {expect})")
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
        after()
    return samples


async def bench_http(requests: int, posts: int, body: bytes) -> dict[str, Any]:
    node = fresh_node()
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            first = await client.post("/tasks", content=body, headers={"content-type": MSGPACK})
            assert first.status_code == 201, first.text

            def get(path: str) -> Callable[[], Awaitable[int]]:
                async def call() -> int:
                    return (await client.get(path)).status_code
                return call

            async def post() -> int:
                return (await client.post("/tasks", content=body, headers={"content-type": MSGPACK})).status_code

            def keep() -> None:
                reset_tasks(node)

            for name, call, expect, count in (
                ("GET /health", get("/health"), 200, requests),
                ("GET /tasks/{id}", get(f"/tasks/{TASK_ID.hex()}"), 200, requests),
                ("GET /ledger/blocks/{h}", get("/ledger/blocks/3"), 200, requests),
                ("POST /tasks", post, 201, posts),
                ("GET /metrics", get("/metrics"), 200, requests),
            ):
                out[name] = summarize(await time_calls(call, count, expect, keep))
        nursery.cancel_scope.cancel()
    return out


async def bench_asgi(requests: int, posts: int, body: bytes) -> dict[str, Any]:
    node = fresh_node()
    app = ApiApp(node, logger=logging.getLogger("bench.api"))

    def request(method: str, path: str, payload: bytes = b"", ctype: str | None = None) -> Callable[[], Awaitable[int]]:
        headers = [(b"host", b"node")]
        if ctype:
            headers += [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}

        async def call() -> int:
            sent = False
            status = 0

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if sent:
                    await trio.sleep_forever()
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}

            async def send(message: MutableMapping[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]

            await app(dict(scope), receive, send)
            return status

        return call

    await request("POST", "/tasks", body, MSGPACK)()
    out: dict[str, Any] = {}
    for name, call, expect, count in (
        ("GET /health", request("GET", "/health"), 200, requests),
        ("GET /tasks/{id}", request("GET", f"/tasks/{TASK_ID.hex()}"), 200, requests),
        ("GET /ledger/blocks/{h}", request("GET", "/ledger/blocks/3"), 200, requests),
        ("POST /tasks", request("POST", "/tasks", body, MSGPACK), 201, posts),
        ("GET /metrics", request("GET", "/metrics"), 200, requests),
    ):
        out[name] = summarize(await time_calls(call, count, expect, lambda: reset_tasks(node)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 requests per route")
    parser.add_argument("--requests", type=int, default=2000, help="requests per GET route")
    args = parser.parse_args()
    requests = 300 if args.quick else args.requests
    posts = max(100, requests // 4)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("p2pgpu.api").setLevel(logging.WARNING)
    body = submission_body()
    result: dict[str, Any] = {
        "bench": "api",
        "app": ApiApp.__module__ + " " + ("fastapi" if hasattr(ApiApp(fresh_node()), "fastapi") else "hand-written"),
        "requests_per_route": requests,
        "posts": posts,
        "submission_bytes": len(body),
        "http": trio.run(bench_http, requests, posts, body),
        "asgi": trio.run(bench_asgi, requests, posts, body),
    }
    for mode in ("http", "asgi"):
        for route, figures in result[mode].items():
            print(f"{mode:5} {route:24} median {figures['median_us']:8.1f} us   p90 {figures['p90_us']:8.1f} us   "
                  f"p99 {figures['p99_us']:8.1f} us")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
