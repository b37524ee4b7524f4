"""Backend selection, torch.library registration (opcheck, torch.compile) and CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import flowkernels as fk
from flowkernels._backend import resolve_backend


def test_every_cpu_backend_is_installed():
    """A missing install step (extension not built, Triton missing) must fail, not skip."""
    import flowkernels._C as C

    assert {"torch", "cpu", "triton"} <= set(fk.available_backends("cpu"))
    assert isinstance(C.has_cuda, bool)


def test_auto_resolution_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "cpu"
    monkeypatch.setenv("FLOWKERNELS_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("cpu", cpu) == "cpu"  # a named backend wins over the override
    monkeypatch.setenv("FLOWKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLOWKERNELS_BACKEND"):
        resolve_backend("auto", cpu)


def test_env_override_triton_and_float64(monkeypatch):
    """FLOWKERNELS_BACKEND=triton is taken as naming triton: float64 is a TypeError that says so
    (it came from inside the Triton launcher without the op's name), and prefix_attention honours
    it on CPU too (it used to run the torch path whatever the variable said)."""
    from flowkernels.ops import triton_attention
    from flowkernels.ops.attention import _resolve

    cpu = torch.device("cpu")
    monkeypatch.setenv("FLOWKERNELS_BACKEND", "triton")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"FLOWKERNELS_BACKEND=triton: the Triton kernels take float32, bfloat16"):
        fk.flow_step(x, x, 0.5, 0.1, "ode")
    with pytest.raises(TypeError, match=r"backend='triton': the Triton kernels take"):
        fk.flow_step(x, x, 0.5, 0.1, "ode", backend="triton")
    assert _resolve("auto", cpu, torch.float32) == "triton"
    calls = []
    real = triton_attention.prefix_attention_triton
    monkeypatch.setattr(triton_attention, "prefix_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    pk, pv = torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8)
    out = fk.prefix_attention(q, k, v, pk, pv, group_size=2)
    assert calls == [1]
    torch.testing.assert_close(out, fk.prefix_attention(q, k, v, pk, pv, group_size=2, backend="torch"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="FLOWKERNELS_BACKEND=triton"):
        fk.prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(), group_size=2)
    for env, want in (("torch", "torch"), ("cpu", "torch"), ("auto", "torch")):
        monkeypatch.setenv("FLOWKERNELS_BACKEND", env)
        assert _resolve("auto", cpu, torch.float32) == want


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fk.BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def _sample_args(op_name: str, device: str = "cpu") -> list[tuple]:
    B, H, D, K, N = 2, 5, 3, 3, 2
    x, v = torch.randn(B, H, D, device=device), torch.randn(B, H, D, device=device)
    sm, dm = torch.ones(1, H, device=device), torch.ones(1, D, device=device)
    t = torch.full((B,), 0.5, device=device)
    chain, vk = torch.randn(B, K + 1, H, D, device=device), torch.randn(B, K, H, D, device=device)
    std = torch.full((B, K, H, D), 0.1, device=device)
    tg = torch.linspace(1, 0, K + 1, device=device)
    A, n, vp = torch.randn(B, H, D, device=device), torch.randn(B, N, H, D, device=device), torch.randn(
        B, N, H, D, device=device)
    inv = torch.full((B,), 1.0 / (H * D), device=device)
    be = "cpu" if device == "cpu" else "cuda"
    return {
        "flow_step_fwd": [(x, v, t, 0.1, 1, None, None, 3, 0, 0.5, sm, dm, be),
                          (x, v, t, 0.1, 2, torch.randn_like(x), torch.full_like(x, 0.2), 0, 0, 0.5, sm, dm, be),
                          (x, v, t, 0.1, 0, None, None, 0, 0, 0.5, sm, dm, be)],
        "chain_logprob_fwd": [(chain, vk, tg, 2, std, None, True, 0.5, sm, dm, be),
                              (chain, vk, tg, 1, None, torch.tensor([0, 2], device=device), False, 0.5, sm, dm, be)],
        "chain_logprob_bwd": [(torch.randn(B, K + 1, device=device), chain, vk, tg, 2, std, None, 0.5, sm, dm, be)],
        "cfm_loss_fwd": [(A, n, vp, sm, dm, inv, be)],
        "cfm_loss_bwd": [(torch.randn(B, N, device=device), A, n, vp, sm, dm, inv, be)],
        "cfm_interpolate": [(A, n, torch.rand(B, N, device=device), be)],
    }[op_name]


OPS = ["flow_step_fwd", "chain_logprob_fwd", "chain_logprob_bwd", "cfm_loss_fwd", "cfm_loss_bwd", "cfm_interpolate"]


@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(op_name):
    """torch.library.opcheck: schema, fake (meta) kernel and dispatch are consistent."""
    op = getattr(torch.ops.flowkernels, op_name).default
    for args in _sample_args(op_name):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(backend):
    """The ops trace into one graph under torch.compile and give the eager results."""
    torch._dynamo.reset()
    B, K, H, D, N = 2, 3, 7, 5, 2
    g = torch.Generator().manual_seed(0)
    chain = torch.randn(B, K + 1, H, D, generator=g)
    t_grid = torch.linspace(1, 0, K + 1)
    actions, noise = torch.randn(B, H, D, generator=g), torch.randn(B, N, H, D, generator=g)
    tau = torch.rand(B, N, generator=g)
    W = torch.randn(D, D, generator=g, requires_grad=True)

    def fn(W):
        v = torch.tanh(chain[:, :-1] @ W)
        lp = fk.chain_logprob(chain, v, t_grid, "sde", reduce="mean", backend=backend)
        xt = fk.cfm_interpolate(actions, noise, tau, backend=backend)
        loss = fk.cfm_loss(actions, noise, tau, xt @ W, backend=backend)
        x0, v0, e0 = chain[:, 0].contiguous(), v[:, 0].contiguous(), noise[:, 0].contiguous()
        step = fk.flow_step(x0, v0, 1.0, 1.0 / K, "sde", noise=e0, backend=backend)
        return lp.sum() + loss.sum() + step.logp.sum()

    fk.set_value_checks(False)  # value checks would sync; compiled code skips them anyway
    try:
        eager = fn(W)
        (gW,) = torch.autograd.grad(eager, W)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out = compiled(W)
        (gWc,) = torch.autograd.grad(out, W)
    finally:
        fk.set_value_checks(True)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gWc, gW)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    """A K-step SDE loop with in-kernel noise captured in a CUDA graph replays exactly."""
    B, H, D, K = 64, 50, 32, 10
    x0 = torch.randn(B, H, D, device="cuda")
    W = torch.randn(D, D, device="cuda") * 0.1
    fk.set_value_checks(False)

    def loop(x):
        lp = torch.zeros(B, device="cuda")
        for k in range(K):
            res = fk.flow_step(x, torch.tanh(x @ W), 1.0 - k / K, 1.0 / K, "sde", seed=7, offset=k * B * H * D,
                               backend=backend)
            x, lp = res.x_next, lp + res.logp
        return x, lp

    try:
        static_x = x0.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            loop(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_x, out_lp = loop(static_x)
        graph.replay()
        torch.cuda.synchronize()
        ref_x, ref_lp = loop(x0.clone())
    finally:
        fk.set_value_checks(True)
    torch.testing.assert_close(out_x, ref_x)
    torch.testing.assert_close(out_lp, ref_lp)


@requires_cuda
@pytest.mark.gpu
def test_cuda_and_triton_agree_with_cpu():
    """The GPU kernels give the C++ path's answers on the same inputs (in-kernel noise too)."""
    B, H, D = 8, 50, 32
    x, v = torch.randn(B, H, D), torch.randn(B, H, D)
    ref = fk.flow_step(x, v, 0.7, 0.1, "sde", seed=3, backend="cpu")
    for be in ("cuda", "triton"):
        out = fk.flow_step(x.cuda(), v.cuda(), 0.7, 0.1, "sde", seed=3, backend=be)
        torch.testing.assert_close(out.x_next.cpu(), ref.x_next, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logp.cpu(), ref.logp, rtol=1e-4, atol=1e-3)
