"""The provider's model cache: a registered model's bundle, fetched once from a holder, kept pinned, decoded.

A task by model (:mod:`kernels.bymodel`) names its model by id, the hash of
its canonical bundle. Before running such a job (or re-running it to
verify) the provider asks :meth:`ModelCache.bundle`: from the blob store if
the bundle is there, else over ``/p2pgpu/data/1`` from each holder in turn
(:func:`model_holders`: the task's client first, then the model's owner,
who stored it as a public blob when pushing it, then for a verifier the
task's provider). The data plane checks the
bytes against the id as they arrive and resumes a partial download; the
bundle then stays in the store, pinned, and is offered to any peer so this
provider is a holder too. Decoding (:func:`kernels.bundle.decode_bundle`,
the same checks as a pushed file) runs in a worker thread, once per model
while it stays in the small in-memory set of decoded bundles.

Which holders to ask, in which order, is pure (:func:`model_holders`); this
module is the Trio shell around one data-plane fetch per holder.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import trio

from kernels.bundle import ModelBundle, decode_bundle
from kernels.errors import ModelError
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.dataplane import DataPlaneError
from p2pgpu.net import NetError
from p2pgpu.net.log import log

__all__ = ["DECODED_MODELS", "MODEL_FETCH_TIMEOUT_S", "ModelCache", "ModelUnavailable", "model_holders"]

logger = logging.getLogger(__name__)

MODEL_FETCH_TIMEOUT_S = 120.0
DECODED_MODELS = 4
"""Decoded bundles kept in memory (the bytes stay pinned in the blob store either way)."""

FetchBlob = Callable[[str, bytes, int], Awaitable[bytes]]
"""``fetch(peer, blob_hash, max_bytes)``: a public blob, hash-checked, from one peer (into the store)."""


class ModelUnavailable(Exception):
    """No holder could give us the bundle (or it did not decode); the job cannot run here."""


def model_holders(client: bytes, owner: bytes | None, peer_of: Callable[[bytes], str | None], *,
                  provider: bytes | None = None) -> list[str]:
    """Peers to ask for a task's model, in order: the task's client, the model's owner, then (for a verifier)
    the task's provider, which holds the bundle once it ran the job; connected ones only."""
    out: list[str] = []
    for address in (client, owner, provider):
        peer = peer_of(address) if address is not None else None
        if peer is not None and peer not in out:
            out.append(peer)
    return out


