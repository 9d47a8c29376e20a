"""The ``p2pgpu.commands`` plugin seam: commands of packages above ``p2pgpu`` join the CLI without being named by it."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from p2pgpu import cli
from p2pgpu.cli import COMMAND_ENTRY_POINT_GROUP, checkout_entry_points, command_plugins, main

PLUGIN_MODULE = "fake_p2pgpu_plugin"


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module with a ``register`` adding ``p2pgpu hello`` (exit code 7)."""
    module = types.ModuleType(PLUGIN_MODULE)

    def register(subparsers: Any) -> None:
        hello = subparsers.add_parser("hello", help="a plugin's command")
        hello.set_defaults(run=lambda args: 7)

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    return module


def write_pyproject(path: Path, name: str, entries: dict[str, str]) -> Path:
    table = "".join(f'{key} = "{value}"\n' for key, value in entries.items())
    path.write_text(f'[project]\nname = "{name}"\n\n[project.entry-points."{COMMAND_ENTRY_POINT_GROUP}"]\n{table}')
    return path


def fake_installed(monkeypatch: pytest.MonkeyPatch, entries: dict[str, str]) -> None:
    """Make ``importlib.metadata`` report ``entries`` as the installed ``p2pgpu.commands`` group."""
    installed = [importlib.metadata.EntryPoint(n, v, COMMAND_ENTRY_POINT_GROUP) for n, v in entries.items()]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return installed if group == COMMAND_ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_an_installed_entry_point_adds_its_command(plugin_module: types.ModuleType, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"hello": f"{PLUGIN_MODULE}:register"})
    assert command_plugins(tmp_path / "absent.toml") == [plugin_module.register]
    assert main(["hello"]) == 7  # beside the checkout's own devnet command


def test_a_checkout_pyproject_adds_its_command_when_the_installed_metadata_is_stale(
        plugin_module: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {})
    pyproject = write_pyproject(tmp_path / "pyproject.toml", "p2pgpu", {"hello": f"{PLUGIN_MODULE}:register"})
    assert [ep.name for ep in checkout_entry_points(pyproject)] == ["hello"]
    assert command_plugins(pyproject) == [plugin_module.register]


def test_the_checkout_wins_over_installed_metadata_under_the_same_name(
        plugin_module: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"hello": "no_such_module_anywhere:register"})  # stale: would fail to load
    pyproject = write_pyproject(tmp_path / "pyproject.toml", "p2pgpu", {"hello": f"{PLUGIN_MODULE}:register"})
    assert command_plugins(pyproject) == [plugin_module.register]


def test_a_pyproject_of_another_project_or_none_at_all_adds_nothing(tmp_path: Path) -> None:
    other = write_pyproject(tmp_path / "pyproject.toml", "someone-else", {"hello": f"{PLUGIN_MODULE}:register"})
    assert checkout_entry_points(other) == []
    assert checkout_entry_points(tmp_path / "missing.toml") == []


def test_this_checkout_declares_the_devnet_command() -> None:
    names = {ep.name: ep.value for ep in checkout_entry_points()}
    assert names == {"devnet": "devnet.cli:register"}
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "devnet" in subparsers.choices
