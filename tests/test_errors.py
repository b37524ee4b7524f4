"""Bad input → a ValueError/TypeError naming the argument, on every backend and at the kernel
boundaries themselves (C++ extension, Triton launchers)."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_BACKENDS

import flowkernels as fk
from flowkernels._backend import BackendUnavailableError, backend_module

B, H, D, K, N = 3, 7, 5, 4, 2


def _x():
    return torch.randn(B, H, D)


FLOW_STEP_CASES = {
    "x-ndim": (dict(x=torch.randn(B, H)), ValueError, "x must have shape"),
    "v-shape": (dict(v=torch.randn(B, H, D + 1)), ValueError, "v must have shape"),
    "v-dtype": (dict(v=torch.randn(B, H, D, dtype=torch.float16)), TypeError, "v has dtype"),
    "x-int": (dict(x=torch.ones(B, H, D, dtype=torch.int32), v=torch.ones(B, H, D, dtype=torch.int32)), TypeError,
              "x must have dtype"),
    "v-device": (dict(v=torch.randn(B, H, D, device="meta")), ValueError, "v is on meta"),
    "t-above-1": (dict(t=1.5), ValueError, "t must lie in"),
    "t-negative-tensor": (dict(t=torch.tensor([0.5, -0.1, 0.5])), ValueError, "t must lie in"),
    "t-shape": (dict(t=torch.rand(B + 1)), ValueError, "t must have shape"),
    "dt-zero": (dict(dt=0.0), ValueError, "dt must be > 0"),
    "dt-above-t-sde": (dict(mode="sde", t=0.05, dt=0.1), ValueError, r"sde needs dt <= t \(got t=0.05, dt=0.1\)"),
    "sde-t-zero": (dict(mode="sde", t=0.0), ValueError, "t must lie in"),
    "std-missing": (dict(mode="noise"), ValueError, "needs std"),
    "std-nonpositive": (dict(mode="noise", std=torch.zeros(B, H, D)), ValueError, "std must be finite and > 0"),
    "std-inf": (dict(mode="noise", std=torch.full((B, H, D), float("inf"))), ValueError, "std must be finite and > 0"),
    "std-float": (dict(mode="noise", std=0.5), TypeError, "std must be a torch.Tensor"),
    "noise-numpy": (dict(mode="sde", noise=torch.randn(B, H, D).numpy()), TypeError, "noise must be a torch.Tensor"),
    "dim-mask-nan": (dict(dim_mask=torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.0])), ValueError,
                     "finite non-negative weights"),
    "step-mask-inf": (dict(step_mask=torch.full((H,), float("inf"))), ValueError, "finite non-negative weights"),
    "std-shape": (dict(mode="noise", std=torch.ones(B, H, 1)), ValueError, "std must have shape"),
    "std-for-ode": (dict(std=torch.ones(B, H, D)), ValueError, "std is only used"),
    "noise-shape": (dict(mode="sde", noise=torch.randn(B, 1, D)), ValueError, "noise must have shape"),
    "dim-mask-length": (dict(dim_mask=torch.ones(D + 2, dtype=torch.bool)), ValueError, "dim_mask must have shape"),
    "step-mask-batch": (dict(step_mask=torch.ones(B + 1, H)), ValueError, "step_mask must have shape"),
    "mode": (dict(mode="euler"), ValueError, "mode must be one of"),
    "seed": (dict(mode="sde", seed=-1), ValueError, "seed must be in"),
    "backend-name": (dict(backend="jax"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("backend,device", [p for p in ALL_BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("case", list(FLOW_STEP_CASES))
def test_flow_step_bad_input(backend, device, case):
    over, exc, msg = FLOW_STEP_CASES[case]
    args = dict(x=_x(), v=torch.randn(B, H, D), t=0.5, dt=0.1, mode="ode", backend=backend)
    args.update(over)
    with pytest.raises(exc, match=msg):
        fk.flow_step(args.pop("x"), args.pop("v"), args.pop("t"), args.pop("dt"), args.pop("mode"), **args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_named_backend_is_refused_auto_copies(backend):
    x = torch.randn(B, D, H).transpose(1, 2)
    v = torch.randn(B, H, D)
    with pytest.raises(ValueError, match="x must be contiguous"):
        fk.flow_step(x, v, 0.5, 0.1, backend=backend)
    res = fk.flow_step(x, v, 0.5, 0.1)  # auto: copies
    torch.testing.assert_close(res.mean, x - 0.1 * v)


def _chain_args(**over):
    args = dict(chain=torch.randn(B, K + 1, H, D), v=torch.randn(B, K, H, D), t_grid=torch.linspace(1, 0, K + 1),
                mode="noise", std=torch.full((B, K, H, D), 0.1))
    args.update(over)
    return args


CHAIN_CASES = {
    "chain-ndim": (dict(chain=torch.randn(B, H, D)), ValueError, "chain must have shape"),
    "chain-one-state": (dict(chain=torch.randn(B, 1, H, D)), ValueError, "at least one transition"),
    "v-steps": (dict(v=torch.randn(B, K - 1, H, D)), ValueError, "v must have shape"),
    "t-grid-length": (dict(t_grid=torch.linspace(1, 0, K)), ValueError, "t_grid must have shape"),
    "t-grid-increasing": (dict(t_grid=torch.linspace(0, 1, K + 1)), ValueError, "strictly decreasing"),
    "t-grid-range": (dict(t_grid=torch.linspace(2, 0, K + 1)), ValueError, "t_grid must lie in"),
    "std-shape": (dict(std=torch.full((B, K, H, 1), 0.1)), ValueError, "std must have shape"),
    "std-negative": (dict(std=torch.full((B, K, H, D), -0.1)), ValueError, "std must be finite and > 0"),
    "std-nan": (dict(std=torch.full((B, K, H, D), float("nan"))), ValueError, "std must be finite and > 0"),
    "std-float": (dict(std=0.1), TypeError, "std must be a torch.Tensor"),
    "v-none-with-steps": (dict(v=None, mode="sde", std=None, steps=torch.zeros(B, dtype=torch.long)), TypeError,
                          "v must be a torch.Tensor"),
    "include-initial-str": (dict(include_initial="no"), TypeError, "include_initial must be a bool"),
    "std-for-sde": (dict(mode="sde"), ValueError, "std is only used"),
    "mode-ode": (dict(mode="ode"), ValueError, "no density"),
    "steps-range": (dict(steps=torch.tensor([0, K, 1])), ValueError, "steps must lie in"),
    "steps-dtype": (dict(steps=torch.zeros(B)), TypeError, "steps must have dtype"),
    "steps-shape": (dict(steps=torch.zeros(B + 1, dtype=torch.long)), ValueError, "steps must have shape"),
    "reduce": (dict(reduce="max"), ValueError, "reduce must be"),
    "std-dtype": (dict(std=torch.full((B, K, H, D), 0.1, dtype=torch.float64)), TypeError, "std has dtype"),
    "dim-mask": (dict(dim_mask=torch.ones(B, D + 1)), ValueError, "dim_mask must have shape"),
}


@pytest.mark.parametrize("backend,device", [p for p in ALL_BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_chain_logprob_bad_input(backend, device, case):
    over, exc, msg = CHAIN_CASES[case]
    args = _chain_args(**over)
    with pytest.raises(exc, match=msg):
        fk.chain_logprob(args.pop("chain"), args.pop("v"), args.pop("t_grid"), args.pop("mode"), backend=backend,
                         **args)


CFM_CASES = {
    "actions-ndim": (dict(actions=torch.randn(B, H)), ValueError, "actions must have shape"),
    "noise-shape": (dict(noise=torch.randn(B, N, H + 1, D)), ValueError, "noise must have shape"),
    "tau-shape": (dict(tau=torch.rand(B, N + 1)), ValueError, "tau must have shape"),
    "tau-range": (dict(tau=torch.full((B, N), 1.5)), ValueError, "tau must lie in"),
    "v-shape": (dict(v_pred=torch.randn(B, N + 1, H, D)), ValueError, "v_pred must have shape"),
    "v-dtype": (dict(v_pred=torch.randn(B, N, H, D, dtype=torch.bfloat16)), TypeError, "v_pred has dtype"),
    "step-mask": (dict(step_mask=torch.ones(H + 1)), ValueError, "step_mask must have shape"),
    "dim-mask-nan": (dict(dim_mask=torch.full((D,), float("nan"))), ValueError, "finite non-negative weights"),
}


@pytest.mark.parametrize("backend,device", [p for p in ALL_BACKENDS if p.values[1] == "cpu"])
@pytest.mark.parametrize("case", list(CFM_CASES))
def test_cfm_loss_bad_input(backend, device, case):
    over, exc, msg = CFM_CASES[case]
    args = dict(actions=torch.randn(B, H, D), noise=torch.randn(B, N, H, D), tau=torch.rand(B, N),
                v_pred=torch.randn(B, N, H, D))
    args.update(over)
    with pytest.raises(exc, match=msg):
        fk.cfm_loss(args.pop("actions"), args.pop("noise"), args.pop("tau"), args.pop("v_pred"), backend=backend,
                    **args)


def test_named_backend_unavailable():
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' runs on CUDA tensors"):
        fk.flow_step(_x(), torch.randn(B, H, D), 0.5, 0.1, backend="cuda")


# ---- the kernel boundaries themselves (a second line of defence behind the Python checks) ----

def _abi_flow_step_args():
    return dict(x=torch.randn(B, H, D), v=torch.randn(B, H, D), t=torch.full((B,), 0.5), dt=0.1, mode=1,
                noise=None, std=None, seed=1, offset=0, noise_level=0.5, sm=torch.ones(1, H), dm=torch.ones(1, D))


KERNEL_BOUNDARY_CASES = {
    "v-shape": (dict(v=torch.randn(B, H, D + 1)), ValueError, "v"),
    "v-dtype": (dict(v=torch.randn(B, H, D, dtype=torch.float16)), TypeError, "v"),
    "t-length": (dict(t=torch.full((B + 1,), 0.5)), ValueError, "t"),
    "t-dtype": (dict(t=torch.full((B,), 0.5, dtype=torch.float64)), TypeError, "t"),
    "sm-shape": (dict(sm=torch.ones(1, H + 1)), ValueError, "sm"),
    "dm-dtype": (dict(dm=torch.ones(1, D, dtype=torch.float64)), TypeError, "dm"),
    "noise-shape": (dict(noise=torch.randn(B, H, 1)), ValueError, "noise"),
    "std-missing": (dict(mode=2), ValueError, "std"),
    "x-noncontiguous": (dict(x=torch.randn(B, D, H).transpose(1, 2), v=torch.randn(B, D, H).transpose(1, 2)),
                        ValueError, "contiguous"),
    "mode": (dict(mode=7), ValueError, "mode"),
}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", list(KERNEL_BOUNDARY_CASES))
def test_kernel_boundary_checks_name_the_tensor(backend, case):
    over, exc, name = KERNEL_BOUNDARY_CASES[case]
    args = _abi_flow_step_args()
    args.update(over)
    with pytest.raises(exc, match=name):
        backend_module(backend).flow_step_fwd(*args.values())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_boundary_other_ops(backend):
    mod = backend_module(backend)
    sm, dm = torch.ones(1, H), torch.ones(1, D)
    chain, v = torch.randn(B, K + 1, H, D), torch.randn(B, K, H, D)
    tg = torch.linspace(1, 0, K + 1)
    with pytest.raises(ValueError, match="v"):
        mod.chain_logprob_fwd(chain, torch.randn(B, K + 2, H, D), tg, 1, None, None, True, 0.5, sm, dm)
    with pytest.raises(ValueError, match="t_grid"):
        mod.chain_logprob_fwd(chain, v, torch.linspace(1, 0, K), 1, None, None, True, 0.5, sm, dm)
    with pytest.raises(ValueError, match="grad_terms"):
        mod.chain_logprob_bwd(torch.zeros(B, K), chain, v, tg, 1, None, None, 0.5, sm, dm)
    A, n, vp = torch.randn(B, H, D), torch.randn(B, N, H, D), torch.randn(B, N, H, D)
    with pytest.raises(ValueError, match="inv_wsum"):
        mod.cfm_loss_fwd(A, n, vp, sm, dm, torch.ones(B + 1))
    with pytest.raises(ValueError, match="v_pred"):
        mod.cfm_loss_fwd(A, n, torch.randn(B, N, H, D + 1), sm, dm, torch.ones(B))
    with pytest.raises(ValueError, match="grad_loss"):
        mod.cfm_loss_bwd(torch.zeros(B, N + 1), A, n, vp, sm, dm, torch.ones(B))
    with pytest.raises(ValueError, match="tau"):
        mod.cfm_interpolate_fwd(A, n, torch.rand(B, N + 1))


def test_auto_never_routes_float64_to_triton():
    """float64 is not a Triton dtype: ``auto`` skips triton for it (on CUDA without the CUDA extension)."""
    from flowkernels._backend import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float64) in ("cpu", "torch")
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda"), torch.float64) in ("cuda", "torch")
