#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), as one prepared command for the device machine:
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json (or ./gpu_check.json)
# Sets up the venv when the machine is bare (make setup), then runs the check within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    make setup >/dev/null
fi
export HOME="${HOME:-$(mktemp -d)}"
if [ ! -f "$HOME/.ray/auth_token" ] && .venv/bin/ray get-auth-token --help >/dev/null 2>&1; then
    .venv/bin/ray get-auth-token --generate >/dev/null 2>&1 || true
fi
timeout 480 .venv/bin/python benchmarks/gpu_check.py "$@"
