"""The roles' data-plane fetches: background tasks that fetch a blob for a role and post the outcome to its inbox.

Each worker runs in the roles' nursery for one action (``FetchSpec``,
``FetchInputs``, ``FetchResult``, ``FetchStreamItem``), fetches over
``/p2pgpu/data/1`` -- sealed task data opened in the task's context and
hashed to what the spec or ``CommitResult`` commits to, or a plain blob --
and answers with one event (``SpecFetched``, ``InputsFetched``,
``ResultFetched`` / ``ResultDelivered``, ``StreamItemFetched``, or
``FetchFailed``). Workers never touch a role: the event goes through
``post`` into the roles' single inbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import trio

from kernels.spec import decode_blob
from kernels.tensors import decode_tensor
from p2pgpu.dataplane import DataPlane, DataPlaneError
from p2pgpu.market import (
    Event,
    FetchFailed,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsFetched,
    ResultDelivered,
    ResultFetched,
    SpecFetched,
    StreamItemFetched,
)
from p2pgpu.net import NetError
from p2pgpu.net.log import log
from p2pgpu.providerservice import PROVIDER
from p2pgpu.sealed import Purpose, SealedError, task_context
from p2pgpu.streams import MAX_ITEM_ELEMENTS

__all__ = ["FETCH_TIMEOUT_S", "MAX_BLOB_BYTES", "MAX_STREAM_ITEM_BYTES", "FetchWorkers"]

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 60.0
MAX_BLOB_BYTES = 1 << 30
MAX_STREAM_ITEM_BYTES = 8 * MAX_ITEM_ELEMENTS + 64  # one tensor ext payload: header + float64 elements


class FetchWorkers:
    """The fetch tasks of one node's roles; ``post(origin, event)`` hands each outcome to the roles' inbox."""

    def __init__(self, dataplane: DataPlane, *, chain_id: bytes, peer_of: Callable[[bytes], str | None],
                 post: Callable[[object, Event], None]) -> None:
        self.dataplane = dataplane
        self.chain_id = chain_id
        self.peer_of = peer_of
        self.post = post

    async def fetch(self, address_or_peer: bytes | str | None, blob_hash: bytes, *,
                    max_bytes: int = MAX_BLOB_BYTES) -> bytes:
        """A plain blob: a spec, or a disputed stream item (its hash is the one the provider signed)."""
        peer = address_or_peer if isinstance(address_or_peer, str) else (
            self.peer_of(address_or_peer) if address_or_peer is not None else None)
        if peer is None:
            raise LookupError("no connected peer for that address")
        return await self.dataplane.fetch(peer, blob_hash, max_bytes=max_bytes, timeout=FETCH_TIMEOUT_S)

    async def fetch_sealed(self, holder: bytes, name: bytes, task_id: bytes, purpose: bytes, *,
                           timeout: float | None = None) -> bytes:
        """Task data from its holder: plaintext that opened in this task's context and hashes to ``name``."""
        peer = self.peer_of(holder)
        if peer is None:
            raise LookupError(f"no connected peer for {holder.hex()}")
        context = task_context(self.chain_id, task_id, purpose)
        limit = FETCH_TIMEOUT_S if timeout is None else min(timeout, FETCH_TIMEOUT_S)
        return await self.dataplane.fetch_sealed(peer, name, context=context, max_bytes=MAX_BLOB_BYTES,
                                                 timeout=limit)

    async def fetch_spec(self, origin: object, action: FetchSpec, peer: str | None) -> None:
        try:
            data = await self.fetch(peer, action.spec_hash)
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError) as exc:
            self.post(origin, FetchFailed(action.task_id, "spec", str(exc)))
            return
        self.post(origin, SpecFetched(action.spec_hash, data))

    async def fetch_inputs(self, origin: object, action: FetchInputs) -> None:
        inputs: dict[str, np.ndarray] = {}
        try:
            for name, ref in action.spec.inputs:
                data = await self.fetch_sealed(action.client, ref.hash, action.task_id, Purpose.INPUT)
                inputs[name] = decode_blob(ref, data)
        except SealedError as exc:  # counted by the data plane; never used as an input
            log(logger, logging.WARNING, "sealed_input_rejected", task=action.task_id.hex()[:16],
                error=type(exc).__name__, detail=str(exc))
            self.post(origin, FetchFailed(action.task_id, "inputs", f"{type(exc).__name__}: {exc}"))
            return
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError, ValueError) as exc:
            self.post(origin, FetchFailed(action.task_id, "inputs", str(exc)))
            return
        self.post(origin, InputsFetched(action.task_id, inputs))

    async def fetch_result(self, origin: object, action: FetchResult) -> None:
        try:
            data = await self.fetch_sealed(action.provider, action.result_hash, action.task_id, Purpose.RESULT,
                                           timeout=action.timeout_s)
        except (SealedError, DataPlaneError, NetError, LookupError, trio.TooSlowError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, SealedError) else str(exc)
            if isinstance(exc, SealedError):  # counted by the data plane; never taken as the result
                log(logger, logging.WARNING, "sealed_result_rejected", task=action.task_id.hex()[:16],
                    error=type(exc).__name__, detail=str(exc))
            if origin != PROVIDER:
                log(logger, logging.INFO, "result_fetch_failed", task=action.task_id.hex()[:16], error=reason)
            self.post(origin, FetchFailed(action.task_id, "result", reason))
            return
        event: Event = ResultFetched(action.task_id, data) if origin == PROVIDER \
            else ResultDelivered(action.task_id, data)
        self.post(origin, event)

    async def fetch_stream_item(self, origin: object, action: FetchStreamItem) -> None:
        """Verifier: a disputed item's input and output from the client, each checked against its item hash."""
        tensors = []
        try:
            for digest in (action.input_hash, action.output_hash):
                data = await self.fetch(action.client, digest, max_bytes=MAX_STREAM_ITEM_BYTES)
                tensors.append(decode_tensor(data, MAX_ITEM_ELEMENTS))  # the data plane checked the hash
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError, ValueError) as exc:  # ValueError: bad tensor
            self.post(origin, FetchFailed(action.task_id, "stream-item", str(exc)))
            return
        self.post(origin, StreamItemFetched(action.task_id, tensors[0], tensors[1]))
