"""The pipelined rollout: PipelinedEnv equals its sub-envs, interleaves policy inference with env stepping,
and the algorithms' rollouts run unchanged on it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flowrl.algos.base import to_device
from flowrl.config import AlgoConfig, ConfigError, load_config
from flowrl.envs import ChunkStep, EnvObs, PipelinedEnv, ReachEnv, VecEnv

FIELDS = ("reward", "done", "success", "truncated", "executed", "episode_return", "episode_length")


def _same_step(a: ChunkStep, b: ChunkStep) -> None:
    for k in FIELDS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    _same_obs(a.obs, b.obs)


def _same_obs(a: EnvObs, b: EnvObs) -> None:
    for k in ("images", "image_masks", "tokens", "token_masks", "state"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.instructions == b.instructions


def _halves(n: int = 4, **kw) -> list[ReachEnv]:
    return [ReachEnv(n, env_offset=0, **kw), ReachEnv(n, env_offset=n, **kw)]


def _policy_act(seed: int = 0):
    """A deterministic stand-in for the policy: actions from the observed state, plus a per-row value."""
    def act(o: EnvObs):
        a = torch.tanh(torch.stack([o.state[:, 0] - o.state[:, 1], o.state[:, 1] + 0.3], dim=1))
        return a[:, None].expand(-1, 5, -1).contiguous(), {"s": o.state.sum(1)}, o.tokens[:, 0].float()
    return act


# ---------------------------------------------------------------------------------------- PipelinedEnv == sub-envs
@pytest.mark.parametrize("threaded", [False, True])
def test_pipelined_reach_equals_its_sub_envs_and_one_big_env(threaded):
    pe = PipelinedEnv(_halves(group_size=2), threaded=threaded)
    sep = _halves(group_size=2)  # the same sub-envs stepped one after the other
    one = ReachEnv(8, group_size=2)  # consecutive env offsets: the very episodes of one env
    assert pe.num_envs == 8 and pe.group_size == 2 and pe.chunk_steps == 5
    o_pe, o_sep, o_one = pe.reset(seed=5), [e.reset(seed=5) for e in sep], one.reset(seed=5)
    _same_obs(o_pe.index(slice(0, 4)), o_sep[0])
    _same_obs(o_pe.index(slice(4, 8)), o_sep[1])
    _same_obs(o_pe, o_one)
    g = torch.Generator().manual_seed(0)
    ends = 0
    for _ in range(10):
        act = torch.rand(8, 5, 2, generator=g) * 2 - 1
        s = pe.step(act)
        s0, s1 = sep[0].step(act[:4]), sep[1].step(act[4:])
        _same_step(s, ChunkStep.cat([s0, s1]))
        _same_step(s, one.step(act))
        ends += int(s.done.sum())
    assert ends > 0  # auto-resets happened on the way
    # state_dict round trip continues exactly
    sd = pe.state_dict()
    act = torch.rand(8, 5, 2, generator=g)
    ref = pe.step(act)
    pe.load_state_dict(sd)
    _same_step(pe.step(act), ref)
    with pytest.raises(ValueError, match=r"same env\.pipeline_groups"):
        pe.load_state_dict(one.state_dict())
    pe.close()


def test_step_chunks_yields_what_the_sequential_loop_does():
    act = _policy_act()
    pe, one = PipelinedEnv(_halves()), ReachEnv(8)
    got = list(pe.step_chunks(act, pe.reset(seed=1), 6))
    want = list(one.step_chunks(act, one.reset(seed=1), 6))
    assert len(got) == len(want) == 6
    for (o1, out1, s1), (o2, out2, s2) in zip(got, want):
        _same_obs(o1, o2)
        _same_step(s1, s2)
        assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1]["s"], out2[1]["s"])
        assert torch.equal(out1[2], out2[2])
    for t in range(5):  # each chunk starts from the previous chunk's observations
        assert got[t + 1][0] is got[t][2].obs
    step, out = pe.step_with(act, got[-1][2].obs)
    assert step.reward.shape == (8,) and out[0].shape == (8, 5, 2)


def test_forwarded_attributes_and_bad_groups():
    pe = PipelinedEnv(_halves(3))
    pe.reset(seed=0)
    pe.set_expert_quality(0.5)
    assert pe.expert_quality == 0.5 and all(e.expert_quality == 0.5 for e in pe.envs)
    assert pe.goal.shape == (6,) and pe.expert_actions(7).shape == (6, 7, 2)
    _same_obs(pe.observe(), ReachEnv(6).reset(seed=0))
    assert pe.seed == 0 and pe.episode.shape == (6,)  # shared values as they are, per-env ones concatenated
    with pytest.raises(AttributeError):
        pe.no_such_attribute  # noqa: B018
    with pytest.raises(AttributeError, match="methods are forwarded only"):
        pe.render  # noqa: B018 - not in FORWARDED_METHODS
    with pytest.raises(ValueError, match="env_offsets"):
        PipelinedEnv([ReachEnv(4), ReachEnv(4)])  # both would run envs 0..3
    with pytest.raises(ValueError, match="group_size"):
        PipelinedEnv([ReachEnv(4, group_size=2), ReachEnv(4, group_size=4, env_offset=4)])
    with pytest.raises(ValueError, match="chunk_steps"):
        PipelinedEnv([ReachEnv(4, chunk_steps=5), ReachEnv(4, chunk_steps=4, env_offset=4)])


@pytest.mark.parametrize("threaded", [False, True])
def test_a_bad_chunk_starts_no_group(threaded):
    """NaN in the second group's rows: the first group had already stepped 5 steps (the other not), and without
    a thread the next valid step failed with 'group 0 already has a step in flight'; the error named the row in
    its group. The whole chunk is now checked before any group starts, with global rows."""
    pe, ref = PipelinedEnv(_halves(2), threaded=threaded), ReachEnv(4)
    _same_obs(pe.reset(seed=3), ref.reset(seed=3))
    a = torch.full((4, 5, 2), 0.5)
    bad = a.clone()
    bad[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"PipelinedEnv.step: actions hold NaN \(rows \[3\]\)"):
        pe.step(bad)
    with pytest.raises(ValueError, match=r"shape \(B=4, H, A\)"):
        pe.step(a[:3])
    assert not any(pe._in_flight)
    _same_step(pe.step(a), ref.step(a))  # nothing moved, and stepping goes on
    # with flowkernels' value checks off (the trainer on a GPU) envs on the host still refuse NaN up front:
    # LiberoEnv checks its host copy anyway, so a later group would refuse after the first had started
    import flowkernels
    import flowkernels._checks as checks

    old = checks._value_checks
    try:
        flowkernels.set_value_checks(False)
        with pytest.raises(ValueError, match=r"NaN \(rows \[3\]\)"):
            pe.step(bad)
    finally:
        flowkernels.set_value_checks(old)
    assert not any(pe._in_flight)
    _same_step(pe.step(a), ref.step(a))


class _Tasks(ReachEnv):
    """A reach env with per-env lists like LiberoEnv's (task_names, instructions)."""

    def __init__(self, n: int, offset: int, names: list[str]) -> None:
        super().__init__(n, env_offset=offset)
        self.task_names = [names[(offset + i) % len(names)] for i in range(n)]
        self.task_ids = [0, 1]  # a shared list that happens to have num_envs entries


