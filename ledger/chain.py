"""A node's finalized chain: the ledger state plus the crash-safe store under it.

``Chain.open`` recovers whatever a crash left: the newest usable snapshot,
then every stored block after it, re-applied in order. ``commit`` appends a
finalized block (fsync) *before* the in-memory state moves, so a block the
node acted on is never lost; a snapshot is written every
``snapshot_interval`` blocks so restarts stay fast.

The data dir remembers the chain id it belongs to (``CHAIN``): pointing a
node at another chain's data dir is an error, not a silent mix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ledger.blocks import FinalizedBlock
from ledger.codec import DecodeError, encode
from ledger.consensus.certificate import CertificateVerifier, verify_finalized_block
from ledger.exceptions import InvalidBlock, LedgerError
from ledger.genesis import Genesis, initial_state
from ledger.state import State
from ledger.store import ChainStore, StoreConfig
from ledger.transition import apply_block, committee_for_height


log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT_INTERVAL = 256


class ChainError(LedgerError):
    """The data dir cannot serve this chain (another chain's data, or a stored block that no longer applies)."""


class Chain:
    def __init__(self, genesis: Genesis, store: ChainStore, state: State, snapshot_interval: int) -> None:
        self.genesis = genesis
        self.store = store
        self.state = state
        self.snapshot_interval = snapshot_interval

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        genesis: Genesis,
        *,
        snapshot_interval: int = DEFAULT_SNAPSHOT_INTERVAL,
        store_config: StoreConfig | None = None,
    ) -> Chain:
        data = Path(data_dir)
        store = ChainStore.open(data, store_config)
        try:
            chain_id = genesis.chain_id()
            marker = data / "CHAIN"
            if marker.exists():
                recorded = marker.read_text().strip()
                if recorded != chain_id.hex():
                    raise ChainError(
                        f"{data} holds chain {recorded[:16]}…, but the genesis given is chain {chain_id.hex()[:16]}…; "
                        "use another data dir or the matching genesis"
                    )
            else:
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(chain_id.hex() + "\n")
                os.replace(tmp, marker)
            if store.recovery is not None and not store.recovery.clean:
                log.warning("store recovered: %s", store.recovery)
            state = cls._recover(genesis, store)
            return cls(genesis, store, state, snapshot_interval)
        except BaseException:
            store.close()
            raise

    @staticmethod
    def _recover(genesis: Genesis, store: ChainStore) -> State:
        loaded = store.load()
        if loaded.snapshot is not None:
            try:
                state = State.decode(loaded.snapshot.data)
            except DecodeError as exc:
                raise ChainError(f"snapshot at height {loaded.snapshot.height} does not decode: {exc}") from exc
            if state.chain_id != genesis.chain_id():
                raise ChainError("snapshot belongs to another chain")
        else:
            state = initial_state(genesis)
        replayed = 0
        for height, record in loaded.blocks:
            try:
                fb = FinalizedBlock.from_bytes(record)
                state = apply_block(state, fb.block, check_signatures=False, check_last_commit=False)
            except (DecodeError, InvalidBlock) as exc:
                raise ChainError(f"stored block {height} does not apply on top of block {height - 1}: {exc}") from exc
            replayed += 1
        if replayed:
            log.info("chain recovered: height=%d replayed=%d", state.height, replayed)
        return state

    @property
    def height(self) -> int:
        return self.state.height

    @property
    def chain_id(self) -> bytes:
        return self.state.chain_id

    def commit(self, finalized: FinalizedBlock, post_state: State | None = None, *,
               verifier: CertificateVerifier | None = None) -> State:
        """Persist a finalized block, then adopt its post-state.

        ``post_state`` is the state ``apply_block`` returned when consensus
        validated the block (saves re-executing it); without it the block is
        applied here. The certificate is always checked: by ``verifier`` if
        given (consensus's cache, which already knows the certificates it
        built or checked), else afresh.

        The same as :meth:`check_commit`, :meth:`persist_block`, :meth:`adopt`
        and :meth:`write_snapshot_if_due` in turn; a host that must not block
        (the Trio node) runs the two writing steps in a worker thread.
        """
        new_state = self.check_commit(finalized, post_state, verifier=verifier)
        self.persist_block(finalized)
        self.adopt(new_state)
        self.write_snapshot_if_due(new_state)
        return new_state

    def check_commit(self, finalized: FinalizedBlock, post_state: State | None = None, *,
                     verifier: CertificateVerifier | None = None) -> State:
        """Everything :meth:`commit` checks, nothing written: the state the block leads to (InvalidBlock,
        InvalidCertificate if it may not be committed on top of our head)."""
        block = finalized.block
        if block.height != self.state.height + 1:
            raise InvalidBlock(f"cannot commit block {block.height} on top of height {self.state.height}")
        block_hash = block.block_hash()
        verify_finalized_block(finalized, committee_for_height(self.state, block.height), self.chain_id,
                               verifier=verifier, block_hash=block_hash)
        new_state = post_state if post_state is not None else apply_block(self.state, block)
        if new_state.height != block.height or new_state.last_block_hash != block_hash:
            raise InvalidBlock("post-state does not belong to this block")
        return new_state

    def persist_block(self, finalized: FinalizedBlock) -> None:
        """Append a checked block to the store, on stable storage when this returns (blocking: fsync).

        Touches neither ``state`` nor anything a reader of this chain uses for blocks at or below ``height``,
        so it may run in a worker thread while the event loop reads the chain.
        """
        self.store.append_block(finalized.block.height, encode(finalized), sync=True)

    def adopt(self, new_state: State) -> None:
        """Move the head to ``new_state``, whose block :meth:`persist_block` stored (persist before adopt)."""
        head = self.store.head_height
        if head is None or head < new_state.height:
            raise InvalidBlock(f"block {new_state.height} is not stored yet (the store's head is {head})")
        self.state = new_state

    def snapshot_due(self, height: int) -> bool:
        """Whether the state after block ``height`` is snapshotted (every ``snapshot_interval`` blocks)."""
        return bool(self.snapshot_interval) and height % self.snapshot_interval == 0

    def write_snapshot_if_due(self, new_state: State) -> None:
        """Snapshot ``new_state`` if its height is due (blocking: encodes the state and fsyncs)."""
        if self.snapshot_due(new_state.height):
            self.store.snapshot(new_state.height, new_state.encode())

    def get_finalized(self, height: int) -> FinalizedBlock:
        return FinalizedBlock.from_bytes(self.store.get_block(height))

    def finalized_from(self, height: int) -> Iterator[FinalizedBlock]:
        for _, record in self.store.blocks_from(height):
            yield FinalizedBlock.from_bytes(record)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
