"""The RL math of flowrl.algos.losses against direct, plainly written formulas."""

from __future__ import annotations

import math

import pytest
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


def _surrogate_grad(name: str, ratio_value: float, adv: list[float] | None = None, **algo_kw):
    """Rollout of a tiny π0 on the reaching task with ``name``, then d(loss)/d(ratio) on the whole batch
    with the ratio replaced by a constant ``ratio_value`` leaf: what the surrogate does with the
    advantages (the value loss does not depend on the ratio); ``adv`` replaces the rollout's advantages
    (tiled over the batch: GRPO drops the chunks after an episode's end). Returns (batch, grad)."""
    from flowrl.config import AlgoConfig, TrainConfig
    from flowrl.envs import ReachEnv
    from flowrl.models import Pi0Policy, get_config
    from flowrl.train import build_algorithm

    torch.manual_seed(0)
    loss_weight = algo_kw.pop("loss_weight", 1.0)
    G = algo_kw.get("group_size", 1)
    env = ReachEnv(4, num_targets=2, chunk_steps=5, max_episode_steps=10, state_with_targets=True, group_size=G)
    policy = Pi0Policy(get_config("tiny", num_cameras=1, image_size=32, action_horizon=10, vocab_size=16,
                                  max_token_len=8)).eval()
    cfg = AlgoConfig(name=name, num_steps=2, rollout_chunks=2, epochs=1, minibatch_size=4, fpo_pairs=3, **algo_kw)
    algo = build_algorithm(TrainConfig(algo=cfg))
    batch, _ = algo.rollout(env, policy, env.reset(seed=0))
    env.close()
    if adv is not None:
        batch.data["adv"] = torch.tensor(adv).repeat(-(-len(batch) // len(adv)))[:len(batch)]  # tiled over the batch
    shape = (len(batch), cfg.fpo_pairs) if name == "fpo" else (len(batch),)
    r = torch.full(shape, ratio_value, requires_grad=True)
    algo.ratio = lambda *a: (r, {})
    batch.loss_weight = loss_weight
    (g,) = torch.autograd.grad(algo.loss(policy, batch)[0], r)
    return batch, g


def test_grpo_uses_its_group_advantages_unnormalized():
    """DESIGN §1: GRPO's advantage is (R − mean)/(std + 1e−6) of the group; PPO's minibatch normalization
    (which shifted an all-equal group off 0) must not be applied on top."""
    # a group with equal rewards (0, 0) and one with a hit (1, −1): minibatch normalization would move the
    # first off 0 and rescale the second
    batch, g = _surrogate_grad("grpo", 1.0, adv=[0.0, 0.0, 1.0, -1.0], group_size=2)
    torch.testing.assert_close(g, -batch.data["adv"] / len(batch))
    assert (g[batch.data["adv"] == 0] == 0).all()
    # a minibatch's loss_weight (ranks of unequal batches) scales its loss
    batch, g = _surrogate_grad("grpo", 1.0, adv=[0.0, 0.0, 1.0, -1.0], group_size=2, loss_weight=0.25)
    torch.testing.assert_close(g, -0.25 * batch.data["adv"] / len(batch))


def test_fpo_surrogate_has_no_dual_clip_and_ppo_normalizes():
    """FPO's clipped surrogate has no dual clip: at ρ = 4 > dual_clip with Â < 0 the gradient is Â/n·… ≠ 0
    (the dual clip would zero it); Flow-SDE PPO keeps the dual clip and normalizes per minibatch."""
    batch, g = _surrogate_grad("fpo", 4.0, fpo_spo=False)
    adv = L.normalize(batch.data["adv"])[:, None].expand_as(g)
    neg = adv < 0
    assert neg.any() and (~neg).any()
    torch.testing.assert_close(g[neg], -adv[neg] / g.numel())  # ρ·Â is the min for Â < 0: gradient Â
    assert (g[~neg] == 0).all()  # clipped at 1 + ε for Â > 0
    batch, g = _surrogate_grad("flow_sde_ppo", 4.0)
    assert (g == 0).all()  # ρ = 4: clipped above for Â > 0, dual-clipped at 3·Â for Â < 0
    batch, g = _surrogate_grad("flow_sde_ppo", 1.0)
    torch.testing.assert_close(g, -L.normalize(batch.data["adv"]) / len(batch))


def test_spo_for_all_samples_or_only_negative_advantages():
    """docs/design.md §1 names SPO as FPO++'s asymmetric option for negative advantages; fpo_spo applied it to every
    sample (positive advantages lost PPO's clip), which stays the default (the tables' setting) and is now said
    so. spo_advantages=negative is the asymmetric form: at ρ = 1.5, ε = 0.05, Â = ±1 the gradients w.r.t. ρ are
    [4.5, 5.5] (SPO for all), [0.0, 5.5] (asymmetric) and [0.0, 0.5] for PPO's clip."""
    adv = torch.tensor([1.0, -1.0])
    grads = {}
    for mode in ("all", "negative", "ppo"):
        r = torch.full((2,), 1.5, requires_grad=True)
        loss = L.ppo_policy_loss(r, adv, 0.05, None)[0] if mode == "ppo" else L.spo_policy_loss(r, adv, 0.05, mode)
        (grads[mode],) = torch.autograd.grad(loss, r)  # the loss is −mean(objective)
    assert grads["all"].tolist() == [4.5, 5.5] and grads["negative"].tolist() == [0.0, 5.5]
    assert grads["ppo"].tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match="'all' or 'negative'"):
        L.spo_policy_loss(torch.ones(2), adv, 0.05, "positive")
    # through FPO's loss: ρ = 4 per pair, Â > 0 clipped (no gradient) with the asymmetric form, not with SPO for all
    batch, g = _surrogate_grad("fpo", 4.0, fpo_spo=True, spo_advantages="negative")
    adv = L.normalize(batch.data["adv"])[:, None].expand_as(g)
    assert (adv > 0).any() and (g[adv > 0] == 0).all() and (g[adv < 0] != 0).all()
    batch, g = _surrogate_grad("fpo", 4.0, fpo_spo=True)
    assert (g[adv > 0] != 0).all()
    from flowrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="spo_advantages"):
        load_config(None, ["algo.spo_advantages=some"])


