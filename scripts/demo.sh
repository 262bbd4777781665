#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs the main job: `python -m psi_cuda demo`.
# Extra arguments go to the demo (see `python -m psi_cuda demo --help`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m psi_cuda demo "$@"
