"""The built-in reaching task: dynamics, rendering, auto-reset, seeding, expert, errors."""

from __future__ import annotations

import pytest
import torch

from flowrl.envs import ReachEnv, tokenize
from flowrl.envs.reach import COLORS, VOCAB


def test_observation_layout():
    env = ReachEnv(4, num_targets=3, image_size=24)
    obs = env.reset(seed=3)
    assert obs.images.shape == (4, 1, 3, 24, 24) and obs.images.dtype == torch.float32
    assert obs.images.min() >= -1 and obs.images.max() <= 1
    assert obs.image_masks.shape == (4, 1) and bool(obs.image_masks.all())
    assert obs.tokens.shape == (4, 8) and obs.tokens.dtype == torch.int64
    assert torch.equal(obs.token_masks, obs.tokens != 0)
    assert obs.state.shape == (4, 2)
    assert int(obs.tokens.max()) < env.vocab_size == len(VOCAB)
    for text, tok in zip(obs.instructions, obs.tokens):
        assert torch.equal(tokenize([text])[0][0], tok)
        assert any(c in text for c in COLORS)


def test_render_draws_targets_and_agent_where_they_are():
    env = ReachEnv(1, num_targets=2, image_size=32)
    env.reset(seed=0)
    env.targets[0] = torch.tensor([[-0.5, 0.5], [0.5, -0.5]])
    env.pos[0] = torch.tensor([0.0, 0.0])
    img = env.render()[0]  # (3, S, S), row 0 at y = +1
    # red target at (x=-0.5, y=+0.5): upper-left quadrant, pixel (row 8, col 8)
    assert torch.allclose(img[:, 8, 8], torch.tensor(COLORS["red"]))
    # green at (x=+0.5, y=-0.5): lower-right quadrant
    assert torch.allclose(img[:, 24, 24], torch.tensor(COLORS["green"]))
    # the agent (white) at the centre, background elsewhere
    assert torch.allclose(img[:, 16, 16], torch.ones(3)) or torch.allclose(img[:, 15, 15], torch.ones(3))
    assert torch.allclose(img[:, 2, 30], torch.full((3,), 0.12))


def test_reaching_the_goal_succeeds_and_stops_the_chunk():
    env = ReachEnv(2, num_targets=1, chunk_steps=5, max_speed=0.1, success_radius=0.15)
    env.reset(seed=0)
    env.targets[:, 0] = torch.tensor([[0.3, 0.0], [0.9, 0.9]])
    env.pos[:] = torch.tensor([[0.0, 0.0], [-0.9, -0.9]])
    a = torch.zeros(2, 5, 2)
    a[:, :, 0] = 1.0  # move right
    r = env.step(a)
    # env 0: 0.1, 0.2 -> within 0.15 of 0.3 after 2 steps
    assert r.success.tolist() == [True, False] and r.done.tolist() == [True, False]
    assert r.executed.tolist() == [2, 5]
    assert r.reward.tolist() == [1.0, 0.0] and r.episode_return.tolist() == [1.0, 0.0]
    assert r.episode_length.tolist() == [2, 0]
    assert env.t.tolist() == [0, 5]  # env 0 was reset, env 1 goes on
    assert torch.allclose(env.pos[1], torch.tensor([-0.4, -0.9]))


def test_time_limit_truncates():
    env = ReachEnv(3, num_targets=1, chunk_steps=4, max_episode_steps=8)
    env.reset(seed=0)
    still = torch.zeros(3, 4, 2)
    env.pos[:] = 0.0
    env.targets[:, 0] = torch.tensor([0.9, 0.9])
    r1 = env.step(still)
    assert not r1.done.any()
    r2 = env.step(still)
    assert r2.truncated.all() and r2.done.all() and not r2.success.any()
    assert r2.episode_length.tolist() == [8, 8, 8]


def test_seeding_is_per_env_and_reproducible():
    a = ReachEnv(6).reset(seed=11)
    b = ReachEnv(6).reset(seed=11)
    c = ReachEnv(3).reset(seed=11)
    d = ReachEnv(6).reset(seed=12)
    assert torch.equal(a.images, b.images) and a.instructions == b.instructions
    assert torch.equal(a.images[:3], c.images)  # env i does not depend on the batch size
    assert not torch.equal(a.images, d.images)


