"""Tokens end to end: ``p2pgpu api token new`` -> the node's config -> a real API server -> the CLI's --token.

The server runs on 127.0.0.1 with the tokens the config file loaded, and
the CLI runs in a worker thread (it is synchronous), as in test_submit_cli.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import trio

from p2pgpu.api.server import serve_api
from p2pgpu.cli import main
from p2pgpu.config import ApiToken, load_config
from p2pgpu.submit_io import TOKEN_ENV, api_token
from p2pgpu.submit_io import api_client as _client
from tests.api.fake_node import FakeNode, matmul_job
from tests.cli.test_submit_cli import cli, one_line

TOKEN_LINE = re.compile(r"^    (p2pgpu_[A-Za-z0-9_-]{43})$", re.M)


def new_token(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """(token, config table) as ``p2pgpu api token new`` prints them."""
    code = main(["api", "token", "new", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    (token,) = TOKEN_LINE.findall(out)
    return token, out[out.index("[[api.tokens]]"):]


def node_config(folder: Path, tables: list[str]) -> Path:
    """A loadable node config (dummy key files) holding ``tables`` under [api]."""
    for name in ("node.json", "genesis.json"):
        (folder / name).write_text("{}")
    path = folder / "node.toml"
    path.write_text('keystore = "node.json"\ngenesis = "genesis.json"\nroles = ["client"]\n\n[api]\nport = 0\n\n'
                    + "\n".join(tables))
    return path


def test_token_new_prints_the_token_once_and_a_table_the_config_loads(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    token, table = new_token(capsys, "--name", "ci-runner", "--scopes", "read, submit", "--spend-per-hour", "5000")
    other, _ = new_token(capsys, "--name", "ci-runner", "--scopes", "read")
    assert token != other
    assert token not in table  # the config gets the hash only
    cfg = load_config(node_config(tmp_path, [table]))
    assert cfg.api.tokens == (ApiToken("ci-runner", hashlib.sha256(token.encode()).hexdigest(),
                                       frozenset({"read", "submit"}), 5000),)


def test_token_new_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["api", "token", "new", "--name", "d", "--scopes", "dispute", "--spend-per-hour", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["token_sha256"] == hashlib.sha256(doc["token"].encode()).hexdigest()
    assert doc["scopes"] == ["dispute"] and doc["spend_per_hour"] == 0
    assert doc["config"].startswith("[[api.tokens]]\n") and doc["token_sha256"] in doc["config"]


@pytest.mark.parametrize(("args", "mentions"), [
    (["--name", "a b", "--scopes", "read"], "--name 'a b'"),
    (["--name", "a", "--scopes", "read,admin"], "unknown scope 'admin'"),
    (["--name", "a", "--scopes", ","], "at least one of read, submit, dispute"),
    (["--name", "a", "--scopes", "read,read"], "listed twice"),
    (["--name", "a", "--scopes", "read,submit"], "--spend-per-hour is required with the submit scope"),
    (["--name", "a", "--scopes", "dispute"], "required with the dispute scope"),
])
def test_token_new_refuses_bad_arguments_in_one_line(args: list[str], mentions: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["api", "token", "new", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and mentions in one_line(err)


@pytest.mark.parametrize("bad", ["-5", "５", "1_000", str(2**63)])
def test_token_new_refuses_a_spending_limit_that_is_not_an_ascii_integer_in_range(
        bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse names the option and the range
        main(["api", "token", "new", "--name", "a", "--scopes", "submit", "--spend-per-hour", bad])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert f"argument --spend-per-hour: {bad!r} is not an integer in [0, 2**63-1]" in err.strip().splitlines()[-1]


# ----------------------------------------------------------------- the CLI with tokens


@pytest.fixture
async def guarded(nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch):
    """A server guarded by two tokens made with the CLI and loaded from a config file: (url, reader, submitter)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    reader, reader_table = new_token(capsys, "--name", "reader", "--scopes", "read")
    submitter, submitter_table = new_token(capsys, "--name", "submitter", "--scopes", "read,submit",
                                           "--spend-per-hour", "1000")
    cfg = load_config(node_config(tmp_path, [reader_table, submitter_table]))
    port = await nursery.start(lambda task_status: serve_api(FakeNode(), "127.0.0.1", 0, tokens=cfg.api.tokens,
                                                             task_status=task_status))
    return f"http://127.0.0.1:{port}", reader, submitter


