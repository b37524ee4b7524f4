"""Shared-prefix ("cascade") attention of action tokens over a cached VLM prefix.

In a π0-style policy the ``N = group_size`` consecutive rows of the batch (the N samples of a
GRPO group, or the N (τ, ε) pairs of FPO) belong to one observation and attend the *same*
prefix K/V. This module never copies that prefix per row:

* ``torch`` / ``cpu`` backend: the queries of a group are folded into one matrix, so the
  prefix scores are one ``(g·N·S, d) @ (d, P)`` product per (observation, KV head); the
  suffix part is per row; one softmax over both (differentiable by autograd).
* ``triton`` backend (CUDA, or the interpreter on CPU): fused kernels, see
  ``flowkernels/ops/triton_attention.py``.
* ``cuda`` backend: flash-attn, when it is installed (guarded import).

Layouts follow flash-attention: ``(batch, seq, heads, head_dim)``. The log-sum-exp is the
natural-log ``lse (B·N, S, Hq)`` float32 of the scaled scores over all keys a query sees;
a query that sees no key at all gets ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import math
import operator

import torch

from flowkernels._backend import BackendUnavailableError, resolve_backend
from flowkernels._checks import fmt_shape, host_min_max, nvtx_range, value_checks_enabled

__all__ = ["merge_attention_states", "prefix_attention", "prefix_attention_ref"]

ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_valid: torch.Tensor,
    suffix_mask: torch.Tensor | None,
    group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable reference: the prefix expanded per row, concatenated with the suffix keys.

    Args:
        q: ``(B·N, S, Hq, d)``; k, v: ``(B·N, S, Hkv, d)``; prefix_k, prefix_v: ``(B, P, Hkv, d)``;
        prefix_valid: bool ``(B, P)``; suffix_mask: bool ``(S, S)`` (query, key) or None (all).
    Returns:
        ``out (B·N, S, Hq, d)`` in q's dtype and ``lse (B·N, S, Hq)`` (float32; float64 for
        float64 inputs), computed in float32 (float64).
    """
    BN, S, Hq, _ = q.shape
    Hkv = k.shape[2]
    acc = _acc(q.dtype)
    n = group_size
    keys = torch.cat([prefix_k.repeat_interleave(n, 0), k], dim=1).to(acc)  # (BN, P+S, Hkv, d)
    vals = torch.cat([prefix_v.repeat_interleave(n, 0), v], dim=1).to(acc)
    rep = Hq // Hkv
    keys = keys.repeat_interleave(rep, dim=2)  # (BN, L, Hq, d)
    vals = vals.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bshd,blhd->bhsl", q.to(acc), keys) * scale  # (BN, Hq, S, L)
    pmask = prefix_valid.repeat_interleave(n, 0)[:, None, None, :].expand(BN, 1, S, -1)
    smask = (
        suffix_mask[None, None].expand(BN, 1, S, S)
        if suffix_mask is not None
        else torch.ones(BN, 1, S, S, dtype=torch.bool, device=q.device)
    )
    allowed = torch.cat([pmask, smask], dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (BN, Hq, S)
    finite = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    out = torch.einsum("bhsl,blhd->bshd", p, vals)
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()


def _row_max(s: torch.Tensor) -> torch.Tensor:
    """``s.amax(-1)``, ``-inf`` where the last dim is empty (no prefix, ``P = 0``, or ``S = 0``)."""
    if s.shape[-1] == 0:
        return s.new_full(s.shape[:-1], float("-inf"))
    return s.amax(-1)


def _prefix_attention_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_valid: torch.Tensor | None,
    suffix_mask: torch.Tensor | None,
    group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch/CPU path: prefix scores per observation (no per-row copy), one joint softmax.

    Same contract as :func:`prefix_attention_ref`; ``prefix_valid=None`` means every prefix
    token is valid.
    """
    BN, S, Hq, d = q.shape
    B, P, Hkv, _ = prefix_k.shape
    n, g = group_size, Hq // Hkv
    acc = _acc(q.dtype)
    # (B, N, S, Hkv, g, d) -> (B, Hkv, N·S·g, d): all queries of an observation and KV head.
    qg = q.to(acc).view(B, n, S, Hkv, g, d).permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, n * S * g, d)
    pk = prefix_k.to(acc).permute(0, 2, 3, 1)  # (B, Hkv, d, P)
    pv = prefix_v.to(acc).permute(0, 2, 1, 3)  # (B, Hkv, P, d)
    s_pre = torch.matmul(qg, pk) * scale  # (B, Hkv, N·S·g, P)
    if prefix_valid is not None:
        s_pre = s_pre.masked_fill(~prefix_valid[:, None, None, :], float("-inf"))
    # suffix: (BN, Hkv, S·g, d) @ (BN, Hkv, d, S)
    qs = q.to(acc).view(BN, S, Hkv, g, d).permute(0, 2, 1, 3, 4).reshape(BN, Hkv, S * g, d)
    ks = k.to(acc).permute(0, 2, 3, 1)
    vs = v.to(acc).permute(0, 2, 1, 3)
    s_suf = torch.matmul(qs, ks) * scale  # (BN, Hkv, S·g, S)
    if suffix_mask is not None:
        m = suffix_mask[:, None, :].expand(S, g, S).reshape(S * g, S)
        s_suf = s_suf.masked_fill(~m, float("-inf"))
    # joint softmax: bring the prefix scores to the row layout (BN, Hkv, S·g, P) as a view
    s_pre_rows = s_pre.view(B, Hkv, n, S * g, P).transpose(1, 2).reshape(BN, Hkv, S * g, P)
    m_max = torch.maximum(_row_max(s_pre_rows), _row_max(s_suf))  # (BN, Hkv, S·g)
    finite = torch.isfinite(m_max)
    m_safe = torch.where(finite, m_max, torch.zeros_like(m_max))
    e_pre = torch.exp(s_pre_rows - m_safe[..., None])
    e_suf = torch.exp(s_suf - m_safe[..., None])
    denom = e_pre.sum(-1) + e_suf.sum(-1)
    inv = torch.where(finite, 1.0 / torch.where(finite, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    # prefix values once per observation: (B, Hkv, N·S·g, P) @ (B, Hkv, P, d)
    e_pre_obs = e_pre.view(B, n, Hkv, S * g, P).transpose(1, 2).reshape(B, Hkv, n * S * g, P)
    o_pre = torch.matmul(e_pre_obs, pv).view(B, Hkv, n, S * g, d).transpose(1, 2).reshape(BN, Hkv, S * g, d)
    o = (o_pre + torch.matmul(e_suf, vs)) * inv[..., None]  # (BN, Hkv, S·g, d)
    out = o.view(BN, Hkv, S, g, d).permute(0, 2, 1, 3, 4).reshape(BN, S, Hq, d)
    lse = torch.where(finite, m_safe + torch.log(torch.where(finite, denom, torch.ones_like(denom))), m_max)
    lse = lse.view(BN, Hkv, S, g).permute(0, 2, 1, 3).reshape(BN, S, Hq)
    return out.to(q.dtype), lse


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets by log-sum-exp.

    Args:
        out_a, out_b: ``(..., S, H, d)`` partial outputs of one dtype (each normalized over its
            own keys).
        lse_a, lse_b: ``(..., S, H)`` float32 / float64 natural-log log-sum-exp of the scaled
            scores of each part (``-inf`` where a part has no key).
    Returns:
        ``out (..., S, H, d)`` in out_a's dtype and ``lse (..., S, H)`` float32 (float64 for
        float64 inputs): ``lse = log(e^lse_a + e^lse_b)``, ``out = (e^lse_a·out_a +
        e^lse_b·out_b) / e^lse``; a query with no key in either part gets ``out = 0``,
        ``lse = -inf``.
    """
    op = "merge_attention_states"
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in ATTN_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{op}: {name} is on {t.device} but out_a is on {out_a.device}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"{op}: out_a and out_b must have one dtype, got {out_a.dtype} and {out_b.dtype} "
                        f"(cast the lower-precision part up first)")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64 (a half-precision log-sum-exp puts "
                            f"errors of ~1% into the merge weights), got {t.dtype}")
    if out_a.dim() < 3:
        raise ValueError(f"{op}: out_a must have shape (..., S, H, d) (at least 3 dims), got {fmt_shape(out_a.shape)}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"merge_attention_states: out_a {fmt_shape(out_a.shape)} and out_b "
                         f"{fmt_shape(out_b.shape)} must have the same shape")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"merge_attention_states: lse_a and lse_b must have shape {fmt_shape(out_a.shape[:-1])} "
            f"(out's shape without head_dim), got {fmt_shape(lse_a.shape)} and {fmt_shape(lse_b.shape)}"
        )
    acc = _acc(out_a.dtype)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)  # NaN if either is NaN: propagated to out and lse, never hidden
    finite = m != float("-inf")  # False only where both parts are empty
    m_safe = torch.where(finite, m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    tot = wa + wb
    tot_safe = torch.where(finite, tot, torch.ones_like(tot))
    out = (wa[..., None] * out_a.to(acc) + wb[..., None] * out_b.to(acc)) / tot_safe[..., None]
    out = torch.where(finite[..., None], out, torch.zeros_like(out))
    lse = torch.where(finite, m_safe + torch.log(tot_safe), m)
    return out.to(out_a.dtype), lse


def _check_bool_mask(op: str, name: str, m: object, shape: tuple[int, int], dims: str, device: torch.device) -> None:
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != shape:
        got = fmt_shape(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{op}: {name} must be a bool tensor of shape {dims} = {fmt_shape(shape)}, got {got}")
    if m.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be bool (True = attend), got {m.dtype}")
    if m.device != device:
        raise ValueError(f"{op}: {name} is on {m.device} but q is on {device}")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    suffix_mask: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor | None:
    """Validate shapes, dtypes and devices; return the prefix validity ``(B, P)`` bool or None."""
    op = "prefix_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "(B·N, S, Hq, d)" if name == "q" else "(B·N, S, Hkv, d)" if name in "kv" else "(B, P, Hkv, d)"
            raise ValueError(f"{op}: {name} must have shape {shape}, got {fmt_shape(t.shape)}")
        if t.dtype not in ATTN_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{op}: group_size must be an int >= 1, got {group_size!r}")
    BN, S, Hq, d = q.shape
    if d < 1:
        raise ValueError(f"{op}: q must have head_dim d >= 1 (shape (B·N, S, Hq, d)), got {fmt_shape(q.shape)}")
    if BN % group_size != 0:
        raise ValueError(f"{op}: group_size={group_size} must divide the batch of q (B·N = {BN})")
    B = BN // group_size
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the KV heads of k (Hkv = {Hkv}) must divide the query heads of q (Hq = {Hq})")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (BN, S, Hkv, d):
            raise ValueError(
                f"{op}: {name} must have shape (B·N, S, Hkv, d) = {fmt_shape((BN, S, Hkv, d))}, "
                f"got {fmt_shape(t.shape)}"
            )
    P = prefix_k.shape[1]
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if tuple(t.shape) != (B, P, Hkv, d):
            raise ValueError(
                f"{op}: {name} must have shape (B, P, Hkv, d) = {fmt_shape((B, P, Hkv, d))} with "
                f"B = B·N / group_size, got {fmt_shape(t.shape)}"
            )
    if prefix_lens is not None and prefix_mask is not None:
        raise ValueError(f"{op}: give prefix_lens or prefix_mask, not both")
    valid = None
    if prefix_lens is not None:
        if not isinstance(prefix_lens, torch.Tensor) or prefix_lens.shape != (B,):
            got = fmt_shape(prefix_lens.shape) if isinstance(prefix_lens, torch.Tensor) else type(prefix_lens).__name__
            raise ValueError(f"{op}: prefix_lens must be an integer tensor of shape (B,) = ({B},), got {got}")
        if prefix_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: prefix_lens must be int32 or int64, got {prefix_lens.dtype}")
        if prefix_lens.device != q.device:
            raise ValueError(f"{op}: prefix_lens is on {prefix_lens.device} but q is on {q.device}")
        # reads the values: a host sync (off with fk.set_value_checks(False)); nothing to read when B = 0
        if value_checks_enabled(q.device) and prefix_lens.numel():
            lo, hi = host_min_max(prefix_lens)
            if lo < 0 or hi > P:
                raise ValueError(f"{op}: prefix_lens must lie in [0, P = {P}], got values in [{lo}, {hi}]")
        valid = torch.arange(P, device=q.device)[None, :] < prefix_lens[:, None]
    if prefix_mask is not None:
        _check_bool_mask(op, "prefix_mask", prefix_mask, (B, P), "(B, P)", q.device)
        valid = prefix_mask
    if suffix_mask is not None:
        _check_bool_mask(op, "suffix_mask", suffix_mask, (S, S), "(S, S)", q.device)
    return valid


def _flash_attn_available() -> str:
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        return f"flash-attn is not installed ({e})"
    return ""


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_lens: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    suffix_mask: torch.Tensor | None = None,
    group_size: int = 1,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of suffix (action) tokens over a shared cached prefix and over the suffix.

    Args:
        q: ``(B·N, S, Hq, d)`` suffix queries (RoPE already applied).
        k, v: ``(B·N, S, Hkv, d)`` suffix keys and values; ``Hkv`` divides ``Hq`` (GQA/MQA).
        prefix_k, prefix_v: ``(B, P, Hkv, d)``, shared by the ``N = group_size`` consecutive
            rows of q that belong to one observation. Read, never copied.
        prefix_lens: int ``(B,)``: the first ``prefix_lens[b]`` prefix tokens are valid.
        prefix_mask: bool ``(B, P)``: valid prefix tokens (may have holes). At most one of the two.
        suffix_mask: bool ``(S, S)`` (query, key): which suffix tokens a suffix query sees
            (None: all; e.g. π0's state token sees only itself among the suffix).
        group_size: N, rows per observation.
        scale: score scale, default ``d ** -0.5``.
        return_lse: also return the natural-log log-sum-exp ``(B·N, S, Hq)`` float32.
        backend: ``auto`` (triton on CUDA, the grouped torch path on CPU), ``triton``, ``cuda``
            (flash-attn, when installed), ``cpu`` / ``torch`` (grouped torch path).
    Returns:
        ``out (B·N, S, Hq, d)`` in q's dtype, and ``lse`` if ``return_lse``. Differentiable
        w.r.t. q, k, v, prefix_k, prefix_v on every backend.
    """
    if type(group_size).__module__ == "numpy" and hasattr(group_size, "__index__"):
        group_size = operator.index(group_size)  # NumPy integers as Python ints (np.bool_ has no __index__)
    valid = _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prefix_mask, suffix_mask, group_size)
    d = q.shape[-1]
    scale = float(d) ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"prefix_attention: scale must be a finite number > 0, got {scale}")
    name = _resolve(backend, q.device, q.dtype)
    with nvtx_range(f"flowkernels.prefix_attention[{name}]"):
        if name in ("torch", "cpu"):
            out, lse = _prefix_attention_grouped(q, k, v, prefix_k, prefix_v, valid, suffix_mask, group_size, scale)
        elif name == "triton":
            from flowkernels.ops import triton_attention

            out, lse = triton_attention.prefix_attention_triton(
                q, k, v, prefix_k, prefix_v, valid, suffix_mask, group_size, scale
            )
        else:  # cuda: flash-attn
            out, lse = _prefix_attention_flash(q, k, v, prefix_k, prefix_v, valid, suffix_mask, group_size, scale)
    return (out, lse) if return_lse else out


def _resolve(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Backends of this op: cpu and torch are the grouped torch path; cuda is flash-attn.

    ``auto`` on CUDA picks triton, except for float64 inputs (the Triton kernels take float32,
    bfloat16 and float16), which go to the grouped torch path; ``FLOWKERNELS_BACKEND`` is honoured
    (see the comment below).
    """
    if backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        why = _flash_attn_available()
        if why:
            raise BackendUnavailableError(f"backend 'cuda' (flash-attn) is unavailable: {why}")
        return "cuda"
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
        return "cpu"
    if backend == "auto":
        # FLOWKERNELS_BACKEND applies as for the flow ops: triton -> triton (CPU: the interpreter;
        # float64 a TypeError), cpu / torch -> the torch path, cuda -> as auto (the compiled extension
        # has no attention kernel; flash-attn is only ever chosen by name)
        name = resolve_backend("auto", device, dtype)
        if name == "triton":
            return "triton"
        if device.type == "cuda":
            ok = name == "cuda" and dtype != torch.float64 and _triton_ok(device)
            return "triton" if ok else "torch"
        return "torch"
    return resolve_backend(backend, device)


def _triton_ok(device: torch.device) -> bool:
    try:
        return resolve_backend("triton", device) == "triton"
    except BackendUnavailableError:
        return False


def _prefix_attention_flash(q, k, v, prefix_k, prefix_v, valid, suffix_mask, group_size, scale):
    """flash-attn path (full prefix, no suffix mask): prefix part and suffix part merged by lse.

    The prefix part reads the prefix once per observation without a copy: the ``N`` rows of a
    group are consecutive, so ``q`` viewed as ``(B, N·S, Hq, d)`` is one query sequence over
    ``prefix_k[b]``. flash-attn's autograd drops the gradient of its log-sum-exp, which the
    merge weights depend on, so the backward is not flash-attn's: it recomputes the attention
    with the grouped torch path (exact, autograd), see :class:`_FlashCascade`.
    """
    from flash_attn import flash_attn_func

    if suffix_mask is not None and not bool(suffix_mask.all()):
        raise NotImplementedError("prefix_attention: backend 'cuda' (flash-attn) takes no suffix_mask; use 'triton'")
    if valid is not None and not bool(valid.all()):
        raise NotImplementedError("prefix_attention: backend 'cuda' (flash-attn) takes a full prefix; use 'triton'")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"prefix_attention: backend 'cuda' (flash-attn) takes float16 or bfloat16, got {q.dtype}")
    if q.numel() == 0 or prefix_k.shape[1] == 0 or q.shape[-1] == 0:
        return _prefix_attention_grouped(q, k, v, prefix_k, prefix_v, None, None, group_size, scale)
    return _FlashCascade.apply(q, k, v, prefix_k, prefix_v, group_size, scale, flash_attn_func)


class _FlashCascade(torch.autograd.Function):
    """Forward: two flash-attn calls merged by lse; backward: the grouped torch path recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, group_size, scale, flash_fn):  # type: ignore[override]
        BN, S, Hq, d = q.shape
        B = prefix_k.shape[0]
        # (B·N, S, Hq, d) -> (B, N·S, Hq, d): a view, every row of a group against one prefix
        o1, l1, _ = flash_fn(q.reshape(B, group_size * S, Hq, d), prefix_k, prefix_v, softmax_scale=scale,
                             return_attn_probs=True)
        o1 = o1.reshape(BN, S, Hq, d)
        l1 = l1.float().transpose(1, 2).reshape(BN, S, Hq)  # (B, Hq, N·S) -> (B·N, S, Hq)
        o2, l2, _ = flash_fn(q, k, v, softmax_scale=scale, return_attn_probs=True)
        out, lse = merge_attention_states(o1, l1, o2, l2.float().transpose(1, 2))
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v)
        ctx.group_size, ctx.scale = group_size, scale
        ctx.set_materialize_grads(False)  # an unused output (lse without return_lse) gets no backward work
        return out.contiguous(), lse.contiguous()

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:5])]
        with torch.enable_grad():
            out, lse = _prefix_attention_grouped(*inputs, None, None, ctx.group_size, ctx.scale)
            used = [(o, g) for o, g in ((out, dout), (lse, dlse)) if g is not None]
            outs, grads_out = [o for o, _ in used], [g for _, g in used]
            wanted = [t for t in inputs if t.requires_grad]
            got = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True) if wanted else ())
        grads = [next(got) if t.requires_grad else None for t in inputs]
        return (*grads, None, None, None)
