"""Backend selection: ``auto | triton | cuda | cpu | torch``, per call.

``auto`` picks, by the device of the inputs:

* CUDA tensors: ``cuda`` (the compiled extension) if it was built with CUDA, else ``triton``
  if Triton imports, else ``torch``;
* CPU tensors: ``cpu`` (the C++ extension) if it was built, else ``torch``.

``FLOWKERNELS_BACKEND=<name>`` replaces ``auto`` everywhere (handy for A/B runs). A backend
chosen automatically that is missing falls back quietly; one asked for by name that is missing
raises :class:`BackendUnavailableError` saying why. Triton on CPU tensors runs only under the
interpreter (``TRITON_INTERPRET=1`` set before flowkernels is imported).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType
from typing import Any

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_module",
    "resolve_backend",
]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (not built, not installed, wrong device)."""


@cache
def _load_ext() -> tuple[ModuleType | None, str]:
    try:
        ext = importlib.import_module("flowkernels._C")
    except ImportError as e:  # not built: pip install -e . --no-build-isolation
        return None, f"the C++ extension flowkernels._C is not built ({e}); run `pip install -e . --no-build-isolation`"
    return ext, ""


@cache
def _load_triton() -> tuple[ModuleType | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return None, f"triton is not installed ({e})"
    try:
        mod = importlib.import_module("flowkernels.ops.triton_kernels")
    except Exception as e:
        return None, f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    return mod, ""


def triton_interpreter() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def _why_unavailable(name: str, device: torch.device) -> str:
    """Empty string if ``name`` can run on ``device``, else the reason.

    Under ``torch.compile`` the answer is taken at trace time as a constant (it depends only on
    what is installed), so backend resolution adds no graph break.
    """
    if name == "torch":
        return ""
    if name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        return _load_ext()[1]
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        ext, why = _load_ext()
        if ext is None:
            return why
        if not getattr(ext, "has_cuda", False):
            return "flowkernels._C was built without CUDA kernels (CPU torch or no nvcc at build time)"
        return ""
    if name == "triton":
        if device.type == "cpu" and not triton_interpreter():
            return "backend 'triton' on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before import"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not support device {device}"
        return _load_triton()[1]
    return f"unknown backend {name!r}; expected one of {BACKENDS}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if not _why_unavailable(b, device)]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn the user's ``backend`` argument into a concrete backend for tensors on ``device``.

    ``auto`` never picks ``triton`` for float64 inputs (``dtype``): the Triton kernels take
    float32 / bfloat16 / float16, so float64 on CUDA without the CUDA extension goes to torch.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        BackendUnavailableError: a backend named explicitly cannot run here.
        TypeError: ``triton`` named (or set by ``FLOWKERNELS_BACKEND``) for float64 inputs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    env_picked = False
    if backend == "auto":
        env = os.environ.get("FLOWKERNELS_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"FLOWKERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend, env_picked = env, env != "auto"
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        if dtype == torch.float64:
            order = tuple(n for n in order if n != "triton")
        for name in order:
            if not _why_unavailable(name, device):
                return name
        return "torch"
    why = _why_unavailable(backend, device)
    if why:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    if backend == "triton" and dtype == torch.float64:
        how = "FLOWKERNELS_BACKEND=triton" if env_picked else "backend='triton'"
        raise TypeError(f"{how}: the Triton kernels take float32, bfloat16 or float16 tensors, got float64 "
                        "(the 'cpu', 'cuda' and 'torch' backends take float64)")
    return backend


class _ExtBackend:
    """Adapter exposing ``flowkernels._C``'s ``<fn>_<suffix>`` functions under ABI names."""

    def __init__(self, ext: ModuleType, suffix: str) -> None:
        self._ext = ext
        self._suffix = suffix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ext, f"{name}_{self._suffix}")


class _TorchBackend:
    """The plain-torch references, computing in float32 (float64 for float64 inputs)."""

    def __getattr__(self, name: str) -> Any:
        from flowkernels.ops import reference

        # ABI name -> reference name: flow_step_fwd -> flow_step_ref, cfm_loss_bwd -> cfm_loss_bwd_ref
        return getattr(reference, f"{name.removesuffix('_fwd')}_ref")


_TORCH = _TorchBackend()


def backend_module(name: str) -> Any:
    """The object whose attributes are the ABI functions (docs/kernels.md) of backend ``name``."""
    if name == "torch":
        return _TORCH
    if name in ("cpu", "cuda"):
        ext, why = _load_ext()
        if ext is None:
            raise BackendUnavailableError(why)
        return _ExtBackend(ext, name)
    if name == "triton":
        mod, why = _load_triton()
        if mod is None:
            raise BackendUnavailableError(why)
        return mod
    raise ValueError(f"no module for backend {name!r}")