async def test_the_cli_without_a_token_is_told_how_to_give_one(guarded, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, _ = guarded
    code, out, err = await cli(capsys, "ledger", "head", "--api", url)
    assert code == 2
    line = one_line(err)
    assert "needs a bearer token" in line and "--token or P2PGPU_API_TOKEN" in line and "(missing_token)" in line


async def test_the_token_comes_from_the_flag_or_the_environment_and_the_flag_wins(
        guarded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, reader, _ = guarded
    code, out, err = await cli(capsys, "ledger", "head", "--api", url, "--token", reader, "--json")
    assert code == 0, err
    assert json.loads(out)["height"] == 7
    monkeypatch.setenv(TOKEN_ENV, reader + "\n")  # as $(cat file) or a paste may leave it
    code, out, err = await cli(capsys, "ledger", "head", "--api", url, "--json")
    assert code == 0, err
    code, out, err = await cli(capsys, "ledger", "head", "--api", url, "--token", "p2pgpu_wrong")
    assert code == 2 and "(invalid_token)" in one_line(err)
    monkeypatch.setenv(TOKEN_ENV, "p2pgpu_wrong")
    code, out, err = await cli(capsys, "ledger", "head", "--api", url, "--token", reader)
    assert code == 0, err
    assert reader not in out + err


async def test_a_read_token_cannot_submit_through_the_cli(guarded, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url, reader, submitter = guarded
    _, inputs = matmul_job()
    for name, arr in inputs.items():
        np.save(tmp_path / f"{name}.npy", arr)
    (tmp_path / "spec.json").write_text(json.dumps({"kernel": "matmul", "version": 1, "params": {}}))
    args = ["submit", "--api", url, "--spec", str(tmp_path / "spec.json"), "--input", f"a={tmp_path / 'a.npy'}",
            "--input", f"b={tmp_path / 'b.npy'}", "--max-price", "9", "--poll-interval", "0"]
    code, out, err = await cli(capsys, *args, "--token", reader, "--out", str(tmp_path / "r"))
    assert code == 2
    assert "needs the submit scope" in one_line(err) and "(insufficient_scope)" in err
    code, out, err = await cli(capsys, *args, "--token", submitter, "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert (tmp_path / "s" / "c.npy").exists()


def test_api_token_resolution() -> None:
    ns = argparse.Namespace
    assert api_token(ns(token="flag"), {TOKEN_ENV: "env"}) == "flag"
    assert api_token(ns(token=None), {TOKEN_ENV: "env"}) == "env"
    assert api_token(ns(token=None), {}) is None
    assert api_token(ns(token=None), {TOKEN_ENV: ""}) is None


@pytest.mark.parametrize("bad", ["   ", "p2pgpu_a b", "p2pgpu_a\x00b", "p2pgpu_é"])
def test_a_token_that_cannot_be_a_header_is_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ledger", "head", "--api", "http://127.0.0.1:1", "--token", bad])
    err = capsys.readouterr().err
    assert code == 2 and "paste it exactly as 'p2pgpu api token new' printed it" in one_line(err)


def test_a_token_sent_in_clear_off_this_machine_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    with _client(argparse.Namespace(api="http://192.0.2.7:8645", token="p2pgpu_x")):
        pass
    assert "sending the API token unencrypted to 192.0.2.7" in capsys.readouterr().err
    for quiet in ("http://127.0.0.1:8645", "https://192.0.2.7:8645"):
        with _client(argparse.Namespace(api=quiet, token="p2pgpu_x")):
            pass
    with _client(argparse.Namespace(api="http://192.0.2.7:8645", token=None)):
        pass
    assert capsys.readouterr().err == ""
