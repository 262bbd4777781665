#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
