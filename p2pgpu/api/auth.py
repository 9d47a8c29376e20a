"""Bearer tokens for the node's API: who may call which route, and how much of the node's funds each may commit.

The tokens come from the node's config (``[[api.tokens]]``), which holds
only each token's SHA-256. A presented token is hashed and compared with
every configured hash by :func:`hmac.compare_digest`, without stopping at
a match, so neither the bytes of a hash nor which entry matched show in
the answer's timing. With no tokens configured the API is open, as it
always was on loopback (the devnet, tests, a node used by its own
machine); :func:`p2pgpu.config.open_api_problem` keeps an open API off
any other address.

Each route declares one :class:`Access` (see ``ApiApp``): ``PUBLIC`` routes
answer without a token, the others need a token holding that scope. A
token's ``spend_per_hour`` bounds what it commits in any 60 minutes: a
request's cost is reserved in one synchronous step (check and hold, no
``await`` in between, so concurrent requests on the node's one Trio loop
cannot both see the same allowance), the request then runs, and the hold
is given back only if the node refused it (nothing was locked then).

Tokens are never logged: the ``Authorization`` header is taken out of the
request before any handler sees it, and log lines name the token's
``name`` only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from p2pgpu.api.types import Forbidden, TooManyRequests, Unauthorized
from p2pgpu.config import TOKEN_PREFIX, ApiToken

__all__ = ["SPEND_WINDOW_S", "Access", "Authenticator", "Caller", "SpendAllowance", "hash_token", "new_token"]

SPEND_WINDOW_S: Final = 3600.0
"""``spend_per_hour`` is a sliding window: at most that much in *any* 60 minutes, not per clock hour
(a fixed window would let a token spend twice its limit across a boundary)."""
REALM: Final = 'realm="p2pgpu"'


class Access(enum.Enum):
    """What a route needs: no token (``PUBLIC``), or a token with the scope of the same name."""

    PUBLIC = "public"
    READ = "read"
    SUBMIT = "submit"
    DISPUTE = "dispute"
    INFER = "infer"


def new_token() -> str:
    """A fresh token: the prefix, then 256 random bits (URL-safe base64, 43 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 the config stores for ``token`` (of its UTF-8 text)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SpendAllowance:
    """One token's sliding hour of commitments to the node's funds.

    Holds are kept with the monotonic time they were taken, oldest first
    (the clock never goes back, so insertion order is time order), with
    their running total: a 1,000-task batch costs 1,000 constant-time
    checks, not a sum over every hold of the hour each. Those older than
    the window no longer count. ``reserve`` checks and takes a hold in one
    step with no ``await``, so it is safe under any number of concurrent
    requests on one event loop.
    """

    def __init__(self, name: str, limit: int, clock: Callable[[], float]) -> None:
        self.name = name
        self.limit = limit
        self._clock = clock
        self._holds: OrderedDict[int, tuple[float, int]] = OrderedDict()
        self._held = 0
        self._ids = itertools.count()

    def _prune(self, now: float) -> None:
        while self._holds:
            key = next(iter(self._holds))
            at, amount = self._holds[key]
            if now - at < SPEND_WINDOW_S:
                return
            del self._holds[key]
            self._held -= amount

    def remaining(self) -> int:
        self._prune(self._clock())
        return max(0, self.limit - self._held)

    def _wait_for(self, amount: int, now: float) -> float | None:
        """Seconds until ``amount`` fits as holds expire; None if it never fits (over the whole limit)."""
        if amount > self.limit:
            return None
        held = self._held
        for at, a in self._holds.values():  # oldest first: the order they stop counting
            if held + amount <= self.limit:
                break
            held -= a
            if held + amount <= self.limit:
                return max(0.0, at + SPEND_WINDOW_S - now)
        return 0.0

    def reserve(self, amount: int, what: str) -> int:
        """Hold ``amount`` or refuse with :class:`TooManyRequests` (429) saying what is left and when more is.

        Returns the hold's id for :meth:`release`. ``what`` names the
        request in the message ("this task", "this dispute").
        """
        now = self._clock()
        self._prune(now)
        left = self.limit - self._held
        if amount <= left:
            key = next(self._ids)
            self._holds[key] = (now, amount)
            self._held += amount
            return key
        wait = self._wait_for(amount, now)
        head = (f"token {self.name!r} may commit {self.limit} of the node's funds per hour and has "
                f"{max(left, 0)} left; {what} would commit {amount}")
        if wait is None:
            raise TooManyRequests(f"{head}, more than the token's whole hourly limit (raise its spend_per_hour "
                                  "or ask for less)", "spend_limit")
        seconds = max(1, math.ceil(wait))
        raise TooManyRequests(f"{head}; enough is free again in {_duration(seconds)}", "spend_limit",
                              retry_after=seconds)

    def release(self, key: int) -> None:
        """Give a hold back: the node refused the request, so none of its funds were committed."""
        hold = self._holds.pop(key, None)
        if hold is not None:
            self._held -= hold[1]


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"


@dataclass(frozen=True, slots=True)
class Caller:
    """The token a request was authenticated with: its name, scopes and spending allowance."""

    name: str
    scopes: frozenset[str]
    allowance: SpendAllowance | None


class Authenticator:
    """The configured tokens of one API server (their spending state lives here, per server, not globally).

    A token without ``spend_per_hour`` is not limited; the config loader
    requires one on every token with a spending scope, so only code that
    builds tokens itself (tests) makes such a token.
    """

    def __init__(self, tokens: Sequence[ApiToken] = (), *, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("p2pgpu.api")
        self._entries: list[tuple[bytes, Caller]] = []
        for token in tokens:
            allowance = (SpendAllowance(token.name, token.spend_per_hour, clock)
                         if token.spend_per_hour is not None else None)
            self._entries.append((bytes.fromhex(token.token_sha256),
                                  Caller(token.name, frozenset(token.scopes), allowance)))

    @property
    def enabled(self) -> bool:
        """Whether tokens are configured; without any, every route is open (loopback only)."""
        return bool(self._entries)

    def authenticate(self, authorization: str | None, *, client: str = "-") -> Caller | None:
        """The caller an ``Authorization`` header proves, None when auth is off; 401 otherwise.

        Only ``Bearer`` in the header: a token in the query string would
        end up in proxies' and servers' access logs.
        """
        if not self._entries:
            return None
        if authorization is None:
            self._refused("missing_token", client)
            raise Unauthorized("this API needs a bearer token: send 'Authorization: Bearer <token>' (the p2pgpu "
                               "CLI: --token or P2PGPU_API_TOKEN)", "missing_token", challenge=f"Bearer {REALM}")
        scheme, _, credentials = authorization.strip().partition(" ")
        token = credentials.strip()
        if scheme.lower() != "bearer" or not token:
            self._refused("bad_authorization", client)
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", "invalid_token",
                               challenge=f'Bearer {REALM}, error="invalid_request"')
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Caller | None = None
        for stored, caller in self._entries:  # every entry, no early exit: the time taken says nothing
            if hmac.compare_digest(stored, digest):
                found = caller
        if found is None:
            self._refused("invalid_token", client)
            raise Unauthorized("the bearer token is not one this node accepts (revoked, mistyped, or for another "
                               "node)", "invalid_token", challenge=f'Bearer {REALM}, error="invalid_token"')
        return found

    def authorize(self, caller: Caller | None, access: Access, *, path: str) -> None:
        """403 unless ``caller`` holds the scope ``access`` needs (no caller: auth is off, or a public route)."""
        if caller is None or access is Access.PUBLIC or access.value in caller.scopes:
            return
        self.log.info("event=api_forbidden token=%s scope=%s path=%s", caller.name, access.value, path)
        raise Forbidden(f"token {caller.name!r} may not do this: it needs the {access.value} scope and has "
                        f"{', '.join(sorted(caller.scopes))}", "insufficient_scope",
                        challenge=f'Bearer {REALM}, error="insufficient_scope", scope="{access.value}"')

    @contextmanager
    def spending(self, caller: Caller | None, amount: int, what: str) -> Iterator[None]:
        """Hold ``amount`` of ``caller``'s allowance around the request that commits it.

        The hold is taken before the body of the ``with`` runs (so before
        its first ``await``) and given back if the body raises, including
        when the request is cancelled: the node then committed nothing.
        """
        allowance = caller.allowance if caller is not None else None
        if allowance is None:
            yield
            return
        try:
            key = allowance.reserve(amount, what)
        except TooManyRequests:
            self.log.info("event=api_spend_limit token=%s amount=%d remaining=%d", allowance.name, amount,
                          allowance.remaining())
            raise
        try:
            yield
        except BaseException:
            allowance.release(key)
            raise
        self.log.debug("event=api_spend token=%s amount=%d remaining=%d", allowance.name, amount,
                       allowance.remaining())

    def _refused(self, reason: str, client: str) -> None:
        # Debug only: an exposed port gets scanned, and a line per probe would drown the log.
        self.log.debug("event=api_unauthorized reason=%s client=%s", reason, client)
