"""Shared-prefix attention: the grouped torch path, the Triton kernels (interpreter on CPU,
compiled on a GPU), merge_attention_states, input validation, torch.compile.

Every result is compared with ``prefix_attention_ref`` run in float64 (the oracle) under
flash-attention's rule ``err(kernel) ≤ 2·err(torch in the same precision) + floor``, where the
"torch in the same precision" is :func:`_ref_lowp` (matmuls in the input dtype, softmax in
fp32, ``P`` rounded to the input dtype before ``P·V``; differentiable by autograd). Gradients
are those of ``Σ out·gO + Σ lse·gL`` (finite lse only) w.r.t. all five inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_error_rule, floor_for, requires_cuda

import flowkernels as fk
from flowkernels.ops.attention import _check_inputs, _prefix_attention_grouped, prefix_attention_ref

triton_attention = pytest.importorskip("flowkernels.ops.triton_attention")

GPU = [pytest.mark.gpu, requires_cuda]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def make_inputs(B, N, S, P, Hq, Hkv, d, dtype=torch.float32, device="cpu", seed=0, noncontig_prefix=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rnd(B * N, S, Hq, d), rnd(B * N, S, Hkv, d), rnd(B * N, S, Hkv, d)
    if noncontig_prefix:  # a slice of a larger cache: strides of a (B, P + 7, Hkv, d) tensor
        pk, pv = rnd(B, P + 7, Hkv, d)[:, 3 : 3 + P], rnd(B, P + 7, Hkv, d)[:, 3 : 3 + P]
    else:
        pk, pv = rnd(B, P, Hkv, d), rnd(B, P, Hkv, d)
    return [q, k, v, pk, pv]


def make_masks(B, P, S, prefix, suffix, device="cpu", seed=0):
    """Return ``(prefix_lens, prefix_mask, suffix_mask, valid)``; valid is the (B, P) bool truth.

    prefix: ``none`` | ``holes`` (random holes) | ``lens`` (random lengths, one 0) | ``empty``
    (observation 0 has no valid prefix token). suffix: ``none`` | ``pi0`` (state token 0 sees only
    itself among the suffix, action tokens see everything) | ``dead`` (π0's plus a query that
    sees no suffix key: with ``empty`` it sees no key at all).
    """
    g = torch.Generator().manual_seed(seed + 7)
    lens = mask = None
    if prefix == "none":
        valid = torch.ones(B, P, dtype=torch.bool)
    elif prefix == "holes":
        valid = torch.rand(B, P, generator=g) > 0.35
        valid[:, 0] = True
    elif prefix == "lens":
        lens = torch.randint(0, P + 1, (B,), generator=g)
        lens[0] = 0
        lens[-1] = P
        valid = torch.arange(P)[None, :] < lens[:, None]
    elif prefix == "empty":
        valid = torch.rand(B, P, generator=g) > 0.3
        valid[0] = False
    else:
        raise AssertionError(prefix)
    if prefix in ("holes", "empty"):
        mask = valid
    smask = None
    if suffix in ("pi0", "dead"):
        smask = torch.ones(S, S, dtype=torch.bool)
        smask[0, 1:] = False
        if suffix == "dead" and S > 2:
            smask[S // 2] = False
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dv(lens), dv(mask), dv(smask), valid.to(device)


def _ref_lowp(q, k, v, pk, pv, valid, smask, n, scale):
    """Attention computed like a plain torch implementation in q's dtype (see module doc)."""
    dt = q.dtype
    BN, S, Hq, _ = q.shape
    rep = Hq // k.shape[2]
    keys = torch.cat([pk.repeat_interleave(n, 0), k], 1).repeat_interleave(rep, 2)
    vals = torch.cat([pv.repeat_interleave(n, 0), v], 1).repeat_interleave(rep, 2)
    scores = torch.einsum("bshd,blhd->bhsl", q, keys).float() * scale
    sm = smask if smask is not None else torch.ones(S, S, dtype=torch.bool, device=q.device)
    allowed = torch.cat([valid.repeat_interleave(n, 0)[:, None, None, :].expand(BN, 1, S, -1),
                         sm[None, None].expand(BN, 1, S, S)], -1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    fin = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(fin, lse, 0)[..., None]) * fin[..., None]
    out = torch.einsum("bhsl,blhd->bshd", p.to(dt), vals)
    return out.to(dt), lse.transpose(1, 2)


