"""The gateway's sessions on a real node: each lane's session is a live stream task of the node's client role.

:func:`live_session_opener` makes the :data:`~p2pgpu.gateway.lanes.SessionOpener`
the gateway's lanes call: it posts a by-model ``stream_infer`` task with
``rows = [gateway] max_batch_rows`` (so one item, one unit, carries a batch
of requests), ``session_units`` units at ``max_unit_price`` at most, and
waits for the provider's ``StreamReady``
(:meth:`p2pgpu.clientservice.ClientService.open_live_session`). What the
market says when no provider takes it -- declines, prices, nobody -- becomes
the :class:`~p2pgpu.gateway.lanes.NoSession` reason callers see in their 503.

:class:`NodeLiveSession` adapts a :class:`~p2pgpu.streams.live.LiveSession`
to what a lane expects: the stream's exceptions mapped to the lane's, and
``remaining`` reported as 0 once the session's task nears its deadline,
so the lane opens the next session before the provider closes this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import trio

from kernels.bymodel import make_model_spec
from p2pgpu.api.types import ApiError, SubmitRequest
from p2pgpu.config import GatewayConfig
from p2pgpu.gateway.errors import InvalidRequest
from p2pgpu.gateway.lanes import LaneTarget, NoSession, SessionExhausted, SessionLost, SessionOpener
from p2pgpu.streams.live import InvalidItem, LiveSession, SessionClosed, SessionStartError
from p2pgpu.streams.live import SessionExhausted as StreamExhausted
from p2pgpu.streams.live import SessionLost as StreamLost

__all__ = ["NodeLiveSession", "live_session_opener", "session_request"]

OpenLive = Callable[..., Awaitable[LiveSession]]
"""``open_live_session(request, *, start_timeout)`` of the node's client role."""

RENEW_AT = 0.8
"""Renew a session once this share of its lifetime has passed."""


def session_request(target: LaneTarget, config: GatewayConfig) -> SubmitRequest:
    """The stream task a lane's session is: the model by id, batched items, the gateway's price and cap.

    The spec's time limit bounds one item's compute (and the model's start)
    at the provider; the task's deadline, which the planner derives from it,
    is about three times as long -- about ``session_seconds``.
    """
    seconds = max(10, config.session_seconds // 3)
    spec = make_model_spec(target.model_id, {"rows": config.max_batch_rows}, None, kernel="stream_infer",
                           seconds=seconds)
    return SubmitRequest(spec=spec, inputs={}, max_unit_price=config.max_unit_price, units=config.session_units,
                         bid_window=config.bid_window, audit_rate_bps=config.audit_rate_bps, kind="stream")


class NodeLiveSession:
    """A :class:`LiveSession` as a lane's session (see the module docstring)."""

    def __init__(self, live: LiveSession, renew_at: float) -> None:
        self.live = live
        self._renew_at = renew_at

    @property
    def provider(self) -> bytes:
        return self.live.provider

    @property
    def remaining(self) -> int:
        return 0 if trio.current_time() >= self._renew_at else self.live.remaining

    async def infer(self, item: np.ndarray) -> np.ndarray:
        try:
            return await self.live.infer(item)
        except (StreamExhausted, SessionClosed) as exc:
            raise SessionExhausted(str(exc)) from None
        except StreamLost as exc:
            raise SessionLost(exc.reason) from None
        except InvalidItem as exc:
            raise InvalidRequest(f"the model refused this input: {exc}") from None

    async def aclose(self) -> None:
        await self.live.aclose()


def live_session_opener(open_live: OpenLive, config: GatewayConfig) -> SessionOpener:
    """The lanes' opener over the node's ``open_live_session`` (see the module docstring).

    ``avoid`` (providers that just lost a session of this model) are never
    chosen for the new session's task, and the auction does not wait for
    their bids.
    """

    async def open_session(target: LaneTarget, avoid: frozenset[bytes]) -> NodeLiveSession:
        request = session_request(target, config)
        try:
            live = await open_live(request, start_timeout=config.start_timeout, avoid=avoid)
        except SessionStartError as exc:
            raise NoSession(exc.reason) from None
        except ApiError as exc:  # refused before posting: funds, terms
            raise NoSession(f"this node cannot post the session's task: {exc.message}") from None
        lifetime = config.session_seconds * RENEW_AT
        return NodeLiveSession(live, trio.current_time() + lifetime)

    return open_session
