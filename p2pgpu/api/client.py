"""A small synchronous client for the local API, used by the CLI.

Transport failures are mapped where they enter (as httpx maps socket
errors): connection refused, DNS, timeouts become :class:`ApiUnreachable`
naming the URL; an error answer becomes the same :class:`ApiError` subclass
the server raised, with its code and message, so the CLI prints the
server's words rather than an HTTP status line.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx
import numpy as np

from p2pgpu.api.types import (
    MSGPACK,
    ApiError,
    BadRequest,
    Health,
    SubmitRequest,
    TaskView,
    decode_result,
    encode_submit,
    error_from_status,
)

__all__ = ["ApiClient", "ApiUnreachable"]


class ApiUnreachable(Exception):
    """No answer from the API at all (not listening, wrong URL, timed out)."""


class ApiClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiUnreachable(f"the API at {self.base_url} did not answer {method} {path} in time ({exc})") from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the API at {self.base_url}: {exc or type(exc).__name__}") from None
        if resp.status_code in ok:
            return resp
        raise self._error(resp)

    def _error(self, resp: httpx.Response) -> ApiError:
        try:
            body = resp.json()
            return error_from_status(resp.status_code, str(body["error"]), str(body["message"]))
        except (ValueError, KeyError, TypeError):
            text = resp.text[:200].strip() or resp.reason_phrase
            return error_from_status(resp.status_code, "bad_response", f"HTTP {resp.status_code}: {text}")

    def _json(self, path: str) -> Any:
        resp = self._request("GET", path)
        try:
            return resp.json()
        except ValueError:
            raise BadRequest(f"{path}: the API answered with something other than JSON", "bad_response") from None

    # ------------------------------------------------------------- endpoints

    def health(self) -> tuple[int, Health]:
        resp = self._request("GET", "/health", ok=(200, 206, 503))
        body = resp.json()
        return resp.status_code, Health(body["state"], body["head_height"], body["peers"], body.get("detail", ""))

    def status(self) -> dict[str, Any]:
        return self._json("/status")

    def submit(self, request: SubmitRequest) -> bytes:
        body = encode_submit(request)
        resp = self._request("POST", "/tasks", ok=(201,), content=body, headers={"content-type": MSGPACK})
        return bytes.fromhex(resp.json()["task_id"])

    def task(self, task_id: bytes) -> TaskView:
        return TaskView.from_json(self._json(f"/tasks/{task_id.hex()}"))

    def task_result(self, task_id: bytes) -> dict[str, np.ndarray]:
        resp = self._request("GET", f"/tasks/{task_id.hex()}/result")
        wire = decode_result(resp.content)
        if wire.task_id != task_id:
            raise BadRequest(f"the API returned the result of task {wire.task_id.hex()}, not {task_id.hex()}",
                             "bad_response")
        return dict(wire.outputs)

    def dispute_item(self, task_id: bytes, item: int, reason: str = "") -> None:
        """Dispute one provider-signed output of a stream task (the node sends the Dispute)."""
        self._request("POST", f"/tasks/{task_id.hex()}/disputes", ok=(202,),
                      json={"item": item, "reason": reason})

    def balance(self, address: str) -> dict[str, Any]:
        return self._json(f"/ledger/balance/{address}")

    def account(self, address: str) -> dict[str, Any]:
        return self._json(f"/ledger/accounts/{address}")

    def validators(self) -> list[dict[str, Any]]:
        return self._json("/ledger/validators")["validators"]

    def providers(self) -> list[dict[str, Any]]:
        return self._json("/ledger/providers")["providers"]

    def head(self) -> dict[str, Any]:
        return self._json("/ledger/head")

    def supply(self) -> dict[str, Any]:
        """The ledger's books: each bucket, ``total``, ``genesis_supply``, ``minted`` and ``conserved``."""
        return self._json("/ledger/supply")

    def block(self, height: int) -> dict[str, Any]:
        return self._json(f"/ledger/blocks/{height}")

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text
