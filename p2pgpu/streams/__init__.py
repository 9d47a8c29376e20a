"""``/p2pgpu/stream/1``: a stream task's items, outputs and receipts between its client and its provider.

The accounting is the market's (:class:`~p2pgpu.market.ClientStream` and
:class:`~p2pgpu.market.ProviderStream`, sans-I/O); this module carries it
over one libp2p stream and keeps the provider's model warm in one kernel
worker for the whole session. Every frame is a record of :data:`STREAM_MESSAGES`
(a codec :class:`~ledger.codec.RecordUnion`, tensors as the kernels' ext type)::

    client   -> StreamHello(task_id)
    provider -> StreamReady(task_id, receipt_every, units, next_index)     once the model is loaded
    client   -> StreamInput(index, item)        never more than K answers outstanding
    provider -> StreamResult(output, signed)    SignedStreamOutput(task_id, index, input_hash, output_hash)
    client   -> StreamAck(receipt)              a client-signed cumulative receipt every K answers
    client   -> END                             after the last answer (and its receipt)
    provider -> END                             after its final StreamClaim

``K`` is the provider's ``receipt_every`` (the node's ``[provider]
receipt_every``), announced in ``StreamReady``; a client whose own interval
is longer receipts every K answers instead (``ClientStream.accept_terms``:
that only lowers its own risk), so neither side can stall waiting for the
other. A client that ignores K anyway is cut off with ``no_receipt`` once K
served items have waited ``receipt_timeout`` for a receipt, an error that
says why, rather than a silent stall until ``idle_timeout``.

Who may stream. The peer's ledger address comes from its Noise-authenticated
peer id (as on ``/p2pgpu/data/1``); the provider serves only the task's
client, only for a STREAM task the ledger shows ASSIGNED to us, and only
once its role has handed over the session (``ServeStream``) and the model
is loaded. A hello that arrives before that (the client saw the assignment
first) waits for it, up to ``ready_timeout``.

Backpressure. Items beyond the K unreceipted the provider may serve wait in
a queue until the receipt that frees them arrives on the same stream; a
client with more than K items unanswered is flooding and is cut off.

Refusals end the connection with an ERROR frame ``"<code>: <reason>"``
(:class:`StreamRejected`; codes in :data:`REJECTION_CODES`), are counted per
code in :class:`StreamMetrics`, and -- when the peer broke the protocol
rather than merely came too early -- charge it a peer-score rejection. The
provider's session (and warm model) outlives a refused connection, so a
client may connect again.

Actions the market objects return (``SendReceipt``, ``SubmitTx(StreamClaim)``)
and what the client learns (``ResultReady`` with the stacked outputs under
``"outputs"``, ``Report``) go to the node through ``route``; a ``SendReceipt``
is also queued on its own connection as it is signed (the provider waits for it).

The package, one idea per module:

* :mod:`.messages` -- the wire records and their codec, the submit-time items input;
* :mod:`.errors` -- the error tree and the rejection codes;
* :mod:`.config` -- :class:`StreamConfig`, :class:`StreamStats`, :class:`StreamMetrics`;
* :mod:`.admission` -- who may stream a task with us, and when (pure);
* :mod:`.provider_core`, :mod:`.client_core` -- the two halves as sans-I/O
  protocol cores (frames in; frames, events and actions out);
* :mod:`.transport` -- :class:`StreamTransport`, the Trio shell that moves
  frames and time for the cores;
* :mod:`.live` -- :class:`LiveSession`, the callers' handle on a live session
  (a stream task fed one item at a time), and its errors.

The session objects (the market's ``ClientStream`` / ``ProviderStream``) each
have one writer: the task that runs the session in :mod:`.transport`. The
provider's role does not change its ``ProviderStream`` once served; it returns
``CommandStream`` (close near the deadline, a refused claim, settlement) and
the session's task applies it between frames. The actions a session returns
go to the node's ``route``, which queues them into the roles' inbox.
"""

from __future__ import annotations

from ..topics import STREAM_PROTOCOL
from .admission import ADMIT, WAIT, Refusal, SessionPhase, check_admission
from .client_core import ClientProtocol
from .config import CLOSE_REASONS, StreamConfig, StreamMetrics, StreamStats
from .errors import (
    PENALIZED_CODES,
    REJECTION_CODES,
    StreamRefused,
    StreamRejected,
    StreamTransportError,
    refusal_code,
)
from .messages import (
    ITEMS_INPUT,
    MAX_ITEM_ELEMENTS,
    STREAM_MESSAGES,
    StreamAck,
    StreamHello,
    StreamInput,
    StreamReady,
    StreamResult,
    decode_message,
    encode_message,
    stream_items,
)
from .live import (
    InvalidItem,
    LiveSession,
    LiveSessionError,
    NoProviderError,
    SessionClosed,
    SessionExhausted,
    SessionLost,
    SessionStartError,
)
from .provider_core import ProviderProtocol
from .transport import StreamTransport

__all__ = [
    "ADMIT",
    "CLOSE_REASONS",
    "ITEMS_INPUT",
    "MAX_ITEM_ELEMENTS",
    "PENALIZED_CODES",
    "REJECTION_CODES",
    "STREAM_MESSAGES",
    "STREAM_PROTOCOL",
    "WAIT",
    "ClientProtocol",
    "InvalidItem",
    "LiveSession",
    "LiveSessionError",
    "NoProviderError",
    "ProviderProtocol",
    "Refusal",
    "SessionClosed",
    "SessionExhausted",
    "SessionLost",
    "SessionPhase",
    "SessionStartError",
    "StreamAck",
    "StreamConfig",
    "StreamHello",
    "StreamInput",
    "StreamMetrics",
    "StreamReady",
    "StreamRefused",
    "StreamRejected",
    "StreamResult",
    "StreamStats",
    "StreamTransport",
    "StreamTransportError",
    "check_admission",
    "decode_message",
    "encode_message",
    "refusal_code",
    "stream_items",
]
