"""``chain_logprob``: log-likelihood of stored denoising chains under recomputed velocities.

Covers the Flow-Noise joint likelihood ``log N(x_0; 0, I) + Σ_k log N(x_{k+1}; μ_k, s_k²)``
and the Flow-SDE single transition at the drawn index ``k*`` (DESIGN §1). One program per
``(sample, term)`` reads each chain slice once; the backward is fused and closed-form
(``∂/∂v = g·w·(z/s)·∂μ/∂v``, ``∂/∂s = g·w·(z² − 1)/s``).

Layers: kernels (reference / Triton / C++ / CUDA), ``torch.library`` ops
``flowkernels::chain_logprob_fwd`` and ``flowkernels::chain_logprob_bwd``, the
:class:`ChainLogProbFunction` autograd.Function, and :func:`chain_logprob`.
"""

from __future__ import annotations

import torch

from flowkernels._backend import backend_module, resolve_backend
from flowkernels._checks import (
    check_noise_level,
    check_positive,
    check_range,
    check_same_dtype,
    check_tensor,
    normalize_masks,
    nvtx_range,
    prepare_contiguous,
    value_checks_enabled,
)
from flowkernels.ops.reference import MODES

__all__ = ["ChainLogProbFunction", "chain_logprob"]


def _stat(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flowkernels::chain_logprob_fwd", mutates_args=())
def _chain_fwd_op(
    chain: torch.Tensor,
    v: torch.Tensor,
    t_grid: torch.Tensor,
    mode: int,
    std: torch.Tensor | None,
    steps: torch.Tensor | None,
    include_initial: bool,
    noise_level: float,
    sm: torch.Tensor,
    dm: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    with nvtx_range("flowkernels.chain_logprob.fwd"):
        return backend_module(backend).chain_logprob_fwd(
            chain, v, t_grid, mode, std, steps, include_initial, noise_level, sm, dm
        )


@_chain_fwd_op.register_fake
def _(chain, v, t_grid, mode, std, steps, include_initial, noise_level, sm, dm, backend):
    return chain.new_empty((chain.shape[0], chain.shape[1]), dtype=_stat(chain.dtype))


@torch.library.custom_op("flowkernels::chain_logprob_bwd", mutates_args=())
def _chain_bwd_op(
    grad_terms: torch.Tensor,
    chain: torch.Tensor,
    v: torch.Tensor,
    t_grid: torch.Tensor,
    mode: int,
    std: torch.Tensor | None,
    steps: torch.Tensor | None,
    noise_level: float,
    sm: torch.Tensor,
    dm: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with nvtx_range("flowkernels.chain_logprob.bwd"):
        grad_v, grad_std = backend_module(backend).chain_logprob_bwd(
            grad_terms, chain, v, t_grid, mode, std, steps, noise_level, sm, dm
        )
    # custom ops return tensors only: an absent std gradient travels as an empty tensor
    return grad_v, grad_std if grad_std is not None else v.new_empty((0,))


@_chain_bwd_op.register_fake
def _(grad_terms, chain, v, t_grid, mode, std, steps, noise_level, sm, dm, backend):
    return torch.empty_like(v), (torch.empty_like(std) if std is not None else v.new_empty((0,)))


class ChainLogProbFunction(torch.autograd.Function):
    """Autograd wiring of the fused forward/backward; returns per-term log-probs ``(B, K+1)``.

    Inputs are already normalized to the kernel ABI (docs/kernels.md). Differentiable w.r.t.
    ``v`` and ``std``; the chain, times and masks are data.
    """

    @staticmethod
    def forward(ctx, chain, v, t_grid, mode, std, steps, include_initial, noise_level, sm, dm, backend):
        terms = _chain_fwd_op(chain, v, t_grid, mode, std, steps, include_initial, noise_level, sm, dm, backend)
        ctx.save_for_backward(chain, v, t_grid, std, steps, sm, dm)
        ctx.mode, ctx.noise_level, ctx.backend = mode, noise_level, backend
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        chain, v, t_grid, std, steps, sm, dm = ctx.saved_tensors
        grad_terms = grad_terms.to(_stat(chain.dtype)).contiguous()
        grad_v, grad_std = _chain_bwd_op(
            grad_terms, chain, v, t_grid, ctx.mode, std, steps, ctx.noise_level, sm, dm, ctx.backend
        )
        return (
            None,
            grad_v if ctx.needs_input_grad[1] else None,
            None,
            None,
            grad_std if (std is not None and ctx.needs_input_grad[4]) else None,
            None, None, None, None, None, None,
        )


def chain_logprob(
    chain: torch.Tensor,
    v: torch.Tensor,
    t_grid: torch.Tensor,
    mode: str,
    *,
    std: torch.Tensor | None = None,
    noise_level: float = 0.5,
    dim_mask: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
    include_initial: bool = True,
    reduce: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Log-prob of stored denoising chains under velocities recomputed by the current weights.

    Args:
        chain: ``(B, K+1, H, D)`` the stored states ``x_{t_0} = ε, …, x_{t_K}``.
        v: ``(B, K, H, D)`` velocities ``v(x_{t_k}, t_k)`` under the current weights; with
            ``steps`` also ``(B, 1, H, D)``, the velocity at step ``k*`` only.
        t_grid: ``(K+1,)`` decreasing times ``t_0 … t_K`` in ``[0, 1]`` (π0: ``1 − k/K``).
        mode: ``"noise"`` (Flow-Noise, needs ``std``) or ``"sde"`` (Flow-SDE, ``noise_level``).
        std: ``(B, K, H, D)`` per-step std ``> 0`` from the noise head (mode ``noise``).
        dim_mask: ``(D,)`` / ``(B, D)``; step_mask: ``(H,)`` / ``(B, H)``: masked elements.
        steps: ``(B,)`` int, the SDE/stochastic index ``k*`` per sample; only that transition
            counts (the others are deterministic ODE steps). None: every step counts.
        include_initial: add the ``log N(x_0; 0, I)`` term.
        reduce: ``"sum"`` → ``(B,)``; ``"mean"`` → ``(B,)`` divided by the number of terms
            (``K`` or 1 with ``steps``, plus 1 with the initial term); ``"none"`` →
            ``(B, K+1)`` with the initial term in column 0 (``(B, K)`` without it).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.

    Returns:
        Log-probs, float32 (float64 for float64 inputs), differentiable w.r.t. ``v`` and ``std``.
    """
    op = "chain_logprob"
    if mode not in ("sde", "noise"):
        raise ValueError(f"{op}: mode must be 'sde' or 'noise' (an 'ode' transition has no density), got {mode!r}")
    if reduce not in ("sum", "mean", "none"):
        raise ValueError(f"{op}: reduce must be 'sum', 'mean' or 'none', got {reduce!r}")
    m = MODES[mode]
    check_tensor(op, "chain", chain, (None, None, None, None), ("B", "K+1", "H", "D"))
    B, K1, H, D = chain.shape
    K = K1 - 1
    if K < 1:
        raise ValueError(f"{op}: chain must hold at least one transition (K+1 >= 2 states), got K+1={K1}")
    dev = chain.device
    if not isinstance(include_initial, bool):
        raise TypeError(f"{op}: include_initial must be a bool, got {type(include_initial).__name__}")
    if steps is not None:
        if not isinstance(v, torch.Tensor):
            check_tensor(op, "v", v, (B, 1, H, D), ("B", "1", "H", "D"), device=dev)
        check_tensor(op, "steps", steps, (B,), ("B",), dtypes=(torch.int64, torch.int32), device=dev)
        if v.dim() == 4 and v.shape[1] == 1 and K != 1:
            check_tensor(op, "v", v, (B, 1, H, D), ("B", "1", "H", "D"), device=dev)
        else:
            check_tensor(op, "v", v, (B, K, H, D), ("B", "K", "H", "D"), device=dev)
        if value_checks_enabled(dev) and bool(((steps < 0) | (steps >= K)).any()):
            raise ValueError(f"{op}: steps must lie in [0, K={K}), got {steps.tolist()}")
        steps = steps.to(torch.int64).contiguous()
    else:
        check_tensor(op, "v", v, (B, K, H, D), ("B", "K", "H", "D"), device=dev)
    check_same_dtype(op, "chain", chain, v=v, std=std)
    check_tensor(op, "t_grid", t_grid, (K1,), ("K+1",), dtypes=(torch.float32, torch.float64), device=dev)
    t_grid = t_grid.to(torch.float32).contiguous()
    check_range(op, "t_grid", t_grid, 0.0, 1.0)
    if value_checks_enabled(dev):
        dts = t_grid[:-1] - t_grid[1:]
        if bool((dts <= 0).any()):
            raise ValueError(f"{op}: t_grid must be strictly decreasing (every dt > 0), got {t_grid.tolist()}")
    if m == 2:
        if std is None:
            raise ValueError(f"{op}: mode 'noise' needs std of shape (B={B}, K={K}, H={H}, D={D})")
        check_tensor(op, "std", std, (B, K, H, D), ("B", "K", "H", "D"), device=dev)
        check_positive(op, "std", std.detach())
    elif std is not None:
        raise ValueError(f"{op}: std is only used by mode 'noise' (mode is 'sde')")
    noise_level = check_noise_level(op, noise_level)
    sm, dm = normalize_masks(op, dim_mask, step_mask, B, H, D, dev)
    name = resolve_backend(backend, dev, chain.dtype)
    chain, v, std = prepare_contiguous(op, name, backend, chain=chain, v=v, std=std)
    terms = ChainLogProbFunction.apply(
        chain.detach(), v, t_grid, m, std, steps, bool(include_initial), float(noise_level), sm, dm, name
    )
    if reduce == "none":
        return terms if include_initial else terms[:, 1:]
    total = terms.sum(dim=1)
    if reduce == "sum":
        return total
    n_terms = (K if steps is None else 1) + int(bool(include_initial))
    return total / n_terms
