"""Edge cases of the public API found by probing it with unusual input.

Each test pins one fixed bug: zero-size key sets and batches in ``prefix_attention``, NaN
queries hidden as empty rows (and the contract for masked prefix slots), value checks on ``meta``
tensors, and scalars (seed, offset, dt, noise_level, clamp, shape) accepted on one backend and
refused on another or refused with an unclear message. Triton runs on CPU under the
interpreter (``conftest`` sets ``TRITON_INTERPRET=1``), tiny shapes only.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKENDS

import flowkernels as fk
from flowkernels.ops.attention import prefix_attention_ref

CPU_PARAMS = [p for p in ALL_BACKENDS if p.values[1] == "cpu"]
# prefix_attention: "cpu" is the grouped torch path like "torch"; "triton" the kernels
ATTN_PARAMS = [pytest.param("torch", id="torch"), pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton")]


def _attn_inputs(B, N, S, P, Hq, Hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B * N, S, Hq, d, generator=g)
    k = torch.randn(B * N, S, Hkv, d, generator=g)
    v = torch.randn(B * N, S, Hkv, d, generator=g)
    pk = torch.randn(B, P, Hkv, d, generator=g)
    pv = torch.randn(B, P, Hkv, d, generator=g)
    return [q, k, v, pk, pv]


def _run_attn(inputs, backend, **kw):
    """``(out, lse, grads)`` of ``Σ out·gO + Σ finite(lse)·gL`` w.r.t. the five inputs."""
    ins = [t.clone().requires_grad_() for t in inputs]
    out, lse = fk.prefix_attention(*ins, return_lse=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=g)
    g_lse = torch.randn(lse.shape, generator=g)
    loss = (out * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * g_lse).sum()
    loss.backward()
    return out.detach(), lse.detach(), [t.grad for t in ins]


# ----------------------------------------------------------------------------------------------
# prefix_attention / merge_attention_states
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ATTN_PARAMS)
def test_prefix_attention_empty_prefix(backend):
    """P = 0 (no cached prefix) used to raise IndexError from ``amax`` on the torch path."""
    B, N, S, Hq, Hkv, d = 2, 2, 3, 4, 2, 16
    ins = _attn_inputs(B, N, S, 0, Hq, Hkv, d)
    out, lse, grads = _run_attn(ins, backend, group_size=N)
    ref_out, ref_lse = prefix_attention_ref(
        *[t.double() for t in ins], torch.ones(B, 0, dtype=torch.bool), None, N, d**-0.5
    )
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert grads[3].shape == (B, 0, Hkv, d) and grads[4].shape == (B, 0, Hkv, d)
    _, _, grads_torch = _run_attn(ins, "torch", group_size=N)
    for a, b in zip(grads, grads_torch):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ATTN_PARAMS)
def test_prefix_attention_empty_suffix_and_batch(backend):
    """S = 0 raised IndexError on the torch path; B·N = 0 with ``prefix_lens`` raised from ``min()``."""
    B, N, S, P, Hq, Hkv, d = 2, 2, 3, 5, 4, 2, 16
    q, k, v, pk, pv = _attn_inputs(B, N, S, P, Hq, Hkv, d)
    out, lse, grads = _run_attn([q[:, :0], k[:, :0], v[:, :0], pk, pv], backend, group_size=N)
    assert out.shape == (B * N, 0, Hq, d) and lse.shape == (B * N, 0, Hq)
    assert all(bool((g == 0).all()) for g in grads)
    lens = torch.zeros(0, dtype=torch.int64)
    out, lse, _ = _run_attn([q[:0], k[:0], v[:0], pk[:0], pv[:0]], backend, group_size=N, prefix_lens=lens)
    assert out.shape == (0, S, Hq, d) and lse.shape == (0, S, Hq)


def test_prefix_attention_head_dim_zero_is_a_value_error():
    """d = 0 used to raise ZeroDivisionError from the default scale ``d ** -0.5``."""
    ins = [t[..., :0] for t in _attn_inputs(1, 1, 2, 3, 2, 1, 4)]
    with pytest.raises(ValueError, match="head_dim d >= 1"):
        fk.prefix_attention(*ins)


def test_prefix_attention_meta_tensors_with_prefix_lens():
    """The ``prefix_lens`` range check called ``.item()`` on meta tensors."""
    ins = [t.to("meta") for t in _attn_inputs(2, 2, 3, 5, 4, 2, 8)]
    lens = torch.tensor([1, 5], device="meta")
    out, lse = fk.prefix_attention(*ins, prefix_lens=lens, group_size=2, return_lse=True)
    assert out.shape == (4, 3, 4, 8) and out.device.type == "meta" and lse.shape == (4, 3, 4)


@pytest.mark.parametrize("fill", [1e4, -3e4], ids=["big", "negative"])
@pytest.mark.parametrize("how", ["lens", "mask"])
@pytest.mark.parametrize("backend", ATTN_PARAMS)
def test_prefix_attention_ignores_finite_values_in_masked_prefix(backend, how, fill):
    """The documented contract (docs/attention.md): masked prefix slots may hold any *finite*
    values (they are read and weighted by exactly 0; NaN/inf there would give 0·NaN, as in
    SDPA, and the kernels do not pay a dependent load to hide it). Output, lse and gradients
    equal those of a clean cache; the masked slots get exactly zero gradient."""
    B, N, S, P, Hq, Hkv, d = 2, 2, 3, 6, 4, 2, 16
    ins = _attn_inputs(B, N, S, P, Hq, Hkv, d)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    kw = dict(group_size=N)
    if how == "lens":
        valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        kw["prefix_lens"] = torch.tensor([3, 6])
    else:
        kw["prefix_mask"] = valid
    dirty = [t.clone() for t in ins]
    for t in dirty[3:]:
        t[~valid] = fill
    out, lse, grads = _run_attn(dirty, backend, **kw)
    ref_out, ref_lse, ref_grads = _run_attn(ins, "torch", **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, ref_grads):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool((grads[3][~valid] == 0).all()) and bool((grads[4][~valid] == 0).all())


@pytest.mark.parametrize("impl", ["fused", "split"])
def test_prefix_attention_triton_nan_query_is_not_an_empty_row(impl):
    """A NaN query came out of the Triton kernels as ``lse = -inf`` with zero gradients (the
    convention of a query with no key), hiding the NaN; torch gives NaN there."""
    from flowkernels.ops import triton_attention

    B, N, S, P, Hq, Hkv, d = 2, 2, 3, 5, 4, 2, 16
    ins = _attn_inputs(B, N, S, P, Hq, Hkv, d)
    ins[0][1, 2, 3, 0] = float("nan")
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out_t, lse_t = fk.prefix_attention(*ins, prefix_mask=valid, group_size=N, return_lse=True, backend="torch")
    out, lse = triton_attention.prefix_attention_triton(*ins, valid, None, N, d**-0.5, impl)
    assert torch.isnan(lse[1, 2, 3]) and torch.isnan(out[1, 2, 3]).all()
    torch.testing.assert_close(out, out_t, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, lse_t, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_merge_attention_states_nan_and_bad_input():
    """A NaN lse was merged into ``out = 0`` (taken for an empty part); a device mismatch or a
    non-tensor failed with messages that named no argument."""
    out = torch.randn(2, 3, 4, 8)
    lse = torch.randn(2, 3, 4)
    nan = torch.full_like(lse, float("nan"))
    o, m = fk.merge_attention_states(out, nan, out, lse)
    assert torch.isnan(o).all() and torch.isnan(m).all()
    empty = torch.full_like(lse, float("-inf"))
    o, m = fk.merge_attention_states(out, empty, out, empty)
    assert bool((o == 0).all()) and bool((m == float("-inf")).all())
    with pytest.raises(ValueError, match="out_b is on meta"):
        fk.merge_attention_states(out, lse, out.to("meta"), lse)
    with pytest.raises(TypeError, match=r"lse_b must be a torch\.Tensor"):
        fk.merge_attention_states(out, lse, out, 0.0)
    one, zero = torch.tensor(1.0), torch.tensor(0.0)  # 0-dim: was "merged" into a (1,) output
    with pytest.raises(ValueError, match=r"out_a must have shape \(\.\.\., S, H, d\)"):
        fk.merge_attention_states(one, zero, one, zero)


def test_merge_attention_states_refuses_mixed_or_half_dtypes():
    """A float64 out_b was cast down to out_a's float32, and bf16 lse (errors of ~1e-2·|lse| in
    the weights) was merged without a word."""
    out, lse = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="out_a and out_b must have one dtype"):
        fk.merge_attention_states(out, lse, out.double(), lse)
    with pytest.raises(TypeError, match="lse_a must be float32 or float64"):
        fk.merge_attention_states(out, lse.bfloat16(), out, lse)
    o16, _ = fk.merge_attention_states(out.bfloat16(), lse, out.bfloat16(), lse.double())
    assert o16.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# flow_step / chain_logprob / philox_normal / fpo_ratio scalars
# ----------------------------------------------------------------------------------------------


def _xv(B=2, H=3, D=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)


@pytest.mark.parametrize("backend,device", CPU_PARAMS)
@pytest.mark.parametrize("mode", ["ode", "sde", "noise"])
def test_flow_step_seed_offset_checked_in_every_mode(backend, device, mode):
    """Unused seeds (ode, or noise given) were not checked: 2**63 failed inside torch.library
    with "Expected a value of type 'int' ... found type 'int'", -1 passed on torch and failed on
    cpu; a float seed was silently truncated."""
    x, v = _xv()
    kw = dict(noise=torch.randn_like(x)) if mode != "ode" else {}
    if mode == "noise":
        kw["std"] = torch.full_like(x, 0.2)
    for seed, offset, exc, msg in [
        (2**63, 0, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (-1, 0, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (1.5, 0, TypeError, "seed must be an int"),
        (0, 2**62, ValueError, r"offset must be in \[0, 2\*\*62\)"),
        (0, -1, ValueError, r"offset must be in \[0, 2\*\*62\)"),
    ]:
        with pytest.raises(exc, match=msg):
            fk.flow_step(x, v, 0.5, 0.1, mode, seed=seed, offset=offset, backend=backend, **kw)
    res = fk.flow_step(x, v, 0.5, 0.1, mode, seed=2**63 - 1, offset=2**62 - 1, backend=backend, **kw)
    assert torch.isfinite(res.mean).all()


@pytest.mark.parametrize("backend,device", CPU_PARAMS)
def test_flow_step_nonfinite_scalars_refused_on_every_backend(backend, device):
    """dt = inf and noise_level = nan/inf ran on the torch backend (inf/NaN results) while the
    kernels refused them."""
    x, v = _xv()
    with pytest.raises(ValueError, match="dt must be > 0"):
        fk.flow_step(x, v, 0.5, math.inf, "ode", backend=backend)
    for level in (math.nan, math.inf):
        with pytest.raises(ValueError, match="noise_level must be finite"):
            fk.flow_step(x, v, 0.5, 0.1, "sde", noise_level=level, seed=0, backend=backend)


def test_flow_step_ode_refuses_noise():
    """ode adds no noise: a given ``noise`` was silently ignored (``std`` was already refused)."""
    x, v = _xv()
    with pytest.raises(ValueError, match="noise is only used by modes 'sde' and 'noise'"):
        fk.flow_step(x, v, 0.5, 0.1, "ode", noise=torch.randn_like(x))


@pytest.mark.parametrize("backend,device", CPU_PARAMS)
def test_chain_logprob_nan_noise_level_refused(backend, device):
    g = torch.Generator().manual_seed(0)
    chain, v = torch.randn(2, 3, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    with pytest.raises(ValueError, match="noise_level must be finite"):
        fk.chain_logprob(chain, v, torch.linspace(1, 0, 3), "sde", noise_level=math.nan, backend=backend)


def test_value_checks_skip_meta_tensors():
    """Value checks (t range, std > 0, steps range, t_grid order) called ``.item()`` on meta."""
    x, v = (t.to("meta") for t in _xv())
    t = torch.full((2,), 0.5, device="meta")
    res = fk.flow_step(x, v, t, 0.1, "noise", std=torch.empty_like(x), seed=0)
    assert res.mean.shape == (2, 3, 4) and res.logp.shape == (2,)
    chain, vv = torch.empty(2, 3, 3, 4, device="meta"), torch.empty(2, 2, 3, 4, device="meta")
    lp = fk.chain_logprob(
        chain, vv, torch.empty(3, device="meta"), "sde", steps=torch.zeros(2, dtype=torch.int64, device="meta")
    )
    assert lp.shape == (2,) and lp.device.type == "meta"


def test_philox_normal_bad_arguments_named():
    """A float seed/offset or a bad shape failed deep inside torch with messages naming nothing."""
    cases = [
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(offset=2.0), TypeError, "offset must be an int"),
        (dict(seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (dict(offset=-1), ValueError, r"offset must be in \[0, 2\*\*62\)"),
        (dict(shape=(-1, 3)), ValueError, "shape must have sizes >= 0"),
        (dict(shape=3), TypeError, "shape must be a tuple of ints"),
        (dict(shape=(2.0, 3)), TypeError, "shape must be a tuple of ints"),
    ]
    for over, exc, msg in cases:
        args = dict(seed=1, offset=0, shape=(2, 3)) | over
        with pytest.raises(exc, match=msg):
            fk.philox_normal(**args)
    assert fk.philox_normal(2**63 - 1, 2**62 - 1, [2, 2]).shape == (2, 2)


def test_fpo_ratio_nan_clamp_and_empty_mean():
    """clamp = NaN made every ratio NaN; mode 'mean' over N = 0 losses returned NaN."""
    old, new = torch.rand(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="clamp must be > 0"):
        fk.fpo_ratio(old, new, clamp=math.nan)
    with pytest.raises(TypeError, match="clamp must be a float > 0 or None, got str"):
        fk.fpo_ratio(old, new, clamp="3")
    with pytest.raises(ValueError, match="needs N >= 1"):
        fk.fpo_ratio(old[:, :0], new[:, :0], mode="mean")
    assert fk.fpo_ratio(old[:, :0], new[:, :0], mode="per_sample").shape == (2, 0)


def test_prefix_attention_numpy_group_size():
    """A NumPy integer group size (e.g. from a config array) was refused as "must be an int >= 1, got 2";
    it now equals the Python int, while bools and floats stay refused."""
    np = pytest.importorskip("numpy")
    ins = _attn_inputs(2, 2, 3, 5, 4, 2, 8)
    want = fk.prefix_attention(*ins, group_size=2, backend="torch")
    torch.testing.assert_close(fk.prefix_attention(*ins, group_size=np.int64(2), backend="torch"), want)
    for bad in (np.bool_(True), 2.0):
        with pytest.raises(ValueError, match="group_size"):
            fk.prefix_attention(*ins, group_size=bad, backend="torch")
