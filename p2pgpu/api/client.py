"""A small synchronous client for the local API, used by the CLI.

Transport failures are mapped where they enter (as httpx maps socket
errors): connection refused, DNS, timeouts become :class:`ApiUnreachable`
naming the URL; an error answer becomes the same :class:`ApiError` subclass
the server raised, with its code and message, so the CLI prints the
server's words rather than an HTTP status line.

A node with ``[[api.tokens]]`` wants ``Authorization: Bearer <token>`` on
every request but ``/health``; ``ApiClient(url, token=...)`` sends it with
each request. The token is kept in the HTTP client's headers only: it is
not part of any URL, message or ``repr`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import time
from types import TracebackType
from typing import Any

from urllib.parse import quote

import httpx
import numpy as np

from p2pgpu.api.types import (
    MAX_BATCH_TASKS,
    MSGPACK,
    ApiError,
    BadRequest,
    Health,
    PayloadTooLarge,
    SubmitRequest,
    TaskView,
    TooManyRequests,
    Unavailable,
    decode_result,
    encode_submit,
    encode_submit_batch,
    error_from_status,
)

__all__ = ["BATCH_BYTES", "BATCH_TIMEOUT_S", "ApiClient", "ApiUnreachable", "InvalidToken", "bearer_headers"]

BATCH_BYTES = 64 << 20
"""Body budget of one ``POST /tasks/batch``: a quarter of the node's default body limit (``api.max_body_bytes``,
256 MiB), so a set of jobs fits without knowing the node's setting; a chunk refused as too large is halved."""
BATCH_TIMEOUT_S = 300.0
"""A batch is answered only once the node has decoded, sealed and posted every task in it."""
SENDER_LIMIT_RETRY_S = 120.0
"""How long ``submit_many`` keeps resending tasks refused for the sender's full mempool chain (429
``sender_limit``): each block includes some, so the rest fit a few blocks later."""


class ApiUnreachable(Exception):
    """No answer from the API at all (not listening, wrong URL, timed out)."""


class InvalidToken(ValueError):
    """A token that cannot go into an HTTP header (empty, or with spaces or control characters inside)."""


