"""Static GPU evidence for psi_cuda's CUDA kernels, gathered WITHOUT a GPU, plus a roofline MODEL.

    python3 benchmarks/gpu_static.py                 # compile csrc/cuda/*.cu for sm_80 and sm_90
    python3 benchmarks/gpu_static.py --check         # ... and exit 1 if an fp32 kernel spills
    python3 benchmarks/gpu_static.py --reuse --check # no compile: check the saved JSON again
    python3 benchmarks/gpu_static.py --archs 80,90,100 --jobs 1

1. Compiler facts (measured, by the compiler; nothing runs on a GPU). Every csrc/cuda/*.cu that
   exists when the script runs is compiled as torch's CUDAExtension compiles it (torch's
   COMMON_NVCC_FLAGS, -fPIC, setup.py's nvcc flags, -DTORCH_API_INCLUDE_EXTENSION_H,
   -DTORCH_EXTENSION_NAME=_C, -std=c++20, torch's CUDA include paths + csrc/include), once per
   architecture (-gencode arch=compute_XX,code=sm_XX), with -Xptxas -v. Per kernel: registers,
   spill store/load bytes, stack frame, static shared memory, and the same for the __noinline__
   device functions it calls (ptxas reports those per calling kernel). The object is then
   disassembled (cuobjdump -sass; the CUDA toolkit here has none, the one inside the CUDA torch's
   triton package is used) and the global memory instructions of each kernel are counted by
   width: LDG/STG (global), LD/ST (generic: the kernels' element pointers come from an int64
   table, so the compiler cannot always prove they are global), LDL/STL (local: spills, stack).
   `vector_loads` = 128-bit global loads (LDG.*.128 and generic LD.*.128);
   `vector_loads_constant` = those on the read-only path (LDG.*.128.CONSTANT). In the kernels
   that call the double-precision solve these are the math library's sin/cos coefficient table
   (each is followed by a DFMA chain), not loads of parameter elements; `vector_loads_data` =
   the others. A kernel's SASS includes the __noinline__ functions it calls.
   Torch: the CUDA build of torch in ~/.cache/psi_cuda_ci/venv-cuda-torch-2.13.0, made (if
   missing) exactly as .ci/run stage 3 makes it; the toolkit: CUDA_HOME or the folder of nvcc.

2. --check: exit 1 if any fp32 (or dtype-independent) kernel instantiation, for any architecture,
   spills (in its own body or in a __noinline__ function it calls), unless ALLOWED_SPILLS below
   names that kernel AND that place (its own body, or a named callee) with a reason.

3. A roofline MODEL (not a measurement): bytes the current kernels move per optimizer step on
   the parameter lists of psi_cuda/apps/shapes.py (ResNet-50, ViT-B/16, the GPU "large" list),
   the launches per step (from the launch scheme at the top of csrc/cuda/psi_sgd_cuda.cu and
   psi_adam_cuda.cu; torch's fused SGD/AdamW from multi_tensor_apply's chunking), and the step
   time those bytes imply at an H100's 3.35 TB/s. If ``psi_cuda.emulated`` exists and is
   available, launch counts measured by it replace the derived ones.

Outputs: benchmarks/results/gpu_static.json and benchmarks/results/gpu_static.md.
Runtime: about 80 s of nvcc per (file, arch) on one core of this 2-core machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_VENV = Path(os.environ.get("PSI_CUDA_CI_CACHE", Path.home() / ".cache" / "psi_cuda_ci")) \
    / "venv-cuda-torch-2.13.0"
TORCH_VERSION = "2.13.0"
DEFAULT_ARCHS = "80,90"
# setup.py's nvcc flags of a release build (extra_compile_args["nvcc"]).
SETUP_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3

# Spills that are there by design. A kernel listed here is excused only for the place named:
# "callee" with a regex of the __noinline__ function, or "kernel" (its own body).
SHORT_FP32 = r"^(psi_short_groups_kernel|psi_adam_short_groups_kernel)<float>$"
ALLOWED_SPILLS = [
    {
        "kernel": SHORT_FP32,
        "place": "callee",
        "function": r"^(solve_psi_group|solve_adam_group<float>|__internal_trig_reduction_slowpathd)$",
        "reason": "the short-group kernels cap registers at 64 via __launch_bounds__(256, 4) "
                  "(short_blocks_per_sm, multi_tensor.cuh); the double-precision solve runs on "
                  "ONE thread per group in a __noinline__ function (with libdevice's double "
                  "sin/cos argument reduction for the exp retraction) and spills there to local "
                  "memory by design, instead of lowering the occupancy of the element loop",
    },
    {
        "kernel": SHORT_FP32,
        "place": "kernel",
        "reason": "the short-group kernels cap registers at 64 via __launch_bounds__(256, 4) "
                  "(short_blocks_per_sm, multi_tensor.cuh) to keep 4 blocks of 256 threads per "
                  "SM while each thread holds 8 elements of w, g, m in registers; values live "
                  "across the call of the __noinline__ solve are saved to the stack (local "
                  "memory) by design",
    },
]


# ================================================================ environment


def find_cuda_home() -> Path:
    """The folder with bin/nvcc and include/cuda_runtime.h (as .ci/run finds it)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", "")]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda", "/usr/local/cuda-13.0"] + sorted(glob.glob("/usr/local/cuda-*"))
    for d in candidates:
        if d and (Path(d) / "bin" / "nvcc").exists() and (Path(d) / "include" / "cuda_runtime.h").exists():
            return Path(d)
    raise SystemExit(f"no CUDA toolkit found (nvcc on PATH: {nvcc})")


