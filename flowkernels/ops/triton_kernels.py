"""Triton kernels of the fused flow ops (the ABI of docs/kernels.md).

Every launcher here has exactly the signature of the raw kernel function it implements and
the math of its ``*_ref`` twin in :mod:`flowkernels.ops.reference`:

* :func:`flow_step_fwd` — one denoising transition (ode / sde / noise) with its log-prob;
* :func:`chain_logprob_fwd` / :func:`chain_logprob_bwd` — per-term log-probs of stored chains
  and their closed-form gradients;
* :func:`cfm_loss_fwd` / :func:`cfm_loss_bwd` — the masked CFM loss and its gradient;
* :func:`cfm_interpolate_fwd` — ``x_τ = τ·ε + (1 − τ)·A``.

Floating inputs are float32, bfloat16 or float16 (float64 is not supported by these kernels:
Triton passes Python float scalars such as ``dt`` as float32, so a float64 path could not
keep float64 accuracy; the launchers raise ``TypeError`` for it). Everything is loaded,
upcast to float32, computed, and stored in the ABI's output dtype.

Launchers validate their inputs cheaply (shapes, dtypes, contiguity, devices, Python scalar
ranges) without reading tensor values, so they never synchronize with the device. Index
values held in tensors (``steps``) are not range-checked on the host; the kernels clamp an
out-of-range step to a safe address and write zeros for it instead of reading out of bounds.

All ops are memory-bound: the kernels read each input element once, keep per-element work to
a few FMAs, and hoist every per-sample / per-step quantity (SDE coefficients, ``1/s``,
``log s``, gradient scales) into scalars computed once per program.
"""

from __future__ import annotations

import math
import operator
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "SUPPORTED_DTYPES",
    "cfm_interpolate_fwd",
    "cfm_loss_bwd",
    "cfm_loss_fwd",
    "chain_logprob_bwd",
    "chain_logprob_fwd",
    "flow_step_fwd",
]

#: Floating dtypes the Triton kernels accept (float64 inputs raise ``TypeError``).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# Whether the kernels below were defined under the Triton interpreter (CPU tensors) or are
# compiled for a GPU. Triton decides this when ``@triton.jit`` runs, i.e. at import time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Module constants for the kernels. Keep a tensor as the left operand of any arithmetic with
# them: ``constexpr <op> tensor`` does not promote to a tensor in Triton.
_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))
_TWO_PI = tl.constexpr(2.0 * math.pi)
_TWO_POW_M24 = tl.constexpr(2.0**-24)

# The interpreter converts float32 -> bfloat16 by truncation, while compiled Triton rounds to
# nearest even (as torch does). Under the interpreter the kernels round explicitly first, so
# stored bf16 values (and the log-probs computed from the stored x_next) match the GPU and
# the reference. Compiled kernels skip this (the branch is removed at compile time).
_EMULATE_BF16_RNE = tl.constexpr(_INTERPRET)

_MODE_ODE, _MODE_SDE, _MODE_NOISE = 0, 1, 2
_MASK32 = 0xFFFFFFFF

# Largest block of elements one program handles per loop iteration. 2048 lanes with 8 warps
# gives each thread 8 consecutive elements: one 16-byte vector load per bf16/fp16 tensor
# (two for fp32), and a whole (H=50, D=32) sample in a single iteration, so all loads of a
# program are in flight at once instead of being serialized over loop trips.
_MAX_BLOCK = 2048


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _philox_normal(c_lo, c_hi, k0, k1):
    """Philox4x32-10 on counters ``(c_lo, c_hi, 0, 0)`` with key ``(k0, k1)`` (all uint32),
    then Box-Muller on outputs 0 and 1: a float32 standard normal per lane.

    Mirrors ``flowkernels.random.philox_normal`` bit for bit up to the float32 rounding of
    ``log``/``cos``/``sqrt``. The 32x32->64 multiplies are written as uint64 products of
    zero-extended operands (LLVM's NVPTX backend turns that pattern into one mul.wide.u32);
    keys are advanced in uint64 and truncated. Doing the wrapping arithmetic in 64 bits keeps
    Triton's integer-overflow sanitizer (debug mode) quiet on the intended uint32 wrap-around.
    """
    c0 = c_lo
    c1 = c_hi
    c2 = tl.zeros_like(c_lo)
    c3 = tl.zeros_like(c_lo)
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p1 = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (p1 >> 32).to(tl.uint32) ^ c1 ^ k0
        c1 = p1.to(tl.uint32)
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c3 = p0.to(tl.uint32)
        k0 = (k0.to(tl.uint64) + 0x9E3779B9).to(tl.uint32)
        k1 = (k1.to(tl.uint64) + 0xBB67AE85).to(tl.uint32)
    # u0 in (0, 1): never 0, so log(u0) is finite; u1 in [0, 1).
    u0 = ((c0 >> 9) * 2 + 1).to(tl.float32) * _TWO_POW_M24
    u1 = (c1 >> 8).to(tl.float32) * _TWO_POW_M24
    return tl.sqrt_rn(-2.0 * tl.log(u0)) * tl.cos(u1 * _TWO_PI)


