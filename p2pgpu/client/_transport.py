"""What the sync and the async client share around httpx: the URL, the headers, and turning answers into
:class:`~p2pgpu.client._ops.Reply` values or SDK errors. No I/O of its own."""

from __future__ import annotations

from typing import Final

import httpx

from p2pgpu.api.client import InvalidToken, bearer_headers
from p2pgpu.client._ops import Call, Reply
from p2pgpu.client.errors import InvalidInput, NodeUnreachable, P2PGPUError, RequestTimeout, error_for
from p2pgpu.config import DEFAULT_API_PORT

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_URL", "auth_headers", "base_url", "map_transport_error", "reply_of",
           "timeout_for"]

DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_API_PORT}"
DEFAULT_TIMEOUT_S: Final = 30.0


def base_url(url: str) -> str:
    """``url`` with a scheme (``http://`` if none, as the CLI's ``--api``) and without a trailing slash."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"node URL {url!r}: give e.g. {DEFAULT_URL}")
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.rstrip("/")


def auth_headers(token: str | None) -> dict[str, str]:
    try:
        return bearer_headers(token)
    except InvalidToken as exc:
        raise InvalidInput(str(exc), code="bad_token") from None


def timeout_for(call: Call, default: float) -> float:
    return (default if call.timeout is None else max(call.timeout, default)) + call.extra_timeout


def map_transport_error(exc: httpx.TransportError, call: Call, url: str) -> P2PGPUError:
    """No answer: a connect failure is :class:`NodeUnreachable` naming the URL; a slow answer RequestTimeout."""
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
        return RequestTimeout(f"the node at {url} did not answer {call.what} in time ({type(exc).__name__}); "
                              "raise the client's timeout for slow models")
    if isinstance(exc, httpx.ConnectTimeout):
        return NodeUnreachable(f"cannot reach the node at {url}: connecting timed out", url=url)
    return NodeUnreachable(f"cannot reach the node at {url}: {exc or type(exc).__name__} (is it running, and is "
                           "the API port right?)", url=url)


def reply_of(call: Call, resp: httpx.Response) -> Reply:
    """The answer as a :class:`Reply`, or the SDK error its status means (``resp`` already read)."""
    headers = {k.lower(): v for k, v in resp.headers.items()}
    if resp.status_code in call.ok:
        return Reply(resp.status_code, headers, resp.content)
    raise error_for(resp.status_code, headers, resp.content, route=call.route, what=call.what,
                    reason=resp.reason_phrase)
