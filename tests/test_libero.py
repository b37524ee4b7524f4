"""LIBERO env (flowrl.envs.libero): real scenes in worker processes.

The scene tests are skipped when the ``libero`` package (``pip install -e '.[libero]'``) or a
headless GL backend (EGL / OSMesa) is missing. They share one 2-worker env at 64² with fast
rendering to stay within a few minutes on a 2-core CPU (building a scene takes 5–30 s).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import time

import numpy as np
import pytest
import torch

from flowrl.envs._libero_worker import quat2axisangle
from flowrl.envs.libero import MAX_EPISODE_STEPS, ByteTokenizer, WordTokenizer, libero_unavailable_reason

S = 64  # camera resolution in these tests (a multiple of the tiny policy's patch size 8)


# ---------------------------------------------------------------------------------- no scene needed
def test_word_tokenizer_deterministic_and_padded():
    tok = WordTokenizer(vocab_size=512, max_len=12)
    texts = ["Pick up the black bowl", "put the bowl on the plate"]
    a, m = tok(texts)
    b, _ = WordTokenizer(vocab_size=512, max_len=12)(texts)
    assert a.shape == (2, 12) and a.dtype == torch.int64 and m.dtype == torch.bool
    assert torch.equal(a, b)
    assert m.sum(1).tolist() == [5, 6]
    assert int(a.max()) < 512 and int(a[m].min()) >= 1 and not a[~m].any()
    assert a[0, 2] == a[1, 1] == a[1, 4]  # "the" → one id
    with pytest.raises(ValueError, match="max_len"):
        WordTokenizer(max_len=2)(["one two three"])


def test_byte_tokenizer():
    tok = ByteTokenizer(max_len=8)
    t, m = tok(["ab"])
    assert t[0, :3].tolist() == [ord("a") + 1, ord("b") + 1, 0] and m[0].sum() == 2
    assert tok.vocab_size == 257


def test_quat2axisangle_matches_rotation():
    # 90° about z: quaternion (x, y, z, w) = (0, 0, sin 45°, cos 45°)
    q = np.array([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    np.testing.assert_allclose(quat2axisangle(q), [0.0, 0.0, math.pi / 2], atol=1e-6)
    np.testing.assert_allclose(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))


def test_suite_time_limits():
    assert MAX_EPISODE_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                 "libero_10": 520, "libero_90": 400}


# ---------------------------------------------------------------------------------- real scenes
_REASON = libero_unavailable_reason()
needs_libero = pytest.mark.skipif(_REASON is not None, reason=f"LIBERO unavailable: {_REASON}")


@pytest.fixture(scope="module")
def env():
    from flowrl.envs.libero import LiberoEnv

    e = LiberoEnv("libero_spatial", task_ids=[0, 1], num_envs=2, chunk_steps=2, image_size=S, fast_render=True,
                  settle_steps=5, step_timeout=60, reset_timeout=120, start_timeout=300)
    yield e
    e.close()


def _to_policy_obs(obs, policy):
    from flowrl.models import Observation

    cfg = policy.config
    pad = torch.zeros(obs.state.shape[0], cfg.max_state_dim - obs.state.shape[1])
    return Observation(images=obs.images, image_masks=obs.image_masks, tokens=obs.tokens,
                       token_masks=obs.token_masks, state=torch.cat([obs.state, pad], 1))


def _check_obs(obs, B):
    assert obs.images.shape == (B, 2, 3, S, S) and obs.images.dtype == torch.float32
    assert float(obs.images.min()) >= -1.0 and float(obs.images.max()) <= 1.0
    assert obs.state.shape == (B, 8) and torch.isfinite(obs.state).all()
    for b in range(B):
        for c in range(2):
            assert float(obs.images[b, c].std()) > 0.05, f"env {b} camera {c} looks blank"
        assert float((obs.images[b, 0] - obs.images[b, 1]).abs().mean()) > 0.05, "the two cameras are identical"
    assert obs.image_masks.all()
    assert obs.tokens.shape[0] == B and obs.token_masks[:, 0].all()


@needs_libero
def test_libero_rollout_with_tiny_policy(env):
    from flowrl.models import Pi0Policy, get_config

    assert env.num_envs == 2 and env.action_dim == 7 and env.state_dim == 8 and env.num_cameras == 2
    assert env.max_episode_steps == 220
    assert "black bowl" in env.instructions[0] and env.instructions[0] != env.instructions[1]
    obs = env.reset(seed=0)
    _check_obs(obs, 2)
    # the gripper starts open (fingers apart) and the end effector above the table
    assert float(obs.state[0, 6]) > 0.01 and float(obs.state[0, 7]) < -0.01 and float(obs.state[0, 2]) > 0.8

    torch.manual_seed(0)
    policy = Pi0Policy(get_config("tiny", num_cameras=2, image_size=S, vocab_size=env.vocab_size,
                                  max_token_len=env.max_token_len, action_horizon=4)).eval()
    first_state = obs.state.clone()
    for _ in range(10):
        out = policy.sample_actions(_to_policy_obs(obs, policy), mode="ode", num_steps=2)
        actions = out.actions.clamp(-1, 1)
        assert actions.shape[:2] == (2, 4)
        step = env.step(actions)
        obs = step.obs
        assert step.executed.tolist() == [2, 2] and not step.done.any()
        assert step.reward.shape == (2,) and step.truncated.dtype == torch.bool
    _check_obs(obs, 2)
    assert env.t.tolist() == [20, 20]
    assert (obs.state - first_state).abs().max() > 1e-3  # the robot moved


@needs_libero
def test_libero_worker_killed_recovers(env):
    obs = env.reset(seed=1)
    env.step(torch.zeros(2, 2, 7))
    pids = env.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(0.2)
    t0 = time.perf_counter()
    step = env.step(torch.zeros(2, 2, 7))
    print(f"restart + reset of a killed worker: {time.perf_counter() - t0:.1f} s")
    assert step.done.tolist() == [False, True]
    assert step.truncated.tolist() == [False, True] and not step.success.any()
    assert step.executed.tolist() == [2, 0] and step.episode_length.tolist() == [0, 2]
    assert env.worker_pids[0] == pids[0] and env.worker_pids[1] != pids[1]
    _check_obs(step.obs, 2)
    assert env.t.tolist() == [4, 0] and env.restarts.tolist() == [0, 1]
    step = env.step(torch.zeros(2, 2, 7))  # the restarted worker goes on
    assert step.executed.tolist() == [2, 2] and not step.done.any()
    del obs


@needs_libero
def test_libero_hung_worker_times_out_and_recovers(env):
    env.reset(seed=2)
    pid0 = env.worker_pids[0]
    env._workers[0].send(("hang", 120.0))  # test hook: the worker stops answering
    old, env.step_timeout = env.step_timeout, 3.0
    try:
        step = env.step(torch.zeros(2, 2, 7))
    finally:
        env.step_timeout = old
    assert step.done.tolist() == [True, False] and step.truncated.tolist() == [True, False]
    assert step.executed.tolist() == [0, 2] and env.worker_pids[0] != pid0
    _check_obs(step.obs, 2)


def test_libero_steps_natively_async_so_pipelines_use_no_threads():
    """LiberoEnv overrides step_async / step_wait: a PipelinedEnv of them (threaded=True, as the trainer
    builds it) steps them directly, with no thread pool. No scene: shells with the shared attributes."""
    from flowrl.envs.base import VecEnv
    from flowrl.envs.libero import LiberoEnv
    from flowrl.envs.pipeline import PipelinedEnv, _native_async

    def shell(offset):
        e = object.__new__(LiberoEnv)
        e._closed, e._in_flight = False, None
        e.num_envs, e.action_dim, e.state_dim, e.num_cameras, e.image_size = 1, 7, 8, 2, S
        e.chunk_steps, e.max_episode_steps, e.vocab_size, e.max_token_len = 2, 220, 4096, 32
        e.device, e.group_size, e.env_offset = torch.device("cpu"), 1, offset
        return e

    envs = [shell(0), shell(1)]
    assert LiberoEnv.step_async is not VecEnv.step_async and _native_async(envs[0])
    pe = PipelinedEnv(envs, threaded=True)
    assert pe._pool is None
    with pytest.raises(RuntimeError, match="no step in flight"):
        envs[0].step_wait()
    for e in envs:
        e._closed = True  # nothing to close


@needs_libero
def test_libero_step_async_wait_equals_step(env):
    """step_async + step_wait runs the same episodes as step (2 workers, 4-step episodes, so every third chunk
    starts from the automatic reset inside step_wait); misuse raises clear errors."""
    gen = torch.Generator().manual_seed(0)
    chunks = [(torch.rand(2, 2, 7, generator=gen) * 2 - 1) * 0.5 for _ in range(3)]
    old, env.max_episode_steps = env.max_episode_steps, 4
    try:
        runs = []
        for split in (False, True):  # step, step_async + step_wait
            obs = env.reset(seed=5)
            steps = [obs]
            for a in chunks:
                if split:
                    assert env.step_async(a) is None
                    steps.append(env.step_wait())
                else:
                    steps.append(env.step(a))
            runs.append(steps)
        plain, split = runs
        assert [s.done.tolist() for s in plain[1:]] == [[False, False], [True, True], [False, False]]
        torch.testing.assert_close(plain[0].images, split[0].images, rtol=0, atol=0)
        for p, q in zip(plain[1:], split[1:]):
            for k in ("reward", "done", "success", "truncated", "executed", "episode_return", "episode_length"):
                assert torch.equal(getattr(p, k), getattr(q, k)), k
            torch.testing.assert_close(p.obs.images, q.obs.images, rtol=0, atol=0)
            torch.testing.assert_close(p.obs.state, q.obs.state, rtol=0, atol=0)
        # misuse
        with pytest.raises(RuntimeError, match="no step in flight"):
            env.step_wait()
        env.step_async(chunks[0])
        with pytest.raises(RuntimeError, match="already in flight"):
            env.step_async(chunks[0])
        with pytest.raises(RuntimeError, match="in flight"):
            env.reset(seed=0)
        assert env.step_wait().executed.tolist() == [2, 2]  # the first one is still collected
        with pytest.raises(RuntimeError, match="no step in flight"):
            env.step_wait()
    finally:
        env.max_episode_steps = old


@needs_libero
def test_libero_reset_does_not_depend_on_the_previous_episode(env):
    """robosuite keeps each gripper's last command in Python, and a reset without hard_reset kept it: the settle
    steps after a reset (and the episode) differed with the previous episode's last gripper command (~1e-3 in
    the state, visibly in the images). Two resets with the same seed give the same scene whatever ran before."""
    obs = [env.reset(seed=5)]
    close = torch.zeros(2, 2, 7)
    close[..., 0], close[..., 6] = 0.5, 1.0  # move and close the gripper
    for _ in range(3):
        env.step(close)
    obs.append(env.reset(seed=5))
    for _ in range(2):
        env.step(-close)  # open it
    obs.append(env.reset(seed=5))
    for o in obs[1:]:
        torch.testing.assert_close(o.state, obs[0].state, rtol=0, atol=0)
        torch.testing.assert_close(o.images, obs[0].images, rtol=0, atol=0)


@needs_libero
def test_libero_close_stops_workers():
    from flowrl.envs.libero import LiberoEnv

    e = LiberoEnv("libero_object", task_ids=[0], num_envs=1, image_size=32, fast_render=True, settle_steps=0)
    pid = e.worker_pids[0]
    assert e.instructions[0] and e.max_episode_steps == 280
    e.close()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    with pytest.raises(RuntimeError, match="closed"):
        e.reset()


def test_from_config_arguments():
    from flowrl.config import EnvConfig
    from flowrl.envs.libero import LiberoEnv

    class Capture(LiberoEnv):
        def __init__(self, suite, task_ids, **kw):  # no workers: record the arguments
            self.args = (suite, task_ids, kw)

    cfg = EnvConfig(name="libero", num_envs=3, image_size=128, chunk_steps=4, suite="libero_goal", task_ids=[1, 2])
    suite, tasks, kw = Capture.from_config(cfg, rank=2).args
    assert (suite, tasks) == ("libero_goal", [1, 2])
    assert kw["num_envs"] == 3 and kw["image_size"] == 128 and kw["chunk_steps"] == 4
    assert kw["max_episode_steps"] is None  # the suite's standard limit, not the reaching task's default
    # every rank the same seed: env_offset places it in one global schedule of init states and MuJoCo seeds
    assert kw["env_offset"] == 6 and kw["seed"] == 0 and kw["total_envs"] == 9
    assert Capture.from_config(cfg, rank=1, world=4).args[2]["total_envs"] == 12
    cfg.max_episode_steps = 100
    assert Capture.from_config(cfg, rank=0, fast_render=True).args[2]["max_episode_steps"] == 100


def test_pinned_init_states_take_precedence_once():
    """set_next_init pins the next episode's init state and seed (no scene: the scheduling state only)."""
    from flowrl.envs.libero import LiberoEnv

    env = object.__new__(LiberoEnv)  # no workers: only the bookkeeping that picks init states
    env._closed = True  # nothing to close
    env.num_envs, env.seed, env.env_offset, env._slots_per_task, env.group_size = 2, 5, 0, 1, 1
    env._slot, env._task_of, env._n_init = [0, 0], [3, 3], [50, 50]
    env.episode = np.zeros(2, dtype=np.int64)
    env._pinned = {}
    assert [env._init_index(i) for i in range(2)] == [5, 5]
    env.set_next_init([1], [42], [7])
    assert [env._init_index(i) for i in range(2)] == [5, 42] and env._episode_seed(1) == 7
    env.set_next_init([1], [9])  # replaces the pin; the seed comes from the schedule again
    assert env._init_index(1) == 9 and env._episode_seed(1) == (5 * 1_000_003 + 65_537) % 2**31
    with pytest.raises(ValueError, match="init index 50"):
        env.set_next_init([0], [50])
    with pytest.raises(ValueError, match="env id 2"):
        env.set_next_init([2], [0])
    with pytest.raises(ValueError, match="one each"):
        env.set_next_init([0, 1], [0])


