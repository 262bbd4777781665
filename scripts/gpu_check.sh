#!/usr/bin/env bash
# GPU acceptance run: the one command to run on a machine with an NVIDIA GPU and nvcc.
#
#   bash scripts/gpu_check.sh             # everything, about 5-9 minutes on one H100/H200, 16 cores
#   bash scripts/gpu_check.sh --dry-run   # the plan only (also PSI_CUDA_GPU_CHECK_DRY=1)
#
# Steps (from the repository root; each with its own timeout, all within a total time budget):
#   setup              venv build/gpu-venv: pip install torch==2.13.0 (--isolated: the default index,
#                      a CUDA build), else this machine's pip configuration; without either (no
#                      network) the CUDA torch of a system python, through --system-site-packages
#                      (said in the summary). Then numpy ninja setuptools wheel pytest, and geoopt
#                      adamp tqdm matplotlib where they install (tests/test_optim.py needs geoopt).
#                      Fails unless torch is a CUDA build and sees a GPU.
#   build              copy of the sources in build/gpu-check/src, PSI_CUDA_BUILD_CUDA=1, CUDA_HOME
#                      = the folder with bin/nvcc and include/cuda_runtime.h (nvcc may be a wrapper
#                      script or a link), TORCH_CUDA_ARCH_LIST unset (setup.py: the visible GPU);
#                      then import check from outside the repository and one op on the GPU.
#   tests-cuda-files   pytest tests/test_*cuda*.py tests/test_capturable.py (a copy of tests/, so
#                      that `import psi_cuda` is the CUDA build): junit xml; any skip fails it.
#   tests-cuda-cases   the CUDA cases of every other test file: the collected ids whose name
#                      (after "::", "psi_cuda" removed) contains "cuda", i.e. the
#                      device="cuda" parametrizations of conftest.DEVICES (like `pytest -k cuda`,
#                      which would also match a folder named *cuda*, e.g. a psi_cuda checkout).
#                      Not test_emulated_*.py (the CPU emulator, not built here). A file that
#                      fails to import is listed and fails the step; the others still run.
#   ctest-build        CMake build with -DPSI_CUDA_WITH_CUDA=ON (build/gpu-check/cmake), started in
#                      the background right after `build`, TORCH_CUDA_ARCH_LIST = the visible GPU.
#   ctest              ctest (all C++ tests); psi_op_cuda and bnp_op_cuda must pass, not skip.
#   sanitize-plain     python scripts/gpu_sanitize_run.py: every op, fused vs reference, on CUDA.
#   sanitize-memcheck  the same under compute-sanitizer --tool memcheck (caching allocator off, so
#                      every tensor is its own allocation); then racecheck, and synccheck last.
#   bench              psi-cuda bench --device cuda --quick (step_cuda_quick.json), and
#                      benchmarks/bench_kernel_paths.py (kernel_paths_cuda.json).
#   train-large        torchrun --standalone --nproc-per-node 1 examples/train_large.py --steps 50
#                      (nccl; the loss must fall).
#
# Output: benchmarks/results/gpu/ (replaced by each run): NN-<step>.log for every step, junit-*.xml,
# cuda-cases.txt, ctest-junit.xml, step_cuda_quick.json, summary.txt and summary.json (rewritten
# after every step, so a run killed from outside still leaves one), and the summary on screen.
#
# Policy: setup or build failing stops the run (nothing after them can run). After the build every
# step runs whatever happened before, since each checks something of its own; but when a step
# fails and a one-line CUDA job then fails too (the GPU is unusable), the run stops. Steps whose
# tool is missing (compute-sanitizer, cmake) are SKIP, not FAIL. When the time budget is spent the
# remaining steps are SKIP. Exit status: 0 when nothing failed (skips are listed in the summary),
# 1 when a step failed or timed out, 130 when interrupted, 2 for bad arguments.
#
# Environment:
#   PSI_CUDA_GPU_VENV          the venv (default build/gpu-venv); reused when it has a CUDA torch
#   PSI_CUDA_GPU_CHECK_OUT     results folder (default benchmarks/results/gpu)
#   PSI_CUDA_GPU_CHECK_WORK    scratch folder (default build/gpu-check)
#   PSI_CUDA_GPU_CHECK_BUDGET  total seconds (default 570; 0 = no limit)
#   PSI_CUDA_GPU_CHECK_SKIP    steps to skip, e.g. "bench train-large" (build: reuse the installed
#                              build in the venv; setup cannot be skipped)
#   PSI_CUDA_GPU_CHECK_DRY=1   same as --dry-run
#   TORCH_SPEC (torch==2.13.0), PYTHON (python3), CUDA_HOME, MAX_JOBS (nproc),
#   TORCH_CUDA_ARCH_LIST (respected when set)
[ -n "${BASH_VERSION:-}" ] || { echo "gpu_check.sh: run it with bash" >&2; exit 2; }
set -u
set -o pipefail

usage() { sed -n '2,/^[^#]/{ /^#/ s/^# \{0,1\}//p; }' "$0"; }

dry=${PSI_CUDA_GPU_CHECK_DRY:-0}
for arg in "$@"; do
  case $arg in
    -n|--dry-run) dry=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
out=${PSI_CUDA_GPU_CHECK_OUT:-$root/benchmarks/results/gpu}
work=${PSI_CUDA_GPU_CHECK_WORK:-$root/build/gpu-check}
venv=${PSI_CUDA_GPU_VENV:-$root/build/gpu-venv}
py=$venv/bin/python
sys_py=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
jobs=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
budget=${PSI_CUDA_GPU_CHECK_BUDGET:-570}
skip_list=" $(echo "${PSI_CUDA_GPU_CHECK_SKIP:-}" | tr ',' ' ') "
notes_dir=$work/notes
SKIP_RC=3        # a step function exits with this when its tool is missing: SKIP, not FAIL
SANITIZER_RC=86  # compute-sanitizer's exit status when it reported errors

