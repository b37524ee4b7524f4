"""Readable plain-torch references of the fused flow ops.

These are the test oracle and the ``torch`` backend at once. They follow DESIGN §1 (docs/design.md):
``t = 1`` is noise, ``t = 0`` the action; ``x_t = t·ε + (1 − t)·A``; target ``u = ε − A``.

Every function here works on *normalized* arguments (the kernel ABI, see docs/kernels.md):

* ``sm``: step-mask weights, float32 ``(Bm, H)`` with ``Bm ∈ {1, B}``;
* ``dm``: dim-mask weights, float32 ``(Bm, D)``; the element weight is ``sm[b, h]·dm[b, d]``;
* ``t``: float32 ``(B,)``; ``mode``: 0 = ode, 1 = sde, 2 = noise.

``upcast=True`` computes in float64 (the oracle); otherwise in float32, the precision the
kernels accumulate in (float64 for float64 inputs). Outputs that mirror an input (means, next
states, gradients) are cast back to that input's dtype; log-probs and losses are float32
(float64 for float64 inputs and for the oracle).

Bytes moved (B·H·D = n elements of size e), the minimum a fused kernel needs:
  flow_step ode: read x, v; write mean                        -> 3·n·e
  flow_step sde/noise, noise given: read x, v, ε (, std); write mean, x_next -> 5·n·e (+n·e)
  chain_logprob: read chain (K+1 slices), v (K), std (K)      -> (2K+1)·n·e (+K·n·e)
  cfm_loss fwd: read A once per observation, ε, v (N each)    -> (2N+1)·n·e
  cfm_loss bwd: read A, ε, v; write dv                        -> (3N+1)·n·e
The unfused torch below materializes ~6-10 temporaries per op, each one a full read+write.
"""

from __future__ import annotations

import math

import torch

from flowkernels.random import philox_normal

