"""Checks of the CUDA kernels that run without a GPU.

* ``csrc/cuda/*.cu`` compile standalone with nvcc for sm_80 and sm_90, with the flags the
  extension build uses, and ``--use_fast_math`` leaves no approximate log/cos/sqrt/div in
  the PTX (the in-kernel noise and the log-probs rely on the precise ones).
* The Philox4x32-10 + Box-Muller code of ``flow_kernels.cuh``, built as host code, matches
  :func:`flowkernels.random.philox_normal` (raw Philox words bit for bit).
* The kernels themselves run on the CPU: ``flow_kernels.cu`` is compiled as C++ against a
  small emulation of the CUDA execution model (one std::thread per CUDA thread, barriers for
  ``__syncthreads`` and warp shuffles) and compared with ``flowkernels/ops/reference.py``.
  This checks indexing, masking, vector/scalar paths, reductions and the ``steps`` logic;
  it cannot check GPU-only behaviour (timing, the device's own log1pf/sincospif, races
  hidden by the lock-step emulation).

Skipped with a reason when nvcc or the CUDA headers are missing.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flowkernels.ops import reference as ref
from flowkernels.random import philox4x32, philox_normal

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))

# The flags of the extension build: setup.py's nvcc flags plus the ones torch's
# CUDAExtension always adds.
NVCC_FLAGS = [
    "-O3",
    "--use_fast_math",
    "-lineinfo",
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the CUDA compile checks need the CUDA toolkit")


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_fp16.h), if any."""
    candidates = []
    if NVCC is not None:
        # nvcc may be a wrapper script; the toolkit is also found through CUDA_HOME.
        candidates.append(Path(os.path.realpath(NVCC)).parent.parent / "include")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_runtime.h").exists() and (c / "cuda_bf16.h").exists():
            return c
    return None


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------------------
# nvcc compile checks
# ---------------------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_standalone(arch: str, tmp_path: Path) -> None:
    assert KERNEL_SOURCES, "no csrc/cuda/*.cu sources found"
    for src in KERNEL_SOURCES:
        proc = _run([NVCC, *NVCC_FLAGS, f"-arch={arch}", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "x.o")])
        # Register spills larger than a few words would mean a kernel outgrew its budget.
        spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
        assert max(spills, default=0) <= 64, f"{src.name} ({arch}) spills registers:\n{proc.stderr}"


@needs_nvcc
def test_fast_math_keeps_precise_math(tmp_path: Path) -> None:
    """--use_fast_math must not turn the noise/log-prob math into MUFU approximations."""
    for src in KERNEL_SOURCES:
        ptx = tmp_path / "x.ptx"
        _run([NVCC, *NVCC_FLAGS, "-arch=sm_90", "-ptx", str(src), "-o", str(ptx)])
        text = ptx.read_text()
        approx = r"\b(?:lg2|ex2|sin|cos|sqrt|div|rsqrt)\.approx\.[a-z0-9.]*|\bdiv\.full\.[a-z0-9.]*"
        bad = sorted(set(re.findall(approx, text)))
        assert not bad, f"{src.name}: approximate instructions in the PTX: {bad}"


