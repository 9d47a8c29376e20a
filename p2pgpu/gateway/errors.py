"""The gateway's errors: one type per HTTP status the two protocols answer with.

Both the Open Inference Protocol v2 and TF Serving's REST API answer a
failed request with ``{"error": "<message>"}`` and a status code, so every
codec function raises a ``GatewayError`` carrying both; a route catches the
base class, answers ``exc.status`` with ``error_body(exc)``, and needs no
table of its own.
"""

from __future__ import annotations

import json

__all__ = [
    "BadModelOutput",
    "GatewayError",
    "InvalidRequest",
    "ModelNotFound",
    "ModelNotReady",
    "RequestTooLarge",
    "TooManyInferRequests",
    "UnsupportedMediaType",
    "error_body",
]


class GatewayError(Exception):
    """A request the gateway refuses; ``status`` is the HTTP status, ``message`` what the user can act on."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:  # e.g. v2's model-ready answers "not ready" with a 4xx, not the class's 503
            self.status = status
        self.retry_after = retry_after
        """Seconds before trying again is worth it (sent as ``Retry-After``)."""


class InvalidRequest(GatewayError):
    """The request is malformed or does not fit the model's signature (400)."""

    status = 400


class ModelNotFound(GatewayError):
    """No model is registered under that name (and version) (404)."""

    status = 404


class ModelNotReady(GatewayError):
    """The model exists but no provider can serve it now; the message says why (503)."""

    status = 503


class RequestTooLarge(GatewayError):
    """The body, or the tensor it declares, is over the gateway's size limit (413)."""

    status = 413


class UnsupportedMediaType(GatewayError):
    """The body's content type is not one the protocol accepts (415)."""

    status = 415


class TooManyInferRequests(GatewayError):
    """More is queued for the model than the gateway holds: back off and retry (429)."""

    status = 429


class BadModelOutput(GatewayError):
    """What the provider returned does not fit the model's output signature (502: the upstream is at fault)."""

    status = 502


def error_body(exc: GatewayError) -> bytes:
    """The protocols' error answer, ``{"error": "<message>"}``, as UTF-8 JSON bytes."""
    return json.dumps({"error": exc.message}, ensure_ascii=False).encode("utf-8")
