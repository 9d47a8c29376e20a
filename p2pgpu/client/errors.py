"""The SDK's errors: one tree, so a caller can catch as broadly or as narrowly as it needs.

Every answer other than success becomes one of these, chosen by status (and,
for a 404, by route and code), with the node's own words as the message.
Two answer shapes arrive: the node's task API says ``{"error": code,
"message": text}``; the Open Inference Protocol v2 routes say ``{"error":
text}``. Both are read here, by :func:`error_for`, a pure function of the
status, headers and body, so the sync and the async client raise exactly
the same thing::

    P2PGPUError                     base: ``message``, ``status`` (None if no answer), ``code``
    ├── NodeUnreachable             no answer at all (refused, DNS, connect timeout); names the URL
    ├── RequestTimeout              connected, but no answer in time (also a TimeoutError)
    ├── WaitTimeout                 ``wait(timeout=...)`` ran out; ``view`` is the last one seen
    ├── BadResponse                 an answer this SDK cannot read (not the shape the protocol says)
    ├── InvalidInput        400     the request does not fit (also a ValueError); raised client-side too
    │   ├── InvalidModelFile        a model file push_model cannot read or validate (never sent)
    │   └── Unprocessable   422     well-formed but refused: invalid job spec or terms
    ├── AuthError           401/403
    │   ├── Unauthorized    401     no token, or one the node does not accept
    │   └── Forbidden       403     the token lacks the route's scope
    ├── InsufficientFunds   402     the node's balance cannot escrow the task (or pay the fee)
    ├── NotFound            404
    │   ├── ModelNotFound           any 404 of a v2 model route; ``unknown_model`` elsewhere
    │   └── TaskNotFound            ``unknown_task``
    ├── NotReady            409     a result asked for before delivery; a model name already taken
    ├── PayloadTooLarge     413     body over the node's ``api.max_body_bytes``
    ├── RateLimited         429     ``retry_after`` seconds (float) from Retry-After, if the node sent it
    ├── ServerError         5xx     but 503
    ├── Unavailable         503
    │   └── ModelUnavailable        a 503 of a v2 model route (model loading, not servable now)
    └── ModelPushFailed             ``push_model(wait=True)``: the registration failed on the chain
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

__all__ = [
    "AuthError",
    "BadResponse",
    "Forbidden",
    "InsufficientFunds",
    "InvalidInput",
    "InvalidModelFile",
    "ModelNotFound",
    "ModelPushFailed",
    "ModelUnavailable",
    "NodeUnreachable",
    "NotFound",
    "NotReady",
    "P2PGPUError",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "Route",
    "ServerError",
    "TaskNotFound",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "WaitTimeout",
    "error_for",
    "parse_retry_after",
]

Route = Literal["api", "v2"]
"""Which protocol answered: the node's task API or the Open Inference Protocol v2 routes."""


class P2PGPUError(Exception):
    """Base of every SDK error. ``status`` is the HTTP status (None when there was no answer); ``code`` is the
    node's stable error code when it sent one (for scripts), ``message`` its words (for people)."""

    default_code: str = "error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.default_code


class NodeUnreachable(P2PGPUError):
    """Nothing answered at ``url``: the node is not running, the URL or port is wrong, or the network is down."""

    default_code = "unreachable"

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class RequestTimeout(P2PGPUError, TimeoutError):
    """The node took the request but did not answer within the client's ``timeout``."""

    default_code = "timeout"


class WaitTimeout(P2PGPUError, TimeoutError):
    """``wait(..., timeout=S)`` (or a push's wait) gave up; the task or push goes on. ``view`` is the last seen."""

    default_code = "wait_timeout"

    def __init__(self, message: str, *, view: Any = None) -> None:
        super().__init__(message)
        self.view = view


class BadResponse(P2PGPUError):
    """The node answered with something this SDK cannot read (a proxy's page, a truncated body, a wrong shape)."""

    default_code = "bad_response"


class InvalidInput(P2PGPUError, ValueError):
    default_code = "bad_request"


class InvalidModelFile(InvalidInput):
    default_code = "bad_model_file"


class Unprocessable(InvalidInput):
    default_code = "unprocessable"


class AuthError(P2PGPUError):
    """The node wants a token (``Client(token=...)``), or a token with more scopes (``p2pgpu api token new``)."""

    default_code = "unauthorized"


class Unauthorized(AuthError):
    default_code = "unauthorized"


class Forbidden(AuthError):
    default_code = "forbidden"


class InsufficientFunds(P2PGPUError):
    default_code = "insufficient_funds"


class NotFound(P2PGPUError):
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "unknown_model"


class TaskNotFound(NotFound):
    default_code = "unknown_task"


class NotReady(P2PGPUError):
    default_code = "not_ready"


class PayloadTooLarge(P2PGPUError):
    default_code = "body_too_large"


class RateLimited(P2PGPUError):
    """Over a limit that frees up with time; ``retry_after``: seconds to wait first, if the node said."""

    default_code = "too_many_requests"

    def __init__(self, message: str, *, status: int | None = 429, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ServerError(P2PGPUError):
    default_code = "internal_error"


class Unavailable(P2PGPUError):
    default_code = "unavailable"


class ModelUnavailable(Unavailable):
    default_code = "model_unavailable"


class ModelPushFailed(P2PGPUError):
    """The node sent the ``RegisterModel`` but it did not make it into a final block; ``detail`` says why."""

    default_code = "push_failed"


_BY_STATUS: Final[Mapping[int, type[P2PGPUError]]] = {
    400: InvalidInput, 401: Unauthorized, 402: InsufficientFunds, 403: Forbidden, 404: NotFound, 409: NotReady,
    413: PayloadTooLarge, 422: Unprocessable, 429: RateLimited, 503: Unavailable,
}
_NOT_FOUND_BY_CODE: Final[Mapping[str, type[NotFound]]] = {"unknown_model": ModelNotFound,
                                                           "unknown_task": TaskNotFound}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent or
    unreadable (a bad header must not hide the 429 itself)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _words(body: bytes, reason: str) -> tuple[str | None, str]:
    """(code, message) of an error body in either shape; the raw text (or reason phrase) when it is neither."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        if isinstance(obj.get("message"), str):  # the task API: a code and a message
            return obj["error"], obj["message"]
        return None, obj["error"]  # v2: the message alone
    text = body[:200].decode("utf-8", "replace").strip()
    return None, text or reason


def error_for(status: int, headers: Mapping[str, str], body: bytes, *, route: Route, what: str,
              reason: str = "") -> P2PGPUError:
    """The error an answer with ``status`` means; ``headers`` with lower-case names; ``what`` names the request
    (e.g. ``POST /v2/models/m/infer``), prefixed to messages that are not the node's own words."""
    code, message = _words(body, reason or f"HTTP {status}")
    if code is None and not message:
        message = f"{what}: HTTP {status}"
    if status == 429:
        return RateLimited(message, code=code, retry_after=parse_retry_after(headers.get("retry-after")))
    cls: type[P2PGPUError] = _BY_STATUS.get(status, ServerError if status >= 500 else P2PGPUError)
    if route == "v2" and status == 404:
        cls = ModelNotFound
    elif route == "v2" and status == 503:
        cls = ModelUnavailable
    elif cls is NotFound and code is not None:
        cls = _NOT_FOUND_BY_CODE.get(code, NotFound)
    if cls is P2PGPUError:
        message = f"{what}: HTTP {status}: {message}"
    return cls(message, status=status, code=code)
