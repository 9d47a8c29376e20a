"""Model adverts, sans-I/O: when a provider publishes one, and what a client keeps of the ones it hears.

Two machines, each fed the time by its caller (``now``: seconds on any
monotonic clock; heights from the ledger), so the cadence and the book are
tested over plain numbers:

* :class:`AdvertPublisher` (provider): told what the provider holds warm and
  how many slots are free (:meth:`~AdvertPublisher.observe`), it says when
  the next :class:`~p2pgpu.market.messages.ModelAdvert` is due and builds it
  (:meth:`~AdvertPublisher.poll`). A change goes out ``debounce_s`` after it
  was first seen (changes in between ride along); with no change the advert
  is re-published every ``heartbeat_s``, well before it expires
  (``lifetime_s``, turned into blocks), so a provider that stops
  publishing ages out of every client's book; and never two adverts closer
  than ``min_interval_s``, however fast the slots change under load: that
  is the rate bound. A provider with nothing warm says so once (replacing
  the advert that listed models) and then stays quiet.
* :class:`AdvertDirectory` (client, and any node that follows the market):
  the :class:`~p2pgpu.market.messages.AdvertBook` plus when each advert
  arrived, behind the advert topic's validator
  (:meth:`~AdvertDirectory.admit`: the message checks of
  :func:`~p2pgpu.market.messages.validate_advert_message`, a registered
  provider, not sooner than ``min_gap_s`` after its last), and the query the
  inference gateway uses: :meth:`~AdvertDirectory.warm_providers`, best
  first.

Sequences rise across restarts: the shell seeds ``first_sequence`` from the
wall clock in milliseconds, and a provider publishes far fewer than one
advert per millisecond, so a restarted provider's first advert is newer than
anything it sent before (a clock set back would have clients refuse its
adverts as :class:`~p2pgpu.market.errors.Replayed` until the old one expires).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import TooFrequent, UnknownProvider
from .messages import (DEFAULT_HORIZON_BLOCKS, MAX_ADVERT_MODELS, AdvertBook, ModelAdvert, SignedAdvert, WarmModel,
                       validate_advert_message)

__all__ = ["AdvertConfig", "AdvertContent", "AdvertDirectory", "AdvertPublisher", "WarmProvider"]


@dataclass(frozen=True, slots=True)
class AdvertConfig:
    """A provider's advert cadence (seconds)."""

    debounce_s: float = 1.0
    """A change waits this long, so a burst of changes (a model fetched, three bids) goes out as one advert."""
    min_interval_s: float = 2.0
    """Never two adverts closer than this: the rate bound under load (slots change with every bid)."""
    heartbeat_s: float = 30.0
    """Re-published this often without a change."""
    lifetime_s: float = 120.0
    """How long clients keep an advert (its expiry, in blocks of the chain's interval); several heartbeats, so one
    lost advert does not drop the provider, and a provider that went away is gone within this."""

    def __post_init__(self) -> None:
        if not 0 <= self.debounce_s <= self.heartbeat_s:
            raise ValueError(f"advert debounce_s must be in 0..heartbeat_s, got {self.debounce_s}")
        if not 0 < self.min_interval_s <= self.heartbeat_s:
            raise ValueError(f"advert min_interval_s must be in (0, heartbeat_s], got {self.min_interval_s}")
        if self.lifetime_s < 2 * self.heartbeat_s:
            raise ValueError(f"advert lifetime_s ({self.lifetime_s}) must be at least two heartbeats "
                             f"({2 * self.heartbeat_s}): one lost advert must not expire the provider")


@dataclass(frozen=True, slots=True)
class AdvertContent:
    """What an advert says: free slots and the warm models with their price per unit (sorted by id, each once)."""

    free_slots: int
    models: tuple[WarmModel, ...]

    @classmethod
    def of(cls, free_slots: int, prices: dict[bytes, int]) -> AdvertContent:
        """From ``{model id: unit price}``: sorted, clamped to what an advert carries (the first ids win)."""
        slots = max(0, min(free_slots, 0xFFFF))
        ids = sorted(prices)[:MAX_ADVERT_MODELS]
        return cls(slots, tuple(WarmModel(m, max(1, prices[m])) for m in ids))


