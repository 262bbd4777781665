#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs psi_cuda into it, editable, with the
# test and benchmark extras. Usage: source-free; prints nothing but pip's errors.
#   PSI_CUDA_VENV   where the venv lives (default: .venv in the repository)
#   PYTHON          the interpreter that creates it (default: python3)
#   TORCH_SPEC      the torch requirement (default: torch==2.13.0)
#   PSI_CUDA_BUILD_EMULATOR  1 (default here): also build the CUDA emulator (psi_cuda.emulated)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PSI_CUDA_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip_q=(-q --disable-pip-version-check)
# torch first, so the packages after it find it satisfied and pull no other build of it.
"$py" -m pip install "${pip_q[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install "${pip_q[@]}" numpy ninja setuptools wheel pytest hypothesis geoopt adamp matplotlib tqdm
# --no-build-isolation: the extension compiles against the torch installed above.
PSI_CUDA_BUILD_EMULATOR=${PSI_CUDA_BUILD_EMULATOR:-1} MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install "${pip_q[@]}" --no-build-isolation --no-deps -e "$root"
echo "$venv"