def test_per_env_lists_are_concatenated():
    """Per-env lists came back from one group only (length num_envs / groups), as if shared, when the groups'
    lists were equal."""
    pe = PipelinedEnv([_Tasks(2, 0, ["a", "b"]), _Tasks(2, 2, ["a", "b"])])
    assert pe.task_names == ["a", "b", "a", "b"]
    assert pe.task_ids == [0, 1]  # not a per-env name: shared, as it was
    pe = PipelinedEnv([_Tasks(2, 0, ["a", "b", "c"]), _Tasks(2, 2, ["a", "b", "c"])])
    assert pe.task_names == ["a", "b", "c", "a"]


# ---------------------------------------------------------------------------------------- the overlap
class _Recording(VecEnv):
    """A constant env with a native async step that logs the order of calls."""

    def __init__(self, name: str, log: list, n: int = 2) -> None:
        self.name, self.log, self.num_envs = name, log, n
        self.action_dim, self.state_dim, self.num_cameras, self.image_size = 2, 2, 1, 8
        self.chunk_steps, self.max_episode_steps, self.vocab_size, self.max_token_len = 1, 100, 4, 2
        self.device = torch.device("cpu")
        self.t = 0
        self._act: torch.Tensor | None = None

    def _obs(self) -> EnvObs:
        B = self.num_envs
        return EnvObs(torch.zeros(B, 1, 3, 8, 8), torch.ones(B, 1, dtype=torch.bool),
                      torch.ones(B, 2, dtype=torch.int64), torch.ones(B, 2, dtype=torch.bool),
                      torch.full((B, 2), float(self.t)), [self.name] * B)

    def reset(self, seed: int | None = None) -> EnvObs:
        self.t = 0
        return self._obs()

    def step(self, actions: torch.Tensor) -> ChunkStep:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: torch.Tensor) -> None:
        self.log.append(f"async {self.name}")
        self._act = actions

    def step_wait(self) -> ChunkStep:
        self.log.append(f"wait {self.name}")
        self.t += 1
        z = torch.zeros(self.num_envs)
        return ChunkStep(self._obs(), self._act[:, 0, 0], z.bool(), z.bool(), z.bool(), z.long() + 1, z, z.long())