def ensure_cuda_venv(venv: Path, create: bool) -> Path:
    """The python of a venv with a CUDA build of torch (.ci/run stage 3 makes the same one)."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import torch"],
                                      capture_output=True).returncode == 0:
        return py
    if not create:
        raise SystemExit(f"{venv} does not import torch (drop --no-create to create it)")
    print(f"creating {venv} (torch=={TORCH_VERSION}, CUDA build; a few GB) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--isolated", f"torch=={TORCH_VERSION}"],
                   check=True, env=env)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "ninja", "setuptools", "wheel",
                    "pytest"], check=True, env=env)
    return py


TORCH_QUERY = r"""
import importlib.util, json, os, sysconfig, torch
import torch.utils.cpp_extension as ce
try:
    inc = ce.include_paths(device_type="cuda")
except TypeError:
    inc = ce.include_paths(cuda=True)
spec = importlib.util.find_spec("triton")
cuobjdump = None
if spec is not None and spec.origin:
    p = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = p if os.path.exists(p) else None
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "include_paths": inc, "python_include": sysconfig.get_paths()["include"],
                  "common_nvcc_flags": list(ce.COMMON_NVCC_FLAGS), "triton_cuobjdump": cuobjdump}))
"""


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unavailable"
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    rel = [ln for ln in lines if ln.startswith("Cuda compilation tools")]
    return rel[0] if rel else (lines[-1] if lines else "unknown")


def discover(python: Path, cuda_home: Path) -> dict:
    env = dict(os.environ, CUDA_HOME=str(cuda_home))
    res = subprocess.run([str(python), "-c", TORCH_QUERY], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"torch query failed:\n{res.stderr}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if not info["torch_cuda"]:
        raise SystemExit(f"{python}: torch {info['torch']} is not a CUDA build")
    cuobjdump = info["triton_cuobjdump"] or shutil.which("cuobjdump") \
        or (str(cuda_home / "bin" / "cuobjdump") if (cuda_home / "bin" / "cuobjdump").exists() else None)
    filt = next((c for c in (str(cuda_home / "bin" / "cu++filt"), shutil.which("cu++filt"),
                             shutil.which("c++filt")) if c and os.path.exists(c)), None)
    if cuobjdump is None:
        raise SystemExit("no cuobjdump (neither triton's nor the toolkit's)")
    if filt is None:
        raise SystemExit("no cu++filt / c++filt to demangle kernel names")
    nvcc = cuda_home / "bin" / "nvcc"
    info.update(cuda_home=str(cuda_home), nvcc=str(nvcc), nvcc_version=tool_version([str(nvcc)]),
                ptxas_version=tool_version([str(cuda_home / "bin" / "ptxas")]),
                cuobjdump=cuobjdump, cuobjdump_version=tool_version([cuobjdump]), demangler=filt,
                python=str(python))
    return info


def nvcc_command(info: dict, root: Path, src: Path, obj: Path, arch: str) -> list[str]:
    """The command torch's BuildExtension (unix, CUDA) runs for one .cu, for one architecture."""
    includes = [str(root / "csrc" / "include")] + info["include_paths"] + [info["python_include"]]
    return ([info["nvcc"]] + [f"-I{p}" for p in includes] + ["-c", str(src), "-o", str(obj)]
            + info["common_nvcc_flags"] + ["--compiler-options", "-fPIC"] + SETUP_NVCC_FLAGS
            + ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++20", "-Xptxas", "-v"])


# ================================================================ ptxas -v and SASS parsing

RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
RE_PROPS = re.compile(r"Function properties for (\S+)")
RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
RE_USED = re.compile(r"Used (\d+) registers")
RE_FIELDS = {"barriers": re.compile(r"used (\d+) barriers"),
             "cumulative_stack_bytes": re.compile(r"(\d+) bytes cumulative stack size"),
             "shared_bytes": re.compile(r"(\d+) bytes smem"),
             "cmem0_bytes": re.compile(r"(\d+) bytes cmem\[0\]")}


def parse_ptxas(text: str) -> tuple[list[dict], list[str]]:
    """Kernels (entries) with their properties and the properties of the device functions
    reported after them (their callees), from ptxas -v output; and ptxas warnings."""
    kernels: list[dict] = []
    warnings = [ln.strip() for ln in text.splitlines() if "ptxas warning" in ln]
    cur = None      # the entry being compiled
    target = None   # what the next "bytes stack frame" line describes
    for line in text.splitlines():
        m = RE_ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "barriers": 0,
                   "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0,
                   "cumulative_stack_bytes": 0, "shared_bytes": 0, "cmem0_bytes": 0,
                   "callees": []}
            kernels.append(cur)
            target = None
            continue
        m = RE_PROPS.search(line)
        if m and cur is not None:
            name = m.group(1)
            if name == cur["mangled"]:
                target = cur
            else:
                target = {"mangled": name, "stack_bytes": 0, "spill_store_bytes": 0,
                          "spill_load_bytes": 0}
                cur["callees"].append(target)
            continue
        m = RE_FRAME.search(line)
        if m and target is not None:
            target["stack_bytes"], target["spill_store_bytes"], target["spill_load_bytes"] = \
                (int(x) for x in m.groups())
            continue
        m = RE_USED.search(line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
            for key, rx in RE_FIELDS.items():
                f = rx.search(line)
                if f:
                    cur[key] = int(f.group(1))
    return kernels, warnings


RE_FUNC = re.compile(r"^\s*Function : (\S+)")
RE_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
MEM_CLASSES = {"LDG": "global_loads", "STG": "global_stores", "LD": "generic_loads",
               "ST": "generic_stores", "LDL": "local_loads", "STL": "local_stores"}


def access_width(mods: list[str]) -> str:
    for mod in mods:
        if mod in ("128", "64"):
            return mod
        if mod in ("U16", "S16", "16"):
            return "16"
        if mod in ("U8", "S8", "8"):
            return "8"
    return "32"


def parse_sass(text: str) -> dict[str, dict]:
    """mangled function name -> {class: {width: count}, "constant_128": n} from cuobjdump -sass."""
    out: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = RE_FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1), {c: Counter() for c in MEM_CLASSES.values()})
            cur["constant_128"] = 0
            continue
        if cur is None:
            continue
        m = RE_INSN.search(line)
        if not m:
            continue
        parts = m.group(1).split(".")
        cls = MEM_CLASSES.get(parts[0])
        if cls is None:
            continue
        width = access_width(parts[1:])
        cur[cls][width] += 1
        if parts[0] == "LDG" and width == "128" and "CONSTANT" in parts:
            cur["constant_128"] += 1
    return out