class _NoProc:
    def join(self, timeout=None):
        pass


class _NoWorker:  # what LiberoEnv keeps of a worker, without the process (the scheduling state only)
    def __init__(self, info):
        self.info, self.pid, self.proc = info, None, _NoProc()

    def kill(self):
        pass


@pytest.fixture
def workerless(monkeypatch):
    """LiberoEnv without worker processes or scenes: its episode schedule, seeds and checks."""
    import flowrl.envs.libero as L

    def start(self, idxs):
        for i in idxs:
            self._workers[i] = _NoWorker({"instruction": f"task {self._task_of[i]}", "num_init_states": 50})
            self._n_init[i] = 50
        return {}

    monkeypatch.setattr(L.LiberoEnv, "_start", start)
    monkeypatch.setattr(L, "libero_unavailable_reason", lambda gl=None: None)
    monkeypatch.setattr(L, "select_gl_backend", lambda gl=None: "egl")
    return L.LiberoEnv


def _schedule(env, episodes):
    """(init index, MuJoCo seed) of every env for episodes 0 .. episodes − 1."""
    out = []
    for k in range(episodes):
        env.episode[:] = k
        out.append([(env._init_index(i), env._episode_seed(i)) for i in range(env.num_envs)])
    return out


@pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                    reason="the libero package is not installed (its benchmark tables name the tasks)")
def test_episode_schedule_is_global_and_groups_share_scenes(workerless, monkeypatch):
    """Three schedule defects, on the bookkeeping alone (no worker, no scene):
    - a GRPO group's members got MuJoCo seeds of their own, and the seed places LIBERO's fixtures (a cabinet
      1.5 cm off): the group's members saw different scenes;
    - envs split into pipeline groups or ranks spaced a task's episodes by their own slot count, so
      init states repeated (2 pipeline groups: 2 and 3 twice, 8 and 9 never) and rank 0's second episodes
      were rank 1's first; build_env now passes the global env count and every rank the same seed;
    - build_env built LIBERO's GRPO env without its groups (the first rollout failed after start-up)."""
    from flowrl.config import load_config
    from flowrl.train import build_env

    LiberoEnv = workerless
    g = LiberoEnv("libero_spatial", task_ids=[0, 1], num_envs=8, group_size=2, image_size=S)
    for ep in _schedule(g, 3):
        assert all(ep[2 * k] == ep[2 * k + 1] for k in range(4)), ep  # a group: one init state, one seed
        assert len(set(ep[::2])) == 4  # the groups differ
    one = LiberoEnv("libero_spatial", task_ids=[0], num_envs=8, image_size=S)
    whole = _schedule(one, 3)
    assert len({x for ep in whole for x in ep}) == 24  # no init state or seed twice
    base = ["env.name=libero", "env.suite=libero_spatial", "env.task_ids=[0]", "env.num_envs=4",
            f"env.image_size={S}"]
    pipe = build_env(load_config(None, [*base, "env.num_envs=8", "env.pipeline_groups=2"]))
    assert [a + b for a, b in zip(_schedule(pipe.envs[0], 3), _schedule(pipe.envs[1], 3))] == whole
    ranks = [build_env(load_config(None, base), rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*(_schedule(e, 3) for e in ranks))] == whole
    assert ranks[0].seed == ranks[1].seed
    grpo = build_env(load_config(None, [*base, "algo.name=grpo", "algo.group_size=2"]))
    assert grpo.group_size == 2 and build_env(load_config(None, [*base, "algo.name=grpo", "algo.group_size=2"]),
                                              for_eval=True).group_size == 1
    for e in (g, one, pipe, *ranks, grpo):
        e.close()


@pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                    reason="the libero package is not installed (its benchmark tables name the tasks)")
def test_nan_actions_are_refused_with_value_checks_off(workerless, monkeypatch):
    """The trainer turns flowkernels' value checks off on a GPU, and the env's NaN check went with them: NaN
    actions reached MuJoCo, which ran on with an unstable simulation. LiberoEnv has the actions on the host
    anyway and always checks them."""
    import flowkernels
    import flowkernels._checks as checks

    monkeypatch.setattr(checks, "_value_checks", checks._value_checks)  # restored after the test
    flowkernels.set_value_checks(False)
    env = workerless("libero_spatial", task_ids=[0], num_envs=2, image_size=S, chunk_steps=2)
    env._started = True  # as after reset(), without a scene
    a = torch.zeros(2, 2, 7)
    a[1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(rows \[1\]\)"):
        env.step_async(a)
    assert env._in_flight is None
    env.close()


@pytest.mark.parametrize("over", [["algo.name=sft"], ["algo.name=arfm"], ["algo.name=fpo", "sft_iterations=2"]])
def test_libero_with_sft_is_a_config_error(over):
    """SFT and ARFM learn from the scripted expert's demonstrations, which only the reach task has: on LIBERO
    they failed after the workers, the policy and DeepSpeed had started."""
    from flowrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="scripted expert"):
        load_config(None, ["env.name=libero", *over])


