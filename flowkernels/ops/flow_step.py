"""``flow_step``: one batched denoising transition (ODE, Flow-SDE or Flow-Noise) with its
Gaussian log-prob, fused into one pass over ``(B, H, D)``.

Layers: the kernels (``reference.flow_step_ref``, ``triton_kernels.flow_step_fwd``,
``flowkernels._C.flow_step_fwd_{cpu,cuda}``), the ``torch.library`` op
``flowkernels::flow_step_fwd`` (so it runs under ``torch.compile`` and in CUDA graphs), and
the functional entry point :func:`flow_step`.

The op is a rollout op and is not differentiable; gradients of log-probs under new weights go
through :func:`flowkernels.chain_logprob`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from flowkernels._backend import backend_module, resolve_backend
from flowkernels._checks import (
    as_float,
    check_int,
    check_noise_level,
    check_positive,
    check_range,
    check_same_dtype,
    check_tensor,
    host_min_max,
    normalize_masks,
    nvtx_range,
    prepare_contiguous,
    value_checks_enabled,
)
from flowkernels.ops.reference import MODES, sde_coefficients

__all__ = ["FlowStepResult", "flow_step"]


@torch.library.custom_op("flowkernels::flow_step_fwd", mutates_args=())
def _flow_step_op(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    mode: int,
    noise: torch.Tensor | None,
    std: torch.Tensor | None,
    seed: int,
    offset: int,
    noise_level: float,
    sm: torch.Tensor,
    dm: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with nvtx_range("flowkernels.flow_step"):
        return backend_module(backend).flow_step_fwd(x, v, t, dt, mode, noise, std, seed, offset, noise_level, sm, dm)


@_flow_step_op.register_fake
def _(x, v, t, dt, mode, noise, std, seed, offset, noise_level, sm, dm, backend):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_next = x.new_empty((0,)) if mode == 0 else torch.empty_like(x)
    return torch.empty_like(x), x_next, x.new_empty((x.shape[0],), dtype=stat)


class FlowStepResult(NamedTuple):
    """Outputs of :func:`flow_step`.

    Attributes:
        x_next: ``(B, H, D)`` the state at ``t − dt`` (for ``ode`` the same tensor as ``mean``).
        mean: ``(B, H, D)`` the transition mean μ.
        std: the transition std, broadcastable to ``(B, H, D)``: ``(B, 1, 1)`` float32 for
            ``ode`` (zeros) and ``sde`` (``σ_t·√dt``), the given ``(B, H, D)`` std for ``noise``.
        logp: ``(B,)`` float32 (float64 for float64 inputs), ``Σ`` over masked elements of
            ``log N(x_next; mean, std²)``; zeros for ``ode``.
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    logp: torch.Tensor


