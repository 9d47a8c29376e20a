"""Task data on the bid link: the roles' side of :mod:`p2pgpu.bidlink`'s ``INPUTS`` and ``RESULT`` pushes.

A client sends a task's sealed inputs to the provider it assigns the task
to, with its ``Assign``; a provider sends the sealed result to the client
just before its ``CommitResult`` hint. Each reader checks and keeps a push
as it would a fetched body (:meth:`p2pgpu.dataplane.DataPlane.accept_pushed_sealed`),
and its fetch then opens the stored copy instead of opening a stream. A
push is only ever a shortcut: whatever keeps one from happening or from
checking out leaves the fetch to do what it always did (see "Task data on
the bid link" in ``docs/architecture.md``).

:class:`LinkData` is Trio shell: it reads the ledger-free facts it needs
(our tasks, our provider role's jobs) through the callables it is given,
and counts every outcome in the roles' counters, which ``/metrics`` shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING

import trio

from ledger.transactions import CommitResult, TaskKind
from p2pgpu.bidlink import (MAX_PUSH_BYTES, MAX_PUSH_INPUTS, BidLinks, ClientLinks, InputsPush, PushedInput,
                            ResultPush, decode_inputs_push, decode_result_push)
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.boundedmap import BoundedBytesMap
from p2pgpu.dataplane import DataPlane, DataPlaneError, account_address_of_peer
from p2pgpu.market import Event, InputsPushed, InputsReceived
from p2pgpu.net import ProtocolError
from p2pgpu.net.log import log
from p2pgpu.providerservice import PROVIDER
from p2pgpu.sealed import Purpose, SealedError, SealedHeader, context_id, task_context
from p2pgpu.sealedstore import SealedRef, SealedStore

if TYPE_CHECKING:
    from p2pgpu.clientservice import ClientRecord
    from p2pgpu.market import ProviderRole

logger = logging.getLogger(__name__)

__all__ = ["LinkData"]

PREPARED_RESULTS_KEPT = 256
"""Result pushes made ahead of their commitment that a provider keeps (the oldest go first)..."""
PREPARED_RESULT_BYTES = 32 << 20
"""... and the bytes they may hold in all: one made for a task that went elsewhere is only ever evicted."""


class LinkData:
    """Pushes of task data over the bid links, both ways, for one node's roles."""

    def __init__(self, *, chain_id: bytes, sealed: SealedStore, store: BlobStore, dataplane: DataPlane,
                 bid_links: BidLinks, client_links: ClientLinks, provider: Callable[[], ProviderRole | None],
                 clients: Callable[[], Mapping[bytes, ClientRecord]], peer_of: Callable[[bytes], str | None],
                 post: Callable[[object, Event], None], spawn: Callable[..., None],
                 counters: MutableMapping[str, int]) -> None:
        self.chain_id = chain_id
        self.sealed = sealed
        self.store = store
        self.dataplane = dataplane
        self.bid_links = bid_links
        self.client_links = client_links
        self._provider = provider
        self._clients = clients
        self._peer_of = peer_of
        self._post = post
        self._spawn = spawn
        self.counters = counters
        self._prepared: BoundedBytesMap[bytes, tuple[bytes, ResultPush]] = BoundedBytesMap(
            PREPARED_RESULTS_KEPT, PREPARED_RESULT_BYTES)
        """Task id -> (the client key it is wrapped for, the result push) made ahead (``prepare_result``)."""

    # ------------------------------------------------------------ client: inputs out, results in

    async def push_inputs(self, task_id: bytes, provider: bytes) -> None:
        """Send our task's sealed inputs to ``provider`` over its bid link, each wrapped for its X25519 key.

        Only when everything is at hand: the provider's link open, its key
        known (its ``HELLO`` on the link, else the key it named in its last
        sealed fetch from us; a new link's ``HELLO`` is waited for a moment,
        :data:`~p2pgpu.bidlink.PROVIDER_KEY_WAIT_SECONDS`), the inputs small
        (:data:`~p2pgpu.bidlink.MAX_PUSH_BYTES`). Otherwise, or if the write
        fails, nothing changes: the provider fetches them once the ``Assign``
        is final, as it always could. Counted per outcome.
        """
        record = self._clients().get(task_id)
        if record is None or record.task.kind != TaskKind.BATCH or not record.task.spec.inputs:
            return
        peer = self._peer_of(provider)
        if peer is None or not self.client_links.has(peer):
            self.counters["inputs_push_no_link"] += 1
            return
        key = (self.client_links.provider_key(peer) or self.dataplane.recipient_key_of(peer)
               or await self.client_links.wait_provider_key(peer))
        if key is None:
            self.counters["inputs_push_no_key"] += 1
            return
        spec = record.task.spec
        if len(spec.inputs) > MAX_PUSH_INPUTS:
            self.counters["inputs_push_too_big"] += 1
            return
        context = task_context(self.chain_id, task_id, Purpose.INPUT)
        sealed = self.sealed

        def build() -> InputsPush | None:
            cid = context_id(context)
            items, size = [], 0
            for _, ref in spec.inputs:
                sref = sealed.lookup(ref.hash, cid)
                if sref is None:
                    return None
                size += self.store.size(sref.content_hash)
                if size > MAX_PUSH_BYTES:
                    return None
                items.append(self._wrapped(sref, key))
            return InputsPush(task_id, tuple(items))

        try:
            push = await trio.to_thread.run_sync(build)
        except (SealedError, BlobStoreError) as exc:
            self.counters["inputs_push_failed"] += 1
            log(logger, logging.WARNING, "inputs_push_not_built", task=task_id.hex()[:16], error=repr(exc))
            return
        if push is None:
            self.counters["inputs_push_too_big"] += 1
            return
        if await self.client_links.push(peer, push):
            self.counters["inputs_push_sent"] += 1
            self._post(task_id, InputsPushed(task_id, provider))
        else:
            self.counters["inputs_push_failed"] += 1

    def result_from_link(self, peer: str, payload: bytes) -> None:
        """A provider pushed the result of one of our tasks, just before its commitment hint: kept like a
        fetched body if it is our task's provider's, the first for that task, and checks out (else the
        hint's fetch gets it as before). A push that does not decode ends the link. The check and store run
        in a task of their own; the hint's fetch waits for them (``DataPlane.expect_push``)."""
        push = decode_result_push(payload)
        record = self._clients().get(push.task_id)
        sender = account_address_of_peer(peer)
        task = record.task if record is not None else None
        providers = {task.chosen.bid.provider if task.chosen is not None else None,
                     task.task.provider if task.task is not None else None} if task is not None else set()
        if record is None or sender is None or sender not in providers or record.result_pushed \
                or record.outputs is not None:
            self.counters["result_push_unexpected"] += 1
            return
        record.result_pushed = True
        self.dataplane.expect_push(push.result.name, task_context(self.chain_id, push.task_id, Purpose.RESULT))
        self._spawn(self._keep, peer, push.task_id, Purpose.RESULT, (push.result,), "result_push")

    # ------------------------------------------------------------ provider: results out, inputs in

    async def prepare_result(self, task_id: bytes, client: bytes, result_hash: bytes, data: bytes) -> None:
        """A result held for a task not yet final for us (an early run): seal it to ourselves and wrap it for
        the client's key now, in a worker thread, so its push goes out the moment we commit (``commit_sent``)
        instead of a worker-thread hop later. Grants nothing; whatever fails leaves ``commit_sent`` to build it."""
        peer = self._peer_of(client)
        key = self.bid_links.client_key(peer) if peer is not None else None
        context = task_context(self.chain_id, task_id, Purpose.RESULT)

        def build() -> ResultPush | None:
            ref = self.sealed.seal_put(data, context=context)
            return self._result_push(task_id, ref, key) if ref.name == result_hash else None

        try:
            push = await trio.to_thread.run_sync(build)
        except (SealedError, BlobStoreError) as exc:
            log(logger, logging.WARNING, "result_not_prepared", task=task_id.hex()[:16], error=repr(exc))
            return
        if push is not None and key is not None:
            self._prepared.put(task_id, (key, push), len(push.result.body))

    def commit_sent(self, peer: str | None, commit: CommitResult, signed_tx: bytes) -> None:
        """Our CommitResult went out: its hint to the client at ``peer``, after the result itself when that
        client's link reads pushes (it said ``HELLO``): at once if it was prepared, else built first."""
        key = self.bid_links.client_key(peer) if peer is not None else None
        prepared = self._prepared.pop(commit.task_id)
        if peer is None or key is None:
            self.bid_links.send_commitment(peer, signed_tx)
        elif prepared is not None and prepared[0] == key and prepared[1].result.name == commit.result_hash:
            self.counters["result_push_prepared"] += 1
            self._send_result_and_hint(peer, prepared[1], signed_tx)
        else:
            self._spawn(self._push_result_and_hint, peer, commit, signed_tx)

    async def _push_result_and_hint(self, peer: str, commit: CommitResult, signed_tx: bytes) -> None:
        """The sealed result for the client at ``peer`` (wrapped for the key its ``HELLO`` named), then the
        CommitResult hint: the client keeps the result before the hint starts its fetch, which then finds it.
        Without a push (the link does not read them, the result is too big or not at hand) the hint goes alone."""
        key = self.bid_links.client_key(peer)
        context = task_context(self.chain_id, commit.task_id, Purpose.RESULT)
        sealed = self.sealed

        def build() -> ResultPush | None:
            return self._result_push(commit.task_id, sealed.lookup(commit.result_hash, context_id(context)), key)

        try:
            push = await trio.to_thread.run_sync(build)
        except (SealedError, BlobStoreError) as exc:
            log(logger, logging.WARNING, "result_push_not_built", task=commit.task_id.hex()[:16], error=repr(exc))
            push = None
        self._send_result_and_hint(peer, push, signed_tx)

    def _send_result_and_hint(self, peer: str, push: ResultPush | None, signed_tx: bytes) -> None:
        if push is None:
            self.counters["result_push_not_built"] += 1
        elif self.bid_links.send_result(peer, push):
            self.counters["result_push_sent"] += 1
        else:
            self.counters["result_push_no_link"] += 1
        self.bid_links.send_commitment(peer, signed_tx)

    def inputs_from_link(self, peer: str, payload: bytes) -> None:
        """A client pushed a task's inputs to us with its Assign: kept like fetched ones, if they check out.

        A push that does not decode, or names an input the task does not have,
        ends the link (``ProtocolError``); one for a task we take no push for
        (not ours, or past fetching: a race with the block) is dropped.
        """
        push = decode_inputs_push(payload)
        client = account_address_of_peer(peer)
        provider = self._provider()
        names = provider.pushable_inputs(push.task_id, client) if provider is not None and client is not None else None
        if names is None:
            self.counters["inputs_push_unexpected"] += 1
            return
        if any(item.name not in names for item in push.inputs):
            raise ProtocolError(f"inputs push for task {push.task_id.hex()[:16]} names an input its spec does not")
        self._spawn(self._accept_pushed_inputs, peer, push, client)

    async def _accept_pushed_inputs(self, peer: str, push: InputsPush, client: bytes) -> None:
        """Keep the pushed inputs; once all are kept, tell the provider role (it may run the job early)."""
        if await self._keep(peer, push.task_id, Purpose.INPUT, push.inputs, "inputs_push"):
            self._post(PROVIDER, InputsReceived(push.task_id, client))

    # ------------------------------------------------------------ both ways

    def _result_push(self, task_id: bytes, ref: SealedRef | None, key: bytes | None) -> ResultPush | None:
        """Our sealed result ``ref`` as a push for ``key`` (a worker thread's job); None without a copy or a key,
        or over :data:`MAX_PUSH_BYTES` (the client fetches it)."""
        if ref is None or key is None or self.store.size(ref.content_hash) > MAX_PUSH_BYTES:
            return None
        return ResultPush(task_id, self._wrapped(ref, key))

    def _wrapped(self, ref: SealedRef, key: bytes) -> PushedInput:
        """Our stored sealed body of ``ref`` with a header that opens it for ``key`` only (a worker thread's job)."""
        return PushedInput(ref.name, self.sealed.wrap_for(ref, key).to_bytes(), self.store.get(ref.content_hash))

    async def _keep(self, peer: str, task_id: bytes, purpose: bytes, items: tuple[PushedInput, ...],
                    counter: str) -> bool:
        """Keep what ``peer`` pushed for ``task_id`` as fetched bodies, counted ``<counter>_accepted``; the first that
        does not check out stops it, counted ``<counter>_refused`` (the data plane counts and charges it; the
        fetch gets the rest as before). True if all were kept."""
        context = task_context(self.chain_id, task_id, purpose)
        for item in items:
            try:
                header = SealedHeader.from_bytes(item.header)
                await self.dataplane.accept_pushed_sealed(peer, item.name, context=context, header=header,
                                                          body=item.body)
            except (SealedError, DataPlaneError) as exc:
                self.dataplane.push_settled(item.name, context)  # a header that does not parse never got there
                self.counters[f"{counter}_refused"] += 1
                log(logger, logging.WARNING, f"{counter}_refused", peer=peer, task=task_id.hex()[:16],
                    error=type(exc).__name__, detail=str(exc))
                return False
        self.counters[f"{counter}_accepted"] += 1
        return True
