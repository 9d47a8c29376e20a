"""Serving the API under Trio with Hypercorn.

Hypercorn is an ASGI server with a native Trio worker (``hypercorn.trio``),
so the API runs in the node's own Trio event loop (FastAPI and Starlette
reach Trio through AnyIO; no asyncio loop). This module and the app are
imported only when a node starts its API, so the CLI and the node's other
parts do not pay their import cost (on top of trio and the API's types,
measured on a loaded 2-core machine: Hypercorn 0.1-0.25 s, FastAPI with
pydantic about 1 s more).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from p2pgpu.api.app import DEFAULT_MAX_BODY_BYTES, ApiApp
from p2pgpu.api.auth import Authenticator
from p2pgpu.api.types import NodeAPI
from p2pgpu.config import ApiToken, open_api_problem

if TYPE_CHECKING:  # trio 0.35 has trio.TaskStatus; libp2p pulls in trio-typing's older stubs, where it lives here
    from p2pgpu.gateway.routes import GatewayPort
    from trio_typing import TaskStatus

__all__ = ["RemoteBindRefused", "serve_api"]


class RemoteBindRefused(ValueError):
    """Asked to listen on a non-loopback address without ``allow_remote``, or without tokens."""


def _port_of(bind_url: str) -> int:
    return int(bind_url.rsplit(":", 1)[1])


async def serve_api(
    node: NodeAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    tokens: Sequence[ApiToken] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] | None = None,
    gateway: GatewayPort | None = None,
    task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node``'s API on ``host:port`` until cancelled; reports the bound port via ``task_status``.

    Use as ``port = await nursery.start(serve_api, node, "127.0.0.1", 0)``.
    The API can post tasks that spend the node's funds, so a non-loopback
    host is refused (before anything binds) unless ``allow_remote`` says it
    is meant *and* ``tokens`` guard it. With tokens, every route but
    ``/health`` needs one, on loopback too. ``clock`` (monotonic seconds)
    times the tokens' spending windows; tests pass their own. ``gateway``
    adds the inference gateway's routes (``/v2/...``, ``/v1/models/...``).
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    problem = open_api_problem(host, allow_remote, len(tokens))
    if problem is not None:
        raise RemoteBindRefused(problem)
    log = logger or logging.getLogger("p2pgpu.api")
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    # Headers are small; bodies are bounded by the app while it reads them.
    config.h11_max_incomplete_size = 64 * 1024
    auth = Authenticator(tokens, clock=clock or time.monotonic, logger=log)
    app = ApiApp(node, max_body_bytes=max_body_bytes, logger=log, auth=auth, gateway=gateway)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, cast(Any, app), config, mode="asgi"))  # Starlette's ASGI types, not hypercorn's
        task_status.started(_port_of(binds[0]))
