"""Input validation and normalization shared by the ops (the user-facing boundary).

Errors name the argument and what was expected: ``ValueError`` for shapes, devices,
contiguity and values, ``TypeError`` for dtypes. Checks that read tensor *values* (t in
[0, 1], std > 0, step indices) need a device sync on CUDA; they are skipped while compiling
or capturing a CUDA graph, and can be turned off with :func:`set_value_checks` or
``FLOWKERNELS_VALUE_CHECKS=0`` for production rollouts.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_value_checks = os.environ.get("FLOWKERNELS_VALUE_CHECKS", "1") not in ("0", "false", "False")

try:
    import nvtx as _nvtx
except ImportError:  # optional: ranges become no-ops
    _nvtx = None


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (which sync on CUDA) on or off for this process."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on ``device``.

    Off when disabled, while compiling, during CUDA-graph capture, and for ``meta`` tensors
    (they hold no values: shape propagation must not fail on ``.item()``).
    """
    if not _value_checks or torch.compiler.is_compiling():
        return False
    if device.type == "meta":
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range (visible in Nsight Systems) when a GPU is present; a no-op otherwise."""
    if _nvtx is not None and torch.cuda.is_available():
        with _nvtx.annotate(name, domain="flowkernels"):
            yield
    else:
        yield


def fmt_shape(shape: Sequence[int | str]) -> str:
    """A shape as Python writes a tuple: ``(2, 3)``, ``(2,)``, ``()``."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_tensor(
    op: str,
    name: str,
    t: object,
    shape: Sequence[int | None],
    names: Sequence[str],
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of ``shape`` (``None`` = any size) with a dtype in ``dtypes``.

    ``names`` are the dimension names used in the message, e.g. ``("B", "H", "D")``.
    """
    expected = fmt_shape([n if s is None else f"{n}={s}" for s, n in zip(shape, names)])
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{op}: {name} must have shape {expected}, got {fmt_shape(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every given tensor of ``others`` has ``ref``'s dtype (a non-tensor is a TypeError naming it)."""
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor (or None), got {type(t).__name__}")
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
                f"{str(ref.dtype).replace('torch.', '')}; all float inputs must share one dtype"
            )


def prepare_contiguous(op: str, backend: str, requested: str, **tensors: torch.Tensor | None) -> list:
    """Kernel backends take contiguous inputs: copy for ``auto``, refuse for a named backend."""
    out = []
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous() and backend != "torch":
            if requested != "auto":
                raise ValueError(
                    f"{op}: {name} must be contiguous for backend {backend!r} (strides {tuple(t.stride())} "
                    f"for shape {fmt_shape(t.shape)}); call .contiguous() or use backend='auto'"
                )
            t = t.contiguous()
        out.append(t)
    return out


def _mask(
    op: str, name: str, mask: torch.Tensor | None, B: int, L: int, dim_name: str, device: torch.device
) -> torch.Tensor:
    if mask is None:
        return torch.ones(1, L, dtype=torch.float32, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor of shape ({dim_name}={L},) or (B={B}, {dim_name}={L})")
    given = mask.shape
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[1] != L or mask.shape[0] not in (1, B):
        raise ValueError(
            f"{op}: {name} must have shape ({dim_name}={L},) or (B={B}, {dim_name}={L}), got {fmt_shape(given)}"
        )
    if mask.dtype not in (torch.bool, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                          torch.int64, torch.uint8):
        raise TypeError(f"{op}: {name} must be bool, integer or float (0/1 weights), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the other inputs are on {device}")
    return mask.to(torch.float32)


def normalize_masks(
    op: str,
    dim_mask: torch.Tensor | None,
    step_mask: torch.Tensor | None,
    B: int,
    H: int,
    D: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sm, dm)``: float32 contiguous ``(Bm, H)`` and ``(Bm, D)`` with one shared ``Bm ∈ {1, B}``."""
    device = torch.device(device)
    sm = _mask(op, "step_mask", step_mask, B, H, "H", device)
    dm = _mask(op, "dim_mask", dim_mask, B, D, "D", device)
    if sm.shape[0] != dm.shape[0]:
        sm, dm = sm.expand(B, H), dm.expand(B, D)
    if value_checks_enabled(device) and (step_mask is not None or dim_mask is not None):
        # one host read; NaN fails ``>= 0``, so a NaN weight is refused with the negative ones
        if not bool(((sm >= 0) & (sm < math.inf)).all() & ((dm >= 0) & (dm < math.inf)).all()):
            raise ValueError(f"{op}: dim_mask and step_mask must be finite non-negative weights")
    return sm.contiguous(), dm.contiguous()


def check_range(
    op: str, name: str, value: float | torch.Tensor, lo: float, hi: float, lo_open: bool = False
) -> None:
    """``value`` (a float or a tensor, checked when value checks are on) in ``[lo, hi]``."""
    lo_txt = "(" if lo_open else "["
    if isinstance(value, torch.Tensor):
        if not value_checks_enabled(value.device) or value.numel() == 0:
            return
        bad = (value < lo) | (value > hi) | torch.isnan(value)
        if lo_open:
            bad |= value == lo
        if bool(bad.any()):
            v = value[bad].flatten()[0].item()
            raise ValueError(f"{op}: {name} must lie in {lo_txt}{lo}, {hi}], got a value {v}")
    else:
        if not (lo <= value <= hi) or (lo_open and value == lo):
            raise ValueError(f"{op}: {name} must lie in {lo_txt}{lo}, {hi}], got {value}")


def host_min_max(t: torch.Tensor) -> tuple[Any, Any]:
    """``(min, max)`` of a non-empty tensor in one host read: ints for an integer tensor, floats for a
    floating one (NaN propagates)."""
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    return lo, hi


def check_positive(op: str, name: str, t: torch.Tensor) -> None:
    """Every element of ``t`` finite and ``> 0`` (when value checks are on; NaN and inf are refused)."""
    if value_checks_enabled(t.device):
        bad = ~((t > 0) & (t < math.inf))
        if bool(bad.any()):
            raise ValueError(f"{op}: {name} must be finite and > 0 everywhere, got a value "
                             f"{t[bad].flatten()[0].item()}")


def check_int(op: str, name: str, value: object, lo: int, hi: int, hi_text: str) -> int:
    """``value`` as a Python int in ``[lo, hi)`` (ints and integer scalars; not bool or float)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int in [{lo}, {hi_text}), got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int in [{lo}, {hi_text}), got {type(value).__name__}") from None
    if not lo <= value < hi:
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi_text}), got {value}")
    return value


def as_float(op: str, name: str, value: object, what: str) -> float:
    """A real scalar (int, float, NumPy scalar, one-element tensor: a host read) as a Python float.

    Bools, strings and anything else are a TypeError naming ``name`` and ``what`` it must be.
    """
    bad = isinstance(value, (str, bytes, bool)) or type(value).__name__ == "bool_"
    if isinstance(value, torch.Tensor):
        bad = value.numel() != 1 or value.dtype == torch.bool or value.is_complex()
    if not bad:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            pass
    got = f"a tensor of shape {fmt_shape(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise TypeError(f"{op}: {name} must be {what}, got {got}")


def check_noise_level(op: str, noise_level: object) -> float:
    """The Flow-SDE noise level as a finite Python float ``>= 0``."""
    noise_level = as_float(op, "noise_level", noise_level, "a float >= 0")
    if not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"{op}: noise_level must be finite and >= 0, got {noise_level}")
    return noise_level
