"""Build of psi_cuda's C++/CUDA extension (psi_cuda._C).

A CUDAExtension is built when torch has CUDA and nvcc is found, a CppExtension otherwise.
Environment:
  PSI_CUDA_BUILD_CUDA=0/1   force the CPU-only or the CUDA build
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default: the visible GPU's, or a
                            list of common datacenter and consumer architectures without one)
  CUDA_HOME                 the toolkit folder holding bin/nvcc
  PSI_CUDA_DEBUG=1          build with -O0 -g
  PSI_CUDA_BUILD_EMULATOR=1 also build psi_cuda._emu: csrc/cuda/*.cu compiled as C++ for the CPU
                            emulator of the CUDA execution model (psi_cuda.emulated, csrc/emu/)
  PSI_CUDA_SANITIZE=1       compile and link the C++ code with -fsanitize=address,undefined
                            (run Python with LD_PRELOAD of the ASan runtime; see .ci/run)
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Without a visible GPU torch would guess; these cover Turing through Blackwell plus PTX
# (CUDA 13 dropped Volta, sm_70).
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def want_cuda() -> bool:
    flag = os.environ.get("PSI_CUDA_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


HERE = os.path.dirname(os.path.abspath(__file__))
# vptr is left out: it checks the dynamic types of torch's objects against type information of
# an uninstrumented libtorch, which it cannot see.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "-g"]


def sanitizer_flags() -> list[str]:
    return SANITIZE if os.environ.get("PSI_CUDA_SANITIZE") == "1" else []


def host_opt_flags(release: str) -> list[str]:
    """-O0 -g under PSI_CUDA_DEBUG, -O1 with the sanitizers, else `release`; then the sanitizer
    flags (if any)."""
    if os.environ.get("PSI_CUDA_DEBUG") == "1":
        opt = ["-O0", "-g"]
    else:
        opt = ["-O1"] if sanitizer_flags() else [release]
    return opt + sanitizer_flags()


def extension():
    debug = os.environ.get("PSI_CUDA_DEBUG") == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = host_opt_flags("-O3")
    # -fopenmp: at::parallel_for is an OpenMP loop in torch's (OpenMP) builds and runs on one
    # thread in code compiled without it; libgomp.so.1 is the one torch already loaded.
    cxx += ["-fopenmp", "-DPSI_CUDA_PYTHON_MODULE"]
    # -fno-math-errno: sqrt in a loop (the AdamW step of psi_adam_) vectorizes only when it
    # need not set errno; nothing here reads errno, and results do not change.
    cxx += ["-fno-math-errno"]
    link = ["-fopenmp"] + sanitizer_flags()
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if not want_cuda():
        return CppExtension("psi_cuda._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link,
                            py_limited_api=False)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    nvcc += ["--expt-relaxed-constexpr", "-lineinfo"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("psi_cuda._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ["-DPSI_CUDA_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=link, py_limited_api=False)


def emulator_extension():
    """psi_cuda._emu: the CUDA sources built as host C++ against the emulator (csrc/emu/)."""
    sources = sorted(glob.glob("csrc/emu/*.cpp")) + ["csrc/checks.cpp", "csrc/bnp_checks.cpp"]
    cxx = host_opt_flags("-O2")
    cxx += ["-DPSI_CUDA_EMULATION", "-DPSI_CUDA_PYTHON_MODULE", "-fno-math-errno"]
    return CppExtension("psi_cuda._emu", sources,
                        include_dirs=[os.path.join(HERE, "csrc", "include")],
                        extra_compile_args={"cxx": cxx}, extra_link_args=sanitizer_flags(),
                        py_limited_api=False)


def extensions():
    exts = [extension()]
    if os.environ.get("PSI_CUDA_BUILD_EMULATOR") == "1":
        exts.append(emulator_extension())
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