@needs_libero
def test_evaluate_libero_runs_each_pair_once_and_writes_videos(tmp_path):
    """flowrl.eval_libero on real scenes: one task, init states 3 and 7, one worker (the second episode starts
    from its pinned init state at the automatic reset), 4-step episodes; both episodes recorded."""
    from flowrl.eval_libero import evaluate_libero, read_video
    from flowrl.models import Pi0Policy, get_config

    torch.manual_seed(0)
    policy = Pi0Policy(get_config("tiny", num_cameras=2, image_size=S, vocab_size=4096, max_token_len=32,
                                  action_horizon=4)).eval()
    t0 = time.perf_counter()
    r = evaluate_libero(policy, "libero_spatial", task_ids=[1], init_states=[3, 7], num_envs=1, num_steps=2, seed=0,
                        chunk_steps=2, max_episode_steps=4, settle_steps=2, fast_render=True, video_dir=tmp_path,
                        num_videos=2, env_kwargs={"step_timeout": 60, "reset_timeout": 120, "start_timeout": 300})
    print(f"evaluate_libero, 2 episodes with one worker: {time.perf_counter() - t0:.1f} s")
    assert r["suite"] == "libero_spatial" and r["episodes"] == 2 and r["config"]["max_episode_steps"] == 4
    (task,) = r["tasks"]
    assert task["task_id"] == 1 and task["episodes"] == 2 and "black bowl" in task["instruction"] and task["name"]
    assert [(e["task_id"], e["init_state"]) for e in r["episode_results"]] == [(1, 3), (1, 7)]
    assert all(e["length"] == 4 and not e["success"] and not e["worker_failure"] for e in r["episode_results"])
    assert task["success_rate"] == r["success_rate"] == 0.0 and 0.0 == r["ci_low"] < r["ci_high"] < 1.0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["libero_spatial_task1_init3_fail.mp4", "libero_spatial_task1_init7_fail.mp4"]
    for name in names:
        assert (tmp_path / name).stat().st_size > 0
        frames, fps = read_video(tmp_path / name)
        assert frames.shape == (3, S, 2 * S, 3), frames.shape  # first obs + one per chunk; agent view | wrist
        assert fps == pytest.approx(10.0)
        assert frames[:, :, :S].std() > 5 and frames[:, :, S:].std() > 5  # both cameras show a scene


