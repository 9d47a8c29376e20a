"""Importing the SDK (and what its model calls load later) pulls in neither TensorFlow nor the node's server.

A fresh interpreter, since this test process has likely imported TensorFlow already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
import p2pgpu.client
from p2pgpu.client import AsyncClient, Client
after_import = sorted(m for m in ("tensorflow", "keras", "fastapi", "hypercorn") if m in sys.modules)
import kernels.bundle, kernels.bymodel, ledger.modelnames  # what push_model / submit_model import when called
after_lazy = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
print(json.dumps([after_import, after_lazy]))
"""


def test_sdk_import_loads_no_tensorflow() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True)
    after_import, after_lazy = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_import == [] and after_lazy == []
