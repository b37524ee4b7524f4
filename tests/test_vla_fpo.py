"""VLA-FPO's parts: the latent actor, the per-sample CFM ratio, the Q-ensemble and one update."""

from __future__ import annotations

import torch

from flowrl.algos.vla_fpo import VLAFPO, LatentActor, QEnsemble
from flowrl.config import AlgoConfig
from flowrl.envs import ReachEnv
from flowrl.models import Pi0Policy, get_config


def _setup(**algo):
    torch.manual_seed(0)
    env = ReachEnv(4, num_targets=2, chunk_steps=5, max_episode_steps=10, state_with_targets=True)
    policy = Pi0Policy(get_config("tiny", num_cameras=1, image_size=32, action_horizon=10, vocab_size=16,
                                  max_token_len=8)).eval()
    cfg = AlgoConfig(name="vla_fpo", num_steps=2, rollout_chunks=3, epochs=1, minibatch_size=6, fpo_pairs=3, **algo)
    algo_ = VLAFPO(cfg, seed=0)
    return env, policy, algo_


def test_latent_actor_cfm_and_sampling():
    actor = LatentActor(cond_dim=5, latent_dim=7, hidden=16)
    cond = torch.randn(3, 5)
    g = torch.Generator().manual_seed(0)
    x = actor.sample(cond, steps=3, eta=1.0, gen=g)
    assert x.shape == (3, 7)
    # a zero-initialized output layer: v = 0, so sampling returns the initial noise
    g2 = torch.Generator().manual_seed(0)
    assert torch.allclose(x, torch.randn(3, 7, generator=g2))
    noise, tau = torch.randn(3, 4, 7), torch.rand(3, 4)
    ell = actor.cfm_losses(x, cond, noise, tau)
    assert torch.allclose(ell, ((noise - x[:, None]) ** 2).mean(-1))  # v = 0: ℓ = |ε − x|²/L
    q = QEnsemble(5, 7, m=3, hidden=8)
    assert q(cond, x).shape == (3, 3)


def test_one_update_trains_actor_and_critic_not_pi0():
    env, policy, algo = _setup()
    modules = algo.trainable_module(policy, env)
    assert not any(p.requires_grad for p in policy.parameters())
    obs = env.reset(seed=0)
    batch, obs = algo.rollout(env, policy, obs)
    assert len(batch) == 3 * 4 and batch.data["latent"].shape == (12, 10 * 2)  # the env's real action dims
    # the stored old losses are the actor's losses on the latent actually used
    d = batch.data
    again = modules.actor.cfm_losses(d["latent"], d["cond"], d["noise"], d["tau"])
    assert torch.allclose(again, d["loss_old"], atol=1e-6)
    opt = torch.optim.SGD(modules.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in modules.parameters()]
    target_before = [p.detach().clone() for p in algo.target.parameters()]
    for mb in algo.minibatches(batch):
        loss, stats = algo.loss(modules, mb)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert modules.actor.net[-1].weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in modules.value_critic.parameters())
        opt.step()
        algo.after_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, modules.parameters()))
    moved = [not torch.equal(a, b) for a, b in zip(target_before, algo.target.parameters())]
    assert any(moved)  # Polyak-averaged towards the critic
    assert 0 <= stats["clip_frac"] <= 1


def test_ablation_switches():
    for kw in ({"vla_clip": False}, {"vla_latent_steps": 1}, {"vla_ensemble": 1}):
        env, policy, algo = _setup(**kw)
        modules = algo.trainable_module(policy, env)
        batch, _ = algo.rollout(env, policy, env.reset(seed=1))
        mb = next(iter(algo.minibatches(batch)))
        loss, stats = algo.loss(modules, mb)
        assert torch.isfinite(loss)
        if kw.get("vla_ensemble") == 1:
            assert len(modules.value_critic.heads) == 1 and stats["ensemble_disagreement"] == 0.0


def test_spo_form_of_the_trust_region():
    """``vla_spo``: the policy loss is SPO's penalty form on the same standardized ratio exp(β·z)."""
    from flowrl.algos import losses as L

    env, policy, algo = _setup(vla_spo=True, vla_beta=0.3)
    modules = algo.trainable_module(policy, env)
    batch, _ = algo.rollout(env, policy, env.reset(seed=2))
    mb = next(iter(algo.minibatches(batch)))
    with torch.no_grad():  # move the actor so that the ratio is not 1
        modules.actor.net[-1].bias.add_(0.3)
    loss, stats = algo.loss(modules, mb)
    d = mb.data
    new = modules.actor.cfm_losses(d["latent"], d["cond"], d["noise"], d["tau"])
    delta = (d["loss_old"] - new).mean(dim=1)
    ratio = torch.exp(0.3 * (delta - delta.mean()) / (delta.std(unbiased=False) + 1e-6))
    want = L.spo_policy_loss(ratio, L.normalize(d["adv"]), algo.cfg.clip)
    assert abs(stats["policy_loss"] - float(want)) < 1e-5
    assert (ratio - 1).abs().max() > 0.01
    loss.backward()
    assert modules.actor.net[-1].weight.grad.abs().sum() > 0


