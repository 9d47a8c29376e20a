"""``p2pgpu keys``: files written and read back, and every refusal is one line on stderr with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledger.keys import address_of
from ledger.keystore import load_keystore
from p2pgpu.cli import main
from p2pgpu.keys_cli import peer_id_of


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PP", "correct horse")
    monkeypatch.setenv("WRONG", "battery staple")
    monkeypatch.setenv("EMPTY", "")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *mentions: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pgpu: error: "), err
    for m in mentions:
        assert m in lines[0]


def test_new_then_show_round_trip(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "node.json"
    code, stdout, _ = run(capsys, "keys", "new", "--out", str(out), "--kind", "both", "--passphrase-env", "PP",
                          "--json")
    assert code == 0
    account_info, validator_info = json.loads(stdout)
    validator_file = tmp_path / "node.validator.json"
    assert validator_info["file"] == str(validator_file)

    account = load_keystore(out, "correct horse")
    assert account.kind == "account" and account.public.hex() == account_info["public_key"]
    assert account_info["address"] == address_of(account.public).hex()
    validator = load_keystore(validator_file, "correct horse")
    assert validator.kind == "validator" and validator.public.hex() == validator_info["public_key"]
    assert (out.stat().st_mode & 0o777) == 0o600

    code, stdout, _ = run(capsys, "keys", "show", str(out), "--passphrase-env", "PP", "--json")
    shown = json.loads(stdout)
    assert code == 0 and shown["verified"] is True
    assert {k: shown[k] for k in ("address", "peer_id", "public_key")} == {
        k: account_info[k] for k in ("address", "peer_id", "public_key")}
    assert account.secret.hex() not in stdout

    # Without a passphrase the clear header is shown, marked unchecked.
    code, stdout, _ = run(capsys, "keys", "show", str(validator_file), "--json")
    assert code == 0 and json.loads(stdout) == {**validator_info, "verified": False}

    # The table form names the fields.
    code, stdout, _ = run(capsys, "keys", "show", str(out), "--passphrase-file", str(_pass_file(tmp_path)))
    assert code == 0 and account_info["address"] in stdout and "peer id" in stdout and "checked" in stdout


def _pass_file(tmp_path: Path) -> Path:
    p = tmp_path / "pass.txt"
    p.write_text("correct horse\n")
    return p


def test_wrong_passphrase_is_one_clear_line(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "PP")[0] == 0
    code, stdout, err = run(capsys, "keys", "show", str(out), "--passphrase-env", "WRONG")
    assert code == 2 and stdout == ""
    assert_one_line_error(err, str(out), "wrong passphrase")


def test_damaged_keystore(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "PP")[0] == 0
    doc = json.loads(out.read_text())
    ct = bytearray.fromhex(doc["cipher"]["ciphertext"])
    ct[0] ^= 1
    doc["cipher"]["ciphertext"] = ct.hex()
    out.write_text(json.dumps(doc))
    code, _, err = run(capsys, "keys", "show", str(out), "--passphrase-env", "PP")
    assert code == 2
    assert_one_line_error(err, str(out), "authentication failed")

    out.write_text(out.read_text()[:50])
    code, _, err = run(capsys, "keys", "show", str(out))
    assert code == 2
    assert_one_line_error(err, str(out), "damaged")


def test_refuses_to_overwrite_without_force(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "PP")[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "PP")
    assert code == 2 and out.read_bytes() == before
    assert_one_line_error(err, "already exists", "--force")
    # --kind both checks the sibling too, before writing anything.
    other = tmp_path / "n.json"
    (tmp_path / "n.validator.json").write_text("keep me")
    code, _, err = run(capsys, "keys", "new", "--out", str(other), "--kind", "both", "--passphrase-env", "PP")
    assert code == 2 and not other.exists() and (tmp_path / "n.validator.json").read_text() == "keep me"
    assert run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "PP", "--force")[0] == 0
    assert out.read_bytes() != before


def test_empty_passphrase_needs_insecure_flag(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    code, _, err = run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "EMPTY")
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "empty passphrase", "--insecure-empty")
    assert run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "EMPTY", "--insecure-empty")[0] == 0
    assert load_keystore(out, "").kind == "account"


def test_missing_passphrase_sources(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "k.json"
    code, _, err = run(capsys, "keys", "new", "--out", str(out), "--passphrase-env", "NOT_SET_ANYWHERE")
    assert code == 2
    assert_one_line_error(err, "NOT_SET_ANYWHERE", "not set")
    code, _, err = run(capsys, "keys", "new", "--out", str(out), "--passphrase-file", str(tmp_path / "none"))
    assert code == 2
    assert_one_line_error(err, "does not exist")
    # stdin is not a terminal under pytest: nobody to prompt.
    code, _, err = run(capsys, "keys", "new", "--out", str(out))
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "--passphrase-env")
    code, _, err = run(capsys, "keys", "show", str(tmp_path / "absent.json"))
    assert code == 2
    assert_one_line_error(err, "no such file")


def test_prompts_twice_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["s3cret", "s3cret", "a", "b"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    out = tmp_path / "k.json"
    assert run(capsys, "keys", "new", "--out", str(out))[0] == 0
    assert load_keystore(out, "s3cret").kind == "account"
    code, _, err = run(capsys, "keys", "new", "--out", str(tmp_path / "k2.json"))
    assert code == 2 and not (tmp_path / "k2.json").exists()
    assert_one_line_error(err, "differ")


def test_peer_id_matches_libp2p() -> None:
    from ledger.keys import AccountKey
    from p2pgpu.net.host import peer_id_from_seed

    for seed in (bytes(32), bytes(range(32)), b"\xff" * 32):
        key = AccountKey.from_seed(seed)
        assert peer_id_of(key.public_key) == peer_id_from_seed(seed)


def test_group_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys")
    assert code == 2 and "new" in out and "show" in out
