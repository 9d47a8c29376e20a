"""Carrying out the roles' actions: one table from action type to handler, instead of an ``isinstance`` ladder.

The roles return actions (:mod:`p2pgpu.market.events`); whoever drives them
-- the node's Trio shell (``p2pgpu.roles``) or the deterministic simulator
(``tests/market/sim.py``) -- gives one handler per action type and runs
every action through an :class:`ActionExecutor`. The table is checked when
it is built: a driver that forgets an action type, or names one twice,
fails at construction rather than dropping that action at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from .events import (
    Action,
    CommandStream,
    DeliverResult,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    OpenStream,
    PrepareResult,
    PublishAnnounce,
    PublishBid,
    PublishDecline,
    Report,
    ReportProgress,
    ResultReady,
    RunJob,
    RunSpotCheck,
    RunVerify,
    SendReceipt,
    ServeInputs,
    ServeResult,
    ServeSpec,
    ServeStream,
    ServeStreamItem,
    SubmitTx,
    TaskClosed,
)

__all__ = ["ACTION_TYPES", "ActionExecutor", "IncompleteActionTable", "Origin"]

Origin = TypeVar("Origin")
"""Who the actions came from, as the driver names it (the node: a task id or ``"provider"``)."""

ACTION_TYPES: tuple[type[Action], ...] = (
    SubmitTx, PublishAnnounce, PublishBid, PublishDecline,
    ServeSpec, ServeInputs, ServeResult, ServeStreamItem, DeliverResult, PrepareResult,
    FetchSpec, FetchInputs, FetchResult, FetchStreamItem,
    RunJob, RunVerify, RunSpotCheck,
    OpenStream, ServeStream, CommandStream, SendReceipt,
    ReportProgress, ResultReady, TaskClosed, Report,
)
"""Every action a role can return: a driver's table handles each of them."""


class IncompleteActionTable(ValueError):
    """An executor's table misses an action type, names one twice, or names something that is no action."""


class ActionExecutor(Generic[Origin]):
    """``executor(origin, action)`` runs the handler for ``type(action)``.

    ``handlers`` maps action types to ``handler(origin, action)``; a key may
    be a tuple of types that share one handler (``(PublishBid,
    PublishDecline)``). Every type in :data:`ACTION_TYPES` must be covered
    exactly once. An action of a type not in the table (a newer role than
    the driver) goes to ``unsupported``.
    """

    def __init__(self, handlers: Mapping[type[Action] | tuple[type[Action], ...], Callable[[Origin, Any], None]],
                 *, unsupported: Callable[[Origin, Action], None]) -> None:
        table: dict[type[Action], Callable[[Origin, Any], None]] = {}
        for key, handler in handlers.items():
            for kind in _types_of(key):
                if not (isinstance(kind, type) and issubclass(kind, Action)):
                    raise IncompleteActionTable(f"{kind!r} is not an action type")
                if kind in table:
                    raise IncompleteActionTable(f"{kind.__name__} has two handlers")
                table[kind] = handler
        missing = [kind.__name__ for kind in ACTION_TYPES if kind not in table]
        if missing:
            raise IncompleteActionTable(f"no handler for {', '.join(missing)}")
        self._table = table
        self._unsupported = unsupported

    def handles(self, kind: type[Action]) -> bool:
        return kind in self._table

    def __call__(self, origin: Origin, action: Action) -> None:
        handler = self._table.get(type(action))
        if handler is None:
            self._unsupported(origin, action)
        else:
            handler(origin, action)


def _types_of(key: type[Action] | tuple[type[Action], ...]) -> Iterable[type[Action]]:
    return key if isinstance(key, tuple) else (key,)
