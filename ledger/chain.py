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
from typing import Protocol

from ledger.blocks import FinalizedBlock
from ledger.codec import DecodeError, encode
from ledger.committee import verify_certificate
from ledger.exceptions import InvalidBlock, LedgerError
from ledger.genesis import Genesis, initial_state
from ledger.state import Committee, State
from ledger.store import ChainStore, StoreConfig
from ledger.transition import apply_block, committee_for_height
from ledger.votes import CommitCertificate


class CertificateVerifier(Protocol):
    """A cache of certificate checks (``ledger.consensus.SignatureVerifier``); raises InvalidCertificate."""

    def verify_certificate(self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int,
                           block_hash: bytes) -> None: ...


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
        """
        block = finalized.block
        if block.height != self.state.height + 1:
            raise InvalidBlock(f"cannot commit block {block.height} on top of height {self.state.height}")
        check = verifier.verify_certificate if verifier is not None else verify_certificate
        check(
            committee_for_height(self.state, block.height), self.chain_id, finalized.certificate,
            height=block.height, block_hash=block.block_hash(),
        )
        new_state = post_state if post_state is not None else apply_block(self.state, block)
        if new_state.height != block.height or new_state.last_block_hash != block.block_hash():
            raise InvalidBlock("post-state does not belong to this block")
        self.store.append_block(block.height, encode(finalized), sync=True)
        self.state = new_state
        if self.snapshot_interval and block.height % self.snapshot_interval == 0:
            self.store.snapshot(block.height, new_state.encode())
        return new_state

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