STEPS=(setup build tests-cuda-files tests-cuda-cases ctest-build ctest sanitize-plain
       sanitize-memcheck sanitize-racecheck bench train-large sanitize-synccheck)
declare -A LIMIT=([setup]=420 [build]=480 [tests-cuda-files]=300 [tests-cuda-cases]=360
  [ctest-build]=480 [ctest]=180 [sanitize-plain]=120 [sanitize-memcheck]=240
  [sanitize-racecheck]=300 [bench]=330 [train-large]=180 [sanitize-synccheck]=180)
for s in $skip_list; do
  if [ -z "${LIMIT[$s]:-}" ] || [ "$s" = setup ]; then
    echo "gpu_check.sh: PSI_CUDA_GPU_CHECK_SKIP: unknown step '$s' (or setup)" >&2
    exit 2
  fi
done

# --- detection (cheap; also in the dry run) ------------------------------------------------------

# The CUDA toolkit: the folder holding bin/nvcc and include/cuda_runtime.h. nvcc on the PATH may be
# a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) or a link, so candidates are checked,
# nvcc's own idea of where it lives (`--dryrun` prints _HERE_=<its bin folder>) first.
find_cuda_home() {
  local nvcc cand here tmp
  nvcc=$(command -v nvcc 2>/dev/null || true)
  local -a cands=("${CUDA_HOME:-}" "${CUDA_PATH:-}")
  if [ -n "$nvcc" ]; then
    tmp=$(mktemp -d 2>/dev/null || echo /tmp)
    : > "$tmp/probe.cu"
    here=$(cd "$tmp" && timeout 30 "$nvcc" --dryrun -c probe.cu -o probe.o 2>&1 \
             | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    [ "$tmp" != /tmp ] && rm -rf "$tmp"
    [ -n "$here" ] && cands+=("$(dirname "$here")")
    cands+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
  fi
  cands+=(/usr/local/cuda /usr/local/cuda-* /opt/cuda /usr/lib/cuda /usr)
  for cand in "${cands[@]}"; do
    if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
      readlink -f "$cand"
      return 0
    fi
  done
  return 1
}

find_sanitizer() {
  local cand
  for cand in "$cuda_home/bin/compute-sanitizer" "$cuda_home/compute-sanitizer/compute-sanitizer" \
              "$(command -v compute-sanitizer 2>/dev/null || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}

cuda_home=$(find_cuda_home || true)
sanitizer=""
[ -n "$cuda_home" ] && sanitizer=$(find_sanitizer || true)
nvcc_version=""
[ -n "$cuda_home" ] && nvcc_version=$("$cuda_home/bin/nvcc" --version 2>/dev/null \
  | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
gpu_smi=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  2>/dev/null | head -n 1 || true)
git_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$git_rev" != unknown ] && [ -n "$(git -C "$root" status --porcelain 2>/dev/null | head -n 1)" ]; then
  git_rev="$git_rev+dirty"
fi

rel() { case $1 in "$root"/*) echo "${1#"$root"/}" ;; *) echo "$1" ;; esac; }

# --- dry run -------------------------------------------------------------------------------------

if [ "$dry" = 1 ]; then
  cat <<EOF
psi_cuda GPU acceptance run: PLAN ONLY (dry run; nothing is run or written)
  repository   $root (commit $git_rev)
  GPU          ${gpu_smi:-none found by nvidia-smi}
  CUDA_HOME    ${cuda_home:-NOT FOUND (the build step would fail)}${nvcc_version:+ (nvcc $nvcc_version)}
  sanitizer    ${sanitizer:-not found: the sanitize-memcheck/racecheck/synccheck steps would be SKIP}
  python       $(command -v "$sys_py" || echo "$sys_py: NOT FOUND") ; venv $(rel "$venv") ($( [ -x "$py" ] && echo exists || echo new))
  results      $(rel "$out") ; scratch $(rel "$work") ; MAX_JOBS $jobs ; budget ${budget}s
  skipped      ${PSI_CUDA_GPU_CHECK_SKIP:-none}
Steps (timeout in seconds, each capped by what is left of the budget):
EOF
  plan() { printf '  %-19s %4ss  %s\n' "$1" "${LIMIT[$1]}" "$2"; }
  plan setup "$sys_py -m venv $(rel "$venv"); pip install --isolated $torch_spec (else pip config, else system torch); numpy ninja setuptools wheel pytest [geoopt adamp tqdm matplotlib]; torch.cuda.is_available()"
  plan build "cp sources -> $(rel "$work")/src; CUDA_HOME=${cuda_home:-?} PSI_CUDA_BUILD_CUDA=1 MAX_JOBS=$jobs pip install --no-build-isolation --no-deps .; import + one op on cuda"
  plan tests-cuda-files "cd $(rel "$work")/tests; pytest $(cd "$root/tests" && echo test_*cuda*.py test_capturable.py) --junitxml=$(rel "$out")/junit-cuda-files.xml (skips fail)"
  plan tests-cuda-cases "pytest --collect-only over the other test files; ids with 'cuda' after '::' -> $(rel "$out")/cuda-cases.txt; pytest those --junitxml=junit-cuda-cases.xml"
  plan ctest-build "(background after build) cmake -DPSI_CUDA_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER=${cuda_home:-?}/bin/nvcc, TORCH_CUDA_ARCH_LIST=<visible GPU>; cmake --build -j $jobs"
  plan ctest "ctest --output-on-failure; psi_op_cuda and bnp_op_cuda must pass"
  plan sanitize-plain "python scripts/gpu_sanitize_run.py ($("$sys_py" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$root/scripts/gpu_sanitize_run.py" 2>/dev/null && echo parses || echo "DOES NOT PARSE"))"
  plan sanitize-memcheck "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode $SANITIZER_RC python scripts/gpu_sanitize_run.py"
  plan sanitize-racecheck "compute-sanitizer --tool racecheck --error-exitcode $SANITIZER_RC python scripts/gpu_sanitize_run.py"
  plan bench "python -m psi_cuda bench --device cuda --quick --out $(rel "$out") --name step_cuda_quick; python benchmarks/bench_kernel_paths.py --device cuda"
  plan train-large "python -m torch.distributed.run --standalone --nproc-per-node 1 examples/train_large.py --steps 50 --log-every 10"
  plan sanitize-synccheck "compute-sanitizer --tool synccheck --error-exitcode $SANITIZER_RC python scripts/gpu_sanitize_run.py"
  echo "Policy: setup/build failing stops the run; later failures are recorded and the rest continue (stop if the GPU is then unusable)."
  exit 0
fi

# --- step functions (each runs in its own bash under `timeout`, output to its log) ---------------

note() {  # a line for the summary (and the log); empty notes are dropped
  [ -n "$*" ] || return 0
  printf '%s\n' "$*" >> "$notes_dir/${STEP:?}"
  printf 'NOTE: %s\n' "$*"
}

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; }

torch_desc() { "$1" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")' 2>/dev/null; }

make_venv() {  # make_venv PYTHON [--system-site-packages]: a fresh venv (without pip if need be)
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "FAILED: $venv exists and is not a venv: not deleting it"
    return 1
  fi
  rm -rf "$venv"
  "$1" -m venv "${@:2}" "$venv" && return 0
  # No ensurepip (e.g. Debian without python3-venv): a venv without pip, which uses the system
  # pip (and packages) through the system site-packages.
  rm -rf "$venv"
  "$1" -m venv --without-pip --system-site-packages "$venv"
}

step_setup() {
  echo "venv $venv, torch requirement $torch_spec"
  local fresh=0  # 1: torch came from pip in this run (so another CUDA build of it may be tried)
  if [ -x "$py" ] && has_cuda_torch "$py"; then
    note "reused venv: $(torch_desc "$py")"
  else
    make_venv "$sys_py" || { echo "FAILED: cannot create a venv with $sys_py"; return 1; }
    local pip_fast=(--disable-pip-version-check --timeout 30 --retries 1)
    # --isolated: no local configuration (e.g. a find-links folder of CPU wheels); the default
    # index has the CUDA build.
    if "$py" -m pip install "${pip_fast[@]}" --isolated "$torch_spec" && has_cuda_torch "$py"; then
      note "$(torch_desc "$py") from the default index"
      fresh=1
    elif "$py" -m pip install "${pip_fast[@]}" "$torch_spec" && has_cuda_torch "$py"; then
      note "$(torch_desc "$py") from this machine's pip configuration"
      fresh=1
    else
      echo "no CUDA build of $torch_spec from pip (no network?); looking for a system torch"
      local cand found=""
      for cand in "${PYTHON:-}" python3 python /usr/bin/python3 /usr/local/bin/python3 \
                  /opt/conda/bin/python; do
        if [ -z "$cand" ] || ! command -v "$cand" > /dev/null 2>&1; then continue; fi
        if has_cuda_torch "$cand"; then found=$(command -v "$cand"); break; fi
      done
      if [ -z "$found" ]; then
        echo "FAILED: pip could not install a CUDA build of $torch_spec, and no system python"
        echo "        (PYTHON, python3, python, /opt/conda/bin/python) has a CUDA torch"
        return 1
      fi
      make_venv "$found" --system-site-packages \
        || { echo "FAILED: cannot create a venv with $found"; return 1; }
      note "NO NETWORK/PIP: using the system $(torch_desc "$py") of $found (--system-site-packages), not $torch_spec"
    fi
  fi
  # torch.utils.cpp_extension refuses an nvcc of another major CUDA version than torch's: try the
  # PyTorch index of nvcc's version (cuXYZ) when the default index gave another one.
  local torch_cuda nvcc_tag
  torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda)' 2>/dev/null)
  if [ -n "$nvcc_version" ] && [ "${torch_cuda%%.*}" != "${nvcc_version%%.*}" ]; then
    nvcc_tag=cu$(echo "$nvcc_version" | tr -d .)
    echo "torch has CUDA $torch_cuda, nvcc is $nvcc_version: trying the $nvcc_tag build of torch"
    if [ "$fresh" = 1 ] \
       && "$py" -m pip install --disable-pip-version-check --timeout 30 --retries 1 --isolated \
            --force-reinstall --index-url "https://download.pytorch.org/whl/$nvcc_tag" \
            "$torch_spec" && has_cuda_torch "$py"; then
      note "$(torch_desc "$py") from download.pytorch.org/whl/$nvcc_tag, to match nvcc $nvcc_version"
    else
      note "WARNING: torch has CUDA $torch_cuda but nvcc is $nvcc_version (major versions differ: the build will likely fail)"
    fi
  fi
  # The rest: what is importable already stays; the others are installed where possible.
  local missing=() mod
  for mod in numpy ninja setuptools wheel pytest geoopt adamp tqdm matplotlib; do
    "$py" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    "$py" -m pip install --disable-pip-version-check --timeout 30 --retries 1 "${missing[@]}" \
      || "$py" -m pip install --disable-pip-version-check --timeout 30 --retries 1 \
           numpy ninja setuptools wheel pytest \
      || echo "pip could not install them all"
  fi
  local absent=()
  for mod in "${missing[@]}"; do "$py" -c "import $mod" 2>/dev/null || absent+=("$mod"); done
  [ ${#absent[@]} -eq 0 ] || note "not installed: ${absent[*]}"
  "$py" -c 'import setuptools' 2>/dev/null || { echo "FAILED: no setuptools: cannot build"; return 1; }
  "$py" - <<'PY' || return 1
import sys, torch
print("python", sys.version.split()[0], "|", "torch", torch.__version__, "| CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("FAILED: torch sees no GPU (torch.cuda.is_available() is False)")
p = torch.cuda.get_device_properties(0)
print(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, "
      f"{p.total_memory / 2**30:.0f} GiB; {torch.cuda.device_count()} GPU(s) visible")
PY
}

copy_sources() {  # the files the pip and CMake builds need, without build products
  rm -rf "$work/src" && mkdir -p "$work/src" || return 1
  (cd "$root" && cp -r setup.py pyproject.toml README.md CMakeLists.txt cmake csrc psi_cuda tests \
     "$work/src/") || return 1
  find "$work/src" \( -name __pycache__ -o -name '*.so' -o -name '*.egg-info' \) -prune \
    -exec rm -rf {} +
}

step_build() {
  if [ -z "$cuda_home" ]; then
    echo "FAILED: no CUDA toolkit: no folder with bin/nvcc and include/cuda_runtime.h"
    echo "        (tried CUDA_HOME, CUDA_PATH, nvcc on the PATH, /usr/local/cuda*, /opt/cuda)"
    return 1
  fi
  echo "CUDA_HOME=$cuda_home (nvcc $nvcc_version); TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset: the visible GPU>}; MAX_JOBS=$jobs"
  copy_sources || return 1
  (cd "$work/src" && CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$venv/bin:$PATH" \
     PSI_CUDA_BUILD_CUDA=1 MAX_JOBS=$jobs \
     "$py" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps \
       --no-index .) || { echo "FAILED: the CUDA build"; return 1; }
  verify_install
}

verify_install() {  # from outside the repository, so that `import psi_cuda` is the installed one
  (cd "$work" && "$py" - "$root" <<'PY')
import os, sys, torch
import psi_cuda
from psi_cuda import ops
root = os.path.realpath(sys.argv[1])
where = os.path.realpath(psi_cuda.__file__)
print("psi_cuda", psi_cuda.__version__, "from", where)
if where.startswith(root + os.sep) and "/build/" not in where[len(root):]:
    sys.exit("FAILED: imported the source tree's psi_cuda, not the installed build")
missing = [op for op in ("psi_sgd_", "psi_adam_", "bnp_update_stats_", "bnp_precondition_", "bnp_sgd_")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"psi_cuda::{op}", "CUDA")]
if missing:
    sys.exit(f"FAILED: no CUDA kernel for {missing}")
p = torch.ones(4, 3, device="cuda")
ops.psi_sgd_([p], [torch.full_like(p, 0.1)], [], [torch.zeros((), device="cuda")], lr=0.1)
torch.cuda.synchronize()  # "no kernel image" for this GPU would show here
print("CUDA kernels registered and run on", torch.cuda.get_device_name(0))
PY
}

prepare_tests() {  # a copy of tests/ with the pytest configuration, rootdir = the copy
  rm -rf "$work/tests" && cp -r "$root/tests" "$work/tests" && cp "$root/pyproject.toml" "$work/tests/"
}

junit_check() {  # junit_check XML: prints the counts; fails on failures, errors, skips, or no tests
  "$py" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"junit: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
for case in root.iter("testcase"):
    for kind in ("skipped", "failure", "error"):
        el = case.find(kind)
        if el is not None:
            message = (el.get("message") or "").strip().splitlines()
            print(f"  {kind}: {case.get('classname')}::{case.get('name')}: "
                  f"{message[0][:150] if message else ''}")
sys.exit(1 if n["tests"] == 0 or n["failures"] or n["errors"] or n["skipped"] else 0)
PY
}

run_pytest() {  # run_pytest JUNIT_NAME ARGS...: pytest in the tests copy, then the junit check
  local junit=$out/$1; shift
  (cd "$work/tests" && "$py" -m pytest -p no:cacheprovider -q -rfEs --junitxml="$junit" "$@")
  local rc=$?
  [ -f "$junit" ] || { echo "FAILED: pytest wrote no junit xml (exit $rc)"; return 1; }
  local counts jrc
  counts=$(junit_check "$junit")
  jrc=$?
  echo "$counts"
  note "$(echo "$counts" | head -n 1 | sed 's/^junit: //')"
  if [ $jrc -ne 0 ]; then
    echo "FAILED: failures, errors, or skipped CUDA cases (a skip here: the GPU was not used)"
    return 1
  fi
  return $rc
}

step_tests_cuda_files() {
  "$py" -c 'import pytest' 2>/dev/null || { note "skipped: pytest not installed"; return $SKIP_RC; }
  prepare_tests || return 1
  local files=() f
  for f in "$work"/tests/test_*cuda*.py "$work"/tests/test_capturable.py; do
    [ -f "$f" ] && files+=("$(basename "$f")")
  done
  [ ${#files[@]} -gt 0 ] || { echo "FAILED: no tests/test_*cuda*.py nor tests/test_capturable.py"; return 1; }
  echo "files: ${files[*]}"
  run_pytest junit-cuda-files.xml "${files[@]}"
}

step_tests_cuda_cases() {
  "$py" -c 'import pytest' 2>/dev/null || { note "skipped: pytest not installed"; return $SKIP_RC; }
  prepare_tests || return 1
  local files=() f
  for f in "$work"/tests/test_*.py; do
    f=$(basename "$f")
    case $f in
      test_*cuda*.py|test_capturable.py) continue ;;  # the step before
      test_emulated_*.py) continue ;;  # the CPU emulator of the CUDA kernels: not built here
    esac
    files+=("$f")
  done
  if ! "$py" -c 'import geoopt, adamp' 2>/dev/null; then  # test_optim.py imports geoopt, others it
    local without=()
    for f in "${files[@]}"; do
      grep -q -E '^(import|from) (geoopt|adamp|test_optim)' "$work/tests/$f" || without+=("$f")
    done
    note "geoopt/adamp missing: not collected: $(comm -23 <(printf '%s\n' "${files[@]}" | sort) <(printf '%s\n' "${without[@]}" | sort) | tr '\n' ' ')"
    files=("${without[@]}")
  fi
  echo "collecting: ${files[*]}"
  # A file that does not import is reported, and the step fails after running the rest.
  (cd "$work/tests" && "$py" -m pytest -p no:cacheprovider --collect-only -q \
     --continue-on-collection-errors "${files[@]}") > "$work/collect.txt" 2>&1
  local broken
  broken=$(sed -n 's/^ERROR \(test_[^ ]*\.py\).*/\1/p' "$work/collect.txt" | sort -u | tr '\n' ' ')
  if [ -n "$broken" ]; then
    grep -v '::' "$work/collect.txt"
    note "collection errors in: $broken"
  fi
  "$py" - "$work/collect.txt" "$out/cuda-cases.txt" <<'PY' || return 1
import sys
ids = [line.strip() for line in open(sys.argv[1]) if "::" in line]
cuda = [i for i in ids if "cuda" in i.split("::", 1)[1].lower().replace("psi_cuda", "")]
open(sys.argv[2], "w").write("".join(i + "\n" for i in cuda))
print(f"{len(cuda)} CUDA cases of {len(ids)} collected")
sys.exit(0 if cuda else "FAILED: no CUDA cases collected")
PY
  local ids
  mapfile -t ids < "$out/cuda-cases.txt"
  run_pytest junit-cuda-cases.xml "${ids[@]}" || return 1
  [ -z "$broken" ] || { echo "FAILED: collection errors in $broken"; return 1; }
}

step_ctest_build() {
  local cmake_bin ver
  cmake_bin=$(PATH="$venv/bin:$PATH" command -v cmake || true)
  ver=$([ -n "$cmake_bin" ] && "$cmake_bin" --version | sed -n 's/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
  if [ -z "$cmake_bin" ] || ! printf '3.18\n%s\n' "$ver" | sort -C -V; then
    echo "cmake ${ver:-not found} (3.18 needed): pip install cmake"
    "$py" -m pip install -q --disable-pip-version-check --timeout 30 --retries 1 cmake \
      && cmake_bin=$venv/bin/cmake
    [ -x "$cmake_bin" ] || { note "skipped: cmake >= 3.18 not found and not installable"; return $SKIP_RC; }
  fi
  [ -f "$work/src/CMakeLists.txt" ] || copy_sources || return 1
  local prefix arch gen=()
  prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)') || return 1
  arch=${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  PATH="$venv/bin:$PATH" command -v ninja > /dev/null && gen=(-G Ninja)
  echo "$("$cmake_bin" --version | head -n 1); TORCH_CUDA_ARCH_LIST=$arch; CUDA_HOME=$cuda_home"
  rm -rf "$work/cmake"
  CUDA_HOME="$cuda_home" CUDACXX="$cuda_home/bin/nvcc" PATH="$cuda_home/bin:$venv/bin:$PATH" \
    TORCH_CUDA_ARCH_LIST="$arch" \
    "$cmake_bin" -S "$work/src" -B "$work/cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix" -DPSI_CUDA_WITH_CUDA=ON \
      -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc" || { echo "FAILED: cmake configure"; return 1; }
  PATH="$cuda_home/bin:$venv/bin:$PATH" "$cmake_bin" --build "$work/cmake" -j "$jobs" \
    || { echo "FAILED: cmake build"; return 1; }
  echo "$cmake_bin" > "$work/cmake/.cmake_bin"
}

step_ctest() {
  [ -f "$work/cmake/.cmake_bin" ] || { echo "FAILED: no CMake build (see the ctest-build log)"; return 1; }
  local ctest_bin junit=()
  ctest_bin=$(dirname "$(cat "$work/cmake/.cmake_bin")")/ctest
  [ -x "$ctest_bin" ] || ctest_bin=ctest
  "$ctest_bin" --help 2>/dev/null | grep -q -- --output-junit && junit=(--output-junit "$out/ctest-junit.xml")
  (cd "$work/cmake" && "$ctest_bin" --output-on-failure --timeout 300 "${junit[@]}") \
    | tee "$work/ctest.out"
  local rc=${PIPESTATUS[0]} t ok=0
  for t in psi_op_cuda bnp_op_cuda; do
    if grep -E "Test +#[0-9]+: $t .*Passed" "$work/ctest.out" > /dev/null; then
      echo "$t: passed on the GPU"
    else
      echo "FAILED: $t did not pass (skipped = no GPU seen, or missing = built without CUDA)"
      ok=1
    fi
  done
  note "$(grep -E 'tests passed|tests failed' "$work/ctest.out" | tail -n 1)"
  [ "$rc" -eq 0 ] && [ $ok -eq 0 ]
}

step_sanitize_plain() {
  (cd "$work" && "$py" "$root/scripts/gpu_sanitize_run.py")
  local rc=$?
  note "$(grep -E 'cases match the reference' "$STEP_LOG" | tail -n 1)"
  return $rc
}

sanitize() {  # sanitize TOOL
  local tool=$1
  [ -n "$sanitizer" ] || { note "skipped: compute-sanitizer not found"; return $SKIP_RC; }
  local opts=(--tool "$tool" --error-exitcode "$SANITIZER_RC") help envs=()
  help=$("$sanitizer" --help 2>&1)
  grep -q -- --print-limit <<< "$help" && opts+=(--print-limit 50)
  # Only the kernels' own errors count: torch may call CUDA APIs that return an error on
  # purpose (probing); an error of a psi_cuda launch raises in Python and fails the script anyway.
  grep -q -- --report-api-errors <<< "$help" && opts+=(--report-api-errors no)
  # memcheck: every tensor its own cudaMalloc, so an access past a small tensor is out of bounds
  # instead of landing in the caching allocator's block.
  [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "$sanitizer ${opts[*]}"
  (cd "$work" && env "${envs[@]}" "$sanitizer" "${opts[@]}" "$py" "$root/scripts/gpu_sanitize_run.py")
  local rc=$? summary
  summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$STEP_LOG" | tail -n 1 | sed 's/^=* *//')
  grep -q -E '^=+ (COMPUTE-SANITIZER|.*SUMMARY)' "$STEP_LOG" \
    || { echo "FAILED: no compute-sanitizer output: it did not run"; return 1; }
  case $rc in
    0) note "${summary:-no summary line} | $(grep -E 'cases match' "$STEP_LOG" | tail -n 1)" ;;
    "$SANITIZER_RC") note "ERRORS: $summary"; echo "FAILED: compute-sanitizer $tool reported errors" ;;
    *) note "exit $rc: $summary | $(grep -E 'cases match' "$STEP_LOG" | tail -n 1)" ;;
  esac
  return $rc
}
step_sanitize_memcheck() { sanitize memcheck; }
step_sanitize_racecheck() { sanitize racecheck; }
step_sanitize_synccheck() { sanitize synccheck; }

step_bench() {
  # psi_cuda/apps/bench.py has --device and --quick (resnet50 + vit_b16, 5 steps, no large list).
  local plot=()
  "$py" -c 'import matplotlib' 2>/dev/null || plot=(--no-plot)
  (cd "$work" && "$py" -m psi_cuda bench --device cuda --quick --out "$out" --name step_cuda_quick \
     "${plot[@]}") || return 1
  [ -s "$out/step_cuda_quick.json" ] || { echo "FAILED: no $out/step_cuda_quick.json"; return 1; }
  # Each kernel path (rows in registers, read twice, chunked, tiny rows, Euclidean) next to
  # torch's fused SGD/AdamW on the same sizes.
  (cd "$work" && "$py" "$root/benchmarks/bench_kernel_paths.py" --device cuda --out "$out" \
     --name kernel_paths_cuda) || return 1
  [ -s "$out/kernel_paths_cuda.json" ] || { echo "FAILED: no $out/kernel_paths_cuda.json"; return 1; }
  note "$(rel "$out")/step_cuda_quick.json ($(grep -m1 'copy bandwidth' "$STEP_LOG" | cut -d'(' -f1)), kernel_paths_cuda.json"
}

step_train_large() {
  (cd "$work" && "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
     "$root/examples/train_large.py" --steps 50 --log-every 10) || return 1
  grep -q -E 'rank\(s\) on cuda \(nccl\)' "$STEP_LOG" \
    || { echo "FAILED: did not run on cuda with nccl"; return 1; }
  local first last
  first=$(sed -n 's/^step *[0-9]*  loss \([0-9.]*\).*/\1/p' "$STEP_LOG" | head -n 1)
  last=$(sed -n 's/^step *50  loss \([0-9.]*\).*/\1/p' "$STEP_LOG" | tail -n 1)
  if [ -z "$first" ] || [ -z "$last" ]; then echo "FAILED: no loss at steps 10 and 50"; return 1; fi
  note "nccl, loss $first (step 10) -> $last (step 50), $(sed -n 's/^step *50 .*  \([0-9,]* tokens\/s\).*/\1/p' "$STEP_LOG" | tail -n 1)"
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' \
    || { echo "FAILED: the loss did not fall"; return 1; }
}

# --- the runner ----------------------------------------------------------------------------------

export root out work venv py sys_py torch_spec jobs notes_dir SKIP_RC SANITIZER_RC cuda_home \
  sanitizer nvcc_version
export -f note has_cuda_torch torch_desc make_venv step_setup copy_sources step_build verify_install \
  prepare_tests junit_check run_pytest step_tests_cuda_files step_tests_cuda_cases \
  step_ctest_build step_ctest step_sanitize_plain sanitize step_sanitize_memcheck \
  step_sanitize_racecheck step_sanitize_synccheck step_bench step_train_large rel

# Each run replaces the results of the last one (only the files this script writes).
mkdir -p "$out" "$work" || exit 1
(cd "$out" && rm -f -- [0-9][0-9]-*.log junit-*.xml cuda-cases.txt ctest-junit.xml \
   step_cuda_quick.json step_cuda_quick.png summary.txt summary.json)
rm -rf "$notes_dir" && mkdir -p "$notes_dir" || exit 1
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
declare -A STATUS=() SECS=() LOG=()
order=()
stop_reason=""
current_pid=""
bg_pid=""
n=0

torch_line=""
write_summary() {
  local tsv=$work/steps.tsv s note
  : > "$tsv"
  for s in "${order[@]}"; do
    note=""
    [ -f "$notes_dir/$s" ] && note=$(tr '\n\t' '  ' < "$notes_dir/$s" | sed 's/ *$//')
    printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${LOG[$s]}" "$note" >> "$tsv"
  done
  S_STARTED=$started S_COMMIT=$git_rev S_GPU=$gpu_smi S_CUDA_HOME=$cuda_home S_NVCC=$nvcc_version \
  S_SANITIZER=$sanitizer S_TORCH=$torch_line S_VENV=$venv S_JOBS=$jobs S_BUDGET=$budget \
  S_STOP=$stop_reason S_NSTEPS=${#STEPS[@]} S_WALL=$SECONDS "$sys_py" - "$tsv" "$out" <<'PY'
import json, os, sys
E = os.environ
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [dict(step=r[0], status=r[1], seconds=float(r[2]), log=r[3], note=r[4]) for r in rows]
bad = [s["step"] for s in steps if s["status"] in ("FAIL", "TIMEOUT", "INTERRUPTED")]
skipped = [s["step"] for s in steps if s["status"] == "SKIP"]
running = not E["S_STOP"] and len(steps) < int(E["S_NSTEPS"])
overall = ("FAILING" if bad else "RUNNING") if running else ("FAIL" if bad else "PASS")
env = dict(started=E["S_STARTED"], commit=E["S_COMMIT"], gpu=E["S_GPU"],
           cuda_home=E["S_CUDA_HOME"], nvcc=E["S_NVCC"], compute_sanitizer=E["S_SANITIZER"],
           torch=E["S_TORCH"], venv=E["S_VENV"], max_jobs=E["S_JOBS"],
           budget_s=int(E["S_BUDGET"]))
summary = dict(overall=overall, failed=bad, skipped=skipped, stop_reason=E["S_STOP"] or None,
               wall_seconds=int(E["S_WALL"]), environment=env,
               steps=steps)
with open(os.path.join(sys.argv[2], "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
    f.write("\n")
lines = [f"psi_cuda GPU acceptance run, {env['started']}, commit {env['commit']}",
         f"GPU: {env['gpu'] or '?'} | {env['torch'] or 'torch ?'} | nvcc {env['nvcc'] or '?'}"
         f" | CUDA_HOME {env['cuda_home'] or '?'}",
         f"{'step':<19} {'status':<11} {'seconds':>7}  log / note"]
for s in steps:
    lines.append(f"{s['step']:<19} {s['status']:<11} {s['seconds']:>7.0f}  {s['log']}")
    if s["note"]:
        lines.append(f"{'':<40}  {s['note'][:110]}")
tail = f"overall: {overall} in {summary['wall_seconds']} s"
if bad:
    tail += f"; failed: {', '.join(bad)}"
if skipped:
    tail += f"; skipped: {', '.join(skipped)}"
if summary["stop_reason"]:
    tail += f"\nstopped early: {summary['stop_reason']}"
lines.append(tail)
with open(os.path.join(sys.argv[2], "summary.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
PY
}

record() {  # record STEP STATUS SECONDS LOG
  order+=("$1")
  STATUS[$1]=$2
  SECS[$1]=$3
  LOG[$1]=$4
  write_summary
}

on_signal() {
  echo
  echo "interrupted: stopping the current step"
  [ -n "$current_pid" ] && kill -TERM "$current_pid" 2>/dev/null
  [ -n "$bg_pid" ] && kill -TERM "$bg_pid" 2>/dev/null
  wait 2>/dev/null
  stop_reason="interrupted"
  [ -n "${cur_step:-}" ] && record "$cur_step" INTERRUPTED "$((SECONDS - cur_start))" "$(rel "$cur_log")"
  write_summary
  cat "$out/summary.txt"
  exit 130
}
trap on_signal INT TERM
cleanup() { [ -n "$bg_pid" ] && kill -TERM "$bg_pid" 2>/dev/null; }
trap cleanup EXIT

step_limit() {  # the step's timeout, capped by the budget; empty when the budget is spent
  local limit=${LIMIT[$1]} left
  if [ "$budget" -gt 0 ]; then
    left=$((budget - SECONDS - 5))
    [ "$left" -lt 20 ] && return 0
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "$limit"
}

fail_note() {  # fail_note STEP LOG RC: why it failed, when the step left no note
  [ -s "$notes_dir/$1" ] && return 0
  local why
  why=$(grep -E '^(FAILED|[A-Za-z_.]*(Error|Exception)\b)' "$2" 2>/dev/null | tail -n 1 | cut -c1-200)
  echo "${why:-exit status $3}" >> "$notes_dir/$1"
}

status_of_rc() {
  case $1 in
    0) echo PASS ;; 124|137) echo TIMEOUT ;; "$SKIP_RC") echo SKIP ;; *) echo FAIL ;;
  esac
}

# run_step STEP: runs step_<STEP> in its own bash under timeout; records the result.
run_step() {
  local name=$1 fn="step_${1//-/_}" limit rc status
  n=$((n + 1))
  cur_step=$name
  cur_log=$out/$(printf '%02d' "$n")-$name.log
  cur_start=$SECONDS
  if [[ $skip_list == *" $name "* ]]; then
    echo "skipped (PSI_CUDA_GPU_CHECK_SKIP)" > "$notes_dir/$name"
    record "$name" SKIP 0 "-"; cur_step=""; return $SKIP_RC
  fi
  limit=$(step_limit "$name")
  if [ -z "$limit" ]; then
    echo "skipped: time budget (${budget}s) spent" > "$notes_dir/$name"
    record "$name" SKIP 0 "-"; cur_step=""; return $SKIP_RC
  fi
  printf '[%s] %-19s ... (timeout %ss, log %s)\n' "$(date +%H:%M:%S)" "$name" "$limit" "$(rel "$cur_log")"
  STEP=$name STEP_LOG=$cur_log timeout -k 15 "$limit" bash -c "set -u -o pipefail; $fn" \
    > "$cur_log" 2>&1 &
  current_pid=$!
  wait "$current_pid"
  rc=$?
  current_pid=""
  status=$(status_of_rc "$rc")
  [ "$status" = TIMEOUT ] && echo "timed out after ${limit}s" >> "$notes_dir/$name"
  [ "$status" = FAIL ] && fail_note "$name" "$cur_log" "$rc"
  printf '[%s] %-19s %s (%ss)\n' "$(date +%H:%M:%S)" "$name" "$status" "$((SECONDS - cur_start))"
  if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then
    echo "---- last lines of $(rel "$cur_log"):"
    tail -n 15 "$cur_log" | sed 's/^/    /'
    echo "----"
  fi
  record "$name" "$status" "$((SECONDS - cur_start))" "$(rel "$cur_log")"
  cur_step=""
  return "$rc"
}

# The CMake build runs in the background from right after the Python build until the ctest step.
start_ctest_build() {
  local name=ctest-build limit
  n=$((n + 1))
  ctest_build_log=$out/$(printf '%02d' "$n")-$name.log
  if [[ $skip_list == *" $name "* ]]; then
    echo "skipped (PSI_CUDA_GPU_CHECK_SKIP)" > "$notes_dir/$name"; return
  fi
  limit=$(step_limit "$name")
  [ -n "$limit" ] || { echo "skipped: time budget (${budget}s) spent" > "$notes_dir/$name"; return; }
  printf '[%s] %-19s ... (background, timeout %ss, log %s)\n' "$(date +%H:%M:%S)" "$name" "$limit" "$(rel "$ctest_build_log")"
  ctest_build_start=$SECONDS
  ctest_build_limit=$limit
  STEP=$name STEP_LOG=$ctest_build_log timeout -k 15 "$limit" bash -c "set -u -o pipefail; step_ctest_build" \
    > "$ctest_build_log" 2>&1 &
  bg_pid=$!
}

finish_ctest_build() {
  local name=ctest-build rc status
  if [ -z "$bg_pid" ]; then
    record "$name" SKIP 0 "-"; return $SKIP_RC
  fi
  printf '[%s] %-19s ... (waiting)\n' "$(date +%H:%M:%S)" "$name"
  wait "$bg_pid"
  rc=$?
  bg_pid=""
  status=$(status_of_rc "$rc")
  [ "$status" = TIMEOUT ] && echo "timed out after ${ctest_build_limit}s" >> "$notes_dir/$name"
  [ "$status" = FAIL ] && fail_note "$name" "$ctest_build_log" "$rc"
  printf '[%s] %-19s %s (%ss since its start)\n' "$(date +%H:%M:%S)" "$name" "$status" "$((SECONDS - ctest_build_start))"
  if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then
    tail -n 15 "$ctest_build_log" | sed 's/^/    /'
  fi
  record "$name" "$status" "$((SECONDS - ctest_build_start))" "$(rel "$ctest_build_log")"
  return "$rc"
}

gpu_alive() {
  timeout 60 "$py" -c 'import torch; torch.ones(8, device="cuda").sum().item()' > /dev/null 2>&1
}

echo "psi_cuda GPU acceptance run: $(rel "$out")/, budget ${budget}s, commit $git_rev"
echo "GPU: ${gpu_smi:-? (nvidia-smi)}; CUDA_HOME ${cuda_home:-NOT FOUND}; compute-sanitizer ${sanitizer:-not found}"

if ! run_step setup; then
  stop_reason="setup failed: nothing else can run"
else
  torch_line=$(torch_desc "$py")
  if [[ $skip_list == *" build "* ]]; then  # reuse the build installed in the venv: check it
    n=$((n + 1))
    log=$out/$(printf '%02d' "$n")-build-verify.log
    if STEP=build verify_install > "$log" 2>&1; then
      echo "skipped (PSI_CUDA_GPU_CHECK_SKIP): the installed build imports and runs" > "$notes_dir/build"
      record build SKIP 0 "$(rel "$log")"
    else
      fail_note build "$log" 1
      record build FAIL 0 "$(rel "$log")"
      stop_reason="build skipped, and the installed build is not usable"
    fi
  elif ! run_step build; then
    stop_reason="the CUDA build failed: nothing else can run"
  fi
fi

if [ -z "$stop_reason" ]; then
  start_ctest_build
  for step in tests-cuda-files tests-cuda-cases ctest sanitize-plain sanitize-memcheck \
              sanitize-racecheck bench train-large sanitize-synccheck; do
    if [ "$step" = ctest ]; then
      if ! finish_ctest_build; then
        if [[ $skip_list == *" ctest "* ]]; then
          echo "skipped (PSI_CUDA_GPU_CHECK_SKIP)" > "$notes_dir/ctest"
        else
          echo "no CMake build (see ctest-build)" > "$notes_dir/ctest"
        fi
        record ctest SKIP 0 "-"
        continue
      fi
    fi
    run_step "$step"
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne "$SKIP_RC" ] && ! gpu_alive; then
      stop_reason="the GPU is unusable after $step (a one-line CUDA job fails)"
      break
    fi
  done
fi
for step in "${STEPS[@]}"; do  # the steps that never ran, so that the summary lists every step
  if [ -z "${STATUS[$step]:-}" ]; then
    rm -f "$notes_dir/$step"  # the summary's "stopped early" line says why
    order+=("$step"); STATUS[$step]=SKIP; SECS[$step]=0; LOG[$step]="-"
  fi
done
write_summary
echo
cat "$out/summary.txt"
echo "(summary: $(rel "$out")/summary.txt, summary.json)"
grep -q -E '^overall: PASS' "$out/summary.txt"
