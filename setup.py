"""Builds flowkernels._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is
found. FLOWKERNELS_BUILD_CUDA=0|1 forces the choice (1 fails clearly if CUDA cannot be built).

Build against the torch you run with: ``pip install -e . --no-build-isolation``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(msg: str) -> None:
    sys.stderr.write(f"\nflowkernels build error: {msg}\n\n")
    raise SystemExit(1)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on broken installs
    _fail(
        "PyTorch must be installed before flowkernels is built. Install it first "
        "(CPU: `pip install torch==2.13.0`), then `pip install -e . --no-build-isolation`."
    )

cxx = os.environ.get("CXX", "c++")
if shutil.which(cxx) is None and shutil.which("g++") is None:
    _fail(
        f"no C++ compiler found (looked for `{cxx}` and `g++`). Install one, e.g. "
        "`apt-get install g++` (Debian/Ubuntu) or `conda install gxx_linux-64`, or set CXX."
    )


def _want_cuda() -> bool:
    flag = os.environ.get("FLOWKERNELS_BUILD_CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    possible = torch.version.cuda is not None and bool(nvcc) and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not possible:
            _fail(
                "FLOWKERNELS_BUILD_CUDA=1 but CUDA kernels cannot be built: needs a CUDA build of "
                f"torch (torch.version.cuda={torch.version.cuda}) and nvcc / CUDA_HOME "
                f"(CUDA_HOME={CUDA_HOME})."
            )
        return True
    return possible


# No -std flag: torch.utils.cpp_extension adds the C++ standard its headers need (C++20 for torch 2.13).
cxx_flags = ["-O3", "-g0", "-fopenmp"]
cpu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))
sources = [os.path.relpath(p, ROOT) for p in ["csrc/bindings.cpp", *cpu_sources]]
include_dirs = [os.path.join(ROOT, "csrc")]

if _want_cuda():
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")) + glob.glob(os.path.join(ROOT, "csrc/cuda/*.cpp"))
    sources += [os.path.relpath(p, ROOT) for p in sorted(cuda_sources)]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "flowkernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("FLOWKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "flowkernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
