#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` to skip the multi-process tests.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-venv.sh || exit $?
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5); that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
