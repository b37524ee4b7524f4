"""Triton kernels of the shared-prefix ("cascade") attention, forward and backward.

Called by :func:`flowkernels.ops.attention.prefix_attention` with ``backend="triton"``; the
math is :func:`flowkernels.ops.attention.prefix_attention_ref` (see docs/attention.md).

Query rows of a group. For an observation ``b`` and a KV head ``h`` the kernels fold every
query that reads this KV head's prefix into one row space of ``N·S·g`` rows (``N`` samples of
the group, ``S`` suffix tokens, ``g = Hq / Hkv`` query heads per KV head)::

    r = (n·S + s)·g + j    ->    q[b·N + n, s, h·g + j, :]

so one ``(BLOCK_M, d) @ (d, BLOCK_N)`` product scores ``BLOCK_M`` rows from several samples
and GQA heads against one prefix tile.

Kernels (all ``tl.dot`` with fp32 accumulation, head_dim padded to a power of two by masks):

* ``_fwd_kernel`` — grid ``(cdiv(N·S·g, BLOCK_M), B·Hkv)``: one program per tile of group rows
  walks the prefix blocks, then the suffix blocks of the (at most a few) samples its tile
  touches, with one online softmax (``impl="fused"``). The M tiles of one (observation, KV
  head) are adjacent in the launch order, so a prefix tile is fetched from DRAM about once per
  observation and served from L2 to the other tiles — never once per sample. With
  ``DO_PREFIX``/``DO_SUFFIX`` switched it computes only one part (``impl="split"``), and the
  two partial ``(out, lse)`` are merged by :func:`merge_attention_states`.
* ``_bwd_dq_kernel`` — same grid and walk as the forward: ``dq = scale·Σ_keys dS·K``.
* ``_bwd_dkdv_kernel`` — one program per (observation, KV head, prefix key block) looping over
  all ``N·S·g`` rows of the group (prefix ``dK``/``dV``, the reduction over the group is inside
  the program: no atomics), or per (row, KV head, suffix key block) looping over ``S·g`` rows.

FlashAttention-2 backward: ``δ = rowsum(dO·O) − dlse`` is precomputed, ``P`` is recomputed from
the saved ``lse``, ``dS = P·(dP − δ)`` (the ``−dlse`` term makes ``lse`` differentiable too).

Inputs are float32, bfloat16 or float16 (float64 raises ``TypeError``); the last dim of every
tensor must have stride 1 (copied otherwise), other strides are free, so a prefix sliced out
of a larger cache is read in place. Under the Triton interpreter ``tl.dot`` runs on fp32
operands (bf16 ``tl.dot`` gives wrong results in the interpreter of the Triton versions we
run); compiled, fp32 inputs use IEEE fp32 dots and bf16/fp16 inputs their native tensor-core
dots with ``P`` rounded to the input dtype.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from flowkernels.ops.triton_kernels import _cast_out

__all__ = ["SUPPORTED_DTYPES", "prefix_attention_triton"]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _decode_rows(rows, S, G):
    """Group row ``r = (n·S + s)·G + j`` -> ``(n, s, j)``."""
    j = rows % G
    t = rows // G
    return t // S, t % S, j


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; IEEE fp32 (no TF32) when asked."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(base, rows, row_stride, row_ok, offs_d, d_ok, F32: tl.constexpr):
    """``(len(rows), BLOCK_D)`` tile ``base[rows·row_stride + d]``, zero outside the masks."""
    x = tl.load(base + rows[:, None] * row_stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _softmax_block(qk, allowed, vt, m_i, l_i, acc, F32: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step on log2-domain scores ``qk (BM, BN)`` and values ``vt (BN, BD)``.

    Rows that have seen no allowed key keep ``m = -inf``, ``l = 0``, ``acc = 0`` (no NaN).
    """
    qk = tl.where(allowed, qk, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if F32:
        acc += _dot(p, vt, IEEE)
    else:
        acc += tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def _bwd_block(q, do, kt, vt, allowed, lse2, delta, dq, F32: tl.constexpr, IEEE: tl.constexpr, qk_scale):
    """``dq += dS @ K`` for one key block (``dS`` is the gradient w.r.t. the scaled scores).

    q, do: ``(BM, BD)``; kt, vt: ``(BN, BD)``; lse2, delta: ``(BM,)``.
    """
    qk = _dot(q, tl.trans(kt), IEEE) * qk_scale
    p = tl.where(allowed, tl.exp2(qk - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(vt), IEEE)
    ds = p * (dp - delta[:, None])
    if F32:
        dq += _dot(ds, kt, IEEE)
    else:
        dq += tl.dot(ds.to(kt.dtype), kt)
    return dq


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, VALID, SMASK, O, LSE,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    spkb, spks, spkh, spvb, spvs, spvh,
    N, S, P, HKV, G, D, qk_scale,
    HAS_VALID: tl.constexpr, HAS_SMASK: tl.constexpr, DO_PREFIX: tl.constexpr, DO_SUFFIX: tl.constexpr,
    F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    SG = S * G
    NSG = N * SG
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < NSG
    n_r, s_r, j_r = _decode_rows(rows, S, G)
    bn_r = (b * N + n_r).to(tl.int64)
    hq_r = h * G + j_r
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + bn_r[:, None] * sqb + s_r[:, None] * sqs + hq_r[:, None] * sqh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if DO_PREFIX:
        b64 = b.to(tl.int64)
        pk_base = PK + b64 * spkb + h * spkh
        pv_base = PV + b64 * spvb + h * spvh
        for start in range(0, P, BLOCK_N):
            keys = start + offs_n
            k_ok = keys < P
            kt = _load_tile(pk_base, keys, spks, k_ok, offs_d, d_ok, F32)
            vt = _load_tile(pv_base, keys, spvs, k_ok, offs_d, d_ok, F32)
            if HAS_VALID:
                k_ok = k_ok & (tl.load(VALID + b64 * P + keys, mask=k_ok, other=0) != 0)
            qk = _dot(q, tl.trans(kt), IEEE) * qk_scale
            m_i, l_i, acc = _softmax_block(qk, k_ok[None, :], vt, m_i, l_i, acc, F32, IEEE)

    if DO_SUFFIX:
        # the samples this tile touches: rows [m0, min(m0 + BLOCK_M, NSG)) span n_lo..n_hi
        n_lo = m0 // SG
        n_hi = (tl.minimum(m0 + BLOCK_M, NSG) - 1) // SG
        for n in range(n_lo, n_hi + 1):
            bn = (b * N + n).to(tl.int64)
            k_base = K + bn * skb + h * skh
            v_base = V + bn * svb + h * svh
            row_in = row_ok & (n_r == n)
            for start in range(0, S, BLOCK_N):
                keys = start + offs_n
                k_ok = keys < S
                kt = _load_tile(k_base, keys, sks, k_ok, offs_d, d_ok, F32)
                vt = _load_tile(v_base, keys, svs, k_ok, offs_d, d_ok, F32)
                allowed = row_in[:, None] & k_ok[None, :]
                if HAS_SMASK:
                    sm = tl.load(SMASK + s_r[:, None] * S + keys[None, :], mask=allowed, other=0)
                    allowed = allowed & (sm != 0)
                qk = _dot(q, tl.trans(kt), IEEE) * qk_scale
                m_i, l_i, acc = _softmax_block(qk, allowed, vt, m_i, l_i, acc, F32, IEEE)

    # no allowed key: l = 0. A NaN score makes l NaN, so NaN inputs give NaN out/lse (as in
    # torch) instead of being taken for an empty row (m stays -inf: tl.maximum drops NaN)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, _NEG_INF, (m_i + tl.log2(l_safe)) * _LN2)
    # O and LSE are contiguous (B·N, S, Hq, D) / (B·N, S, Hq)
    HQ = HKV * G
    o_row = (bn_r * S + s_r) * HQ + hq_r
    tl.store(O + o_row[:, None] * D + offs_d[None, :], _cast_out(out, O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + o_row, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, VALID, SMASK, DO, LSE, DELTA, DQ,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    spkb, spks, spkh, spvb, spvs, spvh,
    N, S, P, HKV, G, D, qk_scale, scale,
    HAS_VALID: tl.constexpr, HAS_SMASK: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    SG = S * G
    NSG = N * SG
    HQ = HKV * G
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < NSG
    n_r, s_r, j_r = _decode_rows(rows, S, G)
    bn_r = (b * N + n_r).to(tl.int64)
    hq_r = h * G + j_r
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    rd_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + bn_r[:, None] * sqb + s_r[:, None] * sqs + hq_r[:, None] * sqh + offs_d[None, :],
                mask=rd_ok, other=0.0)
    o_row = (bn_r * S + s_r) * HQ + hq_r  # row of the contiguous dO / LSE / DELTA / DQ
    do = tl.load(DO + o_row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + o_row, mask=row_ok, other=0.0)
    live = row_ok & (lse != _NEG_INF)
    lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
    delta = tl.load(DELTA + o_row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    b64 = b.to(tl.int64)
    pk_base = PK + b64 * spkb + h * spkh
    pv_base = PV + b64 * spvb + h * spvh
    for start in range(0, P, BLOCK_N):
        keys = start + offs_n
        k_ok = keys < P
        kt = _load_tile(pk_base, keys, spks, k_ok, offs_d, d_ok, F32)
        vt = _load_tile(pv_base, keys, spvs, k_ok, offs_d, d_ok, F32)
        if HAS_VALID:
            k_ok = k_ok & (tl.load(VALID + b64 * P + keys, mask=k_ok, other=0) != 0)
        dq = _bwd_block(q, do, kt, vt, live[:, None] & k_ok[None, :], lse2, delta, dq, F32, IEEE, qk_scale)

    n_lo = m0 // SG
    n_hi = (tl.minimum(m0 + BLOCK_M, NSG) - 1) // SG
    for n in range(n_lo, n_hi + 1):
        bn = (b * N + n).to(tl.int64)
        k_base = K + bn * skb + h * skh
        v_base = V + bn * svb + h * svh
        row_in = live & (n_r == n)
        for start in range(0, S, BLOCK_N):
            keys = start + offs_n
            k_ok = keys < S
            kt = _load_tile(k_base, keys, sks, k_ok, offs_d, d_ok, F32)
            vt = _load_tile(v_base, keys, svs, k_ok, offs_d, d_ok, F32)
            allowed = row_in[:, None] & k_ok[None, :]
            if HAS_SMASK:
                sm = tl.load(SMASK + s_r[:, None] * S + keys[None, :], mask=allowed, other=0)
                allowed = allowed & (sm != 0)
            dq = _bwd_block(q, do, kt, vt, allowed, lse2, delta, dq, F32, IEEE, qk_scale)

    dq = dq * scale
    tl.store(DQ + o_row[:, None] * D + offs_d[None, :], _cast_out(dq, DQ.dtype.element_ty), mask=rd_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, KK, VV, MASK, DO, LSE, DELTA, DK, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    NR, S, L, HKV, G, D, qk_scale, scale,
    IS_PREFIX: tl.constexpr, HAS_MASK: tl.constexpr, F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK, dV of one block of ``L`` keys of KV tensor row ``o`` (``pid(1) = o·Hkv + h``).

    Prefix (``IS_PREFIX``): ``o = b``, keys ``PK[b]``, the rows are all ``NR·S·G`` (NR = N)
    queries of observation ``b``; MASK is valid ``(B, L)``. Suffix: ``o = b·N + n``, keys
    ``K[o]``, the rows are the ``S·G`` queries of row ``o`` (NR = 1); MASK is ``(S, S)``.
    """
    pid_n = tl.program_id(0)
    pid_oh = tl.program_id(1)
    o = pid_oh // HKV
    h = pid_oh % HKV
    o64 = o.to(tl.int64)
    HQ = HKV * G
    NSG = NR * S * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = keys < L
    kt = _load_tile(KK + o64 * skb + h * skh, keys, sks, k_ok, offs_d, d_ok, F32)
    vt = _load_tile(VV + o64 * svb + h * svh, keys, svs, k_ok, offs_d, d_ok, F32)
    if IS_PREFIX:
        if HAS_MASK:
            k_ok = k_ok & (tl.load(MASK + o64 * L + keys, mask=k_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for start in range(0, NSG, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NSG
        n_r, s_r, j_r = _decode_rows(rows, S, G)
        bn_r = o64 * NR + n_r
        hq_r = h * G + j_r
        rd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + bn_r[:, None] * sqb + s_r[:, None] * sqs + hq_r[:, None] * sqh + offs_d[None, :],
                    mask=rd_ok, other=0.0)
        o_row = (bn_r * S + s_r) * HQ + hq_r
        do = tl.load(DO + o_row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
        if F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + o_row, mask=row_ok, other=0.0)
        live = row_ok & (lse != _NEG_INF)
        lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
        delta = tl.load(DELTA + o_row, mask=row_ok, other=0.0)
        allowed = k_ok[:, None] & live[None, :]  # (BN, BM)
        if not IS_PREFIX:
            if HAS_MASK:
                sm = tl.load(MASK + s_r[None, :] * S + keys[:, None], mask=allowed, other=0)
                allowed = allowed & (sm != 0)
        # transposed scores: (BN, BM)
        qkT = _dot(kt, tl.trans(q), IEEE) * qk_scale
        pT = tl.where(allowed, tl.exp2(qkT - lse2[None, :]), 0.0)
        dpT = _dot(vt, tl.trans(do), IEEE)
        dsT = pT * (dpT - delta[None, :])
        if F32:
            dv += _dot(pT, do, IEEE)
            dk += _dot(dsT, q, IEEE)
        else:
            dv += tl.dot(pT.to(do.dtype), do)
            dk += tl.dot(dsT.to(q.dtype), q)

    dk = dk * scale
    out_rows = (o64 * L + keys) * HKV + h  # DK / DV contiguous (X, L, Hkv, D)
    m_out = (keys < L)[:, None] & d_ok[None, :]
    tl.store(DK + out_rows[:, None] * D + offs_d[None, :], _cast_out(dk, DK.dtype.element_ty), mask=m_out)
    tl.store(DV + out_rows[:, None] * D + offs_d[None, :], _cast_out(dv, DV.dtype.element_ty), mask=m_out)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _config(
    d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None
) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)`` for head_dim ``d`` (not autotuned).

    Interpreter: large tiles (fewer, vectorized program steps). Compiled bf16/fp16: FA2-like
    tiles that keep the fp32 accumulator of a ``(BLOCK_M, BLOCK_D)`` tile in registers at
    d = 256. Compiled fp32 (IEEE dots on the FMA units): 32x32 at every d.
    """
    bd = max(16, triton.next_power_of_2(d))
    if _INTERPRET:
        bm, bn, warps, stages = 128, 64, 4, 1
    elif dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units with operands in registers: with the bf16 tiles
        # ptxas gave them stack frames of 8-18 KB per thread at d <= 128; 32x32 tiles need
        # <= 40 B at d <= 64 and <= 336 B at d = 128 (scripts/triton_compile_check.py).
        bm, bn, warps, stages = 32, 32, 4 if bd <= 64 else 8, 1
    elif bd <= 64:
        bm, bn, warps, stages = 128, 64, 4, 2
    elif bd <= 128:
        bm, bn, warps, stages = 128, 32, 8, 2
    else:
        bm, bn, warps, stages = 64, 32, 8, 1
    bm = block_m or bm
    bn = block_n or bn
    for name, x in (("block_m", bm), ("block_n", bn)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"prefix_attention_triton: {name} must be a power of two >= 16, got {x}")
    return bm, bn, bd, warps, stages


def _bwd_configs(
    cfg: tuple[int, int, int, int, int], dtype: torch.dtype, fit: bool
) -> tuple[tuple[int, int, int, int, int], tuple[int, int, int, int, int]]:
    """Tiles of the dq kernel and of the dk/dv kernels, from the forward's ``cfg``.

    The dq kernel holds ``BLOCK_M`` query rows and their dq accumulator while it walks the keys;
    the dk/dv kernels hold ``BLOCK_N`` key rows, dk and dv while they walk the queries in
    ``BLOCK_M`` chunks. The forward's bf16/fp16 tiles leave both spilling on sm_80/86/89 at d <= 64
    (2-7 KB stack frames per thread at 128x64, 4 warps) and the dq kernel at d = 128 (0.6 KB);
    the tiles below bring those to <= 152 B on sm_80/86/89/90 (Triton 3.6 and 3.9,
    scripts/triton_compile_check.py); not yet timed. Tiles the caller chose (``fit`` False),
    fp32 and the interpreter keep ``cfg``.
    """
    bd, stages = cfg[2], cfg[4]
    if not fit or _INTERPRET or dtype == torch.float32:
        return cfg, cfg
    if bd <= 64:
        return (128, 32, bd, 8, stages), (128, 32, bd, 8, stages)
    if bd <= 128:
        return (64, 32, bd, 8, stages), cfg
    return cfg, cfg


def _smaller(cfg: tuple[int, int, int, int, int]) -> tuple[int, int, int, int, int] | None:
    """The next smaller tiles: one pipeline stage first, then halve the larger block (>= 16)."""
    bm, bn, bd, warps, stages = cfg
    if stages > 1:
        return bm, bn, bd, warps, 1
    if bm >= bn and bm > 16:
        bm //= 2
    elif bn > 16:
        bn //= 2
    else:
        return None
    # 4 warps once a tile has <= 1024 elements, but at d >= 256: 32x32 with 8 warps needs no
    # stack frame on sm_80/86/89/90, with 4 it spills (the d = 256 backward on 99 KiB parts)
    return bm, bn, bd, min(warps, 4) if bm * bn <= 1024 and bd < 256 else warps, stages


# (kernel, device, dtype, tiles asked for, flags) -> tiles that launched on that device.
_FITTED: dict[tuple, tuple[int, int, int, int, int]] = {}


def _launch(kernel, grid, cfg, fit: bool, device: torch.device, dtype: torch.dtype, *args, **flags) -> None:
    """``kernel[grid(BLOCK_M, BLOCK_N)](*args, **flags, BLOCK_*=…, num_warps=…, num_stages=…)``.

    The default tiles suit the shared memory of an H100/H200 (227 KiB per block). On a GPU with
    less (A100: 163 KiB; sm_86/sm_89 parts such as the RTX 3090/4090, A6000, L4, L40: 99 KiB) a
    launch that Triton refuses with ``OutOfResources`` is retried with smaller tiles (``fit``:
    only when the caller did not pick the tiles), and the tiles that launched are remembered per
    device. ``scripts/triton_compile_check.py --arch 86`` shows which kernels need it.
    """
    key = (kernel, device, dtype, cfg, tuple(sorted(flags.items())))
    tiles = _FITTED.get(key, cfg)
    while True:
        bm, bn, bd, warps, stages = tiles
        try:
            kernel[grid(bm, bn)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
                                 num_stages=stages)  # fmt: skip
        except OutOfResources:
            smaller = _smaller(tiles) if fit else None
            if smaller is None:
                raise
            tiles = smaller
            continue
        if tiles != cfg:
            _FITTED[key] = tiles
        return


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """``(F32, IEEE)``: run the dots on fp32 operands; use IEEE fp32 (no TF32) dots."""
    f32 = _INTERPRET or dtype == torch.float32
    return f32, dtype == torch.float32 and not _INTERPRET


def _forward(q, k, v, pk, pv, valid_u8, smask_u8, group_size, scale, impl, cfg, fit=False):
    BN, S, Hq, D = q.shape
    B, P, Hkv, _ = pk.shape
    G = Hq // Hkv
    f32, ieee = _flags(q.dtype)
    dummy = q  # never read when the matching HAS_* flag is off
    common = dict(HAS_VALID=valid_u8 is not None, HAS_SMASK=smask_u8 is not None, F32=f32, IEEE=ieee)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(pk), *_strides(pv),
            group_size, S, P, Hkv, G, D, scale * _LOG2E)

    def grid(bm, bn):
        return triton.cdiv(group_size * S * G, bm), B * Hkv

    vm = valid_u8 if valid_u8 is not None else dummy
    sm = smask_u8 if smask_u8 is not None else dummy
    if impl == "fused":
        out = torch.empty(BN, S, Hq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(BN, S, Hq, device=q.device, dtype=torch.float32)
        if BN and S:
            _launch(_fwd_kernel, grid, cfg, fit, q.device, q.dtype, q, k, v, pk, pv, vm, sm, out, lse, *args,
                    DO_PREFIX=True, DO_SUFFIX=True, **common)
        return out, lse
    from flowkernels.ops.attention import merge_attention_states

    parts = []
    for do_prefix in (True, False):
        o = torch.empty(BN, S, Hq, D, device=q.device, dtype=torch.float32)
        ls = torch.empty(BN, S, Hq, device=q.device, dtype=torch.float32)
        if BN and S:
            _launch(_fwd_kernel, grid, cfg, fit, q.device, q.dtype, q, k, v, pk, pv, vm, sm, o, ls, *args,
                    DO_PREFIX=do_prefix, DO_SUFFIX=not do_prefix, **common)
        parts += [o, ls]
    out, lse = merge_attention_states(*parts)
    return out.to(q.dtype), lse


def _backward(q, k, v, pk, pv, valid_u8, smask_u8, out, lse, dout, dlse, group_size, scale, cfg, needs, fit=False):
    BN, S, Hq, D = q.shape
    B, P, Hkv, _ = pk.shape
    G = Hq // Hkv
    f32, ieee = _flags(q.dtype)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dummy = q
    vm = valid_u8 if valid_u8 is not None else dummy
    sm = smask_u8 if smask_u8 is not None else dummy
    meta = dict(F32=f32, IEEE=ieee)
    dev, dt = q.device, q.dtype
    dq = dk = dv = dpk = dpv = None
    dq_cfg, kv_cfg = _bwd_configs(cfg, q.dtype, fit)
    if not (BN and S):
        z = [torch.zeros_like(t) for t in (q, k, v, pk, pv)]
        return tuple(zz if need else None for zz, need in zip(z, needs))
    if needs[0]:
        dq = torch.empty(BN, S, Hq, D, device=q.device, dtype=q.dtype)
        _launch(
            _bwd_dq_kernel, lambda bm, bn: (triton.cdiv(group_size * S * G, bm), B * Hkv), dq_cfg, fit, dev, dt,
            q, k, v, pk, pv, vm, sm, dout, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(pk), *_strides(pv),
            group_size, S, P, Hkv, G, D, scale * _LOG2E, scale,
            HAS_VALID=valid_u8 is not None, HAS_SMASK=smask_u8 is not None, **meta,
        )  # fmt: skip
    if needs[3] or needs[4]:
        dpk = torch.empty(B, P, Hkv, D, device=q.device, dtype=pk.dtype)
        dpv = torch.empty_like(dpk)
        if P:
            _launch(
                _bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(P, bn), B * Hkv), kv_cfg, fit, dev, dt,
                q, pk, pv, vm, dout, lse, delta, dpk, dpv,
                *_strides(q), *_strides(pk), *_strides(pv),
                group_size, S, P, Hkv, G, D, scale * _LOG2E, scale,
                IS_PREFIX=True, HAS_MASK=valid_u8 is not None, **meta,
            )  # fmt: skip
    if needs[1] or needs[2]:
        dk = torch.empty(BN, S, Hkv, D, device=q.device, dtype=k.dtype)
        dv = torch.empty_like(dk)
        _launch(
            _bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(S, bn), BN * Hkv), kv_cfg, fit, dev, dt,
            q, k, v, sm, dout, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v),
            1, S, S, Hkv, G, D, scale * _LOG2E, scale,
            IS_PREFIX=False, HAS_MASK=smask_u8 is not None, **meta,
        )  # fmt: skip
    return dq, dk, dv, dpk, dpv


class PrefixAttentionTriton(torch.autograd.Function):
    """Forward by the fused (or split) kernel; backward by the dq and dk/dv kernels."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, valid_u8, smask_u8, group_size, scale, impl, cfg, fit):
        out, lse = _forward(q, k, v, pk, pv, valid_u8, smask_u8, group_size, scale, impl, cfg, fit)
        ctx.save_for_backward(q, k, v, pk, pv, valid_u8, smask_u8, out, lse)
        ctx.group_size, ctx.scale, ctx.cfg, ctx.fit = group_size, scale, cfg, fit
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, pk, pv, valid_u8, smask_u8, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        grads = _backward(q, k, v, pk, pv, valid_u8, smask_u8, out, lse, dout, dlse, ctx.group_size, ctx.scale,
                          ctx.cfg, needs, ctx.fit)
        return (*grads, None, None, None, None, None, None, None)


def prefix_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    valid: torch.Tensor | None,
    suffix_mask: torch.Tensor | None,
    group_size: int,
    scale: float,
    impl: str = "fused",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-prefix attention by the Triton kernels (differentiable w.r.t. the five tensors).

    Args:
        q: ``(B·N, S, Hq, d)``; k, v: ``(B·N, S, Hkv, d)``; prefix_k, prefix_v: ``(B, P, Hkv, d)``,
            shared by the ``N = group_size`` consecutive rows of an observation.
        valid: bool ``(B, P)`` valid prefix tokens, or None (all valid).
        suffix_mask: bool ``(S, S)`` (query, key), or None (all).
        group_size: N. scale: score scale.
        impl: ``"fused"`` (one kernel, prefix then suffix, one online softmax) or ``"split"``
            (prefix part and suffix part, merged by log-sum-exp).
        block_m, block_n: tile sizes (powers of two >= 16); default by head_dim.
    Returns:
        ``out (B·N, S, Hq, d)`` in q's dtype, ``lse (B·N, S, Hq)`` float32 natural-log; a query
        that sees no key gets ``out = 0``, ``lse = -inf``.

    The caller (``prefix_attention``) has validated shapes, dtypes and devices.
    """
    if impl not in ("fused", "split"):
        raise ValueError(f"prefix_attention_triton: impl must be 'fused' or 'split', got {impl!r}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"prefix_attention_triton: dtype {q.dtype} is not supported by the Triton kernels "
            "(expected float32, bfloat16 or float16)"
        )
    if q.device.type == "cpu" and not _INTERPRET:
        raise ValueError(
            "prefix_attention_triton: Triton kernels need GPU tensors (CPU tensors run only under "
            f"TRITON_INTERPRET=1), got tensors on {q.device}"
        )
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"prefix_attention_triton: scale must be a finite number > 0, got {scale}")
    cfg = _config(q.shape[-1], q.dtype, block_m, block_n)
    q, k, v, prefix_k, prefix_v = (_last_contig(t) for t in (q, k, v, prefix_k, prefix_v))
    valid_u8 = valid.to(torch.uint8).contiguous() if valid is not None else None
    smask_u8 = suffix_mask.to(torch.uint8).contiguous() if suffix_mask is not None else None
    fit = block_m is None and block_n is None  # tiles chosen here may shrink to fit the device
    return PrefixAttentionTriton.apply(q, k, v, prefix_k, prefix_v, valid_u8, smask_u8, int(group_size),
                                       float(scale), impl, cfg, fit)
