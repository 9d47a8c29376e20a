#!/usr/bin/env bash
# The one command for a fresh machine: set up .venv (if needed), then start a local devnet
# (4 validators, 2 providers, 1 client on 127.0.0.1), run the demo workload, and keep a live
# status line until Ctrl-C. Extra arguments go to `p2pgpu devnet up`, e.g.
#   bash scripts/devnet.sh --detach            # leave it running; stop with .venv/bin/p2pgpu devnet down
#   bash scripts/devnet.sh --dir /tmp/net --validators 7 --providers 3
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-venv.sh
exec .venv/bin/p2pgpu devnet up --demo "$@"
