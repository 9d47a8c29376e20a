"""Who may fetch which blob from this node over ``/p2pgpu/data/1``: the market roles' access list.

The roles name the readers of each blob in their actions (``ServeSpec``:
anyone; ``ServeInputs``: the assigned provider or drawn verifiers;
``ServeResult`` / ``DeliverResult``: the client and verifiers;
``ServeStreamItem``: verifiers). The data plane asks :meth:`BlobAccess.entitled`
before it serves anything and reports with :meth:`BlobAccess.served` each blob
that went out in full; once every input of one of our tasks reached a
fetcher, the client role hears it (``InputsServed``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from kernels.spec import JobSpec

__all__ = ["ANY_PEER", "BlobAccess"]

ANY_PEER = b"*"
"""A reader that stands for every peer (public specs)."""


class BlobAccess:
    """The access list, and which of our tasks' inputs each fetcher has received in full."""

    def __init__(self, inputs_served: Callable[[bytes, bytes], None]) -> None:
        """``inputs_served(task_id, address)``: every input of our task ``task_id`` went out to ``address``."""
        self._inputs_served = inputs_served
        self.allowed: defaultdict[bytes, set[bytes]] = defaultdict(set)
        """Blob hash -> the ledger addresses (or :data:`ANY_PEER`) that may fetch it."""
        self._input_tasks: dict[bytes, tuple[bytes, frozenset[bytes]]] = {}
        """Input blob hash -> (our task that uses it, all that task's input hashes)."""
        self._served: defaultdict[tuple[bytes, bytes], set[bytes] | None] = defaultdict(set)
        """(task, fetcher) -> input blobs served to it in full; None once its client role was told."""

    # ------------------------------------------------------------ granting

    def grant(self, readers: Iterable[bytes], *blob_hashes: bytes) -> None:
        readers = tuple(readers)
        for digest in blob_hashes:
            self.allowed[digest].update(readers)

    def grant_inputs(self, spec: JobSpec, readers: Iterable[bytes]) -> None:
        self.grant(readers, *(ref.hash for _, ref in spec.inputs))

    def track_inputs(self, task_id: bytes, spec: JobSpec) -> None:
        """Our task ``task_id`` serves these inputs: report when a fetcher has them all (:meth:`served`)."""
        hashes = frozenset(ref.hash for _, ref in spec.inputs)
        for digest in hashes:
            self._input_tasks[digest] = (task_id, hashes)

    def forget_task(self, task_id: bytes) -> None:
        """The task is over for us: who fetched what of it no longer matters."""
        for key in [k for k in self._served if k[0] == task_id]:
            del self._served[key]

    # ------------------------------------------------------------ the data plane's questions

    def entitled(self, peer_id: str, address: bytes, blob_hash: bytes) -> bool:
        """May ``address`` read ``blob_hash``?"""
        allowed = self.allowed.get(blob_hash)
        return bool(allowed) and (ANY_PEER in allowed or address in allowed)  # type: ignore[operator]

    def served(self, peer_id: str, address: bytes, blob_hash: bytes, *, is_ours: Callable[[bytes], bool]) -> None:
        """A blob went out in full. Once every input of one of our tasks has, its client role hears it.

        (Not at the access check: that told the user "running" 0.05 s after the
        assignment while the transfer took seconds, or never finished.)
        ``is_ours(task_id)``: whether the task is still one of our open records.
        """
        found = self._input_tasks.get(blob_hash)
        if found is None or not is_ours(found[0]):
            return
        task_id, inputs = found
        got = self._served[(task_id, address)]
        if got is None:
            return  # told already
        got.add(blob_hash)
        if got >= inputs:
            self._served[(task_id, address)] = None
            self._inputs_served(task_id, address)
