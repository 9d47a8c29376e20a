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