def test_value_clip_is_per_head_and_gae_uses_the_ensemble_min():
    """Each value head's clip window is centred on its own rollout value; GAE's baseline is the min."""
    batch, _ = _surrogate_grad("flow_sde_ppo", 1.0)
    heads = batch.data["old_values"]
    assert heads.shape == (len(batch), 2)  # the tiny config's two value heads
    assert not torch.equal(heads[:, 0], heads[:, 1])  # two different heads
    torch.testing.assert_close(batch.data["ret"] - batch.data["adv"], heads.amin(dim=1))


def test_loss_functions_refuse_or_promote_what_would_be_silently_wrong():
    """Found by a fuzzing pass: each case below gave a wrong number or a crash without naming the input."""
    from flowrl.algos import losses as L

    # ARFM's alpha: large returns overflowed math.exp (σ_R ≳ 1880); NaN and empty input climbed to the
    # top of the bracket
    assert L.arfm_alpha(torch.tensor([1900.0, -1900.0]), torch.tensor([0.5, 0.7])) == 0.01
    with pytest.raises(ValueError, match="must be finite"):
        L.arfm_alpha(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.3, float("nan"), 0.4]))
    with pytest.raises(ValueError, match="1-D of one length"):
        L.arfm_alpha(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="1-D of one length"):
        L.arfm_alpha(torch.zeros(3), torch.zeros(4))
    # integer rewards were truncated by GAE (int advantages)
    adv, _ = L.gae(torch.ones(3, 1, dtype=torch.long), torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(1))
    want, _ = L.gae(torch.ones(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(1))
    assert adv.is_floating_point() and torch.allclose(adv, want)
    # bool success flags and int returns as GRPO returns; bad group sizes named
    flags = torch.tensor([True, False, True, True])
    assert torch.allclose(L.grpo_advantages(flags, 2), L.grpo_advantages(flags.float(), 2))
    for g in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be an int >= 1"):
            L.grpo_advantages(torch.zeros(4), g)
    assert torch.allclose(L.leave_one_out(torch.tensor([1, 0, 2])), L.leave_one_out(torch.tensor([1.0, 0.0, 2.0])))
    assert L.arfm_weights(torch.tensor([1, 0]), 1.0).is_floating_point()
    # shapes that broadcast into a different objective
    with pytest.raises(ValueError, match=r"ratio, adv must have one shape .* ratio \(4,\), adv \(4, 1\)"):
        L.ppo_policy_loss(torch.ones(4), torch.ones(4, 1))
    with pytest.raises(ValueError, match="one shape"):
        L.spo_policy_loss(torch.ones(4), torch.ones(4, 1))
    with pytest.raises(ValueError, match="one shape"):
        L.value_loss(torch.ones(4, 2), torch.ones(4, 2), torch.ones(4))
    with pytest.raises(ValueError, match="dual_clip > 1"):
        L.ppo_policy_loss(torch.ones(4), torch.ones(4), 0.2, 0.5)
    with pytest.raises(ValueError, match="clip must be > 0"):
        L.spo_policy_loss(torch.ones(4), torch.ones(4), 0.0)


def test_losses_second_fuzzing_pass():
    """explained_variance broadcast (n, 1) against (n,) into another number and crashed on int targets; GAE
    rounded γλ to float32 for float64 input and let a non-finite value past an episode's end poison its column;
    an integer ratio crashed PPO's mean; an empty batch gave NaN losses."""
    pred, target = torch.tensor([1.0, 2.0, 3.5]), torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"explained_variance: pred, target must have one shape"):
        L.explained_variance(pred[:, None], target)
    assert L.explained_variance(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) == 1.0
    r = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    adv, _ = L.gae(r, torch.zeros_like(r), torch.zeros(2, 1), torch.zeros(1, dtype=torch.float64), 0.9, 0.95)
    assert adv.dtype == torch.float64 and adv[0, 0].item() == 1.0 + 0.9 * 0.95  # exact in float64
    adv, _ = L.gae(torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([[0, 0], [0, 1]]), torch.tensor([0.0, math.nan]))
    assert torch.isfinite(adv[:, 1]).all() and adv[:, 0].isfinite().all()  # env 1 ended: its NaN bootstrap unused
    loss, _ = L.ppo_policy_loss(torch.ones(3, dtype=torch.long), torch.tensor([1.0, -1.0, 2.0]))
    assert loss.item() == pytest.approx(-2 / 3)
    for call in (lambda: L.ppo_policy_loss(torch.ones(0), torch.ones(0)),
                 lambda: L.spo_policy_loss(torch.ones(0), torch.ones(0)),
                 lambda: L.value_loss(torch.ones(0, 2), torch.ones(0, 2), torch.ones(0, 2))):
        with pytest.raises(ValueError, match="empty batch"):
            call()


