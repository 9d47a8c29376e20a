from __future__ import annotations

import pytest

from ledger.signer_guard import GuardFileError, SignerGuard, SignRefused, SignStep, check_position

CHAIN = b"\x07" * 32
A, B = b"\x0a" * 32, b"\x0b" * 32


def test_rule_orders_positions_and_allows_only_identical_resign() -> None:
    g = SignerGuard(CHAIN)
    g.approve(5, 1, SignStep.PREVOTE, A)
    g.approve(5, 1, SignStep.PREVOTE, A)  # identical: fine (re-send after a crash)
    with pytest.raises(SignRefused, match="second block"):
        g.approve(5, 1, SignStep.PREVOTE, B)
    with pytest.raises(SignRefused, match="already signed"):
        g.approve(5, 1, SignStep.PROPOSAL, A)
    with pytest.raises(SignRefused):
        g.approve(5, 0, SignStep.PRECOMMIT, A)
    with pytest.raises(SignRefused):
        g.approve(4, 9, SignStep.PRECOMMIT, A)
    g.approve(5, 1, SignStep.PRECOMMIT, B)
    g.approve(5, 2, SignStep.PROPOSAL, A)
    g.approve(6, 0, SignStep.PREVOTE, A)
    assert g.last is not None and g.last.position == (6, 0, SignStep.PREVOTE)
    assert check_position(None, CHAIN, 1, 0, SignStep.PROPOSAL, A)


def test_record_survives_restart_and_is_written_before_the_hook(tmp_path) -> None:
    path = tmp_path / "guard"
    seen = []

    def hook(pos):
        # the record is already durable when the signature would be handed out
        seen.append(SignerGuard(CHAIN, path).last)

    g = SignerGuard(CHAIN, path, on_persisted=hook)
    g.approve(3, 0, SignStep.PRECOMMIT, A)
    assert seen[0] is not None and seen[0].position == (3, 0, SignStep.PRECOMMIT)
    again = SignerGuard(CHAIN, path)
    with pytest.raises(SignRefused):
        again.approve(3, 0, SignStep.PRECOMMIT, B)
    again.approve(3, 0, SignStep.PRECOMMIT, A)
    assert not (tmp_path / "guard.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_damaged_or_foreign_file_refuses_to_start(tmp_path, damage: str) -> None:
    path = tmp_path / "guard"
    SignerGuard(CHAIN, path).approve(3, 0, SignStep.PREVOTE, A)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[:10]))
    elif damage == "flip":
        raw[-3] ^= 0x40
        path.write_bytes(bytes(raw))
    with pytest.raises(GuardFileError):
        SignerGuard(b"\x08" * 32 if damage == "foreign" else CHAIN, path)


class CountingStore:
    """A GuardStore in memory that counts its writes."""

    def __init__(self) -> None:
        self.record = None
        self.writes = 0

    def load(self):
        return self.record

    def write(self, record) -> None:
        self.record = record
        self.writes += 1


def test_deferred_writes_raise_the_mark_at_once_and_one_flush_makes_it_durable() -> None:
    store = CountingStore()
    persisted = []
    g = SignerGuard(CHAIN, store=store, on_persisted=persisted.append)
    g.approve(1, 0, SignStep.PREVOTE, A)  # write-through by default
    assert store.writes == 1 and g.pending is None and g.durable == g.last
    g.defer_writes()
    g.approve(1, 0, SignStep.PRECOMMIT, A)
    g.approve(1, 1, SignStep.PROPOSAL, B)
    g.approve(1, 1, SignStep.PREVOTE, B)
    # nothing written yet, but the mark moved: a conflicting signature is refused at once
    assert store.writes == 1 and store.record.position == (1, 0, SignStep.PREVOTE)
    with pytest.raises(SignRefused):
        g.approve(1, 1, SignStep.PREVOTE, A)
    with pytest.raises(SignRefused):
        g.approve(1, 0, SignStep.PRECOMMIT, B)
    assert g.pending == g.last and g.last.position == (1, 1, SignStep.PREVOTE)
    assert g.durable is not None and g.durable.position == (1, 0, SignStep.PREVOTE)
    g.flush()  # one write covers the three marks
    assert store.writes == 2 and store.record == g.last == g.durable and g.pending is None
    assert [p.position for p in persisted] == [(1, 0, SignStep.PREVOTE), (1, 1, SignStep.PREVOTE)]
    g.flush()
    g.approve(1, 1, SignStep.PREVOTE, B)  # identical re-sign: nothing new to write
    assert store.writes == 2 and g.pending is None
    # an older record marked durable late (a write that finished after a newer one) changes nothing
    g.mark_durable(persisted[0])
    assert g.durable == g.last


def test_a_mark_lost_before_its_write_leaves_the_durable_record_in_force(tmp_path) -> None:
    path = tmp_path / "guard"
    g = SignerGuard(CHAIN, path)
    g.approve(2, 0, SignStep.PREVOTE, A)
    g.defer_writes()
    g.approve(2, 0, SignStep.PRECOMMIT, A)  # signed, never made durable (hence never sent): a crash
    again = SignerGuard(CHAIN, path)
    assert again.last == g.durable and again.last is not None and again.last.position == (2, 0, SignStep.PREVOTE)
    with pytest.raises(SignRefused):
        again.approve(2, 0, SignStep.PREVOTE, B)
    again.approve(2, 0, SignStep.PRECOMMIT, B)  # allowed: the lost precommit left no trace anywhere


def test_memory_only_guard_has_nothing_pending_and_path_and_store_exclude_each_other(tmp_path) -> None:
    g = SignerGuard(CHAIN)
    g.defer_writes()
    g.approve(1, 0, SignStep.PREVOTE, A)
    assert g.pending is None and g.durable == g.last
    with pytest.raises(ValueError):
        SignerGuard(CHAIN, tmp_path / "guard", store=CountingStore())
