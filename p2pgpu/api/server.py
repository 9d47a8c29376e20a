"""Serving the API under Trio with Hypercorn.

Hypercorn is an ASGI server with a native Trio worker (``hypercorn.trio``),
so the API runs in the node's own Trio event loop with no anyio or asyncio
bridge. It is imported here only, so the CLI and the node's other parts do
not pay its import cost (~0.25 s measured on top of trio).
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from p2pgpu.api.app import DEFAULT_MAX_BODY_BYTES, ApiApp
from p2pgpu.api.types import NodeAPI
from p2pgpu.config import is_loopback_host

__all__ = ["RemoteBindRefused", "serve_api"]


class RemoteBindRefused(ValueError):
    """Asked to listen on a non-loopback address without ``allow_remote``."""


def _port_of(bind_url: str) -> int:
    return int(bind_url.rsplit(":", 1)[1])


async def serve_api(
    node: NodeAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    logger: logging.Logger | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node``'s API on ``host:port`` until cancelled; reports the bound port via ``task_status``.

    Use as ``port = await nursery.start(serve_api, node, "127.0.0.1", 0)``.
    The API can post tasks that spend the node's funds, so a non-loopback
    host is refused unless ``allow_remote`` says it is meant.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    if not allow_remote and not is_loopback_host(host):
        raise RemoteBindRefused(f"API host {host!r} is not loopback; pass allow_remote=True to expose it")
    log = logger or logging.getLogger("p2pgpu.api")
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    # Headers are small; bodies are bounded by the app while it reads them.
    config.h11_max_incomplete_size = 64 * 1024
    app = ApiApp(node, max_body_bytes=max_body_bytes, logger=log)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config, mode="asgi"))
        task_status.started(_port_of(binds[0]))