def demangle(names: list[str], filt: str) -> dict[str, str]:
    if not names:
        return {}
    res = subprocess.run([filt], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True)
    return dict(zip(names, res.stdout.splitlines()))


def short_name(demangled: str) -> str:
    """'void psi::(anonymous namespace)::k<c10::Half>(args)' -> 'k<Half>'."""
    s = re.sub(r"_INTERNAL_\w+::", "", demangled)
    s = s.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b(psi|c10|at)::", "", s).strip()
    depth, start = 0, 0  # drop a return type ('Update solve_adam_group<float>'): last word at depth 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == " " and depth == 0:
            start = i + 1
    return s[start:]


def kernel_dtype(name: str) -> str:
    """fp32/fp64/fp16/bf16 from the template arguments; 'any' when none is a floating type."""
    args = name[name.find("<") + 1:name.rfind(">")] if "<" in name else ""
    types = set(re.findall(r"\b(float|double|Half|BFloat16)\b", args))
    for t, label in (("double", "fp64"), ("Half", "fp16"), ("BFloat16", "bf16"), ("float", "fp32")):
        if t in types:
            return label
    return "any"


def width_hist(counter: Counter) -> dict[str, int]:
    return {w: counter.get(w, 0) for w in ("128", "64", "32", "16", "8")}


# ================================================================ compile

def compile_one(info: dict, root: Path, src: Path, arch: str, build: Path) -> dict:
    obj = build / f"{src.stem}.sm_{arch}.o"
    cmd = nvcc_command(info, root, src, obj, arch)
    env = dict(os.environ, CUDA_HOME=info["cuda_home"])
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.time() - t0
    (build / f"{src.stem}.sm_{arch}.ptxas.txt").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        return {"file": src.name, "arch": f"sm_{arch}", "ok": False, "seconds": seconds,
                "error": (res.stdout + res.stderr)[-4000:], "command": cmd}
    sass = subprocess.run([info["cuobjdump"], "-sass", str(obj)], capture_output=True, text=True)
    (build / f"{src.stem}.sm_{arch}.sass").write_text(sass.stdout)
    if sass.returncode != 0:
        return {"file": src.name, "arch": f"sm_{arch}", "ok": False, "seconds": seconds,
                "error": "cuobjdump: " + sass.stderr[-2000:], "command": cmd}
    kernels, warnings = parse_ptxas(res.stderr + res.stdout)
    return {"file": src.name, "arch": f"sm_{arch}", "ok": True, "seconds": round(seconds, 1),
            "kernels": kernels, "ptxas_warnings": warnings, "sass": parse_sass(sass.stdout),
            "command": cmd}


