"""``/tx`` gossip: transactions travel in batches, paced per node like Nagle's algorithm.

Every gossip message costs every node that follows ``/tx`` the same fixed
work whatever it carries -- decryption, framing, a libp2p signature check,
the seen-cache, forwarding to each mesh peer -- and in an 8-node devnet each
one is received about three times (two duplicates). Under load a client
signs a PostTask per submission and an Assign per auction, a provider a
CommitResult per job: sent one message per transaction, ``/tx`` was most of
the gossip every node handled. A batch of transactions is one message.

Pacing (:class:`TxPacer`, pure): a transaction with nothing sent in the last
``linger`` seconds goes out at once (a lone transaction is not delayed);
otherwise it waits until ``linger`` after the previous send, with everything
signed meanwhile. A transaction only needs to reach the next proposer before
it cuts a block (every ``block_interval``), so a linger well below the block
interval costs little latency and bounds a busy node's ``/tx`` messages to
``1 / linger`` a second.

Wire format: one transaction is its :class:`SignedTransaction` encoding, as
before (a MessagePack array of 3); a batch is a :class:`TxBatch` (an array
of 1: the list). Either decodes with :func:`decode_tx_gossip`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from ledger.codec import DecodeError, ListOf, Nested, Record, array_header, decode, record
from ledger.transactions import MAX_TX_BYTES, SignedTransaction

__all__ = ["MAX_BATCH_TXS", "OwnTxWatch", "TxBatch", "TxPacer", "decode_tx_gossip", "encode_tx_batches"]

MAX_BATCH_TXS = 256
"""Transactions per ``/tx`` message at most (a full batch is 256 x ~300 bytes, far below the topic's limit)."""

MAX_BATCH_BYTES = 128 << 10
"""Encoded transactions per ``/tx`` message at most: a batch must fit the gossip message limit with room."""


@record
class TxBatch(Record):
    """Several signed transactions in one ``/tx`` gossip message (see the module docstring)."""

    MAX_BYTES = MAX_BATCH_BYTES + 4096
    txs: Annotated[tuple[SignedTransaction, ...], ListOf(Nested(SignedTransaction), MAX_BATCH_TXS)]


def decode_tx_gossip(data: bytes) -> tuple[SignedTransaction, ...]:
    """The transactions of one ``/tx`` message, a single one or a batch; raises :class:`DecodeError`."""
    if data[:1] == b"\x91":
        batch = decode(TxBatch, data)
        if not batch.txs:
            raise DecodeError("TxBatch.txs", "an empty batch")
        return batch.txs
    return (decode(SignedTransaction, data),)


def encode_tx_batches(encoded: list[bytes], max_bytes: int = MAX_BATCH_BYTES) -> list[bytes]:
    """``/tx`` messages for already-encoded transactions, in order: a lone one as itself, the rest in batches
    of at most :data:`MAX_BATCH_TXS` transactions and ``max_bytes`` (at most :data:`MAX_BATCH_BYTES`)."""
    limit = min(max_bytes, MAX_BATCH_BYTES) - _BATCH_OVERHEAD
    messages: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for tx in encoded:
        if chunk and (len(chunk) >= MAX_BATCH_TXS or size + len(tx) > limit):
            messages.append(_pack(chunk))
            chunk, size = [], 0
        chunk.append(tx)
        size += len(tx)
    if chunk:
        messages.append(_pack(chunk))
    return messages


_BATCH_OVERHEAD = 4
"""Bytes a batch adds to its transactions: two array headers."""


def _pack(chunk: list[bytes]) -> bytes:
    if len(chunk) == 1:
        return chunk[0]
    # A TxBatch is [[tx, tx, ...]]: its encoding is the transactions' own bytes behind two array headers, so
    # they are spliced in rather than decoded and encoded again (decode_tx_gossip checks it byte for byte).
    if len(chunk) > MAX_BATCH_TXS:
        raise ValueError(f"a batch of {len(chunk)} transactions is too long")
    return b"\x91" + array_header(len(chunk)) + b"".join(chunk)


assert MAX_TX_BYTES * 16 <= MAX_BATCH_BYTES  # a batch holds at least 16 transactions of the largest size


@dataclass(slots=True)
class TxPacer:
    """When this node's pending ``/tx`` gossip goes out (pure: the caller passes the clock)."""

    linger: float
    """At most one send per ``linger`` seconds; 0 sends at once (what was signed in the same instant still
    shares a message)."""
    max_bytes: int = MAX_BATCH_BYTES
    """The ``/tx`` topic's message size limit: batches are cut to fit it."""
    pending: list[bytes] = field(default_factory=list)
    last_sent: float = float("-inf")

    def add(self, encoded_tx: bytes) -> None:
        self.pending.append(encoded_tx)

    def due_at(self) -> float | None:
        """When the pending transactions should go out (None: nothing pending); now or earlier means now."""
        if not self.pending:
            return None
        return self.last_sent + self.linger

    def take(self, now: float) -> list[bytes]:
        """The ``/tx`` messages to send now, all pending transactions in them; records the send."""
        if not self.pending:
            return []
        taken, self.pending = self.pending, []
        self.last_sent = now
        return encode_tx_batches(taken, self.max_bytes)


RESEND_BLOCKS = 5
"""Blocks one of our transactions may stay pending before it is gossiped again (:class:`OwnTxWatch`)."""


@dataclass
class OwnTxWatch:
    """Our own transactions still pending, and when each last went out: gossiped again while they wait.

    Gossip sends a message once. A node that follows ``/tx`` sits in its
    mesh, and gossipsub's IHAVE/IWANT repairs what one hop lost; a client or
    provider publishes to a few peers that follow it (``Node.follows_txs``),
    and a message lost on the way there (a connection dropped, the peers not
    known yet) left the transaction, and every later one of ours behind its
    nonce, waiting in our own mempool only. So a transaction still pending
    :data:`RESEND_BLOCKS` blocks after it went out goes out again, the same
    bytes (peers that have it drop the copy as seen), until a block includes
    it or the mempool drops it.
    """

    resend_blocks: int = RESEND_BLOCKS
    _sent: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    """Transaction hash -> (height it last went out at, its encoding)."""

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, tx_hash: bytes, encoded: bytes, height: int) -> None:
        self._sent[tx_hash] = (height, encoded)

    def due(self, height: int, pending: Callable[[bytes], bool]) -> list[bytes]:
        """At a new ``height``: forget what is no longer ``pending``; the encodings to send again now."""
        out: list[bytes] = []
        for tx_hash, (at, encoded) in list(self._sent.items()):
            if not pending(tx_hash):
                del self._sent[tx_hash]
            elif height - at >= self.resend_blocks:
                self._sent[tx_hash] = (height, encoded)
                out.append(encoded)
        return out
