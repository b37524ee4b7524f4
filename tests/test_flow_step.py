"""flow_step on every backend against the float64 oracle, plus the DESIGN properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ALL_BACKENDS, assert_error_rule, floor_for, make_masks

import flowkernels as fk
from flowkernels.ops import reference as R

SHAPES = [(1, 7, 7), (3, 50, 14), (3, 7, 32), (64, 50, 32)]


def _oracle_and_lowp(x, v, t, dt, mode, noise, std, seed, noise_level, dim_mask, step_mask):
    B, H, D = x.shape
    sm, dm = fk._checks.normalize_masks("t", dim_mask, step_mask, B, H, D, x.device)
    t_vec = t if isinstance(t, torch.Tensor) else torch.full((B,), float(t), device=x.device)
    m = R.MODES[mode]
    args = (x, v, t_vec.float(), dt, m, noise, std, seed, 0, noise_level, sm, dm)
    oracle = R.flow_step_ref(*args, upcast=True)
    low = torch.float32 if x.dtype == torch.float64 else x.dtype
    lowp = R.flow_step_ref(*args, upcast=low)
    return oracle, lowp


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "sde", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flow_step_matches_oracle(backend, device, mode, dtype, shape):
    B, H, D = shape
    if backend == "triton" and device == "cpu" and B > 8 and dtype != torch.float32:
        pytest.skip("interpreter cost: the large shape runs in fp32 only under TRITON_INTERPRET")
    g = torch.Generator().manual_seed(hash((B, H, D, mode)) % 2**31)
    x = torch.randn(B, H, D, generator=g).to(device, dtype)
    v = torch.randn(B, H, D, generator=g).to(device, dtype)
    t = (0.3 + 0.7 * torch.rand(B, generator=g)).to(device)
    t[0] = 1.0  # the t = 1 special case of the SDE schedule
    dt = 0.1
    # noise given (odd B) or drawn in the kernel; ode takes none
    noise = torch.randn(B, H, D, generator=g).to(device, dtype) if B % 2 and mode != "ode" else None
    std = (0.05 + 0.1 * torch.rand(B, H, D, generator=g)).to(device, dtype) if mode == "noise" else None
    dim_mask, step_mask = make_masks(B, H, D, ["none", "shared", "batch"][B % 3], device)
    res = fk.flow_step(x, v, t, dt, mode, noise=noise, std=std, seed=1234, noise_level=0.7,
                       dim_mask=dim_mask, step_mask=step_mask, backend=backend)
    (o_mean, o_next, _), (l_mean, l_next, l_logp) = _oracle_and_lowp(
        x, v, t, dt, mode, noise, std, 1234, 0.7, dim_mask, step_mask
    )
    fl = floor_for(dtype)
    assert res.mean.dtype == dtype and res.x_next.dtype == dtype
    assert_error_rule(res.mean, o_mean, l_mean, "mean", floor_rel=fl)
    if mode == "ode":
        assert res.x_next is res.mean
        assert torch.equal(res.logp, torch.zeros_like(res.logp))
        return
    assert_error_rule(res.x_next, o_next, l_next, "x_next", floor_rel=fl)
    # logp of the kernel's own x_next (a last-bit difference in x_next moves z by ulp/s)
    sm, dm = fk._checks.normalize_masks("t", dim_mask, step_mask, B, H, D, x.device)
    w = R.element_weight(sm, dm, torch.float64)
    s = res.std.double().expand(B, H, D)
    z = (res.x_next.double() - o_mean_exact(x, v, t, dt, mode, std, 0.7)) / s
    own = (w * (-torch.log(s) - R.HALF_LOG_2PI - 0.5 * z * z)).sum(dim=(1, 2))
    assert_error_rule(res.logp, own, l_logp, "logp", floor_rel=1e-5)


def o_mean_exact(x, v, t, dt, mode, std, a):
    xf, vf = x.double(), v.double()
    if mode == "sde":
        c_x, c_v, _ = R.sde_coefficients(t.double()[:, None, None], dt, a)
        return c_x * xf + c_v * vf
    return xf - dt * vf


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_float_t_and_float64(backend, device):
    if backend == "triton":
        pytest.skip("Triton kernels take float32/bfloat16/float16 (float64 is rejected with a TypeError)")
    x = torch.randn(3, 7, 5, dtype=torch.float64, device=device)
    v = torch.randn(3, 7, 5, dtype=torch.float64, device=device)
    noise = torch.randn_like(x)
    res = fk.flow_step(x, v, 0.75, 0.25, "sde", noise=noise, backend=backend)
    o = R.flow_step_ref(x, v, torch.full((3,), 0.75, device=device), 0.25, 1, noise, None, 0, 0, 0.5,
                        torch.ones(1, 7, device=device), torch.ones(1, 5, device=device), upcast=True)
    assert res.logp.dtype == torch.float64
    torch.testing.assert_close(res.mean, o[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.logp, o[2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_sde_with_zero_noise_level_is_ode(backend, device):
    x = torch.randn(3, 7, 14, device=device)
    v = torch.randn(3, 7, 14, device=device)
    t = torch.tensor([1.0, 0.6, 0.2], device=device)
    ode = fk.flow_step(x, v, t, 0.2, "ode", backend=backend)
    sde = fk.flow_step(x, v, t, 0.2, "sde", noise_level=0.0, seed=5, backend=backend)
    torch.testing.assert_close(sde.mean, ode.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sde.x_next, ode.x_next, rtol=1e-6, atol=1e-6)
    assert torch.equal(sde.logp, torch.zeros_like(sde.logp)) and torch.equal(sde.std, torch.zeros_like(sde.std))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["sde", "noise"])
def test_in_kernel_noise_is_philox(backend, device, mode):
    """In-kernel noise equals flowkernels.philox_normal(seed, offset) on every backend."""
    B, H, D = 3, 7, 14
    x = torch.randn(B, H, D, device=device)
    v = torch.randn(B, H, D, device=device)
    std = torch.full((B, H, D), 0.1, device=device) if mode == "noise" else None
    seed, offset = 2**40 + 17, 2**33 + 5
    res = fk.flow_step(x, v, 0.5, 0.1, mode, std=std, seed=seed, offset=offset, backend=backend)
    eps = fk.philox_normal(seed, offset, (B, H, D), device)
    expected = res.mean.double() + res.std.double() * eps.double()
    torch.testing.assert_close(res.x_next.double(), expected, rtol=1e-5, atol=1e-5)
    again = fk.flow_step(x, v, 0.5, 0.1, mode, std=std, seed=seed, offset=offset, backend=backend)
    assert torch.equal(again.x_next, res.x_next), "same seed and offset must reproduce the noise exactly"
    other = fk.flow_step(x, v, 0.5, 0.1, mode, std=std, seed=seed + 1, offset=offset, backend=backend)
    assert not torch.equal(other.x_next, res.x_next)


def test_noise_statistics():
    """Philox normals: mean 0, variance 1, no correlation between neighbours or across seeds."""
    z = fk.philox_normal(7, 0, (4, 250_000))
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert abs((z**4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    flat = z.flatten()
    for lag in (1, 2, 32, 250_000):
        c = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(c) < 5 / n**0.5, f"lag {lag}: correlation {c}"
    z2 = fk.philox_normal(8, 0, (4, 250_000)).flatten()
    assert abs(torch.corrcoef(torch.stack([flat, z2]))[0, 1].item()) < 5 / n**0.5
    # offsets continue the stream: drawing in two halves equals one draw
    a = fk.philox_normal(7, 0, (10,))
    b = fk.philox_normal(7, 10, (10,))
    assert torch.equal(torch.cat([a, b]), fk.philox_normal(7, 0, (20,)))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_in_kernel_noise_statistics(backend, device):
    B, H, D = 16, 50, 32
    x = torch.zeros(B, H, D, device=device)
    v = torch.zeros(B, H, D, device=device)
    res = fk.flow_step(x, v, 0.5, 0.1, "noise", std=torch.ones(B, H, D, device=device), seed=99, backend=backend)
    z = res.x_next.double().flatten().cpu()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1.0) < 0.05
    c = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(c) < 5 / n**0.5


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_generator_reproducible(backend, device):
    x = torch.randn(2, 7, 7, device=device)
    v = torch.randn(2, 7, 7, device=device)
    a = fk.flow_step(x, v, 0.5, 0.1, "sde", generator=torch.Generator().manual_seed(3), backend=backend)
    b = fk.flow_step(x, v, 0.5, 0.1, "sde", generator=torch.Generator().manual_seed(3), backend=backend)
    assert torch.equal(a.x_next, b.x_next)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dt", [1e-8, 1e-7, 1e-3, 0.1])
def test_sde_first_step_std_is_the_noise_level_for_any_dt(backend, device, dt):
    """At t = 1, σ·√dt = a·sqrt(1/(1 − t*))·√dt with 1 − t* = dt: exactly a. Computed as
    1 − (1 − dt) in float32 it was inf for dt = 1e-8 (NaN x_next) and 8 % low for dt = 1e-7."""
    x = torch.randn(2, 3, 4, device=device)
    v = torch.randn(2, 3, 4, device=device)
    res = fk.flow_step(x, v, 1.0, dt, "sde", noise_level=0.5, seed=1, backend=backend)
    torch.testing.assert_close(res.std, torch.full_like(res.std, 0.5), rtol=1e-6, atol=0)
    assert torch.isfinite(res.x_next).all() and torch.isfinite(res.logp).all()
    if dt < 1e-3:  # a float32 t_grid cannot hold 1 − dt apart from 1 then
        return
    # the chain log-prob's SDE transition uses the same coefficients
    steps = fk.chain_logprob(torch.stack([x, res.x_next], 1), v[:, None], torch.tensor([1.0, 1.0 - dt], device=device),
                             "sde", noise_level=0.5, include_initial=False, backend=backend)
    torch.testing.assert_close(steps, res.logp, rtol=1e-5, atol=1e-4)


def test_scalar_arguments_accept_what_a_denoising_loop_passes():
    x, v = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    grid = torch.linspace(1, 0, 5)
    ref = fk.flow_step(x, v, float(grid[1]), float(grid[1] - grid[2]), "sde", seed=3)
    for t, dt in [(grid[1], grid[1] - grid[2]), (np.float32(grid[1]), np.float64(grid[1] - grid[2])),
                  (grid[1].expand(3), (grid[1] - grid[2]).reshape(1))]:
        got = fk.flow_step(x, v, t, dt, "sde", seed=3)
        assert torch.equal(got.x_next, ref.x_next) and torch.equal(got.logp, ref.logp)
    with pytest.raises(TypeError, match="dt must be a float > 0, got bool"):
        fk.flow_step(x, v, 0.5, True, "ode")
    with pytest.raises(TypeError, match=r"dt must be a float > 0, got a tensor of shape \(2,\)"):
        fk.flow_step(x, v, 0.5, torch.tensor([0.1, 0.1]), "ode")
    with pytest.raises(TypeError, match="t must be a float or a"):
        fk.flow_step(x, v, "0.5", 0.1, "ode")
    with pytest.raises(ValueError, match="mode must be one of"):
        fk.flow_step(x, v, 0.5, 0.1, ["sde"])
    with pytest.raises(ValueError, match=r"sde needs dt <= t \(got t=0.2, dt=0.5\)"):
        fk.flow_step(x, v, 0.2, 0.5, "sde", seed=0)
    with pytest.raises(ValueError, match=r"sde needs dt <= t \(got a t of 0.2"):
        fk.flow_step(x, v, torch.tensor([1.0, 0.2, 0.6]), 0.5, "sde", seed=0)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\], got nan"):
        fk.flow_step(x, v, torch.tensor([1.0, float("nan"), 0.6]), 0.5, "ode")
    with pytest.raises(ValueError, match=r"dim_mask must have shape \(D=2,\) or \(B=3, D=2\), got \(5,\)"):
        fk.flow_step(x, v, 0.5, 0.1, "ode", dim_mask=torch.ones(5))