def _loss(out, lse, go, gl):
    lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.double() * go).sum() + (lse_f.double() * gl).sum()


def _run(fn, ins, go, gl, lse_grad=True):
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    out, lse = fn(*ins)
    grads = torch.autograd.grad(_loss(out, lse, go, gl if lse_grad else torch.zeros_like(gl)), ins)
    return out.detach(), lse.detach(), grads


def check_case(fn, B, N, S, P, Hq, Hkv, d, dtype, prefix, suffix, device="cpu", seed=0, lse_grad=True,
               noncontig_prefix=False):
    """Run ``fn(q, k, v, pk, pv) -> (out, lse)`` against the fp64 oracle with the error rule."""
    ins = make_inputs(B, N, S, P, Hq, Hkv, d, dtype, device, seed, noncontig_prefix)
    lens, mask, smask, valid = make_masks(B, P, S, prefix, suffix, device, seed)
    scale = d**-0.5
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(B * N, S, Hq, d, generator=g, dtype=torch.float64).to(device)
    gl = torch.randn(B * N, S, Hq, generator=g, dtype=torch.float64).to(device)
    gl = gl if lse_grad else torch.zeros_like(gl)

    o64, l64, g64 = _run(lambda *t: prefix_attention_ref(*t, valid, smask, N, scale), [t.double() for t in ins], go,
                         gl)
    olp, llp, glp = _run(lambda *t: _ref_lowp(*t, valid, smask, N, scale), ins, go, gl)
    out, lse, grads = _run(lambda *t: fn(*t, lens=lens, mask=mask, smask=smask, group_size=N, scale=scale),
                           ins, go, gl)

    assert out.dtype == dtype and out.shape == (B * N, S, Hq, d)
    assert lse.dtype == torch.float32 and lse.shape == (B * N, S, Hq)
    dead = torch.isneginf(l64)
    assert torch.equal(torch.isneginf(lse), dead), "lse = -inf exactly for the queries that see no key"
    assert not torch.isnan(lse).any()
    if dead.any():
        assert (out[dead] == 0).all(), "a query with no visible key must give out = 0"
    floor = floor_for(dtype)
    assert_error_rule(out, o64, olp, "out", floor_rel=floor)
    fin = ~dead
    assert_error_rule(lse[fin], l64[fin], llp[fin], "lse", floor_rel=floor)
    for name, a, ref, lp in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, g64, glp):
        assert a.dtype == dtype
        assert_error_rule(a, ref, lp, name, floor_rel=floor)


def public(backend):
    def fn(q, k, v, pk, pv, *, lens, mask, smask, group_size, scale):
        return fk.prefix_attention(q, k, v, pk, pv, prefix_lens=lens, prefix_mask=mask, suffix_mask=smask,
                                   group_size=group_size, scale=scale, return_lse=True, backend=backend)
    return fn


def triton_impl(impl, block_m=None, block_n=None):
    def fn(q, k, v, pk, pv, *, lens, mask, smask, group_size, scale):
        valid = _check_inputs(q, k, v, pk, pv, lens, mask, smask, group_size)
        return triton_attention.prefix_attention_triton(q, k, v, pk, pv, valid, smask, group_size, scale, impl,
                                                        block_m=block_m, block_n=block_n)
    return fn


# ----------------------------------------------------------------------------------------------
# merge_attention_states
# ----------------------------------------------------------------------------------------------


def _attn(q, k, v, allowed):
    """Plain attention over keys ``k (L, H, d)`` with bool ``allowed (S, L)``: (out, lse)."""
    s = torch.einsum("shd,lhd->hsl", q, k).masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    fin = torch.isfinite(lse)
    p = torch.exp(s - torch.where(fin, lse, 0)[..., None]) * fin[..., None]
    return torch.einsum("hsl,lhd->shd", p, v), lse.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_equals_full_attention(dtype):
    g = torch.Generator().manual_seed(3)
    S, L, H, d = 9, 23, 3, 8
    q, k, v = (torch.randn(n, H, d, generator=g, dtype=dtype) for n in (S, L, L))
    allowed = torch.rand(S, L, generator=g) > 0.3
    allowed[2] = False  # a query with no key at all
    allowed[4] = torch.arange(L) < 10  # keys only in part a
    allowed[5] = torch.arange(L) >= 10  # keys only in part b
    in_a = (torch.arange(L) < 10)[None, :]
    oa, la = _attn(q, k, v, allowed & in_a)
    ob, lb = _attn(q, k, v, allowed & ~in_a)
    out, lse = fk.merge_attention_states(oa, la, ob, lb)
    o_full, l_full = _attn(q, k, v, allowed)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, o_full, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l_full))
    fin = torch.isfinite(l_full)
    torch.testing.assert_close(lse[fin].to(dtype), l_full[fin], atol=tol, rtol=tol)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_merge_both_empty_gives_zero_and_neg_inf():
    o = torch.randn(2, 4, 3, 8)
    ninf = torch.full((2, 4, 3), float("-inf"))
    out, lse = fk.merge_attention_states(o, ninf, o, ninf)
    assert (out == 0).all() and torch.isneginf(lse).all() and not out.isnan().any()


