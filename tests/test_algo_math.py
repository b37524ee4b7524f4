"""The RL math of flowrl.algos.losses against direct, plainly written formulas."""

from __future__ import annotations

import math

import torch

from flowrl.algos import losses as L


def test_gae_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    T, B, gamma, lam = 6, 3, 0.9, 0.8
    r, v = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    d = torch.rand(T, B, generator=g) < 0.3
    last = torch.randn(B, generator=g)
    adv, ret = L.gae(r, v, d, last, gamma, lam)
    for b in range(B):
        for t in range(T):
            # A_t = Σ_l (γλ)^l δ_{t+l}, cut at the end of the episode
            a, coef = 0.0, 1.0
            for k in range(t, T):
                nv = last[b] if k == T - 1 else v[k + 1, b]
                delta = r[k, b] + gamma * nv * (0.0 if d[k, b] else 1.0) - v[k, b]
                a += coef * float(delta)
                if d[k, b]:
                    break
                coef *= gamma * lam
            assert math.isclose(float(adv[t, b]), a, rel_tol=1e-5, abs_tol=1e-5)
    assert torch.allclose(ret, adv + v)


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0])
    a = L.grpo_advantages(r, 2)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0]), atol=1e-5)


def test_ppo_clip_and_dual_clip():
    ratio = torch.tensor([1.5, 0.5, 10.0, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, st = L.ppo_policy_loss(ratio, adv, clip=0.2, dual_clip=3.0)
    # per-sample objectives: min(1.5, 1.2)=1.2; min(0.5, 0.8)=0.5; max(min(-10, -1.2), -3)=-3; -2
    assert math.isclose(float(loss.detach()), -(1.2 + 0.5 - 3.0 - 2.0) / 4, rel_tol=1e-6)
    assert math.isclose(float(st["clip_frac"]), 0.75)
    loss.backward()
    # gradient flows only where the unclipped term is active (samples 1 and 3)
    assert ratio.grad.tolist() == [0.0, -0.25, 0.0, 0.5]


def test_spo_and_value_loss():
    ratio, adv = torch.tensor([1.1]), torch.tensor([-2.0])
    assert math.isclose(float(L.spo_policy_loss(ratio, adv, 0.05)), -(1.1 * -2.0 - 2.0 / 0.1 * 0.01), rel_tol=1e-6)
    v, old, ret = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    # clipped value 0.2: huber(1.0)=0.5, huber(0.2)=0.02 -> max 0.5
    assert math.isclose(float(L.value_loss(v, old, ret, clip=0.2)), 0.5, rel_tol=1e-6)


def test_arfm_alpha_solves_its_equation_and_weights():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(64, generator=g)
    groups = torch.arange(64) % 4
    rs = L.leave_one_out(r, groups)
    for i in range(64):
        m = groups == groups[i]
        others = r[m & (torch.arange(64) != i)]
        assert math.isclose(float(rs[i]), float(r[i] - others.mean()), rel_tol=1e-5, abs_tol=1e-6)
    losses = 1 + 0.1 * torch.randn(64, generator=g)
    alpha = L.arfm_alpha(rs, losses, lam=5e-4)
    sr = float(torch.sqrt((rs.double() ** 2).mean()))
    sl2 = float(losses.double().var(unbiased=False))
    x = (alpha * sr) ** 2
    lhs = 4 * math.sqrt(x) * math.exp(2 * x) - 2 * math.sqrt(x) * math.exp(x)
    if 0.01 < alpha < 5:
        assert math.isclose(lhs, 5e-4 * sr / sl2, rel_tol=1e-3)
    else:
        raise AssertionError(f'alpha {alpha} at the bracket end')
    w = L.arfm_weights(rs, alpha)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    assert torch.equal(w.argmax(), rs.argmax())
    assert torch.allclose(L.arfm_weights(rs, 0.0), torch.full((64,), 1 / 64))


def test_explained_variance():
    t = torch.tensor([1.0, 2.0, 3.0])
    assert L.explained_variance(t, t) == 1.0
    assert abs(L.explained_variance(torch.full((3,), 2.0), t)) < 1e-6


def test_wilson_interval():
    from flowrl.eval import wilson_interval

    lo, hi = wilson_interval(20, 64)
    assert math.isclose(lo, 0.2124, abs_tol=1e-3) and math.isclose(hi, 0.4343, abs_tol=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_critic_side_follows_pi_rl():
    """The on-policy critic reads the action expert for π0 (the state enters the suffix there) and
    the VLM for π0.5 (the state is in the prefix); ``algo.critic_side`` overrides."""
    from flowrl.algos.base import to_policy_obs
    from flowrl.config import AlgoConfig, TrainConfig
    from flowrl.envs import ReachEnv
    from flowrl.models import Pi0Policy, get_config
    from flowrl.train import build_algorithm

    env = ReachEnv(3, state_with_targets=True)
    obs = env.reset(seed=0)
    for variant, side in (("pi0", "expert"), ("pi05", "vlm")):
        torch.manual_seed(0)
        pol = Pi0Policy(get_config("tiny", variant=variant, num_cameras=1, vocab_size=16, max_token_len=8)).eval()
        cache = pol.encode_prefix(to_policy_obs(obs, pol))
        for cfg_side, want in (("auto", side), ("vlm", "vlm"), ("expert", "expert")):
            cfg = TrainConfig(algo=AlgoConfig(name="fpo", critic_side=cfg_side))
            algo = build_algorithm(cfg)
            got = algo.critic(pol, cache)
            assert torch.equal(got, pol.value(cache, side=want)), (variant, cfg_side)
            other = "vlm" if want == "expert" else "expert"
            assert not torch.allclose(got, pol.value(cache, side=other))


def test_collect_demos_keeps_exactly_the_asked_episodes():
    """More envs than demonstration episodes: exactly ``num_episodes`` of them are kept, each with
    its return (one-chunk episodes: 1/H' on success, else 0)."""
    from flowrl.algos.offline import collect_demos
    from flowrl.envs import ReachEnv

    env = ReachEnv(16, chunk_steps=10, max_episode_steps=10, max_speed=0.25)
    env.set_expert_quality(1.0, None, 0.15)
    demos = collect_demos(env, 10, 4, 5, torch.Generator().manual_seed(0))
    assert len(demos) == 5 and demos.data["actions"].shape == (5, 10, 4)
    assert torch.equal(demos.data["actions"][:, :, 2:], torch.zeros(5, 10, 2))
    ret = demos.data["ret"]
    assert bool(((ret == 0) | (ret > 0.09)).all())
