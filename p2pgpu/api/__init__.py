"""The node's local HTTP API: interface (:mod:`.types`), ASGI app (:mod:`.app`), server (:mod:`.server`).

Importing this package does not import the HTTP server; :func:`serve_api`
loads Hypercorn on first call.
"""

from __future__ import annotations

from typing import Any

from p2pgpu.api.types import (
    STAGES,
    AccountView,
    ApiError,
    BadRequest,
    BidView,
    Forbidden,
    HeadView,
    Health,
    InternalError,
    MethodNotAllowed,
    NodeAPI,
    NotFound,
    NotReady,
    PayloadTooLarge,
    PaymentRequired,
    ProviderView,
    StageTime,
    Status,
    SubmitRequest,
    SupplyView,
    TaskView,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
    ValidatorView,
)

__all__ = [
    "STAGES",
    "AccountView",
    "ApiError",
    "BadRequest",
    "BidView",
    "Forbidden",
    "HeadView",
    "Health",
    "InternalError",
    "MethodNotAllowed",
    "NodeAPI",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "PaymentRequired",
    "ProviderView",
    "StageTime",
    "Status",
    "SubmitRequest",
    "SupplyView",
    "TaskView",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "ValidatorView",
    "serve_api",
]


async def serve_api(*args: Any, **kwargs: Any) -> None:
    """See :func:`p2pgpu.api.server.serve_api` (imported lazily: it loads Hypercorn)."""
    from p2pgpu.api.server import serve_api as _serve

    await _serve(*args, **kwargs)
