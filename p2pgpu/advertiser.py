"""The advert topic in a node: a provider publishes its warm models, every market follower keeps what it hears.

The decisions are :mod:`p2pgpu.market.advertise`'s (when an advert is due,
what a client keeps); this module gives them a clock, the ledger and the
network:

* :func:`advert_content` reads what a provider can say right now: the models
  its cache holds warm (through a hook, ``warm_models``, so the provider's
  warm workers can change what "warm" means without touching this module),
  priced by :func:`~p2pgpu.market.pricing.advert_unit_price` from its own
  pricing policy and measured device, and its free slots (slots neither
  running nor promised to a live bid).
* :class:`ProviderAdvertiser` polls that twice a second, feeds the
  publisher core and signs and publishes what it says is due. It starts
  only once the provider has been registered for ``settle_blocks`` blocks,
  so peers a block behind do not charge it for an advert from a provider
  they do not know yet.
* :class:`AdvertFollower` is the ``/advert`` validator's state (an
  :class:`~p2pgpu.market.advertise.AdvertDirectory`) and the client-side
  query :meth:`~AdvertFollower.warm_providers`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import trio

from ledger.keys import AccountKey
from ledger.state import State
from p2pgpu.dataplane import peer_id_of_account_key
from p2pgpu.market import ProviderRole, encode_market_message, sign_advert
from p2pgpu.market.advertise import AdvertConfig, AdvertContent, AdvertDirectory, AdvertPublisher, WarmProvider
from p2pgpu.market.pricing import advert_unit_price
from p2pgpu.marketgossip import GossipHead, validate_advert
from p2pgpu.net import GossipMessage, Verdict
from p2pgpu.net.log import log

__all__ = ["AdvertFollower", "ProviderAdvertiser", "advert_content", "pump_adverts"]

logger = logging.getLogger(__name__)


def advert_content(role: ProviderRole | None, state: State, warm_models: Iterable[bytes]) -> AdvertContent | None:
    """What the provider's advert says now; None before its role is up (the runtime is still warming)."""
    if role is None:
        return None
    prices: dict[bytes, int] = {}
    for model in warm_models:
        entry = state.models.get(model)
        if entry is not None:  # only registered models: a client can do nothing with any other id
            prices[model] = advert_unit_price(role.pricing, role.capabilities, entry.bundle_size)
    return AdvertContent.of(role.config.max_concurrent_jobs - role.active_jobs, prices)


class ProviderAdvertiser:
    """Publishes a provider's advert on the node's advert topic (see the module docstring)."""

    def __init__(self, *, key: AccountKey, chain_id: bytes, topic: str, block_seconds: float,
                 content: Callable[[], AdvertContent | None], state: Callable[[], State],
                 publish: Callable[[str, bytes], None], config: AdvertConfig = AdvertConfig(),
                 settle_blocks: int = 2, clock: Callable[[], float] = trio.current_time) -> None:
        self.key = key
        self.topic = topic
        self.content = content
        self.state = state
        self.publish = publish
        self.settle_blocks = settle_blocks
        self.clock = clock
        self.core = AdvertPublisher(config, chain_id=chain_id, provider=key.address, block_seconds=block_seconds,
                                    first_sequence=max(1, time.time_ns() // 1_000_000))
        self._registered_at: int | None = None

    def _ready(self, state: State) -> bool:
        """Registered on our head, and for ``settle_blocks`` blocks (what peers a little behind have seen too)."""
        if self.key.address not in state.providers:
            self._registered_at = None
            return False
        if self._registered_at is None:
            self._registered_at = state.height
        return state.height >= self._registered_at + self.settle_blocks

    def step(self) -> bool:
        """Observe the provider once and publish if an advert is due; True if one went out."""
        state = self.state()
        now = self.clock()
        self.core.observe(now, self.content() if self._ready(state) else None)
        advert = self.core.poll(now, state.height)
        if advert is None:
            return False
        self.publish(self.topic, encode_market_message(sign_advert(self.key, advert)))
        log(logger, logging.INFO if advert.models else logging.DEBUG, "advert_published", sequence=advert.sequence,
            models=len(advert.models), free_slots=advert.free_slots, expiry=advert.expiry_height)
        return True

    async def run(self, *, poll_seconds: float = 0.5) -> None:
        while True:
            try:
                self.step()
            except Exception as exc:  # a bug here must not take the provider down; the next poll tries again
                log(logger, logging.ERROR, "advert_failed", error=repr(exc))
            await trio.sleep(poll_seconds)


class AdvertFollower:
    """What a market follower keeps of the advert topic, and the client's query over it."""

    def __init__(self, node: GossipHead, chain_id: bytes, *, clock: Callable[[], float] = time.monotonic,
                 capacity: int = 4096) -> None:
        self.node = node
        self.directory = AdvertDirectory(chain_id, capacity=capacity)
        self.clock = clock

    def validate(self, peer: str, data: bytes) -> Verdict[object]:
        """``/advert`` validator (:func:`p2pgpu.marketgossip.validate_advert`)."""
        return validate_advert(self.node, self.directory, peer, data, now=self.clock())  # type: ignore[return-value]

    def on_block(self, height: int) -> None:
        self.directory.evict(height)

    def warm_providers(self, model_id: bytes) -> list[tuple[WarmProvider, str]]:
        """Each provider whose live advert holds ``model_id`` warm, best first, with its peer id."""
        found = self.directory.warm_providers(model_id, now=self.clock(), height=self.node.chain.height)
        return [(w, peer_id_of_account_key(w.public_key)) for w in found]


async def pump_adverts(channel: trio.MemoryReceiveChannel[GossipMessage[object]]) -> None:
    """The validator kept each advert already; the subscription's queue only needs emptying."""
    async for _ in channel:
        pass
