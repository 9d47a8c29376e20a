#!/usr/bin/env bash
# Set up .venv (if needed), type-check, then run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` to skip the multi-process tests.
# A type error fails the run before any test starts (mypy's settings are in pyproject.toml, [tool.mypy]).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-venv.sh || exit $?
.venv/bin/python -m mypy p2pgpu ledger kernels devnet
status=$?
if [ "$status" -ne 0 ]; then
    echo "error: mypy found type errors (exit $status); fix them before the tests run" >&2
    exit "$status"
fi
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5); that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
