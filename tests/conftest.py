"""Shared test setup.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before any
``@triton.jit`` function is defined, i.e. before flowkernels is imported.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import flowkernels._backend

# load the Triton kernels now, in interpreter mode, before any test patches TRITON_INTERPRET
flowkernels._backend._load_triton()

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """The module of a script outside the package (``benchmarks/``, ``scripts/``), loaded from ``path``.

    Environment variables the script sets at import (scripts/triton_compile_check.py turns
    ``TRITON_INTERPRET`` off) are restored afterwards, so later tests still see the interpreter.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script runs
    env = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
        os.environ.clear()
        os.environ.update(env)
    return mod


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    return load_script(ROOT / "benchmarks" / f"{name}.py")


def lerobot_python() -> Path | None:
    """The lerobot venv's interpreter (``$LEROBOT_VENV``, default ``.venv-lerobot`` in the repo), if it exists."""
    venv = Path(os.environ.get("LEROBOT_VENV", ".venv-lerobot"))
    if not venv.is_absolute():
        venv = ROOT / venv
    py = venv / "bin" / "python"
    return py if py.exists() else None


def lerobot_env() -> dict[str, str]:
    """The environment for the lerobot venv's subprocesses: offline, without this venv's ``PYTHONPATH``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the lerobot venv imports its own packages, not this venv's
    return env


@functools.cache
def lerobot_skip_reason(*modules: str) -> str | None:
    """Why the lerobot venv cannot run a test that imports ``modules`` there, or None when it can.

    The venv existing is not enough: a setup that failed half-way (or a copied venv with a dangling
    interpreter link) leaves one without its packages, so the interpreter is asked to import them.
    """
    py = lerobot_python()
    if py is None:
        return (
            "no lerobot venv (run scripts/setup_lerobot_env.sh, or set LEROBOT_VENV to one holding lerobot[pi]==0.6.1)"
        )
    try:
        probe = subprocess.run(
            [str(py), "-c", "import " + ", ".join(modules)],
            capture_output=True,
            text=True,
            env=lerobot_env(),
            cwd=ROOT,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"lerobot venv {py.parent.parent} cannot run ({e}); rebuild it with scripts/setup_lerobot_env.sh"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"lerobot venv {py.parent.parent} cannot import {', '.join(modules)} ({last}); "
            "rebuild it with `bash scripts/setup_lerobot_env.sh`"
        )
    return None


HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU; the CPU twins run the C++, Triton-interpreter and torch paths"
)

# (backend, device) pairs every test runs on: all of them must be available where they apply.
CPU_BACKENDS = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
GPU_BACKENDS = [("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
ALL_BACKENDS = [pytest.param(b, d, id=f"{b}-{d}") for b, d in CPU_BACKENDS] + [
    pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu, requires_cuda]) for b, d in GPU_BACKENDS
]
KERNEL_BACKENDS = [p for p in ALL_BACKENDS if p.values[0] != "torch"]

LOWP = (torch.bfloat16, torch.float16)
ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_rule(
    out: torch.Tensor,
    oracle: torch.Tensor,
    lowp: torch.Tensor,
    what: str,
    factor: float = 2.0,
    floor_rel: float = 1e-6,
) -> None:
    """flash-attention's rule: ``err(kernel) ≤ factor·err(torch in the same precision) + floor``.

    ``floor = floor_rel·(1 + max|oracle|)`` absorbs the last-bit differences of rounding the
    result to a low-precision dtype.
    """
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out.double()).all(), f"{what}: non-finite output"
    err, err_lp = max_err(out, oracle), max_err(lowp, oracle)
    floor = floor_rel * (1.0 + oracle.double().abs().max().item())
    assert err <= factor * err_lp + floor, (
        f"{what}: err {err:.3e} > {factor}·err_torch {err_lp:.3e} + floor {floor:.1e}"
    )


def floor_for(dtype: torch.dtype) -> float:
    """A floor of about one unit in the last place of ``dtype`` (fp32 sums get a little more)."""
    return {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype, 2 * ULP[dtype])


def make_masks(B: int, H: int, D: int, kind: str, device: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``none``: no masks; ``shared``: (D,) bool dims / (H,) bool steps; ``batch``: (B, ·) masks."""
    if kind == "none":
        return None, None
    g = torch.Generator().manual_seed(B * 1000 + H * 10 + D)
    if kind == "shared":
        dim_mask = torch.arange(D) < max(1, (D * 2) // 3)
        step_mask = torch.arange(H) < max(1, H - 2)
        return dim_mask.to(device), step_mask.to(device)
    dim_mask = (torch.rand(B, D, generator=g) > 0.3).float()
    dim_mask[:, 0] = 1.0
    step_mask = (torch.rand(B, H, generator=g) > 0.2).float()
    step_mask[:, 0] = 1.0
    return dim_mask.to(device), step_mask.to(device)


@pytest.fixture(autouse=True)
def _settings_warnings_again():
    """flowrl's warnings about a run's settings come once per process (``flowrl.config.warn_once``): every test
    sees its own."""
    from flowrl.config import _WARNED

    _WARNED.clear()
    yield
