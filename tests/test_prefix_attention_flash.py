"""The flash-attn backend's glue (``backend="cuda"``), on CPU against a stand-in ``flash_attn``.

flash-attn is not installable on our machines, so the real library is tested only where it is
present (the GPU tests of test_prefix_attention.py pick it up there). What is ours — viewing a
group's rows as one query sequence over the shared prefix, the lse layout, the merge and the
backward — runs here against a stand-in with flash-attn 2's contract: ``flash_attn_func(q, k, v,
softmax_scale=, return_attn_probs=True) -> (out, lse, probs)`` with q ``(b, sq, h, d)``, k/v
``(b, sk, hk, d)`` (hk divides h), out in q's dtype, lse ``(b, h, sq)`` float32, and, like the real
one, no gradient through lse.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import requires_cuda
from test_prefix_attention import make_inputs

from flowkernels.ops.attention import _prefix_attention_flash, _prefix_attention_grouped


def _standin(calls: list, grad_through_out: bool = False):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False):
        calls.append((q.shape, k.data_ptr(), k.shape))
        h, hk = q.shape[2], k.shape[2]
        kk = k.float().repeat_interleave(h // hk, dim=2)
        vv = v.float().repeat_interleave(h // hk, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * softmax_scale
        lse = torch.logsumexp(s, -1).detach()  # (b, h, sq); flash-attn gives no gradient through it
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv).to(q.dtype)
        out = out if grad_through_out else out.detach()
        return (out, lse, None) if return_attn_probs else out

    return flash_attn_func


@pytest.fixture
def flash_calls(monkeypatch):
    calls: list = []
    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func = _standin(calls)
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    return calls


@pytest.mark.parametrize(("B", "N", "S", "P", "Hq", "Hkv", "d"), [(2, 4, 17, 97, 8, 1, 64), (3, 1, 5, 9, 4, 4, 32),
                                                                  (1, 8, 3, 1, 8, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_glue_forward_backward(flash_calls, B, N, S, P, Hq, Hkv, d, dtype):
    q, k, v, pk, pv = make_inputs(B, N, S, P, Hq, Hkv, d, dtype=dtype)
    scale = d**-0.5
    leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    out, lse = _prefix_attention_flash(*leaves, None, None, N, scale)
    # the prefix call gets the shared prefix itself (no per-row copy), with a group's rows as one sequence
    assert flash_calls[0][0] == (B, N * S, Hq, d) and flash_calls[0][1] == pk.data_ptr()
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = _prefix_attention_grouped(*ref_leaves, None, None, N, scale)
    assert out.dtype == dtype and out.shape == (B * N, S, Hq, d) and lse.shape == (B * N, S, Hq)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    # a loss on out and on lse: lse's gradient reaches q and the keys through the merge weights
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))
    ((out * w).float().sum() + (lse * wl).sum()).backward()
    ((ref_out * w).float().sum() + (ref_lse * wl).sum()).backward()
    for name, a, b in zip(("q", "k", "v", "prefix_k", "prefix_v"), leaves, ref_leaves):
        assert torch.equal(a.grad, b.grad), name


def test_flash_glue_gradient_is_exact_not_flash_attn_s(flash_calls):
    """flash-attn's autograd gives no gradient through lse, so merging its two parts by autograd (the
    backend's code before) gives a wrong dq; the backend's own backward gives the exact one."""
    from flowkernels.ops.attention import merge_attention_states

    B, N, S, P, Hq, Hkv, d = 2, 2, 4, 6, 4, 1, 16
    q, k, v, pk, pv = make_inputs(B, N, S, P, Hq, Hkv, d, dtype=torch.bfloat16)
    scale = d**-0.5
    qa = q.detach().requires_grad_()
    out, _ = _prefix_attention_flash(qa, k, v, pk, pv, None, None, N, scale)
    out.float().square().sum().backward()
    qe = q.detach().requires_grad_()
    ref, _ = _prefix_attention_grouped(qe, k, v, pk, pv, None, None, N, scale)
    ref.float().square().sum().backward()
    qn = q.detach().requires_grad_()
    fa = _standin([], grad_through_out=True)
    o1, l1, _ = fa(qn.reshape(B, N * S, Hq, d), pk, pv, softmax_scale=scale, return_attn_probs=True)
    o2, l2, _ = fa(qn, k, v, softmax_scale=scale, return_attn_probs=True)
    naive, _ = merge_attention_states(o1.reshape(B * N, S, Hq, d), l1.transpose(1, 2).reshape(B * N, S, Hq),
                                      o2, l2.transpose(1, 2))
    naive.float().square().sum().backward()
    torch.testing.assert_close(naive.float(), ref.float(), atol=2e-2, rtol=2e-2)  # the forward is right...
    err_naive = (qn.grad.float() - qe.grad.float()).abs().max()
    err_ours = (qa.grad.float() - qe.grad.float()).abs().max()
    scale_g = qe.grad.float().abs().max()
    assert err_naive > 0.1 * scale_g, (err_naive, scale_g)  # ...its gradient is not
    assert err_ours < 0.02 * scale_g, (err_ours, scale_g)  # (the loss's dout differs in bf16 rounding only)


def test_flash_glue_refuses_what_it_cannot_do(flash_calls):
    q, k, v, pk, pv = make_inputs(1, 2, 3, 4, 2, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="takes no suffix_mask"):
        _prefix_attention_flash(q, k, v, pk, pv, None, torch.eye(3, dtype=torch.bool), 2, 1.0)
    with pytest.raises(NotImplementedError, match="takes a full prefix"):
        _prefix_attention_flash(q, k, v, pk, pv, torch.tensor([[True, False, True, True]]), None, 2, 1.0)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _prefix_attention_flash(q.float(), k.float(), v.float(), pk.float(), pv.float(), None, None, 2, 1.0)
    assert not flash_calls
    # an empty prefix is the suffix attention alone (flash-attn is not asked for a zero-length key set)
    out, lse = _prefix_attention_flash(q, k, v, pk[:, :0], pv[:, :0], None, None, 2, 1.0)
    ref, ref_lse = _prefix_attention_grouped(q, k, v, pk[:, :0], pv[:, :0], None, None, 2, 1.0)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and not flash_calls


@pytest.mark.gpu
@requires_cuda
def test_real_flash_attn_backend_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (not installable on our machines)")
    import flowkernels as fk

    B, N, S, P, Hq, Hkv, d = 2, 8, 51, 816, 8, 1, 256
    ins = [t.detach().requires_grad_() for t in make_inputs(B, N, S, P, Hq, Hkv, d, dtype=torch.bfloat16,
                                                            device="cuda")]
    out, lse = fk.prefix_attention(*ins, group_size=N, return_lse=True, backend="cuda")
    ref = [t.detach().requires_grad_() for t in ins]
    ref_out, ref_lse = _prefix_attention_grouped(*ref, None, None, N, d**-0.5)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    w = torch.randn_like(out)
    (out * w).float().sum().backward()
    (ref_out * w).float().sum().backward()
    for a, b in zip(ins, ref):
        assert torch.equal(a.grad, b.grad)