def test_ratio_kinds_and_the_trust_region():
    """``vla_ratio``: the paper's standardized exp(β·z) has unit-std z whatever Δℓ's scale; the
    absolute exp(β·Δℓ) is 1 when the actor has not moved and scales with the update."""
    from flowrl.algos.vla_fpo import vla_ratio

    d = torch.tensor([0.1, -0.2, 0.3, 0.0])
    small, big = vla_ratio(d, 1.0), vla_ratio(100 * d, 1.0)
    assert torch.allclose(small, big, rtol=1e-4)  # standardized: blind to the size of the update
    a_small, a_big = vla_ratio(d, 1.0, "absolute"), vla_ratio(5 * d, 1.0, "absolute")
    assert torch.allclose(a_small, torch.exp(d)) and torch.allclose(a_big, torch.exp(5 * d))
    assert torch.equal(vla_ratio(torch.zeros(5), 2.0, "absolute"), torch.ones(5))
    assert torch.allclose(vla_ratio(torch.tensor([50.0, -50.0]), 1.0, "absolute", clamp=3.0),
                          torch.exp(torch.tensor([3.0, -3.0])))  # clamped like FPO's log-ratio
    import pytest

    with pytest.raises(ValueError, match="vla_ratio"):
        vla_ratio(d, 1.0, "raw")
    # one update with the absolute ratio: finite, and an unmoved actor's first minibatch has ρ = 1
    env, policy, algo = _setup(vla_ratio="absolute", vla_beta=1.0)
    modules = algo.trainable_module(policy, env)
    batch, _ = algo.rollout(env, policy, env.reset(seed=2))
    mb = next(iter(algo.minibatches(batch)))
    loss, stats = algo.loss(modules, mb)
    assert torch.isfinite(loss) and abs(stats["ratio_mean"] - 1.0) < 1e-5 and stats["clip_frac"] == 0.0


def test_exploration_noise_scale():
    """algo.vla_explore scales the Gaussian added to the rollout latents; the generator's stream is the same."""
    import pytest

    from flowrl.config import ConfigError, load_config

    latents = {}
    for std in (0.0, 0.1, 0.3):
        _, _, algo = _setup(vla_explore=std)
        algo.modules = torch.nn.Module()
        algo.modules.actor = LatentActor(cond_dim=5, latent_dim=7, hidden=16)
        cond = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
        latents[std] = algo._latent(cond, explore=True)
        plain = algo._latent(cond, explore=False)  # the next draw: the stream advanced by the same amount
        latents[f"plain{std}"] = plain
    base = latents[0.0]
    for std in (0.1, 0.3):
        assert torch.allclose((latents[std] - base) / std, (latents[0.1] - base) / 0.1, atol=1e-5)
        assert torch.equal(latents[f"plain{std}"], latents["plain0.0"])
    assert (latents[0.3] - base).std() > 2.5 * (latents[0.1] - base).std() > 0
    with pytest.raises(ConfigError, match=r"algo\.vla_explore must be >= 0"):
        load_config(None, ["algo.name=vla_fpo", "algo.vla_explore=-0.1"])


def test_value_over_actor_samples():
    """vla_value_samples = S: V(s) is the mean of the ensemble-min Q over S latents drawn as the rollout draws
    them (the actor's sample plus exploration noise), not the Q of the noise-free latent."""
    env, policy, algo = _setup(vla_value_samples=5, vla_explore=0.3)
    modules = algo.trainable_module(policy, env)
    torch.nn.init.normal_(modules.actor.net[-1].weight, std=0.1)  # a non-identity actor
    _, cond = algo._cond(policy, env.reset(seed=2), torch.device("cpu"))
    state = algo.gen.get_state()
    v = algo._value(cond)
    assert v.shape == (cond.shape[0],)
    algo.gen.set_state(state)
    cs = cond.repeat_interleave(5, 0)
    x = modules.actor.sample(cs, algo.cfg.vla_latent_steps, algo.cfg.vla_eta, algo.gen)
    x = x + 0.3 * torch.randn(x.shape, generator=algo.gen)
    want = modules.value_critic(cs, x).amin(dim=1).view(-1, 5).mean(1)
    assert torch.allclose(v, want, atol=1e-6)
    algo.cfg.vla_value_samples = 0
    x0 = modules.actor.sample(cond, algo.cfg.vla_latent_steps, algo.cfg.vla_eta, z0=torch.zeros(len(cond), x.shape[1]))
    assert torch.allclose(algo._value(cond), modules.value_critic(cond, x0).amin(dim=1))
    assert not torch.allclose(v, algo._value(cond))


def test_hidden_width():
    """algo.vla_hidden sets the width of the latent actor's and every Q-head's MLP; one update still runs."""
    env, policy, algo = _setup(vla_hidden=24)
    modules = algo.trainable_module(policy, env)
    assert modules.actor.net[0].out_features == 24 and modules.actor.net[2].out_features == 24
    assert all(h[0].out_features == 24 for h in modules.value_critic.heads)
    assert all(h[0].out_features == 24 for h in algo.target.heads)
    batch, _ = algo.rollout(env, policy, env.reset(seed=3))
    loss, _ = algo.loss(modules, next(iter(algo.minibatches(batch))))
    assert torch.isfinite(loss)