@triton.jit
def _cast_out(y, dtype: tl.constexpr):
    """Round float32 ``y`` to the storage dtype (round-to-nearest-even in every mode)."""
    if _EMULATE_BF16_RNE:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(dtype)


@triton.jit
def _sde_coefficients(t, dt, noise_level):
    """Flow-SDE transition scalars ``(c_x, c_v, s)`` for time ``t`` and step ``dt`` (fp32)."""
    tn = t - dt
    one_minus_t_star = tl.where(t == 1.0, dt, 1.0 - t)  # 1 − (1 − dt) = dt, exactly
    sigma = noise_level * tl.sqrt_rn(t / one_minus_t_star)
    k = sigma * sigma * dt / (2.0 * t)
    c_x = 1.0 - k
    c_v = -(1.0 - tn) * t + (tn - k) * (1.0 - t)
    s = sigma * tl.sqrt_rn(dt)
    return c_x, c_v, s


@triton.jit
def _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, mask):
    """``w = sm[b, h]·dm[b, d]`` for linear in-sample offsets ``offs = h·D + d``; the mask rows
    are tiny and stay in L1/L2, so these gathers cost no DRAM traffic."""
    h = offs // D
    d = offs - h * D
    w_s = tl.load(sm_ptr + sm_row + h, mask=mask, other=0.0)
    w_d = tl.load(dm_ptr + dm_row + d, mask=mask, other=0.0)
    return w_s * w_d


