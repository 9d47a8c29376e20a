"""The perturbation matrix on real processes: no task lost, the books balance, no honest provider slashed.

Runs ``bench/chaos.py --quick`` in-process (:func:`bench.chaos.run_chaos`):
4 validators, 3 providers and 1 client under a steady task load while a
validator, a provider and the client are each killed with ``kill -9``,
paused and restarted, a follower falls 120 blocks behind, an unfunded
transaction flood and a peer holding idle streams run against the nodes.
Only outcomes are asserted; the timings are the bench's figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = pytest.mark.slow


def test_kills_pauses_restarts_and_attacks_lose_nothing_and_slash_no_honest_provider(tmp_path: Path) -> None:
    figures = run_chaos(tmp_path / "devnet", quick=True)
    print(json.dumps({k: v for k, v in figures.items() if k != "perturbations"}, default=str))  # the figures, for -s
    context = {k: figures.get(k) for k in ("load", "client_crash_tasks", "perturbations")}
    assert figures["tasks_lost"] == 0, context
    assert figures["supply_conserved"] is True, context
    assert figures["honest_slashed"] == 0, context
    crash = figures["client_crash_tasks"]
    assert crash["accepted"] > 0 and crash["forgotten"] == 0, crash  # every task back after kill -9
    assert figures["failover_s"] is not None and figures["follower_catchup_s"] is not None, context
    assert figures["load"]["delivered"] > 0, context