def test_expert_quality_controls_success():
    rates = {}
    for q in (1.0, 0.5):
        env = ReachEnv(128)
        env.set_expert_quality(q)
        env.reset(seed=0)
        succ = ends = 0
        for it in range(24):
            r = env.step(env.expert_actions(5, torch.Generator().manual_seed(it)))
            succ += int(r.success.sum())
            ends += int(r.done.sum())
        rates[q] = succ / ends
    assert rates[1.0] == 1.0
    assert 0.3 < rates[0.5] < 0.8
    # a random policy rarely succeeds
    env = ReachEnv(128)
    env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    succ = ends = 0
    for _ in range(24):
        r = env.step(torch.rand(128, 5, 2, generator=g) * 2 - 1)
        succ += int(r.success.sum())
        ends += int(r.done.sum())
    assert succ / max(ends, 1) < 0.3


def test_easy_variant_state_has_the_goal():
    env = ReachEnv(5, num_targets=3, state_with_targets=True, state_with_goal=True)
    obs = env.reset(seed=0)
    assert obs.state.shape == (5, 2 + 6 + 3) and env.state_dim == 11
    assert torch.equal(obs.state[:, 2:8].view(5, 3, 2), env.targets)
    goal = obs.state[:, 8:].argmax(1)
    assert torch.equal(goal, env.goal)
    assert ReachEnv(5, num_targets=3, state_with_targets=True).state_dim == 8


def test_slow_expert_and_time_in_state():
    """``expert_speed`` scales the expert's steps; ``state_with_time`` appends the time left."""
    env = ReachEnv(64, max_episode_steps=15, state_with_targets=True, state_with_goal=True, state_with_time=True)
    assert env.state_dim == 12
    obs = env.reset(seed=1)
    assert torch.equal(obs.state[:, -1], torch.ones(64))
    full = env.expert_actions(5).norm(dim=-1).amax()
    env.set_expert_quality(1.0, 0.5)
    slow = env.expert_actions(5)
    assert float(slow.norm(dim=-1).amax()) <= 0.5 * float(full) * 1.001 + 1e-6
    r = env.step(slow)
    assert torch.allclose(r.obs.state[~r.done, -1], torch.full(((~r.done).sum(),), 1 - 5 / 15))
    rates = {}
    for speed in (1.0, 0.5):  # under a tight time limit a slow expert fails more often
        e = ReachEnv(128, max_episode_steps=15)
        e.set_expert_quality(1.0, speed)
        e.reset(seed=0)
        succ = alive = torch.ones(128, dtype=torch.bool)
        succ = torch.zeros(128, dtype=torch.bool)
        for _ in range(3):
            st = e.step(e.expert_actions(5))
            succ |= alive & st.success
            alive &= ~st.done
        rates[speed] = float(succ.float().mean())
    assert rates[1.0] > 0.95 and rates[0.5] < 0.8
    sd = env.state_dict()
    b = ReachEnv(64, max_episode_steps=15, state_with_targets=True, state_with_goal=True, state_with_time=True)
    b.load_state_dict(sd)
    assert b.expert_speed == 0.5
    with pytest.raises(ValueError, match="speed"):
        env.set_expert_quality(1.0, 0.0)


def test_imprecise_expert_aim_noise():
    """``aim_noise`` offsets the point the expert heads for, per episode: demonstrations miss by a
    graded amount; 0 leaves every other draw of the scene unchanged."""
    kw = dict(chunk_steps=10, max_episode_steps=10, max_speed=0.25)
    exact, noisy = ReachEnv(512, **kw), ReachEnv(512, **kw)
    noisy.set_expert_quality(1.0, None, 0.2)
    exact.reset(seed=3), noisy.reset(seed=3)
    assert torch.equal(exact.targets, noisy.targets) and torch.equal(exact.pos, noisy.pos)
    assert torch.equal(exact.expert_offset, torch.zeros(512, 2))
    assert 0.15 < float(noisy.expert_offset.std()) < 0.25
    ok_exact = exact.step(exact.expert_actions(10)).success.float().mean()
    st = noisy.step(noisy.expert_actions(10))
    assert float(ok_exact) > 0.99 and 0.2 < float(st.success.float().mean()) < 0.6
    assert not torch.equal(noisy.expert_offset, torch.zeros(512, 2))  # new episodes, new offsets
    b = ReachEnv(512, **kw)
    b.load_state_dict(noisy.state_dict())
    assert b.expert_aim_noise == 0.2 and torch.equal(b.expert_offset, noisy.expert_offset)
    assert torch.equal(b.expert_actions(10), noisy.expert_actions(10))
    with pytest.raises(ValueError, match="aim_noise"):
        noisy.set_expert_quality(1.0, None, -0.1)


