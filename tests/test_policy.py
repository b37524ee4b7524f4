"""The π0 / π0.5 policy (flowrl.models) on the tiny config, CPU, float32.

The oracle is a NAIVE π0 written plainly here: the full prefix + suffix sequence through both
Gemma stacks at every denoising step, one dense (cumulative "ar") mask, plain softmax attention,
plain Euler / Flow-SDE / Flow-Noise steps; no flowkernels, no cache, no compaction.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flowrl.models import Observation, Pi0Policy, PrefixCache, get_config
from flowrl.models.weights import CheckpointKeyError, to_lerobot_state_dict

torch.set_num_threads(2)
VARIANTS = ["pi0", "pi05"]


def _randomize(p: Pi0Policy, seed: int = 0) -> Pi0Policy:
    """Non-trivial norms / adaRMS / noise head (their init is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in p.named_parameters():
            if "norm" in name and "vision" not in name:
                t.add_(0.2 * torch.randn(t.shape, generator=g))
            if name.startswith("noise_head.fc2"):
                t.add_(0.5 * torch.randn(t.shape, generator=g))
    return p


@pytest.fixture(scope="module", params=VARIANTS)
def policy(request) -> Pi0Policy:
    torch.manual_seed(0)
    return _randomize(Pi0Policy(get_config("tiny", variant=request.param))).eval()


def make_obs(p: Pi0Policy, B: int = 3, seed: int = 1) -> Observation:
    """Masked cameras and token padding present (row 1: camera 1 off; row 2: camera 0 off; holes)."""
    c = p.config
    g = torch.Generator().manual_seed(seed)
    L = c.max_token_len - 3
    images = torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size, generator=g) * 2 - 1
    im_mask = torch.ones(B, c.num_cameras, dtype=torch.bool)
    if B > 1:
        im_mask[1, -1] = False
    if B > 2:
        im_mask[2, 0] = False
    tokens = torch.randint(0, c.vocab_size, (B, L), generator=g)
    lens = torch.tensor([L, L // 2, L - 4, 3][:B] + [L] * max(0, B - 4))
    tmask = torch.arange(L)[None] < lens[:, None]
    if B > 2:
        tmask[2, 1] = False  # a hole inside the prompt
    state = torch.randn(B, c.max_state_dim - 5, generator=g) if c.variant == "pi0" else None
    return Observation(images, im_mask, tokens, tmask, state)


# ------------------------------------------------------------------------------------------------
# the naive oracle


def _norm(x, w=None, mod=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if mod is None:
        return y * (1 + w), None
    scale, shift, gate = mod
    return y * (1 + scale) + shift, gate


def _rope(x, pos, theta=1e4):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = pos[..., None].float() * inv
    emb = torch.cat([f, f], -1)[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _time_emb(t: float, dim: int) -> torch.Tensor:
    t = float(torch.tensor(t, dtype=torch.float32))  # lerobot's time is a float32 tensor
    frac = torch.linspace(0, 1, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** frac
    x = 2 * math.pi / period * t
    return torch.cat([x.sin(), x.cos()]).float()


def naive_velocity(p: Pi0Policy, obs: Observation, x: torch.Tensor, t: float):
    """Full joint forward of one denoising step; returns (velocity (B,H,D), expert features (B,H,We))."""
    c = p.config
    B, C = obs.images.shape[:2]
    T, H = c.tokens_per_image, c.action_horizon
    img = p.projector(p.vision_tower(obs.images.flatten(0, 1))).view(B, C * T, -1)
    lang = p.embed_tokens(obs.tokens) * math.sqrt(c.vlm_width)
    pre = torch.cat([img, lang], 1)
    pre_valid = torch.cat([obs.image_masks.repeat_interleave(T, 1), obs.token_masks], 1)
    temb = _time_emb(t, c.expert_width).to(x.dtype)[None, None].expand(B, H, -1)
    a = p.action_in_proj(x)
    cond = None
    if c.variant == "pi0":
        state = F.pad(obs.state, (0, c.max_state_dim - obs.state.shape[1]))
        h_act = p.action_time_mlp_out(F.silu(p.action_time_mlp_in(torch.cat([a, temb], -1))))
        suf = torch.cat([p.state_proj(state)[:, None], h_act], 1)
        ar_suf = [1, 1] + [0] * (H - 1)
    else:
        cond = F.silu(p.time_mlp_out(F.silu(p.time_mlp_in(temb[:, 0]))))[:, None]
        suf = a
        ar_suf = [1] + [0] * (H - 1)
    Pn, S = pre.shape[1], suf.shape[1]
    pad = torch.cat([pre_valid, torch.ones(B, S, dtype=torch.bool)], 1)
    ar = torch.tensor([0] * Pn + ar_suf)
    cs = ar.cumsum(0)
    allowed = (cs[None, :] <= cs[:, None])[None] & pad[:, None, :] & pad[:, :, None]
    pos = pad.long().cumsum(1) - 1
    hs = [pre, suf]
    for lv, le in zip(p.vlm.layers, p.expert.layers):
        layers = [lv, le]
        qs, ks, vs, gates = [], [], [], []
        for i, (ly, h) in enumerate(zip(layers, hs)):
            mod = ly.input_layernorm.modulation(cond) if (i == 1 and cond is not None) else None
            y, gate = _norm(h, getattr(ly.input_layernorm, "weight", None), mod)
            gates.append(gate)
            qs.append(ly.self_attn.q_proj(y).view(B, h.shape[1], c.num_heads, c.head_dim))
            ks.append(ly.self_attn.k_proj(y).view(B, h.shape[1], c.num_kv_heads, c.head_dim))
            vs.append(ly.self_attn.v_proj(y).view(B, h.shape[1], c.num_kv_heads, c.head_dim))
        q, k, v = _rope(torch.cat(qs, 1), pos), _rope(torch.cat(ks, 1), pos), torch.cat(vs, 1)
        g = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        s = torch.einsum("bshd,blhd->bhsl", q, k) / math.sqrt(c.head_dim)
        s = s.masked_fill(~allowed[:, None], torch.finfo(s.dtype).min)
        o = torch.einsum("bhsl,blhd->bshd", s.softmax(-1), v).reshape(B, Pn + S, -1)
        outs, start = [], 0
        for i, (ly, h) in enumerate(zip(layers, hs)):
            seg = o[:, start : start + h.shape[1]]
            start += h.shape[1]
            r = ly.self_attn.o_proj(seg)
            h = h + (r if gates[i] is None else r * gates[i])
            mod = ly.post_attention_layernorm.modulation(cond) if (i == 1 and cond is not None) else None
            y, gate = _norm(h, getattr(ly.post_attention_layernorm, "weight", None), mod)
            m = ly.mlp.down_proj(F.gelu(ly.mlp.gate_proj(y), approximate="tanh") * ly.mlp.up_proj(y))
            outs.append(h + (m if gate is None else m * gate))
        hs = outs
    fmod = p.expert.norm.modulation(cond) if cond is not None else None
    feats, _ = _norm(hs[1], getattr(p.expert.norm, "weight", None), fmod)
    feats = feats[:, -H:]
    return p.action_out_proj(feats), feats


def naive_sample(p, obs, mode, K, noise, step_noise, a=0.5, sde_steps=None):
    x = noise
    dt = 1.0 / K
    for k in range(K):
        t = 1.0 - k / K
        v, feats = naive_velocity(p, obs, x, t)
        mean = x - dt * v
        if mode == "ode":
            x = mean
            continue
        if mode == "noise":
            std = p.noise_head(feats)
        else:
            tn = t - dt
            ts = 1 - dt if t == 1.0 else t
            sig = a * math.sqrt(t / (1 - ts))
            a0, a1 = x - t * v, x + (1 - t) * v
            mean_sde = (1 - tn) * a0 + (tn - sig**2 * dt / (2 * t)) * a1
            std = torch.full_like(x, sig * math.sqrt(dt))
            if sde_steps is not None:
                sel = (sde_steps == k)[:, None, None]
                mean = torch.where(sel, mean_sde, mean)
                std = torch.where(sel, std, torch.zeros_like(std))
            else:
                mean = mean_sde
        x = mean + std * step_noise[:, k]
    return x


# ------------------------------------------------------------------------------------------------
# (1) cached path == naive path


@pytest.mark.parametrize("mode", ["ode", "sde", "noise", "sde_hybrid"])
def test_cached_equals_naive(policy, mode):
    p, c = policy, policy.config
    obs = make_obs(p)
    B, K = obs.batch_size, 4
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(B, c.action_horizon, c.action_dim, generator=g)
    step_noise = torch.randn(B, K, c.action_horizon, c.action_dim, generator=g)
    sde_steps = torch.tensor([0, 2, 3]) if mode == "sde_hybrid" else None
    m = "sde" if mode == "sde_hybrid" else mode
    sn = None if m == "ode" else step_noise  # ode takes no transition noise
    with torch.no_grad():
        r = p.sample_actions(obs, mode=m, num_steps=K, noise=noise, step_noise=sn, sde_steps=sde_steps)
        ref = naive_sample(p, obs, m, K, noise, step_noise, sde_steps=sde_steps)
    err = (r.actions - ref).abs().max().item()
    assert err <= 1e-5, f"{c.variant}/{mode}: max |Δaction| = {err:.3e}"
    assert r.chain.shape == (B, K + 1, c.action_horizon, c.action_dim)
    assert torch.equal(r.chain[:, 0], noise) and torch.equal(r.chain[:, -1], r.actions)


def test_first_velocity_matches_naive(policy):
    """The velocity itself (not only the integrated chain), and the cache compaction."""
    p, c = policy, policy.config
    obs = make_obs(p)
    x = torch.randn(obs.batch_size, c.action_horizon, c.action_dim)
    with torch.no_grad():
        cache = p.encode_prefix(obs)
        tc = p.time_constants(torch.tensor([0.7]))
        v = p.velocity(p.suffix_features(cache, x, tc, 1, p.suffix_rope(cache, 1)))
        ref, _ = naive_velocity(p, obs, x, 0.7)
        p64 = copy.deepcopy(p).double()
        o64 = replace(obs, images=obs.images.double(), state=None if obs.state is None else obs.state.double())
        ref64, _ = naive_velocity(p64, o64, x.double(), 0.7)
    # flash-attention's rule: the cached fp32 path is as close to fp64 as the naive fp32 path is
    err, err_naive = (v.double() - ref64).abs().max().item(), (ref.double() - ref64).abs().max().item()
    assert err <= 2 * err_naive + 2e-6, (err, err_naive)
    assert (v - ref).abs().max().item() <= 5e-5
    T = c.tokens_per_image
    lens = obs.image_masks.sum(1) * T + obs.token_masks.sum(1)
    assert torch.equal(cache.prefix_lens, lens)
    extra = 1 if c.variant == "pi0" else 0
    assert cache.keys.shape == (c.depth, obs.batch_size, int(lens.max()) + extra, c.num_kv_heads, c.head_dim)
    assert torch.equal(cache.prefix_mask.sum(1), lens + extra)


# ------------------------------------------------------------------------------------------------
# (7) group_size: N rows share one prefix == each row with its own (repeated) observation


@pytest.mark.parametrize("mode", ["ode", "noise"])
def test_group_size_equals_repeated_obs(policy, mode):
    p, c = policy, policy.config
    obs = make_obs(p, B=2)
    N, K = 3, 3
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2 * N, c.action_horizon, c.action_dim, generator=g)
    sn = torch.randn(2 * N, K, c.action_horizon, c.action_dim, generator=g) if mode != "ode" else None
    r1 = p.sample_actions(obs, mode=mode, num_steps=K, group_size=N, noise=noise, step_noise=sn)
    r2 = p.sample_actions(obs.repeat_interleave(N), mode=mode, num_steps=K, group_size=1, noise=noise, step_noise=sn)
    assert (r1.actions - r2.actions).abs().max().item() <= 1e-5
    assert torch.allclose(r1.logp, r2.logp, rtol=1e-5, atol=1e-3)


def test_cache_reuse_and_not_written(policy):
    p = policy
    obs = make_obs(p)
    cache = p.encode_prefix(obs)
    assert isinstance(cache, PrefixCache)
    k0, v0 = cache.keys.clone(), cache.values.clone()
    r1 = p.sample_actions(cache, mode="ode", num_steps=2, group_size=2, noise=torch.randn(6, 50, 32))
    r2 = p.sample_actions(obs, mode="ode", num_steps=2, group_size=2, noise=r1.chain[:, 0])
    assert torch.equal(cache.keys, k0) and torch.equal(cache.values, v0)
    assert (r1.actions - r2.actions).abs().max() <= 1e-6


def test_stale_cache_is_refused(policy):
    """A cache encoded before an in-place update of the prefix weights gave the old VLM's K/V, silently.
    π0's state token runs through the expert, so an expert-only step makes π0's cache stale too; π0.5's
    prefix has no expert part."""
    p = copy.deepcopy(policy)
    obs = make_obs(p, B=2)
    noise, tau = torch.randn(2, 50, 32), torch.full((2, 1), 0.5)
    for params, stale in ((p.vlm.parameters(), True), (p.expert.parameters(), p.config.variant == "pi0"),
                          (p.action_out_proj.parameters(), False)):
        cache = p.encode_prefix(obs)
        p.sample_actions(cache, num_steps=2, noise=noise)
        opt = torch.optim.SGD(list(params), lr=1e-3)
        for q in opt.param_groups[0]["params"]:
            q.grad = torch.ones_like(q)
        opt.step()
        if stale:
            for call in (lambda c: p.sample_actions(c, num_steps=2, noise=noise), lambda c: p.value(c),
                         lambda c: p.cfm_losses(c, noise, noise[:, None], tau)):
                with pytest.raises(ValueError, match="PrefixCache is stale"):
                    call(cache)
            p.sample_actions(replace(cache, weights_version=None), num_steps=2, noise=noise)  # the escape hatch
        else:
            p.sample_actions(cache, num_steps=2, noise=noise)
        p.sample_actions(p.encode_prefix(obs), num_steps=2, noise=noise)  # a fresh cache is fine
    with torch.no_grad():  # load_state_dict copies in place: stale as well
        cache = p.encode_prefix(obs)
        p.load_state_dict(policy.state_dict())
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    # load_state_dict(assign=True) replaces the Parameter objects: the versions of the old ones never move again
    cache = p.encode_prefix(obs)
    p.load_state_dict({k: v.clone() for k, v in policy.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    cache = p.encode_prefix(obs)  # and the new Parameters are tracked: a step on them is seen
    with torch.no_grad():
        next(p.vlm.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    # writes through .data (DeepSpeed's ZeRO / bf16 optimizers) bump no version counter: mark_weights_updated
    cache = p.encode_prefix(obs)
    for q in p.vlm.parameters():
        q.data.mul_(1.01)
    p.sample_actions(cache, num_steps=2, noise=noise)  # unseen (the trainer marks after each step)
    p.mark_weights_updated()
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    cache = p.encode_prefix(obs)  # a load through a parent module reaches the policy's hook as well
    torch.nn.ModuleDict({"policy": p}).load_state_dict(
        {f"policy.{k}": v.clone() for k, v in policy.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    cache = p.encode_prefix(obs)
    with torch.no_grad():
        next(p.vlm.parameters()).add_(1e-3)  # the new Parameters are tracked
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    cache = p.encode_prefix(obs)  # a failed strict load may have copied some tensors: stale too
    with pytest.raises(RuntimeError, match="Missing key"):
        p.load_state_dict({k: v for k, v in policy.state_dict().items() if "expert" not in k})
    with pytest.raises(ValueError, match="stale"):
        p.sample_actions(cache, num_steps=2, noise=noise)
    # another policy's cache (same sizes) is not checked: it is right when that policy's prefix weights are these
    q = copy.deepcopy(p)
    c = q.encode_prefix(obs)
    assert torch.equal(p.sample_actions(c, num_steps=2, noise=noise).actions,
                       q.sample_actions(c, num_steps=2, noise=noise).actions)


# ------------------------------------------------------------------------------------------------
# (2) cfm_losses: N pairs in one prefix pass == N separate single-pair passes (values, gradients)


def test_cfm_losses_pairs_equal_separate(policy):
    p, c = policy, policy.config
    p.freeze("none")
    obs = make_obs(p)
    B, N = obs.batch_size, 4
    g = torch.Generator().manual_seed(5)
    actions = torch.randn(B, c.action_horizon, c.action_dim, generator=g)
    noise = torch.randn(B, N, c.action_horizon, c.action_dim, generator=g)
    tau = 0.001 + 0.998 * torch.rand(B, N, generator=g)
    dim_mask = torch.arange(c.action_dim) < 7
    params = [q for q in p.parameters() if q.requires_grad]
    loss = p.cfm_losses(obs, actions, noise, tau, dim_mask=dim_mask)
    assert loss.shape == (B, N)
    w = torch.randn(B, N, generator=g)
    g1 = torch.autograd.grad((loss * w).sum(), params, allow_unused=True)
    sep = torch.stack([p.cfm_losses(obs, actions, noise[:, n : n + 1], tau[:, n : n + 1], dim_mask=dim_mask)[:, 0]
                       for n in range(N)], 1)
    g2 = torch.autograd.grad((sep * w).sum(), params, allow_unused=True)
    assert torch.allclose(loss, sep, rtol=1e-5, atol=1e-6)
    nz = 0
    for a, b in zip(g1, g2):
        if a is None:
            assert b is None
            continue
        nz += int(a.abs().sum() > 0)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    assert nz > 10  # gradients reach the VLM and the vision tower too
    # the loss is the plain CFM loss of the naive velocity
    with torch.no_grad():
        x_tau = tau[0, 0] * noise[:, 0] + (1 - tau[0, 0]) * actions
        v, _ = naive_velocity(p, obs, x_tau, float(tau[0, 0]))
        ref = ((v - (noise[:, 0] - actions))[..., :7] ** 2).mean((-2, -1))
    assert abs(loss[0, 0].item() - ref[0].item()) <= 1e-5 * (1 + ref[0].item())


# ------------------------------------------------------------------------------------------------
# (3) chain_logprob recomputes the rollout's log-probs


@pytest.mark.parametrize("mode", ["noise", "sde", "sde_hybrid"])
def test_chain_logprob_matches_rollout(policy, mode):
    p, c = policy, policy.config
    obs = make_obs(p, B=2)
    N, K = 2, 4
    sde_steps = torch.tensor([0, 3, 1, 2]) if mode == "sde_hybrid" else None
    m = "sde" if mode == "sde_hybrid" else mode
    step_mask = torch.arange(c.action_horizon) < 20
    with torch.no_grad():
        r = p.sample_actions(obs, mode=m, num_steps=K, group_size=N, sde_steps=sde_steps,
                             generator=torch.Generator().manual_seed(0), step_mask=step_mask)
    lp = p.chain_logprob(obs, r.chain, m, group_size=N, steps=sde_steps, step_mask=step_mask)
    assert lp.shape == (2 * N,)
    expect = r.step_logps.sum(1) + (r.initial_logp if m == "noise" else 0)
    assert torch.allclose(r.logp, expect)
    assert torch.allclose(lp, r.logp, rtol=1e-5, atol=1e-3), (lp - r.logp).abs().max()
    lp.sum().backward()
    head = p.noise_head.fc2.weight.grad if m == "noise" else p.expert.layers[0].mlp.up_proj.weight.grad
    assert head is not None and head.abs().sum() > 0
    p.zero_grad(set_to_none=True)


def test_chain_logprob_noise_at_one_step_is_that_transitions_term(policy):
    """Flow-Noise's single transition at k* (``steps`` with mode noise) used to fail: the noise head's
    std for k* alone was refused by the op, which takes std for all K steps."""
    p = policy
    obs = make_obs(p, B=2)
    N, K = 2, 4
    with torch.no_grad():
        r = p.sample_actions(obs, mode="noise", num_steps=K, group_size=N, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([0, 3, 1, 2])
    terms = p.chain_logprob(obs, r.chain, "noise", group_size=N, reduce="none", include_initial=False)  # (BN, K)
    one = p.chain_logprob(obs, r.chain, "noise", group_size=N, steps=steps, include_initial=False)
    want = terms[torch.arange(2 * N), steps]
    assert torch.allclose(one, want, rtol=1e-5, atol=1e-3), (one - want).abs().max()
    one.sum().backward()
    assert p.noise_head.fc2.weight.grad is not None and p.noise_head.fc2.weight.grad.abs().sum() > 0
    p.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# (4) weights


def test_save_load_roundtrip(policy, tmp_path):
    p = policy
    p.save_pretrained(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["config.json", "model.safetensors"], files  # no temp files left
    q = Pi0Policy.from_pretrained(tmp_path / "ckpt")
    assert q.config == p.config
    sa, sb = p.state_dict(), q.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    obs = make_obs(p)
    noise = torch.randn(3, 50, 32)
    assert torch.equal(p.sample_actions(obs, noise=noise, num_steps=2).actions,
                       q.eval().sample_actions(obs, noise=noise, num_steps=2).actions)


@pytest.mark.parametrize("cast", ["to_bf16", "set_precision_bf16"])
def test_save_load_roundtrip_keeps_every_tensors_dtype(policy, tmp_path, cast):
    """A model cast with .to(bfloat16) came back with 75 float32 tensors (values equal, actions ~1e-2 apart)."""
    import copy

    p = copy.deepcopy(policy)
    p = p.to(torch.bfloat16) if cast == "to_bf16" else p.set_precision(torch.bfloat16)
    p.save_pretrained(tmp_path / "ckpt")
    q = Pi0Policy.from_pretrained(tmp_path / "ckpt")
    sa, sb = p.state_dict(), q.state_dict()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    obs = make_obs(p)
    noise = torch.randn(3, 50, 32)
    assert torch.equal(p.eval().sample_actions(obs, noise=noise, num_steps=2).actions,
                       q.eval().sample_actions(obs, noise=noise, num_steps=2).actions)


def test_save_is_atomic(policy, tmp_path, monkeypatch):
    import safetensors.torch as st

    d = tmp_path / "ckpt"
    policy.save_pretrained(d)
    before = (d / "model.safetensors").read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        policy.save_pretrained(d)
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


def test_lerobot_key_map_roundtrip(policy, tmp_path):
    """A checkpoint in lerobot's layout (model.paligemma_with_expert…, config.json type) loads exactly."""
    import json

    from safetensors.torch import save_file

    p, c = policy, policy.config
    sd = to_lerobot_state_dict(p.state_dict())
    assert "model.paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight" in sd
    assert ("model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"
            in sd)
    assert "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight" in sd
    lm = sd.pop("model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    sd["model.paligemma_with_expert.paligemma.lm_head.weight"] = lm  # tied weights saved once
    sd["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(4, c.expert_width)
    d = tmp_path / "lerobot"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    cams = {f"observation.images.cam{i}": {"type": "VISUAL", "shape": [3, 32, 32]} for i in range(c.num_cameras)}
    meta = {"type": c.variant, "chunk_size": c.action_horizon, "tokenizer_max_length": c.max_token_len,
            "image_resolution": [c.image_size, c.image_size], "input_features": cams, "dtype": "float32",
            "max_state_dim": c.max_state_dim}
    (d / "config.json").write_text(json.dumps(meta))
    from flowrl.models.weights import load_policy

    q = load_policy(Pi0Policy, d, vision_heads=c.vision_heads, value_heads=c.value_heads,
                    noise_head_hidden=c.noise_head_hidden, value_hidden=c.value_hidden)
    assert q.load_format == "lerobot"
    for k, v in p.state_dict().items():
        if not k.startswith(("noise_head", "value_")):
            assert torch.equal(v, q.state_dict()[k]), k
    # openpi PyTorch layout: the same keys without "model."
    d2 = tmp_path / "openpi"
    d2.mkdir()
    save_file({k[len("model."):]: v.contiguous() for k, v in sd.items()}, str(d2 / "model.safetensors"))
    q2 = load_policy(Pi0Policy, d2, config=q.config)
    assert q2.load_format == "openpi"
    # a missing and an unknown key are named in the error
    bad = dict(sd)
    bad.pop("model.action_out_proj.bias")
    bad["model.paligemma_with_expert.something_new.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as ei:
        load_policy(Pi0Policy, d, config=q.config)
    msg = str(ei.value)
    assert "action_out_proj.bias" in msg and "something_new" in msg
    with pytest.raises(FileNotFoundError, match="local"):
        Pi0Policy.from_pretrained(tmp_path / "does-not-exist")


# ------------------------------------------------------------------------------------------------
# (5) bad input


def test_bad_inputs(policy):
    p, c = policy, policy.config
    obs = make_obs(p)
    with pytest.raises(ValueError, match="cameras"):
        p.encode_prefix(replace(obs, images=obs.images[:, :1], image_masks=obs.image_masks[:, :1]))
    with pytest.raises(ValueError, match="images must be 32x32"):
        p.encode_prefix(replace(obs, images=torch.zeros(3, c.num_cameras, 3, 16, 16)))
    with pytest.raises(ValueError, match="vocab_size"):
        p.encode_prefix(replace(obs, tokens=obs.tokens + c.vocab_size))
    with pytest.raises(TypeError, match="tokens must be int64"):
        p.encode_prefix(replace(obs, tokens=obs.tokens.float()))
    with pytest.raises(ValueError, match="image_masks"):
        p.encode_prefix(replace(obs, image_masks=obs.image_masks.long()))
    if c.variant == "pi0":
        with pytest.raises(ValueError, match="max_state_dim"):
            p.encode_prefix(replace(obs, state=torch.zeros(3, c.max_state_dim + 1)))
        with pytest.raises(ValueError, match="state"):
            p.encode_prefix(replace(obs, state=None))
    else:
        with pytest.raises(ValueError, match="state must be None"):
            p.encode_prefix(replace(obs, state=torch.zeros(3, 8)))
    with pytest.raises(ValueError, match="mode"):
        p.sample_actions(obs, mode="euler")
    with pytest.raises(ValueError, match="noise must have shape"):
        p.sample_actions(obs, noise=torch.zeros(3, 10, 32))
    with pytest.raises(TypeError, match="float32"):
        p.sample_actions(obs, noise=torch.zeros(3, 50, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="Observation"):
        p.sample_actions({"images": obs.images})
    cams = {"a": obs.images[:, 0], "b": obs.images[:, 1]}
    with pytest.raises(ValueError, match="missing camera keys"):
        Observation.from_cameras({"a": cams["a"]}, ["a", "b"], obs.tokens, obs.token_masks, obs.state)
    with pytest.raises(ValueError, match="unknown camera keys"):
        Observation.from_cameras({**cams, "z": cams["a"]}, ["a", "b"], obs.tokens, obs.token_masks, obs.state)
    o2 = Observation.from_cameras({"a": cams["a"]}, ["a", "b"], obs.tokens, obs.token_masks, obs.state,
                                  allow_missing=True)
    assert o2.image_masks[:, 1].logical_not().all()


# ------------------------------------------------------------------------------------------------
# (6) freezing, value heads


def test_freeze_modes(policy):
    p = policy
    p.freeze("expert_only")
    train = {n for n, q in p.named_parameters() if q.requires_grad}
    assert train and all(n.startswith(("expert.", "action_", "state_proj", "time_mlp", "noise_head", "value_"))
                         for n in train)
    assert any(n.startswith("expert.") for n in train) and any(n.startswith("value_vlm") for n in train)
    p.freeze("expert_and_vlm")
    frozen = {n for n, q in p.named_parameters() if not q.requires_grad}
    assert frozen and all(n.startswith("vision_tower.") for n in frozen)
    assert p.vlm.layers[0].self_attn.q_proj.weight.requires_grad
    p.freeze("none")
    assert all(q.requires_grad for q in p.parameters())
    with pytest.raises(ValueError, match="freeze"):
        p.freeze("everything")


def test_value_heads(policy):
    p, c = policy, policy.config
    obs = make_obs(p)
    cache = p.encode_prefix(obs)
    for side in ("vlm", "expert"):
        v = p.value(cache, side=side)
        assert v.shape == (obs.batch_size, c.value_heads) and torch.isfinite(v).all()
        assert not torch.allclose(v[:, 0], v[:, 1])  # independent heads
    v = p.value(obs, side="vlm")
    v.sum().backward()
    assert p.value_vlm.w1.grad is not None and p.vlm.layers[0].mlp.up_proj.weight.grad is None  # detached input
    p.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_sampling_matches_eager():
    torch.manual_seed(0)
    p = _randomize(Pi0Policy(get_config("tiny"))).cuda().eval()
    obs = make_obs(p).to("cuda")
    cache = p.encode_prefix(obs)
    for mode in ("ode", "noise"):
        noise = torch.randn(6, 50, 32, device="cuda")
        sn = torch.randn(6, 5, 50, 32, device="cuda") if mode != "ode" else None
        eager = p.sample_actions(cache, mode=mode, num_steps=5, group_size=2, noise=noise, step_noise=sn)
        for _ in range(2):
            gr = p.sample_actions(cache, mode=mode, num_steps=5, group_size=2, noise=noise, step_noise=sn,
                                  cuda_graph=True)
            assert (gr.actions - eager.actions).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_all_bf16_parameters(variant):
    """Every parameter in bf16 (what DeepSpeed's bf16 mode or ``policy.to(torch.bfloat16)`` leaves): every
    entry point runs, returns float32, matches the float32 policy within bf16 rounding, and trains."""
    torch.manual_seed(0)
    c = get_config("tiny", variant=variant)
    p32 = Pi0Policy(c).eval()
    p16 = copy.deepcopy(p32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    B, N, K, H, D = 3, 2, 3, c.action_horizon, c.action_dim
    L = 6
    obs = Observation(images=torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                      image_masks=torch.ones(B, c.num_cameras, dtype=torch.bool),
                      tokens=torch.randint(1, c.vocab_size, (B, L), generator=g),
                      token_masks=torch.ones(B, L, dtype=torch.bool),
                      state=torch.randn(B, 5, generator=g) if variant == "pi0" else None)
    noise = torch.randn(B * N, H, D, generator=g)
    for mode in ("ode", "sde", "noise"):
        step_noise = torch.randn(B * N, K, H, D, generator=g) if mode != "ode" else None
        ref, out = (p.sample_actions(obs, mode=mode, num_steps=K, group_size=N, noise=noise, step_noise=step_noise)
                    for p in (p32, p16))
        assert out.actions.dtype == torch.float32 and out.chain.dtype == torch.float32
        scale = ref.actions.abs().max().item()
        assert (out.actions - ref.actions).abs().max().item() <= 2e-2 * scale, mode  # bf16: 2^-8 per rounding
        assert not torch.equal(out.actions, ref.actions)  # it did run in bf16
        if mode != "ode":
            assert torch.allclose(out.logp, ref.logp, rtol=5e-2, atol=5e-2 * ref.logp.abs().max().item()), mode
    for side in ("vlm", "expert"):
        v32, v16 = p32.value(obs, side=side), p16.value(obs, side=side)
        assert v16.dtype == torch.float32 and torch.allclose(v16, v32, atol=1e-2 * (1 + v32.abs().max().item()))
    # gradients reach the bf16 parameters through the CFM loss, the chain log-prob and the values
    p16.train()
    cache = p16.encode_prefix(obs)
    loss = (p16.cfm_losses(cache, torch.randn(B, H, D, generator=g), torch.randn(B, N, H, D, generator=g),
                           torch.rand(B, N, generator=g)).mean()
            + p16.chain_logprob(cache, torch.randn(B, K + 1, H, D, generator=g), mode="noise", reduce="mean").mean()
            + p16.value(cache, detach=False).square().mean())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name in ("action_in_proj.weight", "action_out_proj.weight", "noise_head.fc2.weight", "value_vlm.w1"):
        grad = dict(p16.named_parameters())[name].grad
        assert grad is not None and grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def _lerobot_dir(p: Pi0Policy, d, dtype=torch.float32, extra_files: bool = True):
    """``p``'s weights in lerobot's layout (tied LM head saved once, an expert LM head it does not use), with
    lerobot-like side files (processor config and normalization statistics)."""
    import json

    from safetensors.torch import save_file

    c = p.config
    sd = to_lerobot_state_dict(p.state_dict())
    sd["model.paligemma_with_expert.paligemma.lm_head.weight"] = sd.pop(
        "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    sd["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.arange(4 * c.expert_width).float().view(4, -1)
    d.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    cams = {f"observation.images.cam{i}": {"type": "VISUAL", "shape": [3, 32, 32]} for i in range(c.num_cameras)}
    (d / "config.json").write_text(json.dumps({
        "type": c.variant, "chunk_size": c.action_horizon, "tokenizer_max_length": c.max_token_len,
        "image_resolution": [c.image_size, c.image_size], "input_features": cams, "dtype": "float32",
        "max_state_dim": c.max_state_dim}))
    if extra_files:
        (d / "policy_preprocessor.json").write_text('{"steps": ["normalizer"]}')
        save_file({"observation.state.mean": torch.arange(3.0)}, str(d / "policy_preprocessor_step_0.safetensors"))
    return d


def test_save_lerobot_round_trip(policy, tmp_path):
    """save_lerobot writes trained weights in the layout of the lerobot checkpoint they came from: the same keys,
    shapes and dtypes (lerobot's from_pretrained loads exactly that), the side files copied, the tied LM head =
    the trained embedding, the expert's unused LM head kept; loading the result gives the trained weights. The
    same for openpi's PyTorch layout."""
    from safetensors import safe_open

    c = policy.config
    kw = {"vision_heads": c.vision_heads, "value_heads": c.value_heads, "noise_head_hidden": c.noise_head_hidden,
          "value_hidden": c.value_hidden}
    src = _lerobot_dir(policy, tmp_path / "lerobot")
    q = Pi0Policy.from_pretrained(src, **kw)
    with torch.no_grad():  # "training": every tensor moves
        for t in q.parameters():
            t.add_(0.01 * torch.randn_like(t))
    out = q.save_lerobot(tmp_path / "export", like=src)
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in src.iterdir())
    for name in ("config.json", "policy_preprocessor.json", "policy_preprocessor_step_0.safetensors"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and b.metadata() == {"format": "pt"}
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.shape == y.shape and x.dtype == y.dtype, k
            if k.endswith("gemma_expert.lm_head.weight"):
                assert torch.equal(x, y)
        assert torch.equal(b.get_tensor("model.paligemma_with_expert.paligemma.lm_head.weight"),
                           q.state_dict()["embed_tokens.weight"])
    r = Pi0Policy.from_pretrained(out, **kw)
    mine = q.state_dict()
    for k, v in r.state_dict().items():
        if not k.startswith(("noise_head", "value_")):
            assert torch.equal(v, mine[k]), k
    # openpi's PyTorch layout (lerobot's keys without "model.", no config.json): written in that layout
    from safetensors.torch import load_file, save_file

    op = tmp_path / "openpi"
    op.mkdir()
    save_file({k.removeprefix("model."): v for k, v in load_file(str(src / "model.safetensors")).items()},
              str(op / "model.safetensors"))
    q.save_lerobot(tmp_path / "export_openpi", like=op)
    assert sorted(f.name for f in (tmp_path / "export_openpi").iterdir()) == ["model.safetensors"]
    back = load_file(str(tmp_path / "export_openpi" / "model.safetensors"))
    assert not any(k.startswith("model.") for k in back) and len(back) == len(load_file(str(op / "model.safetensors")))
    r2 = Pi0Policy.from_pretrained(tmp_path / "export_openpi", config=r.config)
    assert r2.load_format == "openpi"
    assert all(torch.equal(v, mine[k]) for k, v in r2.state_dict().items() if not k.startswith(("noise_", "value_")))
    # bf16 source: the export keeps lerobot's dtypes
    src16 = _lerobot_dir(policy, tmp_path / "lerobot16", dtype=torch.bfloat16, extra_files=False)
    q.save_lerobot(tmp_path / "export16", like=src16)
    with safe_open(str(tmp_path / "export16" / "model.safetensors"), "pt") as b:
        assert {b.get_tensor(k).dtype for k in b.keys()} == {torch.bfloat16}


def test_save_lerobot_refuses_what_lerobot_would_not_load(policy, tmp_path):
    """lerobot's from_pretrained only prints a warning for keys it cannot load and keeps a random model, so every
    mismatch must be an error here; an existing directory is not overwritten unless asked."""
    import json

    from safetensors.torch import load_file, save_file

    c = policy.config
    src = _lerobot_dir(policy, tmp_path / "lerobot", extra_files=False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        policy.save_lerobot(out, like=src)
    assert (out / "keep.txt").exists()
    policy.save_lerobot(out, like=src, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".export*")), "staging directories left behind"
    with pytest.raises(ValueError, match="is, holds or lies inside like="):
        policy.save_lerobot(src, like=src, overwrite=True)
    with pytest.raises(ValueError, match="is a flowrl checkpoint"):
        policy.save_pretrained(tmp_path / "ours")
        policy.save_lerobot(tmp_path / "e2", like=tmp_path / "ours")
    other = "pi05" if c.variant == "pi0" else "pi0"
    meta = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**meta, "type": other}))
    with pytest.raises(ValueError, match=f"is a lerobot '{other}' checkpoint, the policy is '{c.variant}'"):
        policy.save_lerobot(tmp_path / "e3", like=src)
    (src / "config.json").write_text(json.dumps(meta))
    sd = load_file(str(src / "model.safetensors"))
    sd["model.paligemma_with_expert.something_new.weight"] = torch.zeros(1)
    sd.pop("model.action_out_proj.bias")
    sd["model.action_in_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as ei:
        policy.save_lerobot(tmp_path / "e4", like=src)
    msg = str(ei.value)
    assert "something_new" in msg and "action_out_proj.bias" in msg
    assert "model.action_in_proj.weight: like (3, 3)" in msg
    assert not (tmp_path / "e4").exists()


def test_export_lerobot_cli_follows_init_from(policy, tmp_path, capsys):
    """``python -m flowrl.export_lerobot``: a run that started from a run that started from a lerobot checkpoint
    is written in that lerobot checkpoint's layout (``model.init_from`` followed); ``--like`` overrides it; a run
    without a lerobot origin, a missing origin and a VLA-FPO checkpoint are errors naming what to do."""
    import json

    from flowrl.export_lerobot import main, source_checkpoint

    c = policy.config
    kw = {"vision_heads": c.vision_heads, "value_heads": c.value_heads, "noise_head_hidden": c.noise_head_hidden,
          "value_hidden": c.value_hidden}
    src = _lerobot_dir(policy, tmp_path / "lerobot")

    def run_ckpt(name: str, init_from, scale: float):
        ck = tmp_path / name / "checkpoints" / "iter_000000"
        q = Pi0Policy.from_pretrained(src, **kw)
        with torch.no_grad():
            for t in q.parameters():
                t.mul_(scale)
        q.save_pretrained(ck / "policy")
        init = str(init_from) if init_from else None
        (ck / "train_config.json").write_text(json.dumps({"model": {"init_from": init}}))
        return ck, q

    a, _ = run_ckpt("a", src, 1.5)
    b, qb = run_ckpt("b", a, 2.0)
    assert source_checkpoint(b) == src and source_checkpoint(b / "policy") == src
    out = main(["--checkpoint", str(b), "--out", str(tmp_path / "out")])
    assert "layout and config of" in capsys.readouterr().out
    r = Pi0Policy.from_pretrained(out, **kw)
    mine = qb.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in r.state_dict().items() if not k.startswith(("noise_", "value_")))
    main(["--checkpoint", str(b), "--out", str(tmp_path / "out2"), "--like", str(src)])
    assert (tmp_path / "out2" / "policy_preprocessor.json").is_file()
    with pytest.raises(ValueError, match="exists and is not empty"):
        main(["--checkpoint", str(b), "--out", str(out)])
    scratch, _ = run_ckpt("scratch", None, 1.0)
    with pytest.raises(ValueError, match=r"did not start from a lerobot / openpi checkpoint .* pass --like DIR"):
        main(["--checkpoint", str(scratch), "--out", str(tmp_path / "out3")])
    gone, _ = run_ckpt("gone", tmp_path / "moved_away", 1.0)
    with pytest.raises(FileNotFoundError, match=r"moved_away, which does not exist here .*pass --like"):
        main(["--checkpoint", str(gone), "--out", str(tmp_path / "out4")])
    (b / "latent_actor.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="VLA-FPO checkpoint"):
        main(["--checkpoint", str(b), "--out", str(tmp_path / "out5")])


def test_save_lerobot_never_deletes_like_or_leaves_debris(policy, tmp_path, monkeypatch):
    """An export directory that holds like, or lies inside it, is refused (overwrite=True would have deleted like;
    staging inside like copied the staging directory into itself); a plain file in the way is replaced without
    a leftover; a failure while moving the new export into place puts the previous one back."""
    import os
    import shutil

    src = _lerobot_dir(policy, tmp_path / "ckpts" / "pi0", extra_files=False)
    for bad in (tmp_path / "ckpts", src / "export"):
        with pytest.raises(ValueError, match="is, holds or lies inside like="):
            policy.save_lerobot(bad, like=src, overwrite=True)
    assert (src / "model.safetensors").is_file() and sorted(os.listdir(src)) == ["config.json", "model.safetensors"]
    # a symbolic link (here: placed inside like, pointing elsewhere; or dangling) would be checked at its target
    # but staged and replaced at its own place, inside like
    (tmp_path / "elsewhere").mkdir()
    (src / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad in (src / "link", tmp_path / "dangling"):
        with pytest.raises(ValueError, match="is a symbolic link"):
            policy.save_lerobot(bad, like=src, overwrite=True)
    (src / "link").unlink()
    (tmp_path / "dangling").unlink()
    os.rmdir(tmp_path / "elsewhere")
    assert sorted(os.listdir(src)) == ["config.json", "model.safetensors"]
    # like's read-only folders are copied with their modes: replacing such an export must still remove it
    ro = tmp_path / "ro_like"
    _lerobot_dir(policy, ro, extra_files=False)
    (ro / "stats").mkdir()
    (ro / "stats" / "mean.json").write_text("{}")
    (ro / "stats").chmod(0o555)
    try:
        for _ in range(2):
            policy.save_lerobot(tmp_path / "ro_out", like=ro, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == ["ckpts", "ro_like", "ro_out"], os.listdir(tmp_path)
    finally:
        (ro / "stats").chmod(0o755)
        (tmp_path / "ro_out" / "stats").chmod(0o755)
    for d in ("ro_like", "ro_out"):
        shutil.rmtree(tmp_path / d)
    f = tmp_path / "out_file"
    f.write_text("not a directory")
    policy.save_lerobot(f, like=src, overwrite=True)
    assert f.is_dir() and sorted(os.listdir(tmp_path)) == ["ckpts", "out_file"]
    before = (f / "model.safetensors").read_bytes()
    real = os.replace

    def fail_into_place(a, b):
        if str(a).startswith(str(tmp_path / ".out_file.")) and ".replaced." not in str(a):
            raise OSError("no space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError, match="no space left"):
        policy.save_lerobot(f, like=src, overwrite=True)
    assert (f / "model.safetensors").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpts", "out_file"]


def test_export_lerobot_cli_refusals(policy, tmp_path):
    """The export CLI refuses a VLA-FPO checkpoint also when given its policy/ directory (the π0 there is the
    frozen, untrained one), and an --out that holds the checkpoint; it follows model.init_from=<run>/checkpoints
    (a form the trainer takes) to the run's latest checkpoint."""
    import json

    from flowrl.export_lerobot import main, source_checkpoint

    c = policy.config
    kw = {"vision_heads": c.vision_heads, "value_heads": c.value_heads, "noise_head_hidden": c.noise_head_hidden,
          "value_hidden": c.value_hidden}
    src = _lerobot_dir(policy, tmp_path / "lerobot", extra_files=False)

    def run_ckpt(run: str, init_from, algo: str = "fpo"):
        ck = tmp_path / run / "checkpoints" / "iter_000003"
        Pi0Policy.from_pretrained(src, **kw).save_pretrained(ck / "policy")
        (ck / "train_config.json").write_text(json.dumps({"model": {"init_from": str(init_from)},
                                                          "algo": {"name": algo}}))
        (ck.parent / "latest").write_text(ck.name)
        return ck

    a = run_ckpt("a", src)
    b = run_ckpt("b", tmp_path / "a" / "checkpoints")
    assert source_checkpoint(b) == src
    with pytest.raises(ValueError, match="holds the checkpoint"):
        main(["--checkpoint", str(tmp_path / "b"), "--out", str(tmp_path / "b"), "--overwrite"])
    assert (b / "policy" / "model.safetensors").is_file()
    v = run_ckpt("v", a, algo="vla_fpo")
    for given in (v, v / "policy"):
        with pytest.raises(ValueError, match="VLA-FPO checkpoint"):
            main(["--checkpoint", str(given), "--out", str(tmp_path / "o")])
