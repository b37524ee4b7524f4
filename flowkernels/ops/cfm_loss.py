"""Per-sample conditional flow-matching losses (SFT, ARFM, FPO) and the FPO ratio.

``ℓ[b, n] = masked mean over (h, d) of (v_pred − (ε − A))²`` for ``N`` pairs ``(τ, ε)`` per
chunk, fused in one pass that reads ``A`` once per observation; the backward to ``v_pred`` is
fused too. ``cfm_interpolate`` builds the model inputs ``x_τ = τ·ε + (1 − τ)·A``.

Layers: kernels (reference / Triton / C++ / CUDA), ``torch.library`` ops
``flowkernels::cfm_loss_fwd``, ``flowkernels::cfm_loss_bwd``, ``flowkernels::cfm_interpolate``,
the autograd.Functions, and the functional entry points.
"""

from __future__ import annotations

import torch

from flowkernels._backend import backend_module, resolve_backend
from flowkernels._checks import (
    as_float,
    check_range,
    check_same_dtype,
    check_tensor,
    normalize_masks,
    nvtx_range,
    prepare_contiguous,
)

__all__ = ["CFMInterpolateFunction", "CFMLossFunction", "cfm_interpolate", "cfm_loss", "fpo_ratio"]


def _stat(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flowkernels::cfm_loss_fwd", mutates_args=())
def _cfm_fwd_op(
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    with nvtx_range("flowkernels.cfm_loss.fwd"):
        return backend_module(backend).cfm_loss_fwd(actions, noise, v_pred, sm, dm, inv_wsum)


@_cfm_fwd_op.register_fake
def _(actions, noise, v_pred, sm, dm, inv_wsum, backend):
    return v_pred.new_empty(v_pred.shape[:2], dtype=_stat(v_pred.dtype))


@torch.library.custom_op("flowkernels::cfm_loss_bwd", mutates_args=())
def _cfm_bwd_op(
    grad_loss: torch.Tensor,
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    with nvtx_range("flowkernels.cfm_loss.bwd"):
        return backend_module(backend).cfm_loss_bwd(grad_loss, actions, noise, v_pred, sm, dm, inv_wsum)


@_cfm_bwd_op.register_fake
def _(grad_loss, actions, noise, v_pred, sm, dm, inv_wsum, backend):
    return torch.empty_like(v_pred)


@torch.library.custom_op("flowkernels::cfm_interpolate", mutates_args=())
def _interp_op(actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor, backend: str) -> torch.Tensor:
    with nvtx_range("flowkernels.cfm_interpolate"):
        return backend_module(backend).cfm_interpolate_fwd(actions, noise, tau)


@_interp_op.register_fake
def _(actions, noise, tau, backend):
    return torch.empty_like(noise)


class CFMLossFunction(torch.autograd.Function):
    """Per-sample CFM losses ``(B, N)`` with the fused backward to ``v_pred``."""

    @staticmethod
    def forward(ctx, actions, noise, v_pred, sm, dm, inv_wsum, backend):
        loss = _cfm_fwd_op(actions, noise, v_pred, sm, dm, inv_wsum, backend)
        ctx.save_for_backward(actions, noise, v_pred, sm, dm, inv_wsum)
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        actions, noise, v_pred, sm, dm, inv_wsum = ctx.saved_tensors
        grad_loss = grad_loss.to(_stat(v_pred.dtype)).contiguous()
        grad_v = _cfm_bwd_op(grad_loss, actions, noise, v_pred, sm, dm, inv_wsum, ctx.backend)
        return None, None, grad_v, None, None, None, None


class CFMInterpolateFunction(torch.autograd.Function):
    """``x_τ = τ·ε + (1 − τ)·A``; backward (plain torch, a few small reductions) to A, ε, τ."""

    @staticmethod
    def forward(ctx, actions, noise, tau, backend):
        ctx.save_for_backward(actions, noise, tau)
        return _interp_op(actions, noise, tau, backend)

    @staticmethod
    def backward(ctx, g):
        actions, noise, tau = ctx.saved_tensors
        acc = _stat(noise.dtype)
        gf, tf = g.to(acc), tau.to(acc)[..., None, None]
        grad_a = grad_n = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_a = ((1.0 - tf) * gf).sum(dim=1).to(actions.dtype)
        if ctx.needs_input_grad[1]:
            grad_n = (tf * gf).to(noise.dtype)
        if ctx.needs_input_grad[2]:
            grad_t = (gf * (noise.to(acc) - actions.to(acc)[:, None])).sum(dim=(2, 3)).to(tau.dtype)
        return grad_a, grad_n, grad_t, None


def _check_pairs(op: str, actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor | None) -> tuple[int, ...]:
    check_tensor(op, "actions", actions, (None, None, None), ("B", "H", "D"))
    B, H, D = actions.shape
    check_tensor(op, "noise", noise, (B, None, H, D), ("B", "N", "H", "D"), device=actions.device)
    N = noise.shape[1]
    check_same_dtype(op, "actions", actions, noise=noise)
    if tau is not None:
        check_tensor(op, "tau", tau, (B, N), ("B", "N"), device=actions.device)
        check_range(op, "tau", tau.detach(), 0.0, 1.0)
    return B, N, H, D


def cfm_loss(
    actions: torch.Tensor,
    noise: torch.Tensor,
    tau: torch.Tensor | None,
    v_pred: torch.Tensor,
    *,
    dim_mask: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample conditional flow-matching losses.

    ``ℓ[b, n] = Σ_{h,d} w·(v_pred − (ε − A))² / Σ_{h,d} w`` with ``w = step_mask[h]·dim_mask[d]``
    (an all-masked sample has loss 0).

    Args:
        actions: ``(B, H, D)`` action chunks ``A``.
        noise: ``(B, N, H, D)`` noise ``ε`` of the N pairs per chunk.
        tau: ``(B, N)`` times ``τ`` in ``[0, 1]`` of the pairs (the model saw ``x_τ``; the loss
            itself does not depend on ``τ`` beyond ``v_pred``; checked for shape and range when
            given, None skips the check).
        v_pred: ``(B, N, H, D)`` predicted velocities ``v(x_τ, τ)``.
        dim_mask: ``(D,)`` / ``(B, D)``; step_mask: ``(H,)`` / ``(B, H)``.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.

    Returns:
        ``(B, N)`` losses, float32 (float64 for float64 inputs), differentiable w.r.t. ``v_pred``.
    """
    op = "cfm_loss"
    B, N, H, D = _check_pairs(op, actions, noise, tau)
    check_tensor(op, "v_pred", v_pred, (B, N, H, D), ("B", "N", "H", "D"), device=actions.device)
    check_same_dtype(op, "actions", actions, v_pred=v_pred)
    sm, dm = normalize_masks(op, dim_mask, step_mask, B, H, D, actions.device)
    wsum = (sm.sum(dim=1) * dm.sum(dim=1)).expand(B)
    inv_wsum = torch.where(wsum > 0, 1.0 / wsum.clamp_min(1e-30), torch.zeros_like(wsum)).contiguous()
    name = resolve_backend(backend, actions.device, actions.dtype)
    actions, noise, v_pred = prepare_contiguous(op, name, backend, actions=actions, noise=noise, v_pred=v_pred)
    return CFMLossFunction.apply(actions.detach(), noise.detach(), v_pred, sm, dm, inv_wsum, name)


def cfm_interpolate(
    actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Model inputs ``x_τ = τ·ε + (1 − τ)·A`` for N pairs per chunk.

    Args:
        actions: ``(B, H, D)``; noise: ``(B, N, H, D)``; tau: ``(B, N)`` in ``[0, 1]``.
    Returns:
        ``(B, N, H, D)`` in ``noise``'s dtype; differentiable w.r.t. all three inputs.
    """
    op = "cfm_interpolate"
    _check_pairs(op, actions, noise, tau)
    tau32 = tau if tau.dtype == torch.float32 else tau.to(torch.float32)
    name = resolve_backend(backend, actions.device, actions.dtype)
    actions, noise, tau32 = prepare_contiguous(op, name, backend, actions=actions, noise=noise, tau=tau32)
    return CFMInterpolateFunction.apply(actions, noise, tau32, name)


def fpo_ratio(
    loss_old: torch.Tensor, loss_new: torch.Tensor, mode: str = "mean", clamp: float | None = 3.0
) -> torch.Tensor:
    """FPO's likelihood-free ratio from per-sample CFM losses (McAllister et al.).

    * ``"mean"``: ``ρ[b] = exp(clamp(mean_n ℓ_old − mean_n ℓ_new, ±c))`` → ``(B,)``.
    * ``"per_sample"``: ``ρ[b, n] = exp(clamp(ℓ_old − ℓ_new, ±c))`` → ``(B, N)``.

    Args:
        loss_old: ``(B, N)`` losses under the rollout weights (no gradient needed).
        loss_new: ``(B, N)`` losses under the current weights.
        clamp: ``c``, the bound on the log-ratio (None: no clamp).
    """
    op = "fpo_ratio"
    check_tensor(op, "loss_old", loss_old, (None, None), ("B", "N"))
    check_tensor(op, "loss_new", loss_new, tuple(loss_old.shape), ("B", "N"), device=loss_old.device)
    if clamp is not None:
        clamp = as_float(op, "clamp", clamp, "a float > 0 or None")
    if clamp is not None and not clamp > 0:  # also refuses NaN, which would make every ratio NaN
        raise ValueError(f"{op}: clamp must be > 0 or None, got {clamp}")
    if mode == "mean":
        if loss_old.shape[1] == 0:
            raise ValueError(f"{op}: mode 'mean' needs N >= 1 losses per sample, got shape {tuple(loss_old.shape)}")
        log_ratio = loss_old.detach().mean(dim=1) - loss_new.mean(dim=1)
    elif mode == "per_sample":
        log_ratio = loss_old.detach() - loss_new
    else:
        raise ValueError(f"{op}: mode must be 'mean' or 'per_sample', got {mode!r}")
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio)