@needs_libero
def test_eval_cli_on_libero(tmp_path, capsys):
    """`python -m flowrl.eval --checkpoint POLICY_DIR --suite ...`: a per-task table, the suite line, --json."""
    import json

    from flowrl.eval import main
    from flowrl.models import Pi0Policy, get_config

    torch.manual_seed(0)
    Pi0Policy(get_config("tiny", num_cameras=2, image_size=S, vocab_size=4096, max_token_len=32,
                         action_horizon=4)).save_pretrained(str(tmp_path / "pol"))
    r = main(["--checkpoint", str(tmp_path / "pol"), "--suite", "libero_goal", "--task-ids", "2", "--init-states", "1",
              "--num-envs", "1", "--max-episode-steps", "2", "--fast-render", "--num-steps", "2",
              "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert r["episodes"] == 1 and r["tasks"][0]["task_id"] == 2 and r["noise"] == "N(0, I)"
    assert "libero_goal: success 0.000" in out and "1 episodes (1 tasks x 1 init states)" in out
    assert json.loads((tmp_path / "r.json").read_text())["tasks"][0]["instruction"] == r["tasks"][0]["instruction"]


@needs_libero
def test_deepspeed_trainer_one_iteration_on_libero(tmp_path):
    """`deepspeed flowrl/train.py` with a LIBERO config (Flow-SDE PPO) and the tiny policy: one full iteration
    (rollout, update, checkpoint) with two envs at 64² and fast rendering."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--master_port", str(port), "flowrl/train.py",
           "--config", "flowrl/configs/libero/pi0_libero_spatial_flow_sde_ppo.yaml",
           f"run_dir={tmp_path / 'run'}", "model.config=tiny", "model.freeze=none", "model.overrides.action_horizon=10",
           "env.num_envs=2", "env.task_ids=[0]", "env.image_size=64", "env.fast_render=true", "env.chunk_steps=2",
           "iterations=1", "checkpoint_every=1", "tensorboard=false", "plot=false", "algo.rollout_chunks=2",
           "algo.minibatch_size=4", "algo.num_steps=2", "zero_stage=1", "bf16=false"]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[flowrl] it 1/1 [flow_sde_ppo]" in out, out[-4000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").is_file()
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert (latest / "policy" / "model.safetensors").is_file() and (latest / "trainer_rank0.pt").is_file()
