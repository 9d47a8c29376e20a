"""``/p2pgpu/data/1``: blobs by hash, served only to peers the ledger entitles; task data sealed end to end.

One exchange per stream (framing and transport errors are :mod:`p2pgpu.net`'s)::

    client -> DATA  DataRequest(blob_hash, offset, max_bytes, requester, sealed)   END
    server -> DATA  DataReply(status, size, offset, header)
              DATA  raw bytes …  (only when status is OK, from ``offset`` to ``size``)
              END

Two kinds of blob travel here:

* **Sealed task data** (inputs, results): ``sealed = SealedAsk(context_id,
  recipient)``. ``blob_hash`` is the *name* the ledger knows -- SHA-256 of the
  plaintext, as in the spec's input refs or ``CommitResult`` -- and
  ``context_id`` the task context (:func:`p2pgpu.sealed.context_id` of
  ``task_context(chain, task, purpose)``). The holder keeps only the sealed
  body (:mod:`p2pgpu.sealedstore`); after the entitlement check it wraps the
  body's content key for ``recipient`` (the fetcher's X25519 key) and sends
  that one-wrap header in the reply, then the body. The fetcher stores the
  body by its content hash (``header.content_hash``, checked once the last
  byte is in), opens it with its own key and the context it expects, and
  checks that the plaintext hashes to the name; any failure is the specific
  :class:`~p2pgpu.sealed.SealedError` (``WrongContext``, ``Tampered``,
  ``NotARecipient``, ``Truncated``, ``MalformedEnvelope``,
  :class:`~p2pgpu.sealedstore.PlaintextMismatch`), counted per reason in
  :attr:`DataPlaneMetrics.sealed_rejected`; the body is deleted and the peer
  penalised. So confidentiality and integrity of task data hold end to end,
  whatever carries or stores the bytes.
* **Public blobs** (task specs, announced to everyone anyway): ``sealed`` is
  absent, ``blob_hash`` is the content hash of the bytes served as they are.

Who may fetch. The requester is authenticated by the connection itself:
Noise proves the peer holds the Ed25519 key its peer id embeds (an identity
multihash), and that key is the peer's account key, so the server reads the
public key out of the peer id and derives the ledger address from it. No
signature travels in the request: it would prove nothing Noise has not, and a
signed token could be replayed by whoever saw it. The request still names the
address the client believes it is (``requester``), so a mismatch is refused
with its own status instead of as a silent "not entitled". The node's
entitlement callback ``(peer_id, address, blob_hash) -> bool`` answers from the
ledger (client, assigned provider, drawn verifiers); it runs before the store
is consulted, so a peer that may not have a blob cannot learn whether we hold it.
The recipient key needs no proof either: a peer the ledger entitles can pass
the plaintext on anyway, so wrapping for whichever key it names gives nothing away.

Denials are statuses, not ERROR frames, so the client raises a specific
exception (:class:`NotEntitled`, :class:`NotFound`, :class:`Oversized`, …)
and the server counts each reason in :class:`DataPlaneMetrics`.

Integrity and resume. The client writes frames straight into a
:class:`~p2pgpu.blobstore.PartialBlob` and checks the SHA-256 once the last byte
is in; a mismatch discards the bytes, penalises the peer through the network's
peer scores, and raises :class:`IntegrityError`. A peer that goes away
mid-transfer raises :class:`Truncated`; the bytes received so far stay on disk,
so the next fetch of that blob (from the same peer or another one) asks
only for the rest (``offset``). A sealed fetch learns the body's content hash
from the first reply and remembers it (in memory) to resume; should a holder
answer a resume with another body, the partial bytes are dropped and the
fetch fails with :class:`DataProtocolError` (the next attempt starts afresh).
Partial data cannot be verified until the end, so a resume from a lying peer
is caught by the final hash like any other bad byte.
The package, one idea per module:

* :mod:`.messages` -- the wire records and statuses;
* :mod:`.errors` -- the error tree;
* :mod:`.config` -- :class:`DataPlaneConfig`, :class:`DataPlaneMetrics` and the callback types;
* :mod:`.identity` -- peer id <-> ledger account;
* :mod:`.server_core`, :mod:`.client_core` -- the two halves' decisions and
  checks, sans-I/O (bytes in; verdicts, replies and typed errors out);
* :mod:`.service` -- :class:`DataPlane`, the Trio shell (streams, threads, disk).
"""

from __future__ import annotations

from .config import DataPlaneConfig, DataPlaneMetrics, Entitlement, Progress, Served
from .errors import (
    BadRequest,
    DataPlaneError,
    DataProtocolError,
    IntegrityError,
    NotEntitled,
    NotFound,
    Oversized,
    SizeOverrun,
    Truncated,
)
from .identity import PeerKeys, account_address_of_peer, peer_id_of_account_key
from .messages import DATA_PROTOCOL, DataReply, DataRequest, SealedAsk, Status
from .service import DataPlane

__all__ = [
    "DATA_PROTOCOL",
    "BadRequest",
    "DataPlane",
    "DataPlaneConfig",
    "DataPlaneError",
    "DataPlaneMetrics",
    "DataProtocolError",
    "DataReply",
    "DataRequest",
    "Entitlement",
    "IntegrityError",
    "NotEntitled",
    "NotFound",
    "Oversized",
    "Progress",
    "SealedAsk",
    "Served",
    "SizeOverrun",
    "Status",
    "Truncated",
    "PeerKeys",
    "account_address_of_peer",
    "peer_id_of_account_key",
]