def test_merge_bad_shapes():
    o, lse = torch.randn(4, 3, 8), torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        fk.merge_attention_states(o, lse, torch.randn(4, 3, 7), lse)
    with pytest.raises(ValueError, match="lse_a and lse_b must have shape"):
        fk.merge_attention_states(o, torch.randn(4, 2), o, lse)


# ----------------------------------------------------------------------------------------------
# grouped torch path (backend "torch" / "cpu")
# ----------------------------------------------------------------------------------------------

TORCH_CASES = [  # B, N, S, P, Hq, Hkv, d, prefix, suffix
    (2, 4, 17, 97, 8, 1, 64, "holes", "pi0"),
    (3, 1, 1, 1, 8, 8, 64, "none", "none"),
    (1, 8, 51, 97, 8, 1, 256, "lens", "pi0"),
    (2, 8, 17, 1, 8, 8, 128, "empty", "dead"),
    (2, 4, 51, 97, 8, 1, 128, "empty", "pi0"),
    (3, 4, 1, 97, 8, 1, 64, "lens", "none"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_path_fp32(backend, case):
    check_case(public(backend), *case[:7], torch.float32, *case[7:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_lowp(dtype):
    check_case(public("torch"), 2, 4, 17, 97, 8, 1, 64, dtype, "holes", "dead")


def test_torch_path_gradcheck_fp64():
    B, N, S, P, Hq, Hkv, d = 2, 2, 3, 4, 4, 2, 3
    ins = [t.requires_grad_(True) for t in make_inputs(B, N, S, P, Hq, Hkv, d, torch.float64)]
    _, mask, smask, _ = make_masks(B, P, S, "holes", "pi0")

    def f(*t):
        out, lse = fk.prefix_attention(*t, prefix_mask=mask, suffix_mask=smask, group_size=N, return_lse=True,
                                       backend="torch")
        return out, lse

    assert torch.autograd.gradcheck(f, ins)


def test_torch_path_matches_reference_fp64_exactly():
    """The grouped path in float64 agrees with the reference to rounding (lse float64 too)."""
    B, N, S, P, Hq, Hkv, d = 2, 4, 17, 33, 8, 1, 16
    ins = make_inputs(B, N, S, P, Hq, Hkv, d, torch.float64)
    _, _, smask, valid = make_masks(B, P, S, "empty", "dead")
    o1, l1 = prefix_attention_ref(*ins, valid, smask, N, 0.3)
    o2, l2 = _prefix_attention_grouped(*ins, valid, smask, N, 0.3)
    assert l2.dtype == torch.float64
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l2, l1, atol=1e-12, rtol=1e-12)


def test_torch_compile_fullgraph():
    B, N, S, P, Hq, Hkv, d = 2, 4, 5, 9, 4, 1, 16
    ins = make_inputs(B, N, S, P, Hq, Hkv, d)
    lens = torch.tensor([9, 4])
    _, _, smask, _ = make_masks(B, P, S, "none", "pi0")

    def f(q, k, v, pk, pv, lens, smask):
        out, lse = fk.prefix_attention(q, k, v, pk, pv, prefix_lens=lens, suffix_mask=smask, group_size=N,
                                       return_lse=True, backend="torch")
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_(True) for t in ins]
    b = [t.clone().requires_grad_(True) for t in ins]
    y1 = compiled(*a, lens, smask)
    y2 = f(*b, lens, smask)
    torch.testing.assert_close(y1, y2)
    for g1, g2 in zip(torch.autograd.grad(y1, a), torch.autograd.grad(y2, b)):
        torch.testing.assert_close(g1, g2)


def test_auto_backend_on_cpu_is_the_torch_path():
    ins = make_inputs(1, 2, 3, 5, 2, 1, 8)
    out = fk.prefix_attention(*ins, group_size=2)
    torch.testing.assert_close(out, fk.prefix_attention(*ins, group_size=2, backend="torch"))


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU) — small shapes, fp32/bf16/fp16 operands
# ----------------------------------------------------------------------------------------------

INTERP_CASES = [  # B, N, S, P, Hq, Hkv, d, prefix, suffix
    (2, 4, 17, 97, 8, 1, 32, "holes", "pi0"),
    (1, 1, 1, 1, 8, 8, 16, "none", "none"),
    (2, 8, 5, 33, 8, 8, 24, "lens", "pi0"),
    (2, 1, 51, 20, 8, 1, 16, "empty", "dead"),
]


@pytest.mark.parametrize("impl", ["fused", "split"])
@pytest.mark.parametrize("case", INTERP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreter_fp32(impl, case):
    check_case(triton_impl(impl), *case[:7], torch.float32, *case[7:])


@pytest.mark.parametrize("impl", ["fused", "split"])
def test_triton_interpreter_small_tiles(impl):
    """16-row tiles that straddle samples (S·g = 6 rows per sample), several key blocks,
    GQA 4/2, a prefix sliced out of a larger cache (non-contiguous)."""
    check_case(triton_impl(impl, 16, 16), 2, 4, 3, 37, 4, 2, 16, torch.float32, "holes", "dead",
               noncontig_prefix=True)


def test_triton_interpreter_backward_tiles_differ_from_forward(monkeypatch):
    """Compiled bf16 runs the dq and dk/dv kernels with their own tiles (``_bwd_configs``): the
    gradients must not depend on the forward's tiles. Here (interpreter) 16x32 dq and 32x16
    dk/dv tiles under a 16x16 forward."""
    seen = []

    def bwd_configs(cfg, dtype, fit):
        seen.append(cfg)
        bd = cfg[2]
        return (16, 32, bd, 4, 1), (32, 16, bd, 4, 1)

    monkeypatch.setattr(triton_attention, "_bwd_configs", bwd_configs)
    check_case(triton_impl("fused", 16, 16), 2, 4, 3, 37, 4, 2, 16, torch.float32, "holes", "dead")
    assert seen, "the backward asks _bwd_configs for its tiles"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_interpreter_lowp(dtype):
    check_case(public("triton"), 2, 4, 17, 40, 8, 1, 32, dtype, "holes", "pi0")


def test_triton_only_some_inputs_need_grad():
    ins = make_inputs(2, 2, 5, 9, 4, 1, 16)
    q = ins[0].clone().requires_grad_(True)
    out = fk.prefix_attention(q, *ins[1:], group_size=2, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q)
    q2 = ins[0].clone().requires_grad_(True)
    (dq2,) = torch.autograd.grad(fk.prefix_attention(q2, *ins[1:], group_size=2, backend="torch").square().sum(), q2)
    torch.testing.assert_close(dq, dq2, atol=1e-5, rtol=1e-5)


def test_triton_rejects_float64_and_bad_impl():
    ins = make_inputs(1, 1, 2, 3, 2, 1, 16, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fk.prefix_attention(*ins, backend="triton")
    ins = [t.float() for t in ins]
    with pytest.raises(ValueError, match="impl"):
        triton_attention.prefix_attention_triton(*ins, None, None, 1, 0.25, "nope")
    with pytest.raises(ValueError, match="block_m"):
        triton_attention.prefix_attention_triton(*ins, None, None, 1, 0.25, block_m=24)


# ----------------------------------------------------------------------------------------------
# GPU (compiled Triton), skipped on CPU
# ----------------------------------------------------------------------------------------------

GPU_CASES = [  # B, N, S, P, Hq, Hkv, d, prefix, suffix
    (2, 4, 51, 816, 8, 1, 256, "holes", "pi0"),  # π0 size
    (2, 8, 51, 816, 8, 1, 256, "lens", "dead"),
    (3, 1, 17, 97, 8, 8, 128, "empty", "pi0"),
    (2, 4, 1, 97, 8, 1, 64, "holes", "none"),
    (2, 8, 17, 1, 8, 1, 16, "none", "pi0"),
    (1, 4, 51, 97, 8, 8, 256, "empty", "dead"),
]


@pytest.mark.parametrize("impl", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.gpu
@requires_cuda
def test_triton_gpu(case, dtype, impl):
    check_case(triton_impl(impl), *case[:7], dtype, *case[7:], device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_path_gpu(dtype):
    check_case(public("torch"), 2, 4, 51, 816, 8, 1, 256, dtype, "holes", "pi0", device="cuda")


@pytest.mark.gpu
@requires_cuda
def test_auto_on_gpu_uses_triton_and_float64_falls_back():
    from flowkernels.ops.attention import _resolve

    dev = torch.device("cuda")
    assert _resolve("auto", dev, torch.bfloat16) in ("triton", "torch")
    assert _resolve("auto", dev, torch.float64) == "torch"


# ----------------------------------------------------------------------------------------------
# bad input -> clear errors
# ----------------------------------------------------------------------------------------------


def _good(B=2, N=2, S=3, P=5, Hq=4, Hkv=2, d=8):
    return make_inputs(B, N, S, P, Hq, Hkv, d)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "exc", "match"),
    [
        (lambda t: [t[0][:, :, :3], *t[1:]], {}, ValueError, "must divide the query heads"),
        (lambda t: [t[0], t[1][..., :4], *t[2:]], {}, ValueError, r"k must have shape \(B·N, S, Hkv, d\)"),
        (lambda t: [*t[:3], t[3][..., :4], t[4]], {}, ValueError, r"prefix_k must have shape \(B, P, Hkv, d\)"),
        (lambda t: [*t[:4], t[4][:, :4]], {}, ValueError, r"prefix_v must have shape"),
        (lambda t: t, {"group_size": 3}, ValueError, "group_size=3 must divide the batch"),
        (lambda t: t, {"group_size": 0}, ValueError, "group_size must be an int >= 1"),
        (lambda t: [t[0][0], *t[1:]], {}, ValueError, r"q must have shape \(B·N, S, Hq, d\)"),
        (lambda t: t, {"prefix_lens": torch.tensor([5, 6])}, ValueError, r"prefix_lens must lie in \[0, P = 5\]"),
        (lambda t: t, {"prefix_lens": torch.tensor([-1, 2])}, ValueError, "prefix_lens must lie"),
        (lambda t: t, {"prefix_lens": torch.tensor([1, 2, 3])}, ValueError, r"prefix_lens must be .* shape \(B,\)"),
        (lambda t: t, {"prefix_lens": torch.tensor([1.0, 2.0])}, TypeError, "prefix_lens must be int32 or int64"),
        (lambda t: t, {"prefix_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError,
         r"prefix_mask must be .*\(2, 5\)"),
        (lambda t: t, {"prefix_mask": torch.ones(2, 5)}, TypeError, "prefix_mask must be bool"),
        (lambda t: t, {"prefix_mask": torch.ones(2, 5, dtype=torch.bool), "prefix_lens": torch.tensor([1, 2])},
         ValueError, "not both"),
        (lambda t: t, {"suffix_mask": torch.ones(3, 4, dtype=torch.bool)}, ValueError,
         r"suffix_mask must be .*\(3, 3\)"),
        (lambda t: t, {"suffix_mask": torch.ones(3, 3, dtype=torch.int8)}, TypeError, "suffix_mask must be bool"),
        (lambda t: [t[0], t[1].half(), *t[2:]], {}, TypeError, "k has dtype torch.float16 but q has torch.float32"),
        (lambda t: [t[0], t[1].to("meta"), *t[2:]], {}, ValueError, "k is on meta but q is on cpu"),
        (lambda t: t, {"prefix_mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, ValueError,
         "prefix_mask is on meta"),
        (lambda t: [t[0].int(), *t[1:]], {}, TypeError, "q must be float32, bfloat16, float16 or float64"),
        (lambda t: [t[0], t[1].numpy(), *t[2:]], {}, TypeError, "k must be a torch.Tensor"),
        (lambda t: t, {"scale": -1.0}, ValueError, "scale must be a finite number > 0"),
        (lambda t: t, {"backend": "nope"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input(mutate, kwargs, exc, match):
    kwargs = {"group_size": 2, **kwargs}
    with pytest.raises(exc, match=match):
        fk.prefix_attention(*mutate(_good()), **kwargs)


def test_named_backend_unavailable():
    ins = _good()
    with pytest.raises(fk.BackendUnavailableError):
        fk.prefix_attention(*ins, group_size=2, backend="cuda")
    if not HAS_CUDA:
        with pytest.raises(fk.BackendUnavailableError):
            fk.prefix_attention(*[t.to("meta") for t in ins], group_size=2, backend="cpu")
