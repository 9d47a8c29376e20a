"""The node's local HTTP API: interface (:mod:`.types`), JSON models (:mod:`.models`), FastAPI app (:mod:`.app`),
``/metrics`` page (:mod:`.metrics`), server (:mod:`.server`).

Importing this package does not import the HTTP server or FastAPI;
:func:`serve_api` loads them on first call.
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