class AdvertPublisher:
    """When a provider's next advert is due, and the advert: see the module docstring."""

    def __init__(self, config: AdvertConfig, *, chain_id: bytes, provider: bytes, block_seconds: float,
                 first_sequence: int) -> None:
        if block_seconds <= 0:
            raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
        if first_sequence < 1:
            raise ValueError(f"first_sequence must be >= 1, got {first_sequence}")
        self.config = config
        self.chain_id = chain_id
        self.provider = provider
        self.lifetime_blocks = min(DEFAULT_HORIZON_BLOCKS, max(2, math.ceil(config.lifetime_s / block_seconds)))
        """Blocks an advert lives (within the validators' horizon)."""
        self._next_sequence = first_sequence
        self._current: AdvertContent | None = None
        self._published: AdvertContent | None = None
        self._published_at: float | None = None
        self._changed_at: float | None = None
        self.published = 0
        """Adverts built so far."""

    @property
    def current(self) -> AdvertContent | None:
        return self._current

    def observe(self, now: float, content: AdvertContent | None) -> None:
        """What the provider holds now (None: nothing to advertise yet, e.g. not registered)."""
        self._current = content
        if content is None:
            self._changed_at = None
        elif content != self._published and self._changed_at is None:
            self._changed_at = now  # kept if the content flaps back meanwhile: a flapping value still goes out

    def due_at(self) -> float | None:
        """When the next advert goes out (on the caller's clock), or None while there is nothing to say."""
        current = self._current
        if current is None:
            return None
        if not current.models and (self._published is None or not self._published.models):
            return None  # nothing warm, and no earlier advert listing models to replace
        if self._published_at is None:
            return -math.inf if self._changed_at is None else self._changed_at + self.config.debounce_s
        heartbeat = self._published_at + self.config.heartbeat_s
        changed = self._changed_at is not None and current != self._published
        change = self._changed_at + self.config.debounce_s if changed and self._changed_at is not None else math.inf
        return max(min(heartbeat, change), self._published_at + self.config.min_interval_s)

    def poll(self, now: float, height: int) -> ModelAdvert | None:
        """The advert to publish now, if one is due; the caller signs and publishes it."""
        due = self.due_at()
        if due is None or now < due:
            return None
        content = self._current
        assert content is not None
        advert = ModelAdvert(chain_id=self.chain_id, provider=self.provider, sequence=self._next_sequence,
                             expiry_height=height + self.lifetime_blocks, free_slots=content.free_slots,
                             models=content.models)
        self._next_sequence += 1
        self._published, self._published_at, self._changed_at = content, now, None
        self.published += 1
        return advert


@dataclass(frozen=True, slots=True)
class WarmProvider:
    """One provider that says it holds a model warm: what the inference gateway picks from."""

    provider: bytes
    public_key: bytes
    """The provider's account key, which is also its libp2p identity (the shell turns it into a peer id)."""
    free_slots: int
    unit_price: int
    age_s: float
    """Seconds since its advert arrived here."""
    sequence: int
    expiry_height: int


class AdvertDirectory:
    """The adverts a node keeps (the latest per provider, bounded), where they came from and when."""

    def __init__(self, chain_id: bytes, *, capacity: int = 4096, min_gap_s: float = 1.0,
                 horizon: int = DEFAULT_HORIZON_BLOCKS) -> None:
        if min_gap_s < 0:
            raise ValueError(f"min_gap_s must be >= 0, got {min_gap_s}")
        self.chain_id = chain_id
        self.book = AdvertBook(capacity)
        self.min_gap_s = min_gap_s
        """An advert sooner than this after its provider's last is not taken (nor relayed): half an honest
        publisher's ``min_interval_s``, so gossip jitter does not refuse honest ones."""
        self.horizon = horizon
        self._arrived: dict[bytes, tuple[float, bytes]] = {}  # provider -> (when its latest arrived, its public key)

    def __len__(self) -> int:
        return len(self.book)

    def admit(self, data: bytes, *, now: float, height: int,
              is_provider: Callable[[bytes], bool]) -> SignedAdvert:
        """Validate one advert topic payload and keep it; raises a :class:`~p2pgpu.market.MarketMessageError`.

        Refused, cheapest first: bytes that are no advert, another chain, bad
        content, outside the expiry window, not newer than the provider's
        last (:class:`~p2pgpu.market.Replayed`), an address that is no
        registered provider (:class:`UnknownProvider`), too soon after the
        last (:class:`TooFrequent`), a bad signature. A refused advert
        changes nothing here.
        """
        def precheck(advert: ModelAdvert) -> None:
            if not is_provider(advert.provider):
                raise UnknownProvider(f"advert from {advert.provider.hex()}, which is not a registered provider "
                                      f"at height {height}")
            last = self._arrived.get(advert.provider)
            if last is not None and self.book.latest(advert.provider) is not None and now - last[0] < self.min_gap_s:
                raise TooFrequent(f"advert from {advert.provider.hex()} {now - last[0]:.3g} s after its last "
                                  f"(at least {self.min_gap_s:g} s apart)")

        message = validate_advert_message(self.chain_id, height, data, self.book, horizon=self.horizon,
                                          precheck=precheck)
        self._arrived[message.advert.provider] = (now, bytes(message.public_key))
        self._prune()
        return message

    def evict(self, height: int) -> None:
        """Forget adverts that expired before ``height`` (called with each finalized block)."""
        self.book.evict(height)
        self._prune()

    def _prune(self) -> None:
        if len(self._arrived) > len(self.book):  # the book dropped some (expired, or over capacity)
            for provider in [p for p in self._arrived if self.book.latest(p) is None]:
                del self._arrived[provider]

    def warm_providers(self, model_id: bytes, *, now: float, height: int) -> list[WarmProvider]:
        """Every live advert that holds ``model_id`` warm, best first.

        Best: a provider with a free slot before one without, then the lower
        price per unit, then the fresher advert, then the address (so the
        order is total and the same on every call).
        """
        out: list[WarmProvider] = []
        for provider, entry, free_slots in self.book.warm_providers(model_id, height):
            arrived, public_key = self._arrived.get(provider, (now, b""))
            advert = self.book.latest(provider)
            assert advert is not None
            out.append(WarmProvider(provider=provider, public_key=public_key, free_slots=free_slots,
                                    unit_price=entry.unit_price, age_s=max(0.0, now - arrived),
                                    sequence=advert.sequence, expiry_height=advert.expiry_height))
        out.sort(key=lambda w: (w.free_slots == 0, w.unit_price, w.age_s, w.provider))
        return out