def _draw_seed(generator: torch.Generator | None) -> int:
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=dev).item())


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: float | torch.Tensor,
    dt: float,
    mode: str = "ode",
    *,
    noise: torch.Tensor | None = None,
    noise_level: float = 0.5,
    std: torch.Tensor | None = None,
    dim_mask: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> FlowStepResult:
    """One denoising transition ``t → t − dt`` for a batch of action chunks (DESIGN §1).

    * ``ode``: ``x' = x − dt·v``.
    * ``sde`` (Flow-SDE): ``μ = (1 − t')·Â0 + (t' − σ_t²·dt/(2t))·Â1`` with ``t' = t − dt``,
      ``Â0 = x − t·v``, ``Â1 = x + (1 − t)·v``, ``σ_t = a·sqrt(t/(1 − t*))``,
      std ``σ_t·√dt``; ``x' = μ + std·ε``.
    * ``noise`` (Flow-Noise): ``μ = x − dt·v``, std given per element; ``x' = μ + std·ε``.

    Args:
        x: ``(B, H, D)`` current state ``x_t``; v: ``(B, H, D)`` velocity ``v(x_t, t)``.
        t: float, ``(B,)`` tensor, or 0-dim tensor (one time for every row): current time(s) in
            ``[0, 1]`` (``(0, 1]`` for sde). Used as float32 on every path (docs/kernels.md).
        dt: step size ``> 0`` (``≤ t`` for sde): a float, NumPy scalar or one-element tensor (read
            on the host once).
        mode: ``"ode" | "sde" | "noise"``.
        noise: ``(B, H, D)`` standard-normal ``ε`` (sde / noise modes only; an error with ode);
            if None it is drawn inside the kernel from
            ``(seed, offset)`` (see :mod:`flowkernels.random`; element ``i`` uses counter
            ``offset + i``, so advance ``offset`` by ``B·H·D`` between calls with one seed).
            Without ``seed``, a seed is drawn from ``generator`` (or torch's default generator).
        noise_level: Flow-SDE noise level ``a ≥ 0``.
        std: ``(B, H, D)`` per-element std ``> 0`` for mode ``noise``.
        dim_mask: ``(D,)`` or ``(B, D)``; step_mask: ``(H,)`` or ``(B, H)`` — bool or 0/1
            weights selecting the elements summed in ``logp``.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.

    Returns:
        :class:`FlowStepResult` ``(x_next, mean, std, logp)``.
    """
    op = "flow_step"
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {tuple(MODES)}, got {mode!r}")
    m = MODES[mode]
    check_tensor(op, "x", x, (None, None, None), ("B", "H", "D"))
    B, H, D = x.shape
    dev = x.device
    check_tensor(op, "v", v, (B, H, D), ("B", "H", "D"), device=dev)
    check_same_dtype(op, "x", x, v=v, noise=noise, std=std)
    if noise is not None:
        if m == 0:
            raise ValueError(f"{op}: noise is only used by modes 'sde' and 'noise' (mode is 'ode', which adds none)")
        check_tensor(op, "noise", noise, (B, H, D), ("B", "H", "D"), device=dev)
    if m == 2:
        if std is None:
            raise ValueError(f"{op}: mode 'noise' needs std of shape (B={B}, H={H}, D={D})")
        check_tensor(op, "std", std, (B, H, D), ("B", "H", "D"), device=dev)
        check_positive(op, "std", std)
    elif std is not None:
        raise ValueError(f"{op}: std is only used by mode 'noise' (mode is {mode!r})")
    dt = as_float(op, "dt", dt, "a float > 0")  # a 0-dim tensor (t_grid[k] - t_grid[k + 1]) is read once
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"{op}: dt must be > 0 and finite, got {dt}")
    noise_level = check_noise_level(op, noise_level)
    t_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if isinstance(t, torch.Tensor) and t.dim() == 0:  # one time for every row (e.g. t_grid[k])
        check_tensor(op, "t", t, (), (), dtypes=t_dtypes, device=dev)
        t = t.expand(B)
    if isinstance(t, torch.Tensor):
        check_tensor(op, "t", t, (B,), ("B",), dtypes=t_dtypes, device=dev)
        t_vec = t.to(torch.float32).contiguous()
        if value_checks_enabled(dev) and B > 0:  # one host read: min and max (NaN propagates)
            lo_t, hi_t = host_min_max(t_vec)
            for val in (lo_t, hi_t):
                check_range(op, "t", val, 0.0, 1.0, lo_open=m == 1)
            if m == 1 and lo_t < dt - 1e-6:
                raise ValueError(f"{op}: sde needs dt <= t (got a t of {lo_t}, dt={dt})")
    else:
        t = as_float(op, "t", t, "a float or a (B,) tensor")
        check_range(op, "t", t, 0.0, 1.0, lo_open=m == 1)
        if m == 1 and t < dt - 1e-6:
            raise ValueError(f"{op}: sde needs dt <= t (got t={t}, dt={dt})")
        t_vec = torch.full((B,), t, dtype=torch.float32, device=dev)
    sm, dm = normalize_masks(op, dim_mask, step_mask, B, H, D, dev)
    # seed / offset are checked whenever given (also where unused: ode, or noise given), so a
    # call is accepted or refused the same way on every backend
    if seed is None and m != 0 and noise is None:
        seed = _draw_seed(generator)
    seed = 0 if seed is None else check_int(op, "seed", seed, 0, 2**63, "2**63")
    offset = check_int(op, "offset", offset, 0, 2**62, "2**62")
    name = resolve_backend(backend, dev, x.dtype)
    x, v, noise, std_c = prepare_contiguous(op, name, backend, x=x, v=v, noise=noise, std=std)
    with torch.no_grad():
        mean, x_next, logp = _flow_step_op(
            x.detach(), v.detach(), t_vec, dt, m, None if noise is None else noise.detach(),
            None if std_c is None else std_c.detach(), seed, offset, noise_level, sm, dm, name,
        )
    if m == 0:
        x_next = mean
        std_out = torch.zeros(B, 1, 1, dtype=torch.float32, device=dev)
    elif m == 1:
        _, _, s = sde_coefficients(t_vec, dt, float(noise_level))
        std_out = s.view(B, 1, 1)
    else:
        std_out = std
    return FlowStepResult(x_next, mean, std_out, logp)