def compile_all(info: dict, root: Path, archs: list[str], jobs: int, build: Path) -> tuple[list, list]:
    sources = sorted((root / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        raise SystemExit(f"no .cu files in {root / 'csrc' / 'cuda'}")
    build.mkdir(parents=True, exist_ok=True)
    tasks = [(src, arch) for src in sources for arch in archs]
    print(f"compiling {len(sources)} .cu x {len(archs)} archs = {len(tasks)} nvcc runs, "
          f"{jobs} at a time ...", flush=True)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(compile_one, info, root, s, a, build): (s, a) for s, a in tasks}
        for fut in concurrent.futures.as_completed(futs):
            r = fut.result()
            print(f"  {r['file']} sm_{r['arch'][3:]}: {'ok' if r['ok'] else 'FAILED'} "
                  f"({r['seconds']:.0f} s)", flush=True)
            results.append(r)
    failed = [r for r in results if not r["ok"]]
    if failed:
        for r in failed:
            print(f"\n{r['file']} {r['arch']} failed:\n{' '.join(r['command'])}\n{r['error']}")
        raise SystemExit(1)
    names = sorted({k["mangled"] for r in results for k in r["kernels"]}
                   | {c["mangled"] for r in results for k in r["kernels"] for c in k["callees"]})
    dem = demangle(names, info["demangler"])
    records, functions = [], []
    for r in sorted(results, key=lambda r: (r["file"], r["arch"])):
        for k in r["kernels"]:
            d = dem.get(k["mangled"], k["mangled"])
            name = short_name(d)
            sass = r["sass"].get(k["mangled"])
            callees = []
            for c in k["callees"]:
                cname = short_name(dem.get(c["mangled"], c["mangled"]))
                spill = c["spill_store_bytes"] + c["spill_load_bytes"]
                callees.append({"function": cname, "stack_bytes": c["stack_bytes"],
                                "spill_store_bytes": c["spill_store_bytes"],
                                "spill_load_bytes": c["spill_load_bytes"], "spill_bytes": spill})
            rec = {"file": r["file"], "arch": r["arch"], "kernel": name, "dtype": kernel_dtype(name),
                   "registers": k["registers"],
                   "spill_bytes": k["spill_store_bytes"] + k["spill_load_bytes"],
                   "spill_store_bytes": k["spill_store_bytes"],
                   "spill_load_bytes": k["spill_load_bytes"], "stack_bytes": k["stack_bytes"],
                   "cumulative_stack_bytes": k["cumulative_stack_bytes"],
                   "shared_bytes": k["shared_bytes"], "barriers": k["barriers"],
                   "cmem0_bytes": k["cmem0_bytes"], "callees": callees,
                   "callee_spill_bytes": sum(c["spill_bytes"] for c in callees)}
            if sass is not None:
                g, gen = sass["global_loads"], sass["generic_loads"]
                rec.update({
                    "vector_loads": g.get("128", 0) + gen.get("128", 0),
                    "vector_loads_constant": sass["constant_128"],
                    "vector_loads_data": g.get("128", 0) + gen.get("128", 0) - sass["constant_128"],
                    "global_loads": width_hist(g), "global_stores": width_hist(sass["global_stores"]),
                    "generic_loads": width_hist(gen),
                    "generic_stores": width_hist(sass["generic_stores"]),
                    "local_loads": sum(sass["local_loads"].values()),
                    "local_stores": sum(sass["local_stores"].values())})
            else:
                rec["vector_loads"] = None
            rec["demangled"] = d
            records.append(rec)
        for mangled, s in sorted(r["sass"].items()):
            if not any(k["mangled"] == mangled for k in r["kernels"]):
                functions.append({"file": r["file"], "arch": r["arch"],
                                  "function": short_name(dem.get(mangled, mangled)),
                                  "global_loads": width_hist(s["global_loads"]),
                                  "generic_loads": width_hist(s["generic_loads"]),
                                  "local_loads": sum(s["local_loads"].values()),
                                  "local_stores": sum(s["local_stores"].values())})
    return records, [{"file": r["file"], "arch": r["arch"], "seconds": r["seconds"],
                      "ptxas_warnings": r["ptxas_warnings"]} for r in results], functions


# ================================================================ --check

def check_spills(records: list[dict]) -> dict:
    """fp32 and dtype-independent kernels must not spill, except where ALLOWED_SPILLS says why."""
    violations, allowed = [], []
    for rec in records:
        if rec["dtype"] not in ("fp32", "any"):
            continue
        places = []
        if rec["spill_bytes"] > 0:
            places.append(("kernel", rec["kernel"], rec["spill_bytes"]))
        for c in rec["callees"]:
            if c["spill_bytes"] > 0:
                places.append(("callee", c["function"], c["spill_bytes"]))
        for place, func, nbytes in places:
            rule = next((a for a in ALLOWED_SPILLS if re.search(a["kernel"], rec["kernel"])
                         and a["place"] == place
                         and (place == "kernel" or re.search(a["function"], func))), None)
            item = {"file": rec["file"], "arch": rec["arch"], "kernel": rec["kernel"],
                    "place": place, "function": func, "spill_bytes": nbytes}
            if rule is None:
                violations.append(item)
            else:
                allowed.append(dict(item, reason=rule["reason"]))
    return {"violations": violations, "allowed": allowed, "ok": not violations}


# ================================================================ roofline MODEL

def load_shape_lists(root: Path) -> dict:
    """The parameter lists of psi_cuda/apps/shapes.py, loaded from the file alone (standard
    library only: no torch, no build, no import of the psi_cuda package)."""
    spec = importlib.util.spec_from_file_location(
        "psi_cuda_shapes", root / "psi_cuda" / "apps" / "shapes.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    return {"resnet50": shapes.resnet50(), "vit_b16": shapes.vit_b16(),
            "large": shapes.large(shapes.large_target("cuda"))}


def bench_groups(shapes: list) -> list[tuple]:
    """psi_cuda.apps.bench.psi_groups: one param group per manifold, in order of first
    appearance (for these lists the same split psi_cuda.param_groups makes: channel groups for convs that
    feed BatchNorm, tensor groups for the marked ViT projections, the rest Euclidean)."""
    by: dict = {}
    for _, shape, manifold in shapes:
        by.setdefault(manifold, []).append(shape)
    return list(by.items())


# multi_tensor_apply's chunking (ATen/native/cuda/MultiTensorApply.cuh; the CUDA >= 13 values,
# replaced by the header's values when the CUDA torch is found).
MTA = {"chunk": 65536, "max_tensors": [770, 448, 336, 252, 210], "max_blocks": [2240] * 5}


def read_mta_constants(include_paths: list[str], cuda_major: int) -> dict:
    for inc in include_paths:
        p = Path(inc) / "ATen" / "native" / "cuda" / "MultiTensorApply.cuh"
        if not p.exists():
            continue
        text = p.read_text()
        tensors = re.findall(r"depth_to_max_tensors\[5\]\s*=\s*\{([^}]*)\}", text)
        blocks = re.findall(r"depth_to_max_blocks\[5\]\s*=\s*\{([^}]*)\}", text)
        chunk = re.search(r"kChunkSize\s*=\s*(\d+)", text)
        if not (tensors and blocks and chunk):
            break
        i = 0 if (cuda_major >= 13 and len(tensors) > 1) else len(tensors) - 1
        return {"chunk": int(chunk.group(1)),
                "max_tensors": [int(x) for x in tensors[i].split(",")],
                "max_blocks": [int(x) for x in blocks[i].split(",")], "from": str(p)}
    return dict(MTA, **{"from": "built-in (CUDA >= 13 values of torch 2.13's header)"})


def mta_launches(numels: list[int], depth: int, mta: dict) -> int:
    """Kernel launches of multi_tensor_apply<depth> over tensors of these sizes."""
    max_t, max_b, chunk_size = mta["max_tensors"][depth - 1], mta["max_blocks"][depth - 1], mta["chunk"]
    launches = blocks = tensors = 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = -(-n // chunk_size)
        for c in range(chunks):
            blocks += 1
            if (tensors == max_t and c == chunks - 1) or blocks == max_b:
                launches += 1
                blocks = 0
                tensors = 0 if c == chunks - 1 else 1
    return launches + (1 if blocks else 0)


# multi_tensor.cuh: kRegisterGroup, kShortGroup, kChunk
REGISTER_GROUP, SHORT_GROUP, CHUNK = 2048, 65536, 8192
# Groups in (REGISTER_GROUP, SHORT_GROUP] are read twice by their block; the second read is
# modelled as an L2 hit while the blocks resident at once hold at most L2_BYTES of (w, g, m):
# H100 SXM: 50 MB of L2, 132 SMs, 4 short-group blocks per SM (the kernel's 64-register cap).
L2_BYTES, RESIDENT_SHORT_BLOCKS = 50e6, 132 * 4
META_BYTES, GRAM_BYTES, UPDATE_BYTES = 96, 48, 56  # TensorMeta, Gram, Update (psi/math.h)


def psi_call(manifold, shapes: list, elt: int, adam: bool) -> dict:
    """One psi_sgd_ / psi_adam_ call (one param group, one dtype): launches and DRAM bytes of
    the current kernels, and the minimum bytes (one read of every input, one write of every
    output). State (m, v) in fp32 (opmath) for fp32/fp16/bf16 params."""
    st = 4
    numels = [math.prod(s) for s in shapes]
    nonempty = sum(1 for n in numels if n > 0)
    # Steady state: the metadata table was uploaded by an earlier call with the same tensors and
    # is reused (csrc/cuda/device_table.cuh), so no copy; a call after a tensor changed adds one.
    launches = []
    dram = mn = 0
    steps = len(shapes)
    short_groups = long_groups = long_chunks = plain_chunks = 0
    per_elem_rw = 3 * elt + 2 * st + (2 * st if adam and manifold is None else 0)  # r w,g,m(,v) w w,m(,v)
    for shape, n in zip(shapes, numels):
        if n == 0:
            continue
        if manifold is None:
            plain_chunks += -(-n // CHUNK)
            dram += n * per_elem_rw
            mn += n * per_elem_rw
            continue
        group = n // shape[0] if manifold == "channel" else n
        groups = n // group
        v_bytes = 2 * st * groups if adam else 0  # PSIAdam: one v per group, read + written
        mn += n * per_elem_rw + v_bytes
        if group <= SHORT_GROUP:
            short_groups += groups
            dram += n * per_elem_rw + v_bytes
            if group > REGISTER_GROUP:  # the write's second read of w, g, m: L2, beyond it DRAM
                read = group * (2 * elt + st)
                working = min(groups, RESIDENT_SHORT_BLOCKS) * read
                dram += int(groups * read * max(0.0, 1.0 - L2_BYTES / working))
        else:
            chunks = groups * -(-group // CHUNK)
            long_groups += groups
            long_chunks += chunks
            # reduce: read w, g, m + write partials; solve: read partials, write updates (and v);
            # apply: read w, g, m and each chunk's update, write w, m.
            dram += n * (2 * elt + st) + chunks * GRAM_BYTES
            dram += chunks * GRAM_BYTES + groups * UPDATE_BYTES + v_bytes
            dram += n * (3 * elt + 2 * st) + chunks * UPDATE_BYTES
    kernels = []
    if short_groups:
        kernels.append("psi_adam_short_groups_kernel" if adam else "psi_short_groups_kernel")
    if long_groups:
        kernels += ["psi_long_reduce_kernel",
                    "psi_adam_long_solve_kernel" if adam else "psi_long_solve_kernel",
                    "psi_long_apply_kernel"]
    if plain_chunks:
        kernels.append("euclidean_adam_kernel" if adam else "euclidean_sgd_kernel")
    # The last kernel's last block advances the steps (StepBump); a call with no kernel (every
    # tensor empty) launches increment_steps_kernel.
    launches += kernels or ["increment_steps_kernel"]
    table = 8 * (nonempty * META_BYTES // 8 + steps + 1)  # + the arrivals counter
    # Table: read once (binary-search re-reads assumed to hit L2; not written: reused). Steps:
    # read (4 B) and incremented (read + write, 8 B).
    dram += table + 12 * steps
    mn += 8 * steps
    return {"manifold": manifold, "tensors": len(shapes), "launches": launches,
            "dram_bytes": dram, "min_bytes": mn, "table_bytes": table,
            "short_groups": short_groups, "long_groups": long_groups, "long_chunks": long_chunks,
            "euclidean_chunks": plain_chunks}


def torch_fused(shapes: list, elt: int, adam: bool, mta: dict) -> dict:
    """torch.optim.SGD(momentum, fused=True) / AdamW(fused=True): one dtype/device group;
    state in the param dtype; one elementwise pass (DRAM bytes = min bytes)."""
    numels = [math.prod(s) for _, s, _ in shapes]
    n = sum(numels)
    if adam:  # _foreach_add_(state_steps, 1), then _fused_adamw_ (depth 4: p, g, m, v)
        launches = mta_launches([1] * len(numels), 1, mta) + mta_launches(numels, 4, mta)
        nbytes = n * 7 * elt + len(numels) * (8 + 4)
    else:      # _fused_sgd_ with momentum (depth 3: p, g, buf)
        launches = mta_launches(numels, 3, mta)
        nbytes = n * 5 * elt
    return {"launches": launches, "dram_bytes": nbytes, "min_bytes": nbytes}


METHODS = ("PSISGD", "PSIAdam", "torch SGD (fused)", "torch AdamW (fused)")


def roofline(shapes: list, method: str, elt: int = 4, mta: dict | None = None,
             launches: list[dict] | None = None, bytes_per_s: float = H100_BYTES_PER_S) -> dict:
    """MODEL of one optimizer step of ``method`` on the parameter list ``shapes`` (bench.py
    format: (name, shape, manifold)). ``launches``: measured launches (dicts with keys kernel,
    grid, block, shared_bytes, e.g. psi_cuda.emulated.launches()) replace the derived count."""
    mta = mta or MTA
    if method in ("PSISGD", "PSIAdam"):
        calls = [psi_call(m, ss, elt, method == "PSIAdam") for m, ss in bench_groups(shapes)]
        derived = [k for c in calls for k in c["launches"]]
        out = {"launches": len(derived), "launch_kinds": dict(Counter(derived)),
               "dram_bytes": sum(c["dram_bytes"] for c in calls),
               "min_bytes": sum(c["min_bytes"] for c in calls),
               "calls": [{k: v for k, v in c.items() if k != "launches"} for c in calls]}
    else:
        out = torch_fused(shapes, elt, method == "torch AdamW (fused)", mta)
    out["launch_source"] = "derived from the launch scheme"
    if launches is not None:
        out["launches_derived"] = out["launches"]
        out["launches"] = len(launches)
        out["launch_kinds"] = dict(Counter(str(x.get("kernel")) for x in launches))
        out["launch_source"] = "measured (psi_cuda.emulated.launches())"
    out["model_us"] = out["dram_bytes"] / bytes_per_s * 1e6
    out["min_us"] = out["min_bytes"] / bytes_per_s * 1e6
    return out


def emulated_launches(shapes: list, method: str) -> tuple[list | None, str]:
    """Launches of one step measured by psi_cuda.emulated (the installed psi_cuda, e.g. the
    editable install of scripts/setup.sh), if that module exists (guarded: it may not) and says
    it is available."""
    try:
        from psi_cuda import emulated  # noqa: PLC0415
    except Exception as e:  # ImportError, or psi_cuda itself not built for this python
        return None, f"psi_cuda.emulated not importable ({type(e).__name__}: {e})"
    try:
        if not emulated.available():
            return None, "psi_cuda.emulated.available() is False"
        import torch
        from psi_cuda.apps import bench
        from psi_cuda.optim import PSIAdam, PSISGD
        dev = getattr(emulated, "device", "cuda")
        dev = dev() if callable(dev) else dev
        params = bench.make_params(shapes, dev, torch.float32)
        groups = bench.psi_groups(shapes, params)
        opt = {"PSISGD": lambda: PSISGD(groups, lr=0.01, momentum=0.9),
               "PSIAdam": lambda: PSIAdam(groups, lr=0.01),
               "torch SGD (fused)": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True),
               "torch AdamW (fused)": lambda: torch.optim.AdamW(params, lr=0.01, fused=True)}[method]()
        opt.step()  # the first step creates the state
        if hasattr(emulated, "reset"):
            emulated.reset()
        before = len(emulated.launches())
        opt.step()
        return list(emulated.launches())[before:], "measured"
    except Exception as e:
        return None, f"psi_cuda.emulated failed ({type(e).__name__}: {e})"


def model_section(root: Path, elt: int, mta: dict, measure: bool, measure_large: bool) -> dict:
    lists = load_shape_lists(root)
    out = {"label": "MODEL, not a measurement", "bytes_per_s": H100_BYTES_PER_S,
           "bytes_per_s_note": "H100 SXM HBM3 peak, 3.35 TB/s",
           "param_bytes": elt, "state_bytes": 4, "multi_tensor_apply": mta,
           "assumptions": [
               "channel/tensor groups of <= 2048 elements: one pass (read w, g, m; write w, m)",
               "groups of 2049-65536 elements: one block per group reads w, g, m, reduces, "
               "solves, reads them again and writes w, m; the second read hits L2 while the "
               "resident blocks (132 SMs x 4) hold at most 50 MB of (w, g, m), and the share "
               "beyond that comes from DRAM (H100 SXM; not verified on a GPU)",
               "longer groups: reduce reads w, g, m; solve; apply reads w, g, m again and writes "
               "w, m; plus the Gram partials (48 B/chunk of 8192) and Updates (56 B)",
               "Euclidean tensors: one elementwise pass (Adam: also read and write v)",
               "PSIAdam: one fp32 v per group, read and written",
               "metadata table (96 B/tensor + 8 B/step + 8 B) read once; uploaded only when a "
               "tensor changes (steady state: reused, no copy); steps read and incremented",
               "param groups as psi_cuda.apps.bench.psi_groups (one per manifold); one psi op "
               "call per group: one launch per kernel kind present (the steps are advanced by "
               "the last kernel's last block)",
               "torch fused SGD/AdamW: state in the param dtype, one pass; launches from "
               "multi_tensor_apply's chunking (AdamW also _foreach_add_ on the steps)",
               "launch latency, caches, kernel efficiency: not modelled"],
           "lists": {}}
    for name, shapes in lists.items():
        rows = {}
        for method in METHODS:
            measured, why = (None, "not attempted")
            if measure and (name != "large" or measure_large):
                measured, why = emulated_launches(shapes, method)
            rows[method] = roofline(shapes, method, elt, mta, measured)
            rows[method]["measured_launches"] = why
        ref = {"PSISGD": "torch SGD (fused)", "PSIAdam": "torch AdamW (fused)",
               "torch SGD (fused)": "torch SGD (fused)", "torch AdamW (fused)": "torch AdamW (fused)"}
        for method, row in rows.items():
            row["torch_fused_min_us"] = rows[ref[method]]["min_us"]
            row["vs_torch_fused_min"] = row["model_us"] / row["torch_fused_min_us"]
        out["lists"][name] = {"tensors": len(shapes),
                              "params": sum(math.prod(s) for _, s, _ in shapes), "methods": rows}
    return out


# ================================================================ output

def git_state(root: Path) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    files = sorted(list((root / "csrc" / "cuda").glob("*.cu*")) + list((root / "csrc" / "include").rglob("*.h")))
    return {"commit": git("rev-parse", "HEAD"),
            "dirty_cuda_sources": bool(git("status", "--porcelain", "--", "csrc")),
            "sources_sha256": {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                               for f in files}}


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def static_rows(records: list[dict], archs: list[str]) -> list[list[str]]:
    by: dict = {}
    for r in records:
        by.setdefault((r["file"], r["kernel"]), {})[r["arch"]] = r
    rows = []
    for (f, k), per in sorted(by.items()):
        row = [f.replace("_cuda.cu", ""), k]
        for a in archs:
            r = per.get(f"sm_{a}")
            if r is None:
                row += ["-"] * 4
                continue
            callee = f"+{r['callee_spill_bytes']}" if r["callee_spill_bytes"] else ""
            row += [str(r["registers"]), f"{r['spill_bytes']}{callee}", str(r["stack_bytes"]),
                    str(r["shared_bytes"])]
        r = per.get(f"sm_{archs[-1]}")
        if r and r.get("global_loads") is not None:
            gl, gn = r["global_loads"], r["generic_loads"]
            row += [f"{r['vector_loads']} ({r['vector_loads_constant']}c)",
                    "/".join(str(gl[w] + gn[w]) for w in ("128", "64", "32", "16")),
                    "/".join(str(r["global_stores"][w] + r["generic_stores"][w])
                             for w in ("128", "64", "32", "16"))]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return rows


def static_header(archs: list[str]) -> list[str]:
    h = ["file", "kernel"]
    for a in archs:
        h += [f"sm{a} regs", f"sm{a} spill", f"sm{a} stack", f"sm{a} smem"]
    return h + [f"sm{archs[-1]} vector_loads", "loads 128/64/32/16", "stores 128/64/32/16"]


def model_rows(model: dict) -> list[list[str]]:
    rows = []
    for name, lst in model["lists"].items():
        for method, r in lst["methods"].items():
            rows.append([name, method, str(r["launches"]), fmt_bytes(r["dram_bytes"]),
                         fmt_bytes(r["min_bytes"]), f"{r['model_us']:.1f}", f"{r['min_us']:.1f}",
                         f"{r['torch_fused_min_us']:.1f}", f"{r['vs_torch_fused_min']:.2f}"])
    return rows


MODEL_HEADER = ["list", "method", "launches", "dram_bytes", "min_bytes", "model us",
                "min us", "torch fused min us", "model / torch min"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(x.rjust(w) if i >= 2 else x.ljust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def write_markdown(path: Path, data: dict) -> None:
    archs = [a.replace("sm_", "") for a in data["archs"]]
    m, env, chk = data["model"], data["toolchain"], data["check"]
    parts = [
        "# GPU step roofline: a MODEL, not a measurement (plus compiler facts)",
        "",
        f"Written by `{data['command']}` on {data['date']} (no GPU; CUDA sources at commit "
        f"{(data['sources']['commit'] or '?')[:12]}"
        f"{', with uncommitted changes' if data['sources']['dirty_cuda_sources'] else ''}).",
        "",
        "## Roofline MODEL (not a measurement)",
        "",
        f"Bytes the current kernels move per step and the time those bytes take at "
        f"{m['bytes_per_s'] / 1e12:.2f} TB/s (an H100's HBM3 peak): `model us` = dram_bytes / "
        f"bandwidth, `min us` = the method's minimum bytes (every input read once, every output "
        f"written once) / bandwidth, next to torch's fused SGD (for PSISGD) or fused AdamW (for "
        f"PSIAdam) at its minimum bytes. fp{8 * m['param_bytes']} params, fp32 state. Launches "
        f"per step: {', '.join(sorted({r['launch_source'] for lst in m['lists'].values() for r in lst['methods'].values()}))}. "
        "Launch latency and kernel efficiency are not modelled. Assumptions:",
        "",
        *[f"- {a}" for a in m["assumptions"]],
        "",
        md_table(MODEL_HEADER, model_rows(m)),
        "",
        "## Compiler facts (ptxas -v, cuobjdump -sass; measured by the compiler, nothing run)",
        "",
        f"{env['nvcc_version']}; torch {env['torch']} (CUDA {env['torch_cuda']}) headers; "
        f"SASS by {env['cuobjdump_version']} ({env['cuobjdump']}). Per kernel instantiation: "
        "registers, spill bytes (stores + loads; `+N`: spilled by the __noinline__ functions it "
        "calls), stack frame and static shared memory bytes per architecture; then, for the "
        "last architecture, `vector_loads` = 128-bit global loads (LDG and generic LD; `Nc`: N "
        "of them on the read-only path, LDG.128.CONSTANT, which in the solve-calling kernels is "
        "the math library's sin/cos coefficient table, not parameter data) and the load/store "
        "instruction counts by width in bits (global + generic). Generic LD/ST: the element "
        "pointers come from an int64 table, so the compiler cannot always prove them global. "
        "A kernel's SASS includes the __noinline__ functions it calls.",
        "",
        md_table(static_header(archs), [[r[0], f"`{r[1]}`"] + r[2:]
                                        for r in static_rows(data["kernels"], archs)]),
        "",
        f"Spill check (fp32 and dtype-independent kernels): "
        f"{'passed' if chk['ok'] else 'FAILED'}; {len(chk['violations'])} violation(s), "
        f"{len(chk['allowed'])} allowed by design:",
        "",
        *[f"- {a['arch']} `{a['kernel']}` ({a['place']} `{a['function']}`, {a['spill_bytes']} B): "
          f"{a['reason']}" for a in chk["allowed"]],
        *[f"- VIOLATION {v['arch']} `{v['kernel']}` ({v['place']} `{v['function']}`, "
          f"{v['spill_bytes']} B)" for v in chk["violations"]],
        "",
    ]
    path.write_text("\n".join(parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="source tree whose csrc/cuda/*.cu are compiled (default: this repo)")
    ap.add_argument("--archs", default=DEFAULT_ARCHS, help="comma-separated sm numbers (80,90)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc runs (2)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if an fp32 kernel spills outside ALLOWED_SPILLS")
    ap.add_argument("--reuse", action="store_true",
                    help="do not compile: re-check and re-model from the saved JSON")
    ap.add_argument("--python", type=Path, default=None,
                    help=f"python of a CUDA build of torch (default: {CUDA_VENV}, created if missing)")
    ap.add_argument("--no-create", action="store_true", help="do not create the CUDA torch venv")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="default: <root>/benchmarks/results")
    ap.add_argument("--build-dir", type=Path, default=None,
                    help="objects, ptxas logs, SASS (default: <root>/build/gpu_static)")
    ap.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--no-measure", action="store_true",
                    help="do not try psi_cuda.emulated for measured launch counts")
    ap.add_argument("--measure-large", action="store_true",
                    help="also measure launches on the large list (1B values) with psi_cuda.emulated")
    args = ap.parse_args(argv)
    t0 = time.time()
    root = args.root.resolve()
    out_dir = args.out_dir or root / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_static.json", out_dir / "gpu_static.md"
    archs = [a.strip().replace("sm_", "") for a in args.archs.split(",") if a.strip()]

    if args.reuse:
        old = json.loads(json_path.read_text())
        records, compiles, functions = old["kernels"], old["compiles"], old.get("device_functions", [])
        info, archs, sources = old["toolchain"], [a.replace("sm_", "") for a in old["archs"]], old["sources"]
        mta = old["model"]["multi_tensor_apply"]
    else:
        cuda_home = find_cuda_home()
        python = args.python or ensure_cuda_venv(CUDA_VENV, create=not args.no_create)
        info = discover(python, cuda_home)
        print(f"toolkit {info['cuda_home']}: {info['nvcc_version']}; torch {info['torch']} "
              f"(CUDA {info['torch_cuda']}); cuobjdump {info['cuobjdump']}", flush=True)
        sources = git_state(root)
        records, compiles, functions = compile_all(
            info, root, archs, max(1, args.jobs), args.build_dir or root / "build" / "gpu_static")
        mta = read_mta_constants(info["include_paths"], int(str(info["torch_cuda"]).split(".")[0]))
        info["nvcc_flags_example"] = [a.replace(str(root), "<root>") for a in nvcc_command(
            info, root, Path("csrc/cuda/X.cu"), Path("X.o"), archs[-1])[1:]]

    elt = {"float32": 4, "bfloat16": 2, "float16": 2}[args.model_dtype]
    model = model_section(root, elt, mta, not args.no_measure, args.measure_large)
    check = check_spills(records)
    data = {"command": "python3 benchmarks/gpu_static.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "archs": [f"sm_{a}" for a in archs], "toolchain": info, "sources": sources,
            "compiles": compiles, "kernels": records, "device_functions": functions,
            "allowed_spills": ALLOWED_SPILLS, "check": check, "model": model,
            "seconds": round(time.time() - t0, 1) if not args.reuse else None}
    if args.reuse:  # the compiler facts are those of the saved run
        old = json.loads(json_path.read_text())
        data["rechecked"] = {"command": data["command"], "date": data["date"]}
        data.update(command=old["command"], date=old["date"], seconds=old.get("seconds"))
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(md_path, data)

    print("\nCompiler facts (spill = kernel + __noinline__ callees; loads/stores: global+generic "
          f"by width, sm_{archs[-1]}):")
    print(text_table(static_header(archs), static_rows(records, archs)))
    print("\nRoofline MODEL, not a measurement (H100 3.35 TB/s):")
    print(text_table(MODEL_HEADER, model_rows(model)))
    for a in check["allowed"]:
        print(f"allowed spill: {a['arch']} {a['kernel']} ({a['place']} {a['function']}, "
              f"{a['spill_bytes']} B)")
    for v in check["violations"]:
        print(f"SPILL: {v['arch']} {v['kernel']} ({v['place']} {v['function']}, {v['spill_bytes']} B)")
    print(f"\nwrote {json_path} and {md_path} ({time.time() - t0:.0f} s)")
    if args.check and not check["ok"]:
        print(f"--check: {len(check['violations'])} fp32 kernel spill(s) not in ALLOWED_SPILLS")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
