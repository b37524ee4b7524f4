"""chain_logprob forward and fused backward on every backend against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_BACKENDS, assert_error_rule, floor_for, make_masks

import flowkernels as fk
from flowkernels.ops import reference as R

CASES = [  # (B, K, H, D)
    (1, 1, 7, 7),
    (3, 4, 50, 14),
    (3, 10, 7, 32),
    (64, 4, 50, 32),
]


def _inputs(B, K, H, D, mode, dtype, device, seed=0):
    """A realistic chain: each state drawn from its transition (z ~ N(0, 1)), so gradients stay
    in range of float16 as they do in real use."""
    g = torch.Generator().manual_seed(seed + B * 100 + K)
    v = torch.randn(B, K, H, D, generator=g)
    std = (0.08 + 0.08 * torch.rand(B, K, H, D, generator=g)) if mode == "noise" else None
    t_grid = torch.linspace(1.0, 0.0, K + 1)
    states = [torch.randn(B, H, D, generator=g)]
    for k in range(K):
        t, dt = t_grid[k].double(), (t_grid[k] - t_grid[k + 1]).double()
        x = states[-1].double()
        if mode == "sde":
            c_x, c_v, s = R.sde_coefficients(t.reshape(1), dt, 0.5)
            mean, s = c_x * x + c_v * v[:, k].double(), s
        else:
            mean, s = x - dt * v[:, k].double(), std[:, k].double()
        states.append((mean + s * torch.randn(B, H, D, generator=g, dtype=torch.float64)).float())
    chain = torch.stack(states, 1).to(device, dtype)
    std = std.to(device, dtype) if std is not None else None
    return chain, v.to(device, dtype), std, t_grid.to(device)


def _ref_terms(chain, v, t_grid, mode, std, steps, include_initial, dim_mask, step_mask, upcast):
    B, _, H, D = chain.shape
    sm, dm = fk._checks.normalize_masks("t", dim_mask, step_mask, B, H, D, chain.device)
    return R.chain_logprob_ref(chain, v, t_grid, R.MODES[mode], std, steps, include_initial, 0.5, sm, dm,
                               upcast=upcast), (sm, dm)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["sde", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}K{}H{}D{}".format(*c))
@pytest.mark.parametrize("use_steps", [False, True], ids=["all-steps", "k-star"])
def test_chain_logprob_matches_oracle(backend, device, mode, dtype, case, use_steps):
    B, K, H, D = case
    if backend == "triton" and device == "cpu" and B > 8 and dtype != torch.float32:
        pytest.skip("interpreter cost: the large shape runs in fp32 only under TRITON_INTERPRET")
    chain, v, std, t_grid = _inputs(B, K, H, D, mode, dtype, device)
    steps = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(B)).to(device) if use_steps else None
    if use_steps and B % 2:  # the velocity at k* only
        v = v[torch.arange(B, device=device), steps][:, None].contiguous()
    dim_mask, step_mask = make_masks(B, H, D, ["none", "shared", "batch"][(B + K) % 3], device)
    include_initial = K % 2 == 0
    v_ = v.clone().requires_grad_(True)
    std_ = std.clone().requires_grad_(True) if std is not None else None
    terms = fk.chain_logprob(chain, v_, t_grid, mode, std=std_, steps=steps, dim_mask=dim_mask,
                             step_mask=step_mask, include_initial=include_initial, reduce="none", backend=backend)
    o_terms, (sm, dm) = _ref_terms(chain, v, t_grid, mode, std, steps, include_initial, dim_mask, step_mask, True)
    l_terms, _ = _ref_terms(chain, v, t_grid, mode, std, steps, include_initial, dim_mask, step_mask, dtype)
    if not include_initial:
        o_terms, l_terms = o_terms[:, 1:], l_terms[:, 1:]
    assert terms.dtype == torch.float32
    assert_error_rule(terms, o_terms, l_terms, "terms", floor_rel=1e-5)

    g = torch.randn(terms.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (terms * g).sum().backward()
    g_full = g if include_initial else torch.cat([torch.zeros(B, 1, device=device), g], dim=1)
    o_gv, o_gs = R.chain_logprob_bwd_ref(g_full, chain, v, t_grid, R.MODES[mode], std, steps, 0.5, sm, dm, upcast=True)
    l_gv, l_gs = R.chain_logprob_bwd_ref(g_full, chain, v, t_grid, R.MODES[mode], std, steps, 0.5, sm, dm,
                                         upcast=dtype)
    assert v_.grad.dtype == dtype
    # gradients: o_* are rounded to the input dtype by the oracle; compare in float64
    o_gv64, _ = R.chain_logprob_bwd_ref(g_full, chain.double(), v.double(), t_grid, R.MODES[mode],
                                        None if std is None else std.double(), steps, 0.5, sm, dm, upcast=True)
    assert_error_rule(v_.grad, o_gv64, l_gv, "grad_v", factor=3.0, floor_rel=floor_for(dtype))
    del o_gv
    if std is not None:
        _, o_gs64 = R.chain_logprob_bwd_ref(g_full, chain.double(), v.double(), t_grid, R.MODES[mode],
                                            std.double(), steps, 0.5, sm, dm, upcast=True)
        assert_error_rule(std_.grad, o_gs64, l_gs, "grad_std", factor=3.0, floor_rel=floor_for(dtype))
        del o_gs


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "none"])
def test_reduce_modes(backend, device, reduce):
    B, K, H, D = 3, 4, 7, 5
    chain, v, std, t_grid = _inputs(B, K, H, D, "noise", torch.float32, device)
    none = fk.chain_logprob(chain, v, t_grid, "noise", std=std, reduce="none", backend=backend)
    out = fk.chain_logprob(chain, v, t_grid, "noise", std=std, reduce=reduce, backend=backend)
    expected = {"none": none, "sum": none.sum(1), "mean": none.sum(1) / (K + 1)}[reduce]
    torch.testing.assert_close(out, expected)
    no_init = fk.chain_logprob(chain, v, t_grid, "noise", std=std, include_initial=False, reduce="none",
                               backend=backend)
    assert no_init.shape == (B, K)
    torch.testing.assert_close(no_init, none[:, 1:])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["sde", "noise"])
def test_chain_from_flow_step_equals_sum_of_step_logps(backend, device, mode):
    """DESIGN property: chain_logprob of a chain made by flow_step = Σ of flow_step's log-probs."""
    B, K, H, D = 3, 5, 7, 14
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, D, generator=g).to(device) * 0.3
    t_grid = torch.linspace(1.0, 0.0, K + 1).to(device)
    x = torch.randn(B, H, D, generator=g).to(device)
    dim_mask, step_mask = make_masks(B, H, D, "batch", device)
    chain, vs, stds, step_logps = [x], [], [], []
    for k in range(K):
        v = torch.tanh(x @ W) + t_grid[k]
        std = (0.1 + 0.05 * torch.sigmoid(x)) if mode == "noise" else None
        dt = float(t_grid[k] - t_grid[k + 1])
        res = fk.flow_step(x, v, float(t_grid[k]), dt, mode, std=std, seed=11, offset=k * B * H * D,
                           dim_mask=dim_mask, step_mask=step_mask, backend=backend)
        x = res.x_next
        chain.append(x)
        vs.append(v)
        stds.append(std)
        step_logps.append(res.logp)
    chain = torch.stack(chain, 1)
    v_all = torch.stack(vs, 1)
    std_all = torch.stack(stds, 1) if mode == "noise" else None
    lp = fk.chain_logprob(chain, v_all, t_grid, mode, std=std_all, include_initial=False, dim_mask=dim_mask,
                          step_mask=step_mask, reduce="none", backend=backend)
    torch.testing.assert_close(lp, torch.stack(step_logps, 1), rtol=1e-5, atol=1e-3)
    # Flow-SDE hybrid: a single SDE step k* per sample gives that step's log-prob
    if mode == "sde":
        steps = torch.tensor([0, 2, 4], device=device)
        single = fk.chain_logprob(chain, v_all, t_grid, "sde", steps=steps, include_initial=False,
                                  dim_mask=dim_mask, step_mask=step_mask, backend=backend)
        torch.testing.assert_close(single, torch.stack(step_logps, 1)[torch.arange(B), steps], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", ["sde", "noise"])
@pytest.mark.parametrize("use_steps", [False, True])
def test_gradcheck_fp64(backend, mode, use_steps):
    B, K, H, D = 2, 3, 4, 3
    chain, v, std, t_grid = _inputs(B, K, H, D, mode, torch.float64, "cpu")
    steps = torch.tensor([2, 0]) if use_steps else None
    dim_mask, step_mask = make_masks(B, H, D, "batch", "cpu")
    v.requires_grad_(True)
    inputs = [v] if std is None else [v, std.requires_grad_(True)]

    def fn(v, std=None):
        return fk.chain_logprob(chain, v, t_grid, mode, std=std, steps=steps, dim_mask=dim_mask,
                                step_mask=step_mask, reduce="none", backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