def test_grpo_minibatches_balanced_over_ranks_of_unequal_batches():
    """GRPO's ranks hold their own envs' episodes, so their batches differ in size. Every rank must take the
    same number of optimizer steps; before, the larger ranks left their extra minibatches out. Now each epoch
    splits every rank's batch into the same number of minibatches (none above minibatch_size, no sample left
    out), and the loss weights make each step's gradient, averaged over the ranks by the engine, the mean over
    all the step's samples. Equal batches keep the one-rank minibatches."""
    from flowrl.algos.base import Batch
    from flowrl.config import AlgoConfig, TrainConfig
    from flowrl.envs import ReachEnv
    from flowrl.train import build_algorithm

    def make(n: int, offset: float) -> Batch:
        env = ReachEnv(n)
        return Batch(env.reset(seed=0), {"x": torch.arange(n, dtype=torch.float64) + offset})

    cfg = AlgoConfig(name="grpo", group_size=1, minibatch_size=4, epochs=2)
    ns = [10, 3, 7, 1]
    W, c = len(ns), max(math.ceil(n / 4) for n in ns)
    batches = [make(n, 100.0 * r) for r, n in enumerate(ns)]
    per_rank = []
    for r, b in enumerate(batches):
        algo = build_algorithm(TrainConfig(algo=cfg, seed=r))
        algo.rank_samples = (r, ns)
        mbs = list(algo.minibatches(b))
        assert len(mbs) == algo.num_minibatches(b) == cfg.epochs * c
        for e in range(cfg.epochs):  # each epoch: every sample once, in minibatches of at most minibatch_size
            used = torch.cat([mb.data["x"] for mb in mbs[e * c:(e + 1) * c] if mb.loss_weight > 0])
            assert sorted(used.tolist()) == b.data["x"].tolist()
        assert all(len(mb) <= 4 and len(mb.obs.state) == len(mb) for mb in mbs)
        per_rank.append(mbs)
    for j in range(cfg.epochs * c):
        step = [mbs[j] for mbs in per_rank]
        # the engine's mean over the ranks of the weighted per-rank means = the mean over the step's samples
        engine = sum(mb.loss_weight * float(mb.data["x"].mean()) for mb in step) / W
        samples = torch.cat([mb.data["x"] for mb in step if mb.loss_weight > 0])
        assert math.isclose(engine, float(samples.mean()), rel_tol=1e-12)
        assert all(mb.loss_weight > 0 or len(mb) == 1 for mb in step)  # rank 3's empty ones: one sample, weight 0
    assert any(mb.loss_weight == 0 for mb in per_rank[3])
    algo = build_algorithm(TrainConfig(algo=cfg, seed=0))
    algo.rank_samples = (1, ns)  # a batch other than the one whose size the ranks exchanged
    with pytest.raises(RuntimeError, match=r"a batch of 10 samples, but this rank's last rollout .* gave 3"):
        algo.num_minibatches(batches[0])
    # equal batches on every rank (and one rank): the shared drop-last minibatches, weight 1
    algo = build_algorithm(TrainConfig(algo=cfg, seed=0))
    algo.rank_samples = (0, [10, 10])
    ref = build_algorithm(TrainConfig(algo=cfg, seed=0))
    got, want = list(algo.minibatches(batches[0])), list(ref.minibatches(batches[0]))
    assert len(got) == len(want) == 4 and all(torch.equal(a.data["x"], b.data["x"]) and a.loss_weight == 1.0
                                              for a, b in zip(got, want))