def test_policy_inference_for_one_group_runs_while_the_other_steps():
    log: list[str] = []
    pe = PipelinedEnv([_Recording("g0", log), _Recording("g1", log)])

    def act(o: EnvObs):
        log.append(f"act {o.instructions[0]}")
        return torch.full((o.state.shape[0], 1, 2), float(o.state[0, 0])), o.state[:, 0]

    chunks = []
    for o, _, step in pe.step_chunks(act, pe.reset(), 3):
        log.append("yield")
        chunks.append((o.state[:, 0].tolist(), step.reward.tolist()))
    assert log == [
        "act g0", "async g0", "act g1", "async g1",            # chunk 0 started in both groups
        "wait g0", "act g0", "async g0", "wait g1", "yield",    # g0's chunk 1 runs while g1's chunk 0 is collected
        "act g1", "async g1",
        "wait g0", "act g0", "async g0", "wait g1", "yield",
        "act g1", "async g1",
        "wait g0", "wait g1", "yield",
    ]
    # group 1's inference happens between group 0's step_async and its step_wait
    i_async0, i_act1, i_wait0 = log.index("async g0"), log.index("act g1"), log.index("wait g0")
    assert i_async0 < i_act1 < i_wait0
    assert chunks == [([0.0] * 4, [0.0] * 4), ([1.0] * 4, [1.0] * 4), ([2.0] * 4, [2.0] * 4)]


class _SlowReach(ReachEnv):
    """Its step blocks until ``gate`` is set (or gives up after 20 s)."""

    gate: threading.Event | None = None

    def step(self, actions):
        if self.gate is not None:
            self.gate.wait(20.0)
        return super().step(actions)


def test_threaded_sub_env_steps_while_the_policy_acts_for_the_other_group():
    """Group 0's step cannot finish before the act for group 1 has run: only a real overlap completes quickly."""
    gate = threading.Event()
    envs = [_SlowReach(2, env_offset=0), ReachEnv(2, env_offset=2)]
    envs[0].gate = gate
    pe = PipelinedEnv(envs, threaded=True)

    calls = [0]

    def act(o: EnvObs):
        calls[0] += 1
        if calls[0] == 2:  # the act of group 1 (chunk 0) releases group 0's step
            gate.set()
        return torch.zeros(o.state.shape[0], 5, 2), None

    t0 = time.perf_counter()
    out = list(pe.step_chunks(act, pe.reset(seed=0), 2))
    assert len(out) == 2 and time.perf_counter() - t0 < 15.0
    assert out[0][1][1] is None
    pe.close()


def test_stopping_early_collects_the_steps_in_flight():
    pe = PipelinedEnv(_halves())
    obs = pe.reset(seed=0)
    for _ in pe.step_chunks(_policy_act(), obs, 5):
        break
    assert not any(pe._in_flight)
    pe.step(torch.zeros(8, 5, 2))  # usable again