class _Flight:
    """One fetch and decode of a model, shared by every caller that asks for it while it runs."""

    __slots__ = ("bundle", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.bundle: ModelBundle | None = None
        self.error: str | None = None
        """The :class:`ModelUnavailable` message every waiting caller raises too."""


class ModelCache:
    """Bundles by model id: see the module docstring."""

    def __init__(self, store: BlobStore, access: BlobAccess, fetch: FetchBlob) -> None:
        self.store = store
        self.access = access
        self._fetch = fetch
        self._decoded: OrderedDict[bytes, ModelBundle] = OrderedDict()
        self._sizes: dict[bytes, int] = {}  # model id -> bundle bytes, for the decoded ones
        self._flights: dict[bytes, _Flight] = {}  # model id -> the one fetch and decode under way
        self._held: dict[bytes, int] = {}  # model id -> bundle bytes, for every bundle this cache pinned
        self.fetches = 0
        """Bundles fetched from a peer (not found in the store)."""
        self.evictions = 0
        """Bundles deleted from the store by :meth:`evict`."""

    async def bundle(self, model_id: bytes, *, holders: Sequence[str], max_bytes: int) -> ModelBundle:
        """The decoded bundle of ``model_id``; raises :class:`ModelUnavailable` naming every holder's failure.

        Concurrent calls for one model share one fetch and one decode, and
        its outcome: each gets the bundle, or a :class:`ModelUnavailable`
        with the same message (the next call after a failure tries again).
        A caller cancelled while it leads the fetch takes nobody with it:
        the fetch ends, and one of the callers still waiting starts it again
        (the data plane resumes the partial download).
        """
        while True:
            held = self._decoded.get(model_id)
            if held is not None:
                self._decoded.move_to_end(model_id)
                return held
            flight = self._flights.get(model_id)
            if flight is None:
                break
            await flight.done.wait()
            if flight.bundle is not None:
                return flight.bundle
            if flight.error is not None:
                raise ModelUnavailable(flight.error)
            # the caller that led it was cancelled: loop, and the first waiter to wake leads the next try
        flight = _Flight()
        self._flights[model_id] = flight
        try:
            flight.bundle = await self._load(model_id, holders, max_bytes)
            return flight.bundle
        except ModelUnavailable as exc:
            flight.error = str(exc)
            raise
        finally:
            del self._flights[model_id]
            flight.done.set()

    async def _load(self, model_id: bytes, holders: Sequence[str], max_bytes: int) -> ModelBundle:
        data = await self._bytes(model_id, holders, max_bytes)
        try:
            bundle = await trio.to_thread.run_sync(decode_bundle, data)
        except ModelError as exc:
            raise ModelUnavailable(f"model {model_id.hex()[:16]}: the bundle does not decode "
                                   f"({type(exc).__name__}: {exc})") from None
        if model_id not in self._held:  # one pin per model we hold, however often it is decoded again
            self.store.pin(model_id)
            self._held[model_id] = len(data)
        self.access.grant((ANY_PEER,), model_id)  # we hold it now: any provider may fetch it from us
        self._decoded[model_id] = bundle
        self._sizes[model_id] = len(data)
        while len(self._decoded) > DECODED_MODELS:
            dropped, _ = self._decoded.popitem(last=False)
            self._sizes.pop(dropped, None)
        return bundle

    def fetching(self, model_id: bytes) -> bool:
        """Whether a fetch or decode of ``model_id`` is under way (:meth:`evict` leaves such a model alone)."""
        return model_id in self._flights

    def held_sizes(self) -> dict[bytes, int]:
        """Every model whose bundle this cache pinned on disk, with its size: what counts in ``model_cache_bytes``."""
        return dict(self._held)

    def evict(self, model_id: bytes) -> bool:
        """Drop ``model_id``: forget the decoded bundle, unpin it and delete the blob; False if we did not hold it.

        The blob stays on disk when something else pins it too (this node
        pushed the model and serves it as its owner): only our pin goes. The
        caller makes sure no running task or session uses the model.
        Synchronous, so it cannot interleave with a :meth:`bundle` of another
        task between its checks and its writes; a model being fetched or
        decoded (:meth:`fetching`) is not evicted.
        """
        size = self._held.get(model_id)
        if size is None or model_id in self._flights:
            return False
        del self._held[model_id]
        self._decoded.pop(model_id, None)
        self._sizes.pop(model_id, None)
        self.store.unpin(model_id)
        if self.store.is_pinned(model_id):
            log(logger, logging.INFO, "model_evicted", model=model_id.hex()[:16], bytes=size, blob="kept: pinned")
            return True
        self.store.delete(model_id)  # still granted to any peer: a fetch of it now finds no blob and tries elsewhere
        self.evictions += 1
        log(logger, logging.INFO, "model_evicted", model=model_id.hex()[:16], bytes=size, blob="deleted")
        return True

    def is_warm(self, model_id: bytes) -> bool:
        """Whether the decoded bundle is held in memory: a task naming it starts without a fetch or a decode."""
        return model_id in self._decoded

    def on_disk(self, model_id: bytes) -> bool:
        """Whether the bundle's bytes are in the blob store (a cold start then only decodes and loads)."""
        return self.store.has(model_id)

    def warm_sizes(self) -> dict[bytes, int]:
        """The decoded models and their bundle sizes (what :func:`~p2pgpu.market.warmset.plan_warm_set` calls held)."""
        return dict(self._sizes)

    async def _bytes(self, model_id: bytes, holders: Sequence[str], max_bytes: int) -> bytes:
        if self.store.has(model_id):
            return await trio.to_thread.run_sync(self.store.get, model_id)
        failures: list[str] = []
        for peer in holders:
            try:
                data = await self._fetch(peer, model_id, max_bytes)
            except (DataPlaneError, NetError, trio.TooSlowError, OSError) as exc:
                failures.append(f"{peer[:12]}: {type(exc).__name__}: {exc}")
                continue
            digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())
            if digest != model_id:  # the data plane checks this; a holder's wrong answer must never pass as the model
                failures.append(f"{peer[:12]}: its answer is not the bundle (SHA-256 {digest.hex()[:16]})")
                log(logger, logging.WARNING, "model_fetch_corrupt", model=model_id.hex()[:16], peer=peer[:12])
                continue
            self.fetches += 1
            log(logger, logging.INFO, "model_fetched", model=model_id.hex()[:16], peer=peer[:12], bytes=len(data))
            return data
        why = "; ".join(failures) if failures else "no holder is connected"
        raise ModelUnavailable(f"model {model_id.hex()[:16]}: could not fetch its bundle ({why})")
