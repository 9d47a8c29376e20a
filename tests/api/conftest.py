"""A real API server on 127.0.0.1 (ephemeral port) in front of a FakeNode, and an httpx client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from p2pgpu.api.server import serve_api
from tests.api.fake_node import FakeNode

MAX_BODY = 256 * 1024


@dataclass
class Served:
    node: FakeNode
    client: httpx.AsyncClient
    url: str


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[Served]:
    node = FakeNode()
    port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, max_body_bytes=MAX_BODY,
                                                             task_status=task_status))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        yield Served(node, client, url)