# ---------------------------------------------------------------------------------------- the algorithms on it
def _tiny_policy():
    from flowrl.models import Pi0Policy, get_config

    torch.manual_seed(0)
    return Pi0Policy(get_config("tiny", num_cameras=1, image_size=32, action_horizon=10, vocab_size=16,
                                max_token_len=8)).eval()


@pytest.mark.parametrize("name", ["fpo", "flow_sde_ppo", "grpo", "vla_fpo"])
def test_rollouts_on_a_pipelined_env(name):
    from flowrl.config import TrainConfig
    from flowrl.train import build_algorithm

    cfg = TrainConfig()
    cfg.algo = AlgoConfig(name=name, num_steps=2, rollout_chunks=3, epochs=1, minibatch_size=8, fpo_pairs=2,
                          group_size=2)
    gs = 2 if name == "grpo" else 1
    kw = dict(num_targets=2, chunk_steps=5, max_episode_steps=10, state_with_targets=True, group_size=gs)
    policy = _tiny_policy()
    algo = build_algorithm(cfg, seed=0)
    env = PipelinedEnv([ReachEnv(4, env_offset=0, **kw), ReachEnv(4, env_offset=4, **kw)])
    module = algo.trainable_module(policy, env) if hasattr(algo, "trainable_module") else policy
    batch, obs = algo.rollout(env, policy, env.reset(seed=0))
    if name == "grpo":
        assert 8 <= len(batch) <= 8 * 2  # one episode of at most 2 chunks per env
    else:
        assert len(batch) == 3 * 8 and batch.data["actions" if name != "vla_fpo" else "latent"].shape[0] == 24
    assert obs.state.shape[0] == 8
    for k in ("episodes", "success_rate", "return", "env_steps"):
        assert k in batch.stats
    policy.train()
    mb = next(iter(algo.minibatches(batch)))
    loss, _ = algo.loss(module, mb)
    assert torch.isfinite(loss)
    loss.backward()


def test_rollout_stats_match_the_unpipelined_env():
    """Same env episodes either way (consecutive offsets); the policy's noise is drawn per group, so only
    the first chunk's observations are bitwise equal, and both rollouts are well formed."""
    from flowrl.algos.fpo import FPO

    cfg = AlgoConfig(name="fpo", num_steps=2, rollout_chunks=2, fpo_pairs=2)
    policy = _tiny_policy()
    one = ReachEnv(8)
    b1, _ = FPO(cfg).rollout(one, policy, one.reset(seed=0))
    pe = PipelinedEnv(_halves())
    b2, _ = FPO(cfg).rollout(pe, policy, pe.reset(seed=0))
    assert len(b1) == len(b2) == 16
    assert torch.equal(b1.obs.images[:8], b2.obs.images[:8])
    assert b1.data.keys() == b2.data.keys()
    for k in b1.data:
        assert b1.data[k].shape == b2.data[k].shape and torch.isfinite(b2.data[k].float()).all(), k


def test_to_device_is_a_copy():
    x = torch.randn(3, 4)
    y = to_device(x, torch.device("cpu"))
    assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("over, msg", [
    (["env.pipeline_groups=0"], "env.pipeline_groups=0 must be >= 1"),
    (["env.num_envs=6", "env.pipeline_groups=4"], "divide env.num_envs=6"),
    (["algo.name=grpo", "env.num_envs=8", "algo.group_size=4", "env.pipeline_groups=4"], "must not straddle"),
])
def test_bad_pipeline_groups_is_a_config_error(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, over)
    load_config(None, ["algo.name=grpo", "env.num_envs=8", "algo.group_size=4", "env.pipeline_groups=2"])


def test_build_env_pipelines_the_reach_env():
    from flowrl.train import build_env

    cfg = load_config(None, ["env.num_envs=6", "env.pipeline_groups=3"])
    env = build_env(cfg)
    assert isinstance(env, PipelinedEnv) and [e.num_envs for e in env.envs] == [2, 2, 2]
    assert [e.env_offset for e in env.envs] == [0, 2, 4] and env.expert_quality == cfg.env.expert_quality
    _same_obs(env.reset(seed=4), build_env(load_config(None, ["env.num_envs=6"])).reset(seed=4))