def test_padded_actions_and_bad_input():
    env = ReachEnv(2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, 5, 2))
    env.reset(seed=0)
    env.step(torch.zeros(2, 50, 32))  # the policy's padded chunk is cut to (H', 2)
    with pytest.raises(ValueError, match="num_envs"):
        env.step(torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="chunk_steps"):
        env.step(torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="needs 2"):
        env.step(torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match=r"\(B, H, A\)"):
        env.step(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating"):
        env.step(torch.zeros(2, 5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_targets"):
        ReachEnv(2, num_targets=7)
    # floats, strings and bools for counts; NaN / inf for the geometry: raw torch errors or NaN states before
    for kw, exc, msg in ((dict(num_envs=2.0), TypeError, "num_envs must be an int, got float"),
                         (dict(num_envs=True), TypeError, "num_envs must be an int, got bool"),
                         (dict(chunk_steps=2.5), TypeError, "chunk_steps must be an int"),
                         (dict(image_size="32"), TypeError, "image_size must be an int, got str"),
                         (dict(max_speed=float("inf")), ValueError, "max_speed must be a finite float > 0"),
                         (dict(success_radius=float("nan")), ValueError, "success_radius must be a finite float > 0")):
        with pytest.raises(exc, match=msg):
            ReachEnv(**({"num_envs": 2} | kw))
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        env.reset(seed=1.7)
    env.reset(seed=torch.tensor(3))  # integer scalars are ints
    with pytest.raises(ValueError, match="horizon must be >= 0"):
        env.expert_actions(-1)
    with pytest.raises(ValueError, match="noise must be a finite float >= 0"):
        env.expert_actions(3, noise=float("nan"))
    with pytest.raises(ValueError, match="unknown word"):
        tokenize(["fly to the moon"])
    with pytest.raises(ValueError, match="quality"):
        env.set_expert_quality(1.5)


def test_state_dict_resumes_exactly():
    a = ReachEnv(8)
    a.set_expert_quality(0.5)
    a.reset(seed=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.step(torch.rand(8, 5, 2, generator=g) * 2 - 1)
    b = ReachEnv(8)
    b.load_state_dict(a.state_dict())
    acts = torch.rand(6, 8, 5, 2, generator=g) * 2 - 1
    for x in acts:
        ra, rb = a.step(x), b.step(x)
        assert torch.equal(ra.obs.images, rb.obs.images) and torch.equal(ra.reward, rb.reward)
        assert ra.obs.instructions == rb.obs.instructions


def test_state_dict_refuses_other_settings():
    """A state continues only in an env with the same settings: a resume after a config change (time limit,
    speed, state layout) would otherwise continue its episodes under other rules, silently."""
    a = ReachEnv(4)
    a.reset(seed=1)
    sd = a.state_dict()
    for kw, name in ((dict(max_episode_steps=60), "max_episode_steps"), (dict(max_speed=0.2), "max_speed"),
                     (dict(state_with_time=True), "state_with_time"), (dict(group_size=2), "group_size")):
        with pytest.raises(ValueError, match=name):
            ReachEnv(4, **kw).load_state_dict(sd)
    old = {k: v for k, v in sd.items() if k != "settings"}  # a state saved before settings were recorded
    ReachEnv(4).load_state_dict(old)


def test_large_seeds_nan_actions_and_graphs_found_by_fuzzing():
    """A seed above ~2.8e8 (a timestamp; the trainer resets with seed·1000 + rank) overflowed manual_seed;
    NaN actions passed clamp and poisoned the episode until its time limit; actions that require grad
    made the env's state part of an ever-growing autograd graph."""
    for seed in (300_000_000, 2**31 - 1, 1_764_000_000_000, -5):
        ReachEnv(2).reset(seed=seed)
    assert torch.equal(ReachEnv(3).reset(seed=7).state, ReachEnv(3).reset(seed=7).state)
    e = ReachEnv(4, chunk_steps=5, max_episode_steps=10)
    e.reset(seed=0)
    bad = torch.zeros(4, 5, 2)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"actions hold NaN \(rows \[2\]\)"):
        e.step(bad)
    e.step(torch.full((4, 5, 2), float("inf")))  # ±inf is clamped like any large action
    a = torch.zeros(4, 5, 2, requires_grad=True)
    assert not e.step(a * 2).obs.state.requires_grad