@needs_nvcc
def test_host_glue_compiles_against_torch(tmp_path: Path) -> None:
    """flow_ops_cuda.cpp (the ATen wrappers) and bindings.cpp with CUDA on, syntax-checked by g++.

    The CPU torch wheel ships the ATen/c10 CUDA headers but not the generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; an empty stand-in is enough for a syntax check.
    """
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include()
    gxx = shutil.which("g++")
    if cuda_inc is None or gxx is None:
        pytest.skip("the host-glue check needs the CUDA headers (cuda_runtime.h) and g++")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    import sysconfig

    flags = ["-std=c++20", "-fsyntax-only", "-DFLOWKERNELS_WITH_CUDA", f"-I{ROOT / 'csrc'}", f"-I{tmp_path}"]
    flags += [f"-I{p}" for p in include_paths()] + [f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"]
    for src in (CUDA_DIR / "flow_ops_cuda.cpp", ROOT / "csrc" / "bindings.cpp"):
        _run([gxx, *flags, str(src)], timeout=300)


# ---------------------------------------------------------------------------------------
# Philox host check
# ---------------------------------------------------------------------------------------

PHILOX_CHECK_SRC = r"""
#include "flow_kernels.cuh"
#include <cstdio>
#include <cstdlib>
// Usage: philox_check SEED OFFSET N -> N lines "r0 r1 r2 r3 z" for counters OFFSET + i.
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const unsigned long long seed = strtoull(argv[1], nullptr, 10);
  const unsigned long long offset = strtoull(argv[2], nullptr, 10);
  const long long n = atoll(argv[3]);
  for (long long i = 0; i < n; ++i) {
    uint32_t r[4];
    flowkernels::cuda::philox4x32_10(offset + i, seed, r);
    const float z = flowkernels::cuda::philox_normal_f32(seed, offset + i);
    printf("%u %u %u %u %.9e\n", r[0], r[1], r[2], r[3], z);
  }
  return 0;
}
"""


@needs_nvcc
def test_philox_host_matches_python(tmp_path: Path) -> None:
    src = tmp_path / "philox_check.cu"
    src.write_text(PHILOX_CHECK_SRC)
    exe = tmp_path / "philox_check"
    _run([NVCC, "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(src), "-o", str(exe)])
    cases = [
        (42, 0, 20000),
        (2**63 - 1, 2**62 - 5000, 5000),  # largest seed and offset
        (0x0123456789ABCDEF, 2**32 - 2500, 5000),  # counter low word wraps into the high word
        (7, 12_345_678_901, 5000),
    ]
    worst = 0.0
    for seed, offset, n in cases:
        out = _run([str(exe), str(seed), str(offset), str(n)]).stdout.split()
        assert len(out) == 5 * n
        rows = [out[i : i + 5] for i in range(0, len(out), 5)]
        words = torch.tensor([[int(w) for w in r[:4]] for r in rows], dtype=torch.int64)
        z = torch.tensor([float(r[4]) for r in rows], dtype=torch.float64)
        counter = torch.arange(n, dtype=torch.int64) + offset
        expected = torch.stack(philox4x32(counter, seed), dim=1)
        assert torch.equal(words, expected), f"Philox words differ for seed={seed}, offset={offset}"
        z_ref = philox_normal(seed, offset, (n,)).double()
        diff = (z - z_ref).abs().max().item()
        worst = max(worst, diff)
        # float32 rounding of log/cos/sqrt: a few ulp of |z| <= 5.8.
        assert diff < 2e-6, f"Box-Muller differs by {diff} for seed={seed}, offset={offset}"
    print(f"max |z_host - z_python| = {worst:.3g}")


# ---------------------------------------------------------------------------------------
# Host emulation of the kernels
# ---------------------------------------------------------------------------------------

EMU_SHIM = r"""
// Host emulation of the CUDA execution model, enough to run flow_kernels.cu on the CPU:
// blocks run one after another, each CUDA thread is a std::thread, __syncthreads and warp
// shuffles are barriers. A missing barrier participant (a divergent __syncthreads or shuffle)
// deadlocks, which the test's timeout turns into a failure.
#pragma once
#define __shared__ static  // one block runs at a time, so a static is its shared memory
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace fk_emu {
inline thread_local uint3 t_thread_idx;
inline thread_local uint3 t_block_idx;
inline dim3 g_grid_dim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline double g_warp_slots[32][32];

template <typename T>
T shfl_down(T v, int delta) {
  const int lane = t_thread_idx.x & 31, warp = t_thread_idx.x >> 5;
  g_warp_slots[warp][lane] = static_cast<double>(v);
  g_warp_barriers[warp]->arrive_and_wait();
  const T out = lane + delta < 32 ? static_cast<T>(g_warp_slots[warp][lane + delta]) : v;
  g_warp_barriers[warp]->arrive_and_wait();
  return out;
}

// One std::thread per CUDA thread of a block; the blocks of the grid run one after another
// on the same threads, separated by a block-wide barrier.
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, void (*kernel)(P...), A... args) {
  g_grid_dim = grid;
  const unsigned nt = block.x;
  std::barrier<> bar(nt);
  g_block_barrier = &bar;
  g_warp_barriers.clear();
  for (unsigned w = 0; w < nt / 32; ++w) g_warp_barriers.emplace_back(new std::barrier<>(32));
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      t_thread_idx = make_uint3(t, 0, 0);
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        t_block_idx = make_uint3(bx, 0, 0);
        kernel(static_cast<P>(args)...);
        bar.arrive_and_wait();  // the block is done before the next one reuses shared memory
      }
    });
  }
  for (auto& th : threads) th.join();
}
}  // namespace fk_emu

#define threadIdx (fk_emu::t_thread_idx)
#define blockIdx (fk_emu::t_block_idx)
#define gridDim (fk_emu::g_grid_dim)
#define cudaGetLastError() cudaSuccess
#undef __launch_bounds__
#define __launch_bounds__(...)

template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) { return fk_emu::shfl_down(v, delta); }
inline void __syncthreads() { fk_emu::g_block_barrier->arrive_and_wait(); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
"""

EMU_API = r"""
#include "flow_kernels.cuh"
using namespace flowkernels::cuda;
extern "C" {
int emu_flow_step_fwd(int dtype, const void* x, const void* v, const float* t, double dt, int mode,
                      const void* noise, const void* std_, uint64_t seed, uint64_t offset,
                      double noise_level, const float* sm, int64_t smb, const float* dm, int64_t dmb,
                      int64_t B, int64_t H, int64_t D, void* mean, void* x_next, void* logp) {
  return launch_flow_step_fwd(DType(dtype), x, v, t, dt, mode, noise, std_, seed, offset, noise_level,
                              sm, smb, dm, dmb, B, H, D, mean, x_next, logp, nullptr);
}
int emu_chain_logprob_fwd(int dtype, const void* chain, const void* v, int64_t Kv, const float* t_grid,
                          int mode, const void* std_, const int64_t* steps, int include_initial,
                          double noise_level, const float* sm, int64_t smb, const float* dm, int64_t dmb,
                          int64_t B, int64_t K, int64_t H, int64_t D, void* terms) {
  return launch_chain_logprob_fwd(DType(dtype), chain, v, Kv, t_grid, mode, std_, steps, include_initial != 0,
                                  noise_level, sm, smb, dm, dmb, B, K, H, D, terms, nullptr);
}
int emu_chain_logprob_bwd(int dtype, const void* grad_terms, const void* chain, const void* v, int64_t Kv,
                          const float* t_grid, int mode, const void* std_, const int64_t* steps,
                          double noise_level, const float* sm, int64_t smb, const float* dm, int64_t dmb,
                          int64_t B, int64_t K, int64_t H, int64_t D, void* grad_v, void* grad_std) {
  return launch_chain_logprob_bwd(DType(dtype), grad_terms, chain, v, Kv, t_grid, mode, std_, steps,
                                  noise_level, sm, smb, dm, dmb, B, K, H, D, grad_v, grad_std, nullptr);
}
int emu_cfm_loss_fwd(int dtype, const void* a, const void* e, const void* v, const float* sm, int64_t smb,
                     const float* dm, int64_t dmb, const float* inv_wsum, int64_t B, int64_t N, int64_t H,
                     int64_t D, void* loss) {
  return launch_cfm_loss_fwd(DType(dtype), a, e, v, sm, smb, dm, dmb, inv_wsum, B, N, H, D, loss, nullptr);
}
int emu_cfm_loss_bwd(int dtype, const void* g, const void* a, const void* e, const void* v, const float* sm,
                     int64_t smb, const float* dm, int64_t dmb, const float* inv_wsum, int64_t B, int64_t N,
                     int64_t H, int64_t D, void* grad_v) {
  return launch_cfm_loss_bwd(DType(dtype), g, a, e, v, sm, smb, dm, dmb, inv_wsum, B, N, H, D, grad_v, nullptr);
}
int emu_cfm_interpolate_fwd(int dtype, const void* a, const void* e, const float* tau, int64_t B, int64_t N,
                            int64_t H, int64_t D, void* x_tau) {
  return launch_cfm_interpolate_fwd(DType(dtype), a, e, tau, B, N, H, D, x_tau, nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
P = ctypes.c_void_p
I64 = ctypes.c_int64
SIGNATURES = {
    "emu_flow_step_fwd": [ctypes.c_int, P, P, P, ctypes.c_double, ctypes.c_int, P, P, ctypes.c_uint64,
                          ctypes.c_uint64, ctypes.c_double, P, I64, P, I64, I64, I64, I64, P, P, P],
    "emu_chain_logprob_fwd": [ctypes.c_int, P, P, I64, P, ctypes.c_int, P, P, ctypes.c_int, ctypes.c_double,
                              P, I64, P, I64, I64, I64, I64, I64, P],
    "emu_chain_logprob_bwd": [ctypes.c_int, P, P, P, I64, P, ctypes.c_int, P, P, ctypes.c_double, P, I64, P,
                              I64, I64, I64, I64, I64, P, P],
    "emu_cfm_loss_fwd": [ctypes.c_int, P, P, P, P, I64, P, I64, P, I64, I64, I64, I64, P],
    "emu_cfm_loss_bwd": [ctypes.c_int, P, P, P, P, P, I64, P, I64, P, I64, I64, I64, I64, P],
    "emu_cfm_interpolate_fwd": [ctypes.c_int, P, P, P, I64, I64, I64, I64, P],
}


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    include = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("the kernel emulation needs the CUDA headers (cuda_runtime.h, cuda_bf16.h) and g++")
    work = tmp_path_factory.mktemp("emu")
    (work / "emu_shim.h").write_text(EMU_SHIM)
    # `kernel<...><<<grid, block, smem, stream>>>(args)`
    #   -> `fk_emu::launch(grid, block, smem, stream, kernel<...>, args)`
    src = (CUDA_DIR / "flow_kernels.cu").read_text()
    src, n_launch = re.subn(r"(\w+_kernel<[^;{}]*?>)<<<([^;]*?)>>>\(", r"fk_emu::launch(\2, \1, ", src)
    assert n_launch >= 6, "kernel launches not found in flow_kernels.cu"
    (work / "flow_kernels_emu.cpp").write_text(src)
    (work / "emu_api.cpp").write_text(EMU_API)
    lib = work / "libfkemu.so"
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", f"-I{CUDA_DIR}", f"-I{include}"]
    _run([cxx, *flags, "-include", str(work / "emu_shim.h"), "-shared", "-o", str(lib),
          str(work / "flow_kernels_emu.cpp"), str(work / "emu_api.cpp")], timeout=300)
    dll = ctypes.CDLL(str(lib))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(dll, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return dll


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _poison(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Output buffer filled with NaN, so that unwritten elements show."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose storage starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _masks(B: int, H: int, D: int, shared: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    Bm = 1 if shared else B
    sm = (torch.rand(Bm, H, generator=gen) > 0.3).float() * torch.rand(Bm, H, generator=gen).add(0.5)
    dm = (torch.rand(Bm, D, generator=gen) > 0.3).float()
    return sm, dm


def _stride(m: torch.Tensor, L: int) -> int:
    return 0 if m.shape[0] == 1 else L


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN (unwritten output?)"
    if dtype == torch.float64:
        tol = 1e-10
    elif dtype == torch.float32:
        tol = 2e-5
    else:
        tol = 1e-2  # one half/bf16 rounding of an output
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


# Row lengths H·D: 40 takes the 16-byte path for every dtype; 2400 needs several loop
# iterations / chunks on the vector path; 91 (H·D odd) and the misaligned case take the
# scalar path, 793 with several iterations.
SHAPES = [(3, 5, 8), (2, 50, 48), (2, 7, 13), (2, 13, 61)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_flow_step(emu: ctypes.CDLL, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for si, (B, H, D) in enumerate(SHAPES):
        for mode in (0, 1, 2):
            for given_noise in (True, False):
                if mode == 0 and not given_noise:
                    continue
                shared = (si + mode) % 2 == 0
                misalign = si == 0 and mode == 2
                x = torch.randn(B, H, D, generator=gen).to(dtype)
                v = torch.randn(B, H, D, generator=gen).to(dtype)
                t = torch.rand(B, generator=gen) * 0.8 + 0.15
                t[0] = 1.0  # the t = 1 branch of the schedule
                dt = 0.1
                noise = torch.randn(B, H, D, generator=gen).to(dtype) if given_noise else None
                std = (torch.rand(B, H, D, generator=gen) * 0.1 + 0.05).to(dtype) if mode == 2 else None
                if std is not None:
                    std.view(-1)[::7] = 0  # s = 0 elements contribute 0
                sm, dm = _masks(B, H, D, shared, gen)
                noise_level = 0.0 if (mode == 1 and si == 3) else 0.5  # σ = 0: s = 0 everywhere
                seed, offset = 1234 + si, 2**32 - 17 + 1000 * mode
                if misalign:
                    x, v = _misaligned(x), _misaligned(v)
                mean = _poison((B, H, D), dtype)
                x_next = _poison((B, H, D), dtype) if mode != 0 else None
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                logp = _poison((B,), acc)
                rc = emu.emu_flow_step_fwd(
                    DTYPE_CODE[dtype], _ptr(x), _ptr(v), _ptr(t), dt, mode, _ptr(noise), _ptr(std), seed, offset,
                    noise_level, _ptr(sm), _stride(sm, H), _ptr(dm), _stride(dm, D), B, H, D, _ptr(mean),
                    _ptr(x_next), _ptr(logp),
                )
                assert rc == 0
                what = f"flow_step {dtype} shape={(B, H, D)} mode={mode} noise={given_noise}"
                r_mean, r_xn, r_logp = ref.flow_step_ref(
                    x, v, t, dt, mode, noise, std, seed, offset, noise_level, sm, dm, upcast=_upcast(dtype)
                )
                _assert_close(mean, r_mean, dtype, what + " mean")
                if mode == 0:
                    assert torch.equal(logp, torch.zeros(B, dtype=acc)), what
                    continue
                if given_noise:
                    _assert_close(x_next, r_xn, dtype, what + " x_next")
                    # logp (float32, float64 for float64) sums ~H·D terms of size ~|log s| + z²/2.
                    _assert_close(logp, r_logp, acc, what + " logp", H * D)
                else:
                    # In-kernel noise: the Philox stream of the oracle up to float32 rounding of
                    # log/cos (~1e-7·|z|), which can also flip one half/bf16 rounding of x_next.
                    assert not torch.isnan(x_next).any(), what
                    ulp = 1e-6 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps
                    atol = ulp * max(1.0, r_xn.double().abs().max().item())
                    torch.testing.assert_close(x_next.double(), r_xn.double(), rtol=0, atol=atol, msg=what)


def _chain_inputs(B, K, H, D, dtype, mode, steps_kind, gen):
    chain = torch.randn(B, K + 1, H, D, generator=gen).to(dtype)
    t_grid = torch.linspace(1.0, 0.0, K + 1)
    t_grid[-1] = 0.05
    Kv = 1 if steps_kind == "one_v" else K
    v = torch.randn(B, Kv, H, D, generator=gen).to(dtype)
    std = (torch.rand(B, K, H, D, generator=gen) * 0.1 + 0.05).to(dtype) if mode == 2 else None
    if std is not None:
        std.view(-1)[::5] = 0
    steps = None if steps_kind == "none" else torch.randint(0, K, (B,), generator=gen)
    return chain, v, t_grid, std, steps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_chain_logprob(emu: ctypes.CDLL, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    cases = []
    for si, (B, H, D) in enumerate(SHAPES):
        for K in (1, 3):
            for mode in (1, 2):
                for steps_kind in ("none", "steps", "one_v"):
                    if si == 1 and (K == 1 or steps_kind == "one_v"):
                        continue  # keep the large shape to a few cases
                    cases.append((si, B, H, D, K, mode, steps_kind))
    for si, B, H, D, K, mode, steps_kind in cases:
        chain, v, t_grid, std, steps = _chain_inputs(B, K, H, D, dtype, mode, steps_kind, gen)
        sm, dm = _masks(B, H, D, (K + mode) % 2 == 0, gen)
        if si == 0 and steps_kind == "steps":
            chain = _misaligned(chain)
        include_initial = (K + mode) % 2 == 1
        noise_level = 0.5
        Kv = v.shape[1]
        what = f"chain {dtype} shape={(B, H, D)} K={K} mode={mode} steps={steps_kind}"
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        terms = _poison((B, K + 1), acc)
        rc = emu.emu_chain_logprob_fwd(
            DTYPE_CODE[dtype], _ptr(chain), _ptr(v), Kv, _ptr(t_grid), mode, _ptr(std), _ptr(steps),
            int(include_initial), noise_level, _ptr(sm), _stride(sm, H), _ptr(dm), _stride(dm, D), B, K, H, D,
            _ptr(terms),
        )
        assert rc == 0
        r_terms = ref.chain_logprob_ref(chain, v, t_grid, mode, std, steps, include_initial, noise_level, sm, dm,
                                        upcast=_upcast(dtype))
        _assert_close(terms, r_terms.to(acc), acc, what + " terms", H * D)

        grad_terms = torch.randn(B, K + 1, generator=gen).to(acc)
        grad_v = _poison(tuple(v.shape), dtype)
        grad_std = _poison(tuple(std.shape), dtype) if std is not None else None
        rc = emu.emu_chain_logprob_bwd(
            DTYPE_CODE[dtype], _ptr(grad_terms), _ptr(chain), _ptr(v), Kv, _ptr(t_grid), mode, _ptr(std),
            _ptr(steps), noise_level, _ptr(sm), _stride(sm, H), _ptr(dm), _stride(dm, D), B, K, H, D,
            _ptr(grad_v), _ptr(grad_std),
        )
        assert rc == 0
        r_gv, r_gs = ref.chain_logprob_bwd_ref(grad_terms, chain, v, t_grid, mode, std, steps, noise_level, sm, dm,
                                               upcast=_upcast(dtype))
        gscale = max(1.0, r_gv.abs().max().item())
        _assert_close(grad_v, r_gv, dtype, what + " grad_v", gscale)
        if std is not None:
            _assert_close(grad_std, r_gs, dtype, what + " grad_std", max(1.0, r_gs.abs().max().item()))

        if steps is not None:
            # An out-of-range step gives NaNs for that sample, never an out-of-bounds access.
            bad = steps.clone()
            bad[0] = K
            terms = _poison((B, K + 1), acc)
            emu.emu_chain_logprob_fwd(
                DTYPE_CODE[dtype], _ptr(chain), _ptr(v), Kv, _ptr(t_grid), mode, _ptr(std), _ptr(bad),
                int(include_initial), noise_level, _ptr(sm), _stride(sm, H), _ptr(dm), _stride(dm, D), B, K, H, D,
                _ptr(terms),
            )
            assert torch.isnan(terms[0]).all() and not torch.isnan(terms[1:]).any(), what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_cfm(emu: ctypes.CDLL, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    for si, (B, H, D) in enumerate(SHAPES):
        N = 3 if si != 1 else 2
        A = torch.randn(B, H, D, generator=gen).to(dtype)
        eps = torch.randn(B, N, H, D, generator=gen).to(dtype)
        vp = torch.randn(B, N, H, D, generator=gen).to(dtype)
        if si == 0:
            eps = _misaligned(eps)
        sm, dm = _masks(B, H, D, si % 2 == 0, gen)
        w = sm[:, :, None] * dm[:, None, :]
        inv_wsum = (1.0 / w.sum(dim=(1, 2)).clamp_min(1e-6)).expand(B).contiguous()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        what = f"cfm {dtype} shape={(B, N, H, D)}"

        loss = _poison((B, N), acc)
        assert emu.emu_cfm_loss_fwd(DTYPE_CODE[dtype], _ptr(A), _ptr(eps), _ptr(vp), _ptr(sm), _stride(sm, H),
                                    _ptr(dm), _stride(dm, D), _ptr(inv_wsum), B, N, H, D, _ptr(loss)) == 0
        _assert_close(loss, ref.cfm_loss_ref(A, eps, vp, sm, dm, inv_wsum, upcast=_upcast(dtype)).to(acc), acc,
                      what + " loss", 10.0)

        g = torch.randn(B, N, generator=gen).to(acc)
        gv = _poison((B, N, H, D), dtype)
        assert emu.emu_cfm_loss_bwd(DTYPE_CODE[dtype], _ptr(g), _ptr(A), _ptr(eps), _ptr(vp), _ptr(sm),
                                    _stride(sm, H), _ptr(dm), _stride(dm, D), _ptr(inv_wsum), B, N, H, D,
                                    _ptr(gv)) == 0
        r_gv = ref.cfm_loss_bwd_ref(g, A, eps, vp, sm, dm, inv_wsum, upcast=_upcast(dtype))
        _assert_close(gv, r_gv, dtype, what + " grad_v", max(1.0, r_gv.abs().max().item()))

        tau = torch.rand(B, N, generator=gen)
        xt = _poison((B, N, H, D), dtype)
        assert emu.emu_cfm_interpolate_fwd(DTYPE_CODE[dtype], _ptr(A), _ptr(eps), _ptr(tau), B, N, H, D,
                                           _ptr(xt)) == 0
        _assert_close(xt, ref.cfm_interpolate_ref(A, eps, tau, upcast=_upcast(dtype)), dtype, what + " x_tau")


def test_emulated_flow_step_noise_matches_philox(emu: ctypes.CDLL) -> None:
    """In-kernel noise: x_next − mean = s·ε with ε = philox_normal(seed, offset) over (B, H, D)."""
    B, H, D = 2, 5, 8
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, D, generator=gen, dtype=torch.float64)
    std = torch.ones(B, H, D, dtype=torch.float64)
    sm, dm = torch.ones(1, H), torch.ones(1, D)
    t = torch.full((B,), 0.5)
    seed, offset = 2**40 + 3, 2**32 - 30
    mean, x_next = _poison((B, H, D), torch.float64), _poison((B, H, D), torch.float64)
    logp = _poison((B,), torch.float64)
    assert emu.emu_flow_step_fwd(1, _ptr(x), _ptr(v), _ptr(t), 0.1, 2, None, _ptr(std), seed, offset, 0.0,
                                 _ptr(sm), 0, _ptr(dm), 0, B, H, D, _ptr(mean), _ptr(x_next), _ptr(logp)) == 0
    eps = philox_normal(seed, offset, (B, H, D)).double()
    assert (x_next - mean - eps).abs().max().item() < 2e-6
    expected = (-0.5 * math.log(2 * math.pi) - 0.5 * eps * eps).sum(dim=(1, 2))
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-4)