# ----------------------------------------------------------------------------------------------
# flow_step
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _flow_step_kernel(
    x_ptr,
    v_ptr,
    t_ptr,
    noise_ptr,
    std_ptr,
    mean_ptr,
    xnext_ptr,
    logp_ptr,
    sm_ptr,
    dm_ptr,
    dt,
    noise_level,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HD,
    D,
    sm_bstride,
    dm_bstride,
    MODE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per sample b; the log-prob is reduced inside the program (deterministic).
    b = tl.program_id(0).to(tl.int64)
    base = b * HD
    sm_row = b * sm_bstride
    dm_row = b * dm_bstride
    lanes = tl.arange(0, BLOCK)

    if MODE == 0:
        for start in range(0, HD, BLOCK):
            offs = start + lanes
            m = offs < HD
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            mean = x - dt * v
            tl.store(mean_ptr + base + offs, _cast_out(mean, mean_ptr.dtype.element_ty), mask=m)
        tl.store(logp_ptr + b, 0.0)
    else:
        if MODE == 1:
            t = tl.load(t_ptr + b)
            c_x, c_v, s = _sde_coefficients(t, dt, noise_level)
            s_pos = s > 0.0
            s_safe = tl.where(s_pos, s, 1.0)
            inv_s = 1.0 / s_safe
            log_norm = -tl.log(s_safe) - _HALF_LOG_2PI
        if not HAS_NOISE:
            # Philox key and the 64-bit counter base of this sample: c = offset + b·HD + j.
            k0 = seed_lo.to(tl.uint32, bitcast=True)
            k1 = seed_hi.to(tl.uint32, bitcast=True)
            off = (off_hi.to(tl.uint32, bitcast=True).to(tl.int64) << 32) | off_lo.to(tl.uint32, bitcast=True).to(
                tl.int64
            )
            cbase = off + base
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, HD, BLOCK):
            offs = start + lanes
            m = offs < HD
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_NOISE:
                eps = tl.load(noise_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            else:
                c = cbase + offs
                eps = _philox_normal(c.to(tl.uint32), (c >> 32).to(tl.uint32), k0, k1)
            if MODE == 1:
                mean = c_x * x + c_v * v
                x_next = mean + s * eps
                xq = _cast_out(x_next, xnext_ptr.dtype.element_ty)
                # z from the stored (rounded) x_next, as chain_logprob recomputes it.
                z = (xq.to(tl.float32) - mean) * inv_s
                elem = tl.where(s_pos, log_norm - 0.5 * z * z, 0.0)
            else:
                sd = tl.load(std_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
                mean = x - dt * v
                x_next = mean + sd * eps
                xq = _cast_out(x_next, xnext_ptr.dtype.element_ty)
                pos = sd > 0.0
                sd_safe = tl.where(pos, sd, 1.0)
                z = (xq.to(tl.float32) - mean) / sd_safe
                elem = tl.where(pos, -tl.log(sd_safe) - _HALF_LOG_2PI - 0.5 * z * z, 0.0)
            tl.store(mean_ptr + base + offs, _cast_out(mean, mean_ptr.dtype.element_ty), mask=m)
            tl.store(xnext_ptr + base + offs, xq, mask=m)
            w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
            acc += tl.where(m, w * elem, 0.0)
        tl.store(logp_ptr + b, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------
# chain_logprob
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chain_fwd_kernel(
    chain_ptr,
    v_ptr,
    tg_ptr,
    std_ptr,
    steps_ptr,
    terms_ptr,
    sm_ptr,
    dm_ptr,
    noise_level,
    K,
    HD,
    D,
    sm_bstride,
    dm_bstride,
    V_STEPS,
    MODE: tl.constexpr,
    HAS_STEPS: tl.constexpr,
    INCLUDE_INITIAL: tl.constexpr,
    V_ONE_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (B, K+1) without steps, (B, 2) with steps: column 0 is the initial term, column 1+
    # a transition (with steps, the single selected one). Each program reduces over H·D.
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    K1 = K + 1
    sm_row = b * sm_bstride
    dm_row = b * dm_bstride
    lanes = tl.arange(0, BLOCK)

    if j == 0:
        if INCLUDE_INITIAL:
            base0 = b * K1 * HD
            acc0 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, HD, BLOCK):
                offs = start + lanes
                m = offs < HD
                x0 = tl.load(chain_ptr + base0 + offs, mask=m, other=0.0).to(tl.float32)
                w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
                acc0 += tl.where(m, w * (-0.5 * x0 * x0 - _HALF_LOG_2PI), 0.0)
            tl.store(terms_ptr + b * K1, tl.sum(acc0, axis=0))
        else:
            tl.store(terms_ptr + b * K1, 0.0)
    else:
        if HAS_STEPS:
            k = tl.load(steps_ptr + b).to(tl.int32)
            valid = (k >= 0) & (k < K)
            k = tl.where(valid, k, 0)
            if V_ONE_STEP:
                vk = 0
            else:
                vk = k
        else:
            k = j - 1
            vk = k
        t = tl.load(tg_ptr + k)
        dt = t - tl.load(tg_ptr + k + 1)
        x_base = (b * K1 + k) * HD
        v_base = (b * V_STEPS + vk) * HD
        s_base = (b * K + k) * HD
        if MODE == 1:
            c_x, c_v, s = _sde_coefficients(t, dt, noise_level)
            s_pos = s > 0.0
            s_safe = tl.where(s_pos, s, 1.0)
            inv_s = 1.0 / s_safe
            log_norm = -tl.log(s_safe) - _HALF_LOG_2PI
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, HD, BLOCK):
            offs = start + lanes
            m = offs < HD
            x = tl.load(chain_ptr + x_base + offs, mask=m, other=0.0).to(tl.float32)
            xn = tl.load(chain_ptr + x_base + HD + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + v_base + offs, mask=m, other=0.0).to(tl.float32)
            if MODE == 1:
                z = (xn - (c_x * x + c_v * v)) * inv_s
                elem = tl.where(s_pos, log_norm - 0.5 * z * z, 0.0)
            else:
                sd = tl.load(std_ptr + s_base + offs, mask=m, other=0.0).to(tl.float32)
                pos = sd > 0.0
                sd_safe = tl.where(pos, sd, 1.0)
                z = (xn - (x - dt * v)) / sd_safe
                elem = tl.where(pos, -tl.log(sd_safe) - _HALF_LOG_2PI - 0.5 * z * z, 0.0)
            w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
            acc += tl.where(m, w * elem, 0.0)
        total = tl.sum(acc, axis=0)
        if HAS_STEPS:
            tl.store(terms_ptr + b * K1 + k + 1, total, mask=valid)
        else:
            tl.store(terms_ptr + b * K1 + k + 1, total)


@triton.jit
def _chain_bwd_kernel(
    gterms_ptr,
    chain_ptr,
    v_ptr,
    tg_ptr,
    std_ptr,
    steps_ptr,
    gv_ptr,
    gstd_ptr,
    sm_ptr,
    dm_ptr,
    noise_level,
    K,
    HD,
    D,
    sm_bstride,
    dm_bstride,
    V_STEPS,
    MODE: tl.constexpr,
    HAS_STEPS: tl.constexpr,
    V_ONE_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (B, K) without steps, (B, 1) with steps; elementwise over H·D.
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    K1 = K + 1
    sm_row = b * sm_bstride
    dm_row = b * dm_bstride
    lanes = tl.arange(0, BLOCK)

    if HAS_STEPS:
        k = tl.load(steps_ptr + b).to(tl.int32)
        valid = (k >= 0) & (k < K)
        k = tl.where(valid, k, 0)
        if V_ONE_STEP:
            vk = 0
        else:
            vk = k
    else:
        k = j
        vk = k
    g = tl.load(gterms_ptr + b * K1 + k + 1)
    if HAS_STEPS:
        # An invalid step contributes nothing (grad outputs are pre-zeroed or written as 0).
        g = tl.where(valid, g, 0.0)
    t = tl.load(tg_ptr + k)
    dt = t - tl.load(tg_ptr + k + 1)
    x_base = (b * K1 + k) * HD
    v_base = (b * V_STEPS + vk) * HD
    s_base = (b * K + k) * HD
    if MODE == 1:
        c_x, c_v, s = _sde_coefficients(t, dt, noise_level)
        s_pos = s > 0.0
        inv_s = 1.0 / tl.where(s_pos, s, 1.0)
        # d/dv = g·w·(z/s)·c_v with z = (x_next − mean)/s: fold g·c_v/s into one scalar.
        gscale = tl.where(s_pos, g * inv_s * c_v, 0.0)
    for start in range(0, HD, BLOCK):
        offs = start + lanes
        m = offs < HD
        x = tl.load(chain_ptr + x_base + offs, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(chain_ptr + x_base + HD + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + v_base + offs, mask=m, other=0.0).to(tl.float32)
        w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
        if MODE == 1:
            z = (xn - (c_x * x + c_v * v)) * inv_s
            gv = (gscale * w) * z
        else:
            sd = tl.load(std_ptr + s_base + offs, mask=m, other=0.0).to(tl.float32)
            pos = sd > 0.0
            inv_sd = 1.0 / tl.where(pos, sd, 1.0)
            z = (xn - (x - dt * v)) * inv_sd
            gw = g * w
            gv = tl.where(pos, gw * z * inv_sd * (-dt), 0.0)
            gs = tl.where(pos, gw * (z * z - 1.0) * inv_sd, 0.0)
            tl.store(gstd_ptr + s_base + offs, _cast_out(gs, gstd_ptr.dtype.element_ty), mask=m)
        tl.store(gv_ptr + v_base + offs, _cast_out(gv, gv_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# cfm_loss / cfm_interpolate
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cfm_fwd_kernel(
    a_ptr,
    eps_ptr,
    v_ptr,
    sm_ptr,
    dm_ptr,
    inv_ptr,
    loss_ptr,
    N,
    HD,
    D,
    sm_bstride,
    dm_bstride,
    BLOCK: tl.constexpr,
):
    # One program per (b, n), flattened so that the N programs sharing A[b] run back to back
    # and A[b] is served from L2 after its first read.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    a_base = b * HD
    e_base = pid * HD
    sm_row = b * sm_bstride
    dm_row = b * dm_bstride
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HD, BLOCK):
        offs = start + lanes
        m = offs < HD
        a = tl.load(a_ptr + a_base + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + e_base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + e_base + offs, mask=m, other=0.0).to(tl.float32)
        diff = v - (e - a)
        w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
        acc += w * diff * diff
    tl.store(loss_ptr + pid, tl.sum(acc, axis=0) * tl.load(inv_ptr + b))


@triton.jit
def _cfm_bwd_kernel(
    g_ptr,
    a_ptr,
    eps_ptr,
    v_ptr,
    sm_ptr,
    dm_ptr,
    inv_ptr,
    gv_ptr,
    N,
    HD,
    D,
    sm_bstride,
    dm_bstride,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    a_base = b * HD
    e_base = pid * HD
    sm_row = b * sm_bstride
    dm_row = b * dm_bstride
    scale = 2.0 * tl.load(g_ptr + pid) * tl.load(inv_ptr + b)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, HD, BLOCK):
        offs = start + lanes
        m = offs < HD
        a = tl.load(a_ptr + a_base + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + e_base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + e_base + offs, mask=m, other=0.0).to(tl.float32)
        w = _element_weight(sm_ptr, dm_ptr, sm_row, dm_row, offs, D, m)
        gv = (scale * w) * (v - (e - a))
        tl.store(gv_ptr + e_base + offs, _cast_out(gv, gv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cfm_interp_kernel(
    a_ptr,
    eps_ptr,
    tau_ptr,
    out_ptr,
    N,
    HD,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    a_base = b * HD
    e_base = pid * HD
    tau = tl.load(tau_ptr + pid)
    one_m_tau = 1.0 - tau
    lanes = tl.arange(0, BLOCK)
    for start in range(0, HD, BLOCK):
        offs = start + lanes
        m = offs < HD
        a = tl.load(a_ptr + a_base + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + e_base + offs, mask=m, other=0.0).to(tl.float32)
        out = tau * e + one_m_tau * a
        tl.store(out_ptr + e_base + offs, _cast_out(out, out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Host-side validation and launch configuration
# ----------------------------------------------------------------------------------------------


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float(name: str, t: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous tensor of a supported floating dtype (``dtype`` if given)."""
    t = _require_tensor(name, t)
    if dtype is not None:
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    elif t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported by the Triton kernels (expected float32, bfloat16 or float16)"
        )
    return t


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], desc: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {desc} = {tuple(expected)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape {desc}")


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    if not _INTERPRET and device.type == "cpu":
        raise ValueError(
            f"Triton kernels need GPU tensors (CPU tensors run only under TRITON_INTERPRET=1), got tensors on {device}"
        )
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def _check_masks(sm: object, dm: object, B: int, H: int, D: int) -> tuple[int, int]:
    """Validate normalized masks; return their batch strides (0 when broadcast, Bm == 1)."""
    sm = _check_float("sm", sm, torch.float32)
    dm = _check_float("dm", dm, torch.float32)
    if sm.dim() != 2 or sm.shape[0] not in (1, B) or sm.shape[1] != H:
        raise ValueError(f"sm: expected shape (Bm, H) with Bm in {{1, {B}}}, H = {H}, got {tuple(sm.shape)}")
    if dm.dim() != 2 or dm.shape[0] not in (1, B) or dm.shape[1] != D:
        raise ValueError(f"dm: expected shape (Bm, D) with Bm in {{1, {B}}}, D = {D}, got {tuple(dm.shape)}")
    if not sm.is_contiguous():
        raise ValueError("sm: expected a contiguous tensor of shape (Bm, H)")
    if not dm.is_contiguous():
        raise ValueError("dm: expected a contiguous tensor of shape (Bm, D)")
    sm_bstride = H if (sm.shape[0] == B and B > 1) else 0
    dm_bstride = D if (dm.shape[0] == B and B > 1) else 0
    return sm_bstride, dm_bstride


def _check_same_dtype(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def _check_int(name: str, value: object, lo: int, hi: int, hi_text: str | None = None) -> int:
    # Tensors are refused: reading a device scalar would synchronize with the device.
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if not (lo <= value < hi):
        raise ValueError(f"{name}: expected a value in [{lo}, {hi_text or hi}), got {value}")
    return value


def _check_real(name: str, value: object, nonnegative: bool = False) -> float:
    # Tensors are refused: reading a device scalar would synchronize with the device.
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    try:
        value = float(value)  # int, float, numpy scalars
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}") from None
    if not math.isfinite(value) or (nonnegative and value < 0.0):
        bound = "a finite value >= 0" if nonnegative else "a finite value"
        raise ValueError(f"{name}: expected {bound}, got {value}")
    return value


def _check_mode(value: object, allowed: tuple[int, ...]) -> int:
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"mode: expected a Python int, got {type(value).__name__}")
    try:
        mode = operator.index(value)
    except TypeError:
        raise TypeError(f"mode: expected an int, got {type(value).__name__}") from None
    if mode not in allowed:
        raise ValueError(f"mode: expected one of {allowed} (0 = ode, 1 = sde, 2 = noise), got {mode}")
    return mode


def _as_i32_bits(u32: int) -> int:
    """A uint32 value as the int32 with the same bits, so every launch passes an int32
    argument (one compiled variant, no value-dependent specialization of the argument type)."""
    return u32 - (1 << 32) if u32 >= (1 << 31) else u32


def _launch_config(n: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``n`` elements: about 8 elements per thread."""
    block = max(16, min(triton.next_power_of_2(max(n, 1)), _MAX_BLOCK))
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


# ----------------------------------------------------------------------------------------------
# Launchers (the kernel ABI)
# ----------------------------------------------------------------------------------------------


def flow_step_fwd(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising transition ``t → t − dt``.

    Args:
        x, v: ``(B, H, D)`` in the dtype; t: float32 ``(B,)``; dt: step; mode: 0 ode, 1 sde,
        2 noise; noise: ``(B, H, D)`` or None (drawn in-kernel from ``(seed, offset)``,
        ``0 <= seed < 2**63``, ``0 <= offset < 2**62``); std: ``(B, H, D)`` for mode 2, else
        None; noise_level: ``a >= 0``; sm: float32 ``(Bm, H)``; dm: float32 ``(Bm, D)``.

    Returns:
        ``mean (B, H, D)`` in the dtype; ``x_next (B, H, D)`` in the dtype (an empty ``(0,)``
        tensor for ode); ``logp (B,)`` float32 (zeros for ode).
    """
    mode = _check_mode(mode, (_MODE_ODE, _MODE_SDE, _MODE_NOISE))
    x = _check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (B, H, D), got {tuple(x.shape)}")
    B, H, D = x.shape
    _check_shape("x", x, (B, H, D), "(B, H, D)")
    v = _require_tensor("v", v)
    _check_same_dtype("x", x, v=v)
    _check_shape("v", v, (B, H, D), "(B, H, D)")
    t = _check_float("t", t, torch.float32)
    _check_shape("t", t, (B,), "(B,)")
    if noise is not None:
        noise = _require_tensor("noise", noise)
        _check_same_dtype("x", x, noise=noise)
        _check_shape("noise", noise, (B, H, D), "(B, H, D)")
    if mode == _MODE_NOISE:
        if std is None:
            raise ValueError("std: expected a tensor of shape (B, H, D) for mode 2 (noise), got None")
        std = _require_tensor("std", std)
        _check_same_dtype("x", x, std=std)
        _check_shape("std", std, (B, H, D), "(B, H, D)")
    elif std is not None:
        raise ValueError(f"std: expected None for mode {mode} (std is used by mode 2 only)")
    sm_bs, dm_bs = _check_masks(sm, dm, B, H, D)
    _check_device(x.device, v=v, t=t, noise=noise, std=std, sm=sm, dm=dm)
    dt = _check_real("dt", dt)
    noise_level = _check_real("noise_level", noise_level, nonnegative=True)
    seed = _check_int("seed", seed, 0, 2**63, "2**63")
    offset = _check_int("offset", offset, 0, 2**62, "2**62")

    mean = torch.empty_like(x)
    x_next = x.new_empty((0,)) if mode == _MODE_ODE else torch.empty_like(x)
    logp = torch.empty((B,), dtype=torch.float32, device=x.device)
    if B == 0:
        return mean, x_next, logp
    HD = H * D
    block, num_warps = _launch_config(HD)
    _flow_step_kernel[(B,)](
        x,
        v,
        t,
        noise if noise is not None else x,
        std if std is not None else x,
        mean,
        x_next if mode != _MODE_ODE else mean,
        logp,
        sm,
        dm,
        dt,
        noise_level,
        _as_i32_bits(seed & _MASK32),
        _as_i32_bits(seed >> 32),
        _as_i32_bits(offset & _MASK32),
        _as_i32_bits(offset >> 32),
        HD,
        D,
        sm_bs,
        dm_bs,
        MODE=mode,
        HAS_NOISE=noise is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return mean, x_next, logp


def _check_chain_args(
    chain: object,
    v: object,
    t_grid: object,
    mode: object,
    std: object,
    steps: object,
    noise_level: object,
    sm: object,
    dm: object,
) -> tuple[int, int, int, int, int, bool, int, int, float]:
    """Shared validation of the chain_logprob arguments.

    Returns ``(mode, B, K, H, D, v_one_step, sm_bstride, dm_bstride, noise_level)``.
    """
    mode = _check_mode(mode, (_MODE_SDE, _MODE_NOISE))
    chain = _check_float("chain", chain)
    if chain.dim() != 4 or chain.shape[1] < 1:
        raise ValueError(f"chain: expected shape (B, K+1, H, D) with K >= 0, got {tuple(chain.shape)}")
    B, K1, H, D = chain.shape
    K = K1 - 1
    _check_shape("chain", chain, (B, K1, H, D), "(B, K+1, H, D)")
    v = _require_tensor("v", v)
    _check_same_dtype("chain", chain, v=v)
    if steps is not None:
        steps = _require_tensor("steps", steps)
        if steps.dtype != torch.int64:
            raise TypeError(f"steps: expected dtype torch.int64, got {steps.dtype}")
        _check_shape("steps", steps, (B,), "(B,)")
        if v.dim() == 4 and v.shape[1] == 1 and K != 1:
            _check_shape("v", v, (B, 1, H, D), "(B, 1, H, D)")
            v_one_step = True
        else:
            _check_shape("v", v, (B, K, H, D), "(B, K, H, D) or (B, 1, H, D)")
            v_one_step = False
    else:
        _check_shape("v", v, (B, K, H, D), "(B, K, H, D)")
        v_one_step = False
    t_grid = _check_float("t_grid", t_grid, torch.float32)
    _check_shape("t_grid", t_grid, (K1,), "(K+1,)")
    if mode == _MODE_NOISE:
        if std is None:
            raise ValueError("std: expected a tensor of shape (B, K, H, D) for mode 2 (noise), got None")
        std = _require_tensor("std", std)
        _check_same_dtype("chain", chain, std=std)
        _check_shape("std", std, (B, K, H, D), "(B, K, H, D)")
    elif std is not None:
        raise ValueError("std: expected None for mode 1 (std is used by mode 2 only)")
    sm_bs, dm_bs = _check_masks(sm, dm, B, H, D)
    _check_device(chain.device, v=v, t_grid=t_grid, std=std, steps=steps, sm=sm, dm=dm)
    noise_level = _check_real("noise_level", noise_level, nonnegative=True)
    return mode, B, K, H, D, v_one_step, sm_bs, dm_bs, noise_level


def chain_logprob_fwd(
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
) -> torch.Tensor:
    """Per-term log-probs of stored denoising chains.

    Args:
        chain: ``(B, K+1, H, D)``; v: ``(B, K, H, D)``, or ``(B, 1, H, D)`` with ``steps``
        (the velocity at step ``steps[b]``); t_grid: float32 ``(K+1,)``; mode: 1 sde or
        2 noise; std: ``(B, K, H, D)`` for mode 2, else None; steps: int64 ``(B,)`` with
        ``0 <= steps[b] < K``, or None; include_initial: add ``log N(x_0; 0, I)`` in column 0;
        noise_level: ``a >= 0``; sm: float32 ``(Bm, H)``; dm: float32 ``(Bm, D)``.

    Returns:
        ``terms (B, K+1)`` float32: column 0 the initial term (0 unless ``include_initial``),
        column ``k+1`` the transition ``x_k → x_{k+1}`` (with ``steps`` only column
        ``steps[b]+1`` is non-zero).
    """
    mode, B, K, H, D, v_one_step, sm_bs, dm_bs, noise_level = _check_chain_args(
        chain, v, t_grid, mode, std, steps, noise_level, sm, dm
    )
    has_steps = steps is not None
    alloc = torch.zeros if has_steps else torch.empty
    terms = alloc((B, K + 1), dtype=torch.float32, device=chain.device)
    if B == 0:
        return terms
    if has_steps and K == 0:
        # No transition exists; only the initial column can be non-zero.
        has_steps = False
    HD = H * D
    block, num_warps = _launch_config(HD)
    grid = (B, 2 if has_steps else K + 1)
    _chain_fwd_kernel[grid](
        chain,
        v,
        t_grid,
        std if std is not None else chain,
        steps if steps is not None else t_grid,
        terms,
        sm,
        dm,
        noise_level,
        K,
        HD,
        D,
        sm_bs,
        dm_bs,
        v.shape[1],
        MODE=mode,
        HAS_STEPS=has_steps,
        INCLUDE_INITIAL=bool(include_initial),
        V_ONE_STEP=v_one_step,
        BLOCK=block,
        num_warps=num_warps,
    )
    return terms


def chain_logprob_bwd(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form gradients of ``(grad_terms · terms).sum()`` w.r.t. ``v`` and ``std``.

    Args:
        grad_terms: float32 ``(B, K+1)`` (column 0 unused); the others as in
        :func:`chain_logprob_fwd`.

    Returns:
        ``grad_v`` of ``v``'s shape and dtype; ``grad_std`` of ``std``'s shape and dtype for
        mode 2, else None. With ``steps``, slices other than the selected step are zero.
    """
    mode, B, K, H, D, v_one_step, sm_bs, dm_bs, noise_level = _check_chain_args(
        chain, v, t_grid, mode, std, steps, noise_level, sm, dm
    )
    grad_terms = _check_float("grad_terms", grad_terms, torch.float32)
    _check_shape("grad_terms", grad_terms, (B, K + 1), "(B, K+1)")
    _check_device(chain.device, grad_terms=grad_terms)
    has_steps = steps is not None
    # With steps only one slice per sample is written: pre-zero the rest (a (B, 1, H, D) v
    # is written in full, invalid steps included).
    zero_rest = has_steps and not v_one_step
    grad_v = torch.zeros_like(v) if zero_rest else torch.empty_like(v)
    grad_std = None
    if mode == _MODE_NOISE:
        grad_std = torch.zeros_like(std) if has_steps else torch.empty_like(std)
    if B == 0 or K == 0:
        return grad_v.zero_(), grad_std
    HD = H * D
    block, num_warps = _launch_config(HD)
    grid = (B, 1 if has_steps else K)
    _chain_bwd_kernel[grid](
        grad_terms,
        chain,
        v,
        t_grid,
        std if std is not None else chain,
        steps if steps is not None else t_grid,
        grad_v,
        grad_std if grad_std is not None else grad_v,
        sm,
        dm,
        noise_level,
        K,
        HD,
        D,
        sm_bs,
        dm_bs,
        v.shape[1],
        MODE=mode,
        HAS_STEPS=has_steps,
        V_ONE_STEP=v_one_step,
        BLOCK=block,
        num_warps=num_warps,
    )
    return grad_v, grad_std


def _check_cfm_args(
    actions: object, noise: object, v_pred: object | None, sm: object | None, dm: object | None
) -> tuple[int, int, int, int, int, int]:
    """Shared validation; returns ``(B, N, H, D, sm_bstride, dm_bstride)``."""
    actions = _check_float("actions", actions)
    if actions.dim() != 3:
        raise ValueError(f"actions: expected shape (B, H, D), got {tuple(actions.shape)}")
    B, H, D = actions.shape
    _check_shape("actions", actions, (B, H, D), "(B, H, D)")
    noise = _require_tensor("noise", noise)
    _check_same_dtype("actions", actions, noise=noise)
    if noise.dim() != 4:
        raise ValueError(f"noise: expected shape (B, N, H, D), got {tuple(noise.shape)}")
    N = noise.shape[1]
    _check_shape("noise", noise, (B, N, H, D), "(B, N, H, D)")
    if v_pred is not None:
        v_pred = _require_tensor("v_pred", v_pred)
        _check_same_dtype("actions", actions, v_pred=v_pred)
        _check_shape("v_pred", v_pred, (B, N, H, D), "(B, N, H, D)")
    sm_bs = dm_bs = 0
    if sm is not None:
        sm_bs, dm_bs = _check_masks(sm, dm, B, H, D)
    _check_device(actions.device, noise=noise, v_pred=v_pred, sm=sm, dm=dm)
    return B, N, H, D, sm_bs, dm_bs


def _check_inv_wsum(inv_wsum: object, B: int, device: torch.device) -> None:
    inv_wsum = _check_float("inv_wsum", inv_wsum, torch.float32)
    _check_shape("inv_wsum", inv_wsum, (B,), "(B,)")
    _check_device(device, inv_wsum=inv_wsum)


def cfm_loss_fwd(
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
) -> torch.Tensor:
    """Per-observation CFM losses.

    Args:
        actions: ``(B, H, D)``; noise, v_pred: ``(B, N, H, D)`` in the dtype; sm: float32
        ``(Bm, H)``; dm: float32 ``(Bm, D)``; inv_wsum: float32 ``(B,)``.

    Returns:
        ``loss (B, N)`` float32, ``inv_wsum[b]·Σ_{h,d} w·(v − (ε − A))²``.
    """
    B, N, H, D, sm_bs, dm_bs = _check_cfm_args(actions, noise, v_pred, sm, dm)
    _check_inv_wsum(inv_wsum, B, actions.device)
    loss = torch.empty((B, N), dtype=torch.float32, device=actions.device)
    if B * N == 0:
        return loss
    HD = H * D
    block, num_warps = _launch_config(HD)
    _cfm_fwd_kernel[(B * N,)](
        actions,
        noise,
        v_pred,
        sm,
        dm,
        inv_wsum,
        loss,
        N,
        HD,
        D,
        sm_bs,
        dm_bs,
        BLOCK=block,
        num_warps=num_warps,
    )
    return loss


def cfm_loss_bwd(
    grad_loss: torch.Tensor,
    actions: torch.Tensor,
    noise: torch.Tensor,
    v_pred: torch.Tensor,
    sm: torch.Tensor,
    dm: torch.Tensor,
    inv_wsum: torch.Tensor,
) -> torch.Tensor:
    """Gradient of ``(grad_loss · loss).sum()`` w.r.t. ``v_pred``.

    Args:
        grad_loss: float32 ``(B, N)``; the others as in :func:`cfm_loss_fwd`.

    Returns:
        ``grad_v (B, N, H, D)`` in ``v_pred``'s dtype, ``2·g[b,n]·inv_wsum[b]·w·(v − ε + A)``.
    """
    B, N, H, D, sm_bs, dm_bs = _check_cfm_args(actions, noise, v_pred, sm, dm)
    _check_inv_wsum(inv_wsum, B, actions.device)
    grad_loss = _check_float("grad_loss", grad_loss, torch.float32)
    _check_shape("grad_loss", grad_loss, (B, N), "(B, N)")
    _check_device(actions.device, grad_loss=grad_loss)
    grad_v = torch.empty_like(v_pred)
    if grad_v.numel() == 0:
        return grad_v
    HD = H * D
    block, num_warps = _launch_config(HD)
    _cfm_bwd_kernel[(B * N,)](
        grad_loss,
        actions,
        noise,
        v_pred,
        sm,
        dm,
        inv_wsum,
        grad_v,
        N,
        HD,
        D,
        sm_bs,
        dm_bs,
        BLOCK=block,
        num_warps=num_warps,
    )
    return grad_v


def cfm_interpolate_fwd(actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Noisy interpolants ``x_τ = τ·ε + (1 − τ)·A``.

    Args:
        actions: ``(B, H, D)``; noise: ``(B, N, H, D)`` in the dtype; tau: float32 ``(B, N)``.

    Returns:
        ``x_tau (B, N, H, D)`` in the dtype.
    """
    B, N, H, D, _, _ = _check_cfm_args(actions, noise, None, None, None)
    tau = _check_float("tau", tau, torch.float32)
    _check_shape("tau", tau, (B, N), "(B, N)")
    _check_device(actions.device, tau=tau)
    out = torch.empty_like(noise)
    if out.numel() == 0:
        return out
    HD = H * D
    block, num_warps = _launch_config(HD)
    _cfm_interp_kernel[(B * N,)](
        actions,
        noise,
        tau,
        out,
        N,
        HD,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out