MODE_ODE, MODE_SDE, MODE_NOISE = 0, 1, 2
MODES = {"ode": MODE_ODE, "sde": MODE_SDE, "noise": MODE_NOISE}
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _acc(upcast: bool | torch.dtype, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Accumulation dtype: float64 for the oracle and for float64 inputs, else float32.

    ``upcast`` may also name a dtype to compute in (tests use the inputs' own low precision as
    the "torch in low precision" baseline of the error rule).
    """
    if isinstance(upcast, torch.dtype):
        return upcast
    return torch.float64 if upcast or dtype == torch.float64 else torch.float32


def _stat_dtype(upcast: bool | torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Dtype of log-probs and losses: float32, float64 for float64 inputs or the oracle."""
    if isinstance(upcast, torch.dtype):
        return torch.float64 if upcast == torch.float64 else torch.float32
    return torch.float64 if upcast or dtype == torch.float64 else torch.float32


def element_weight(sm: torch.Tensor, dm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w[b, h, d] = sm[b, h]·dm[b, d]``: ``(Bm, H, D)``."""
    return sm.to(dtype)[:, :, None] * dm.to(dtype)[:, None, :]


def sde_coefficients(
    t: torch.Tensor, dt: torch.Tensor | float, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-SDE transition as ``mean = c_x·x + c_v·v``, ``std = s``.

    From DESIGN §1 with ``tn = t − dt``, ``Â0 = x − t·v``, ``Â1 = x + (1 − t)·v``:
    ``mean = (1 − tn)·Â0 + (tn − σ²·dt/(2t))·Â1``, ``σ = a·sqrt(t/(1 − t*))``
    (``t* = 1 − dt`` at ``t = 1``, else ``t``), ``s = σ·sqrt(dt)``. Hence
    ``c_x = 1 − σ²·dt/(2t)`` and ``c_v = −(1 − tn)·t + (tn − σ²·dt/(2t))·(1 − t)``.

    Args:
        t: ``(B,)`` times in ``(0, 1]``; dt: scalar or ``(B,)``; noise_level: ``a ≥ 0``.
    Returns:
        ``(c_x, c_v, s)``, each of ``t``'s shape and dtype.
    """
    dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
    tn = t - dt
    # 1 − t* is dt at t = 1, taken as dt itself: 1 − (1 − dt) would lose dt's digits (all of them
    # in float32 for dt < 2⁻²⁴, giving σ = inf)
    one_minus_t_star = torch.where(t == 1.0, dt, 1.0 - t)
    sigma = noise_level * torch.sqrt(t / one_minus_t_star)
    k = sigma * sigma * dt / (2.0 * t)
    c_x = 1.0 - k
    c_v = -(1.0 - tn) * t + (tn - k) * (1.0 - t)
    s = sigma * torch.sqrt(dt)
    return c_x, c_v, s


def flow_step_ref(
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
    upcast: bool | torch.dtype = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising transition from ``t`` to ``t − dt``.

    Args:
        x, v: ``(B, H, D)``; t: float32 ``(B,)``; noise: ``(B, H, D)`` or None (then drawn
        with :func:`philox_normal` from ``(seed, offset)``); std: ``(B, H, D)`` (mode noise).
    Returns:
        ``mean (B, H, D)``, ``x_next (B, H, D)`` (empty ``(0,)`` for ode: it equals mean),
        ``logp (B,)`` float32 — the masked sum of ``log N(x_next; mean, s²)``, where the
        deviation is taken from the *stored* ``x_next`` (rounded to x's dtype). Elements with
        ``s = 0`` (ode, or sde with noise_level 0) contribute 0.
    """
    acc = _acc(upcast, x.dtype)
    out = _stat_dtype(upcast, x.dtype)
    B, H, D = x.shape
    xf, vf = x.to(acc), v.to(acc)
    tf = t.to(acc)[:, None, None]
    if mode == MODE_ODE:
        mean = xf - dt * vf
        return mean.to(x.dtype), x.new_empty((0,)), torch.zeros(B, dtype=out, device=x.device)
    if mode == MODE_SDE:
        c_x, c_v, s = sde_coefficients(tf, dt, noise_level)
        mean = c_x * xf + c_v * vf
        s = s.expand(B, H, D)
    else:
        mean = xf - dt * vf
        s = std.to(acc)
    eps = noise.to(acc) if noise is not None else philox_normal(seed, offset, (B, H, D), x.device).to(acc)
    x_next = (mean + s * eps).to(x.dtype)
    w = element_weight(sm, dm, acc)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    z = (x_next.to(acc) - mean) / safe_s
    term = torch.where(s > 0, -torch.log(safe_s) - HALF_LOG_2PI - 0.5 * z * z, torch.zeros_like(s))
    logp = (w * term).sum(dim=(1, 2))
    return mean.to(x.dtype), x_next, logp.to(out)


def _chain_mean_std(
    chain: torch.Tensor,
    v: torch.Tensor,
    t_grid: torch.Tensor,
    mode: int,
    std: torch.Tensor | None,
    steps: torch.Tensor | None,
    noise_level: float,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step (mean, s, dmean/dv, x_next) of a stored chain, ``(B, K, H, D)`` each
    (``K = 1`` when ``steps`` selects one step per sample)."""
    B, K1 = chain.shape[:2]
    K = K1 - 1
    tg = t_grid.to(acc)
    if steps is None:
        idx = torch.arange(K, device=chain.device).expand(B, K)
        v_sel = v.to(acc)
        std_sel = std.to(acc) if std is not None else None
    else:
        idx = steps.long()[:, None]
        bi = torch.arange(B, device=chain.device)
        v_sel = (v[bi, steps.long()] if v.shape[1] == K else v[:, 0]).to(acc)[:, None]
        std_sel = std[bi, steps.long()].to(acc)[:, None] if std is not None else None
    bi = torch.arange(B, device=chain.device)[:, None]
    x_k = chain[bi, idx].to(acc)
    x_next = chain[bi, idx + 1].to(acc)
    t = tg[idx][..., None, None]
    dt = t - tg[idx + 1][..., None, None]
    if mode == MODE_SDE:
        c_x, c_v, s = sde_coefficients(t, dt, noise_level)
        mean = c_x * x_k + c_v * v_sel
        s = s.expand_as(mean)
        dmean_dv = c_v.expand_as(mean)
    else:
        mean = x_k - dt * v_sel
        s = std_sel
        dmean_dv = (-dt).expand_as(mean)
    return mean, s, dmean_dv, x_next


def chain_logprob_ref(
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
    upcast: bool | torch.dtype = False,
) -> torch.Tensor:
    """Per-term log-probs of stored chains, differentiable w.r.t. ``v`` and ``std``.

    Args:
        chain: ``(B, K+1, H, D)``; v: ``(B, K, H, D)`` (or ``(B, 1, H, D)`` with ``steps``:
        the velocity at step ``k*``); t_grid: float32 ``(K+1,)``; std: ``(B, K, H, D)`` for
        mode noise; steps: int64 ``(B,)`` or None.
    Returns:
        ``terms (B, K+1)`` float32: column 0 the initial ``log N(x_0; 0, I)`` (0 unless
        ``include_initial``), column ``k+1`` the transition ``x_k → x_{k+1}`` (with ``steps``
        only column ``k*+1`` is non-zero).
    """
    acc = _acc(upcast, chain.dtype)
    B, K1 = chain.shape[:2]
    w = element_weight(sm, dm, acc)
    if include_initial:
        x0 = chain[:, 0].to(acc)
        initial = (w * (-HALF_LOG_2PI - 0.5 * x0 * x0)).sum(dim=(1, 2))
    else:
        initial = torch.zeros(B, dtype=acc, device=chain.device)
    mean, s, _, x_next = _chain_mean_std(chain, v, t_grid, mode, std, steps, noise_level, acc)
    pos = s > 0
    safe_s = torch.where(pos, s, torch.ones_like(s))
    z = (x_next - mean) / safe_s
    elem = torch.where(pos, -torch.log(safe_s) - HALF_LOG_2PI - 0.5 * z * z, torch.zeros_like(z))
    step_terms = (w[:, None] * elem).sum(dim=(2, 3))
    if steps is not None:
        zeros = torch.zeros(B, K1 - 1, dtype=acc, device=chain.device)
        step_terms = zeros.scatter(1, steps.long()[:, None], step_terms)
    terms = torch.cat([initial[:, None], step_terms], dim=1)
    return terms.to(_stat_dtype(upcast, chain.dtype))


def chain_logprob_bwd_ref(
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
    upcast: bool | torch.dtype = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form gradients of ``(grad_terms · terms).sum()``.

    With ``z = (x_{k+1} − mean_k)/s_k``: ``∂/∂v = g·w·(z/s)·∂mean/∂v`` and
    ``∂/∂s = g·w·(z² − 1)/s``. Returns ``grad_v`` of ``v``'s shape and dtype and
    ``grad_std`` of ``std``'s (None without std).
    """
    acc = _acc(upcast, chain.dtype)
    B, K1 = chain.shape[:2]
    w = element_weight(sm, dm, acc)[:, None]
    mean, s, dmean_dv, x_next = _chain_mean_std(chain, v, t_grid, mode, std, steps, noise_level, acc)
    if steps is None:
        g = grad_terms.to(acc)[:, 1:]
    else:
        g = grad_terms.to(acc)[torch.arange(B), steps.long() + 1][:, None]
    g = g[..., None, None]
    pos = s > 0
    safe_s = torch.where(pos, s, torch.ones_like(s))
    z = (x_next - mean) / safe_s
    gv = torch.where(pos, g * w * z / safe_s * dmean_dv, torch.zeros_like(z))
    gs = torch.where(pos, g * w * (z * z - 1.0) / safe_s, torch.zeros_like(z)) if std is not None else None
    if steps is None:
        grad_v = gv
        grad_std = gs
    else:
        bi = torch.arange(B, device=chain.device)
        grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        if v.shape[1] == K1 - 1:
            grad_v[bi, steps.long()] = gv[:, 0]
        else:
            grad_v[:, 0] = gv[:, 0]
        grad_std = None
        if std is not None:
            grad_std = torch.zeros(std.shape, dtype=acc, device=std.device)
            grad_std[bi, steps.long()] = gs[:, 0]
    return grad_v.to(v.dtype), (grad_std.to(std.dtype) if grad_std is not None else None)


def cfm_loss_ref(
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
    upcast: bool | torch.dtype = False,
) -> torch.Tensor:
    """Per-sample CFM losses ``(B, N)`` float32.

    ``ℓ[b, n] = inv_wsum[b]·Σ_{h,d} w[b,h,d]·(v[b,n,h,d] − (ε[b,n,h,d] − A[b,h,d]))²`` with
    ``inv_wsum[b] = 1/Σ_{h,d} w[b,h,d]`` (the masked mean; 0 for an all-masked sample).
    """
    acc = _acc(upcast, v_pred.dtype)
    w = element_weight(sm, dm, acc)[:, None]
    diff = v_pred.to(acc) - (noise.to(acc) - actions.to(acc)[:, None])
    loss = (w * diff * diff).sum(dim=(2, 3)) * inv_wsum.to(acc)[:, None]
    return loss.to(_stat_dtype(upcast, v_pred.dtype))


def cfm_loss_bwd_ref(
    grad_loss: torch.Tensor,
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
    upcast: bool | torch.dtype = False,
) -> torch.Tensor:
    """``∂/∂v = 2·g[b,n]·inv_wsum[b]·w·(v − ε + A)``, of ``v_pred``'s shape and dtype."""
    acc = _acc(upcast, v_pred.dtype)
    w = element_weight(sm, dm, acc)[:, None]
    diff = v_pred.to(acc) - (noise.to(acc) - actions.to(acc)[:, None])
    scale = 2.0 * grad_loss.to(acc) * inv_wsum.to(acc)[:, None]
    return (scale[..., None, None] * w * diff).to(v_pred.dtype)


def cfm_interpolate_ref(
    actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor, upcast: bool | torch.dtype = False
) -> torch.Tensor:
    """``x_τ = τ·ε + (1 − τ)·A``: ``(B, N, H, D)`` in ``noise``'s dtype."""
    acc = _acc(upcast, noise.dtype)
    tf = tau.to(acc)[..., None, None]
    return (tf * noise.to(acc) + (1.0 - tf) * actions.to(acc)[:, None]).to(noise.dtype)