def bearer_headers(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``token`` (none for None); :class:`InvalidToken` if it cannot be one.

    Shared with :mod:`p2pgpu.client`, so the CLI and the SDK accept and refuse the same tokens.
    """
    if token is None:
        return {}
    token = token.strip()  # pasted from a file or a terminal: the newline is not part of it
    if not token or not token.isprintable() or " " in token or not token.isascii():
        raise InvalidToken("the API token is empty or has spaces or control characters in it; "
                           "paste it exactly as 'p2pgpu api token new' printed it")
    return {"authorization": f"Bearer {token}"}


class ApiClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                 token: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        headers = bearer_headers(token)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r})"

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

    def submit_many(self, requests: Sequence[SubmitRequest], *,
                    progress: Callable[[int, int], None] | None = None,
                    max_batch_bytes: int = BATCH_BYTES,
                    sleep: Callable[[float], None] = time.sleep) -> list[bytes | ApiError]:
        """Post many tasks through ``POST /tasks/batch``: for each request, in order, its task id or the error.

        Requests go in chunks of at most ``MAX_BATCH_TASKS`` tasks and about
        ``max_batch_bytes`` of body (a larger task goes alone), encoded chunk
        by chunk so only one chunk's bytes exist at a time. One task's
        refusal is that task's entry. A chunk refused whole gives its error
        to each of its tasks (a 413 is first retried in halves), so the ids
        of tasks already posted are never lost; for the same reason an API
        that stops answering after the first chunk marks the rest
        ``Unavailable`` ("unreachable") and sends no more, instead of raising.
        ``progress`` is
        called with (tasks answered, tasks in all) after each chunk. Tasks
        refused because the node's chain of pending transactions is full (429
        ``sender_limit``: a big batch outruns the blocks) are sent again a
        second apart for up to :data:`SENDER_LIMIT_RETRY_S`.
        """
        results: list[bytes | ApiError | None] = [None] * len(requests)
        answered = 0
        for chunk in self._batch_chunks(requests, results, max_batch_bytes):
            try:
                self._post_batch(chunk, results)
            except ApiUnreachable as exc:
                if answered == 0:
                    raise
                lost = Unavailable(f"not known whether the node posted this task: {exc}", "unreachable")
                for i, _ in chunk:
                    results[i] = lost
                break
            answered = sum(r is not None for r in results)
            if progress is not None:
                progress(answered, len(requests))
        for i, r in enumerate(results):
            if r is None:  # chunks after the one the API did not answer were never sent
                results[i] = Unavailable("not sent: the API stopped answering", "unreachable")
        self._resend_over_sender_limit(requests, results, max_batch_bytes, sleep)
        return results  # type: ignore[return-value]

    def _resend_over_sender_limit(self, requests: Sequence[SubmitRequest], results: list[bytes | ApiError | None],
                                  max_batch_bytes: int, sleep: Callable[[float], None]) -> None:
        """Send again, a block or so later, the tasks refused because this node's chain of pending transactions
        was full (429 ``sender_limit``), for up to :data:`SENDER_LIMIT_RETRY_S`; what still does not fit keeps
        its 429."""
        waited = 0.0
        while waited < SENDER_LIMIT_RETRY_S:
            waiting = [i for i, r in enumerate(results)
                       if isinstance(r, TooManyRequests) and r.code == "sender_limit"]
            if not waiting:
                return
            pause = 1.0
            sleep(pause)
            waited += pause
            again: list[bytes | ApiError | None] = [None] * len(waiting)
            try:
                for chunk in self._batch_chunks([requests[i] for i in waiting], again, max_batch_bytes):
                    self._post_batch(chunk, again)
            except ApiUnreachable:
                return  # the earlier answers stand
            for i, r in zip(waiting, again, strict=True):
                if r is not None:
                    results[i] = r

    def _batch_chunks(self, requests: Sequence[SubmitRequest], results: list[bytes | ApiError | None],
                      max_bytes: int) -> Iterator[list[tuple[int, bytes]]]:
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for i, request in enumerate(requests):
            try:
                body = encode_submit(request)
            except ApiError as exc:  # cannot go on the wire: this task's answer, the others go on
                results[i] = exc
                continue
            if chunk and (len(chunk) == MAX_BATCH_TASKS or size + len(body) > max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append((i, body))
            size += len(body)
        if chunk:
            yield chunk

    def _post_batch(self, chunk: list[tuple[int, bytes]], results: list[bytes | ApiError | None]) -> None:
        try:
            resp = self._request("POST", "/tasks/batch", content=encode_submit_batch([b for _, b in chunk]),
                                 headers={"content-type": MSGPACK}, timeout=max(BATCH_TIMEOUT_S, self._timeout))
        except PayloadTooLarge:
            if len(chunk) == 1:
                results[chunk[0][0]] = PayloadTooLarge(
                    "this task alone exceeds the node's body limit (api.max_body_bytes)", "body_too_large")
                return
            half = len(chunk) // 2
            self._post_batch(chunk[:half], results)
            self._post_batch(chunk[half:], results)
            return
        except ApiError as exc:  # refused whole: the same answer for each of its tasks
            for i, _ in chunk:
                results[i] = exc
            return
        try:
            answers = self._batch_answers(resp, len(chunk))
        except ApiError as exc:  # the tasks may well be posted; say so for each rather than lose the others
            answers = [exc] * len(chunk)
        for (i, _), answer in zip(chunk, answers, strict=True):
            results[i] = answer

    def _batch_answers(self, resp: httpx.Response, count: int) -> list[bytes | ApiError]:
        try:
            entries = resp.json()["results"]
            if not isinstance(entries, list) or len(entries) != count:
                raise ValueError(f"{count} tasks sent, {len(entries) if isinstance(entries, list) else '?'} answered")
            out: list[bytes | ApiError] = []
            for position, entry in enumerate(entries):
                if entry["index"] != position:
                    raise ValueError(f"entry {position} has index {entry['index']}")
                if "task_id" in entry:
                    task_id = bytes.fromhex(entry["task_id"])
                    if len(task_id) != 32:
                        raise ValueError(f"entry {position}: task id of {len(task_id)} bytes")
                    out.append(task_id)
                else:
                    out.append(error_from_status(int(entry["status"]), str(entry["error"]), str(entry["message"])))
            return out
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequest(f"POST /tasks/batch: the API's answer is not a list of results ({exc}); the "
                             "tasks may have been posted", "bad_response") from None

    def task(self, task_id: bytes) -> TaskView:
        return TaskView.from_json(self._json(f"/tasks/{task_id.hex()}"))

    def task_result(self, task_id: bytes, *, wait: float = 0.0) -> dict[str, np.ndarray]:
        """The result; ``wait`` > 0 lets the node hold the request up to that many seconds until it is in."""
        path = f"/tasks/{task_id.hex()}/result" + (f"?wait={wait:g}" if wait > 0 else "")
        resp = self._request("GET", path)
        wire = decode_result(resp.content)
        if wire.task_id != task_id:
            raise BadRequest(f"the API returned the result of task {wire.task_id.hex()}, not {task_id.hex()}",
                             "bad_response")
        return dict(wire.outputs)

    def delete_result(self, task_id: bytes) -> None:
        """Delete a settled task's kept result from the node (the node forgets the task)."""
        self._request("DELETE", f"/tasks/{task_id.hex()}/result")

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

    # ------------------------------------------------------------ models

    def models(self) -> list[dict[str, Any]]:
        """Every registered model (``GET /ledger/models``), as the API's JSON."""
        return self._json("/ledger/models")["models"]  # type: ignore[no-any-return]

    def model(self, ref: str) -> dict[str, Any]:
        """One registered model by id, ``NAME`` (its latest version) or ``NAME@VERSION``; NotFound if none."""
        return self._json(f"/ledger/models/{quote(ref, safe='@')}")  # type: ignore[no-any-return]

    def model_providers(self, ref: str) -> dict[str, Any]:
        """The providers whose adverts say the model is warm, best first (``GET /ledger/models/{ref}/providers``)."""
        return self._json(f"/ledger/models/{quote(ref, safe='@')}/providers")  # type: ignore[no-any-return]

    def push_model(self, bundle: bytes, *, name: str, version: str = "1", royalty: int = 0,
                   timeout: float = 300.0) -> dict[str, Any]:
        """``POST /models``: register a canonical bundle; answers the push's status (``pending`` first)."""
        resp = self._request("POST", "/models", ok=(202,), content=bundle, timeout=timeout,
                             params={"name": name, "version": version, "royalty": str(royalty)},
                             headers={"content-type": "application/octet-stream"})
        return resp.json()  # type: ignore[no-any-return]

    def model_push(self, model_id: bytes) -> dict[str, Any]:
        """Where this node's push of ``model_id`` stands (``GET /models/{id}``)."""
        return self._json(f"/models/{model_id.hex()}")  # type: ignore[no-any-return]
