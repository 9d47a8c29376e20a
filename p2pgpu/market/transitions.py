"""Transition tables: a machine's allowed (state, trigger) pairs and where each one leads, in one place.

The market's machines (:class:`~p2pgpu.market.client.ClientTask`, the
provider's per-task :class:`~p2pgpu.market.provider.JobPhase`) change state
from many handlers: a ledger view, a failed transaction, a finished job.
Each handler names *why* it moves (a trigger) and asks the machine's table
*where to*; a pair the table does not hold raises :class:`IllegalTransition`,
so a handler that moves from a state it was never meant to see is a named
error (logged as ``role_event_failed`` by the node) instead of a silently
wrong state. This is how h2 keeps its connection state machine
(``H2ConnectionStateMachine._transitions``) and tests it over every pair.

A table here is written per trigger -- the states it may fire in and the
one state it leads to -- because that is how the handlers read; the table
itself is the product view, ``(state, trigger) -> next state``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import MarketError

__all__ = ["IllegalTransition", "TransitionTable"]

StateT = TypeVar("StateT", bound=enum.Enum)
TriggerT = TypeVar("TriggerT", bound=enum.Enum)


class IllegalTransition(MarketError):
    """A machine was asked to move on a trigger its table does not allow in its current state (our bug).

    Like h11's ``LocalProtocolError``: no peer can cause it, since every
    remote input is checked before a handler decides to move.
    """

    def __init__(self, machine: str, state: enum.Enum, trigger: enum.Enum) -> None:
        super().__init__(f"{machine}: no transition on {trigger.name} from {state.name}")
        self.machine = machine
        self.state = state
        self.trigger = trigger


@dataclass(frozen=True, slots=True)
class TransitionTable(Generic[StateT, TriggerT]):
    """``(state, trigger) -> next state`` for one machine; :meth:`next_state` raises on any other pair."""

    machine: str
    rows: Mapping[tuple[StateT, TriggerT], StateT]

    @classmethod
    def by_trigger(cls, machine: str,
                   moves: Mapping[TriggerT, tuple[Iterable[StateT], StateT]]) -> TransitionTable[StateT, TriggerT]:
        """Build a table from ``{trigger: (states it may fire in, state it leads to)}``."""
        rows: dict[tuple[StateT, TriggerT], StateT] = {}
        for trigger, (sources, target) in moves.items():
            for source in sources:
                rows[(source, trigger)] = target
        return cls(machine, rows)

    def next_state(self, state: StateT, trigger: TriggerT) -> StateT:
        try:
            return self.rows[(state, trigger)]
        except KeyError:
            raise IllegalTransition(self.machine, state, trigger) from None

    def allows(self, state: StateT, trigger: TriggerT) -> bool:
        return (state, trigger) in self.rows

    def sources(self, trigger: TriggerT) -> frozenset[StateT]:
        """The states in which ``trigger`` may fire."""
        return frozenset(s for (s, t) in self.rows if t == trigger)

    def exits(self, state: StateT) -> Iterator[tuple[TriggerT, StateT]]:
        """The (trigger, next state) pairs out of ``state``."""
        return ((t, target) for (s, t), target in self.rows.items() if s == state)
