"""flowrl.eval: the LIBERO evaluation's scheduling (on a stand-in env: no LIBERO needed), its argument checks,
videos, and the eval CLI on a VLA-FPO checkpoint (the latent actor must be used, not plain N(0, I)).

The real-scene LIBERO evaluation test is in tests/test_libero.py (skipped without LIBERO).
"""

from __future__ import annotations

import json
import os
import socket
from typing import ClassVar

import numpy as np
import pytest
import torch

from flowrl.envs.base import ChunkStep, EnvObs
from flowrl.eval_libero import check_libero_args, evaluate_libero, format_libero_result

S = 16


def _tiny_policy(image_size: int = S, horizon: int = 4):
    from flowrl.models import Pi0Policy, get_config

    torch.manual_seed(0)
    return Pi0Policy(get_config("tiny", num_cameras=2, image_size=image_size, vocab_size=64, max_token_len=8,
                                action_horizon=horizon)).eval()


class FakeLibero:
    """A LiberoEnv stand-in with its scheduling interface (``task_of_env``, ``set_next_init``, ``reset_to``,
    ``episode_init``, ``final_images``, auto-reset). Episode ``(task, init)`` succeeds after ``1 + init % 3``
    chunks when ``(task + init) % 2 == 0``, else runs to the time limit. Pairs in ``fail_once`` lose their
    worker on the first chunk once (``executed = 0``, as LiberoEnv reports a failure). The agent-view image
    encodes ``init`` and the chunk count, so videos can be checked."""

    instances: ClassVar[list[FakeLibero]] = []

    def __init__(self, suite, task_ids, num_envs, *, chunk_steps, image_size, max_episode_steps, seed,
                 fail_once=(), **_kw):
        self.suite, self.num_envs, self.chunk_steps, self.image_size = suite, num_envs, chunk_steps, image_size
        self.max_episode_steps = max_episode_steps or 12
        self.task_of_env = [task_ids[i % len(task_ids)] for i in range(num_envs)]
        self.instructions = [f"do task {t}" for t in self.task_of_env]
        self.task_names = [f"TASK_{t}" for t in self.task_of_env]
        self.episode_init = np.full(num_envs, -1)
        self.final_images = np.zeros((num_envs, 2, image_size, image_size, 3), np.uint8)
        self.t = np.zeros(num_envs, np.int64)
        self.chunks = np.zeros(num_envs, np.int64)
        self.pinned: dict[int, tuple[int, int]] = {}
        self.started: list[tuple[int, int, int, bool]] = []  # (env, task, init, pinned)
        self.fail_once = set(fail_once)
        self.closed = False
        FakeLibero.instances.append(self)

    def set_next_init(self, env_ids, inits, seeds):
        for i, k, s in zip(env_ids, inits, seeds):
            self.pinned[i] = (k, s)

    def _start(self, i):
        pinned = i in self.pinned
        k, _ = self.pinned.pop(i) if pinned else (-1, None)  # -1: an unpinned (scheduled) episode
        self.started.append((i, self.task_of_env[i], k, pinned))
        self.episode_init[i], self.t[i], self.chunks[i] = k, 0, 0

    def reset_to(self, inits, env_ids=None, seeds=None):
        ids = list(range(self.num_envs)) if env_ids is None else list(env_ids)
        self.set_next_init(ids, inits, seeds or [0] * len(ids))
        for i in ids:
            self._start(i)
        return self.observe()

    def _img(self, i):
        img = np.zeros((2, self.image_size, self.image_size, 3), np.uint8)
        img[0, ..., 0] = 10 * int(self.episode_init[i]) % 256
        img[0, ..., 1] = 40 * int(self.chunks[i])
        img[1] = 200
        return img

    def observe(self):
        B, L = self.num_envs, 8
        imgs = np.stack([self._img(i) for i in range(B)])
        images = torch.from_numpy(imgs).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        tokens = torch.ones(B, L, dtype=torch.int64)
        return EnvObs(images, torch.ones(B, 2, dtype=torch.bool), tokens, tokens > 0, torch.zeros(B, 8),
                      list(self.instructions))

    def step(self, actions):
        assert actions.shape[0] == self.num_envs and not self.closed
        B = self.num_envs
        done, succ, ex, length = (np.zeros(B, bool), np.zeros(B, bool), np.zeros(B, np.int64), np.zeros(B, np.int64))
        for i in range(B):
            task, init = self.task_of_env[i], int(self.episode_init[i])
            if (task, init) in self.fail_once:
                self.fail_once.discard((task, init))
                done[i], length[i] = True, self.t[i]
                continue
            n = min(self.chunk_steps, self.max_episode_steps - self.t[i])
            self.t[i] += n
            self.chunks[i] += 1
            ex[i] = n
            if (task + init) % 2 == 0 and self.chunks[i] == 1 + init % 3:
                done[i] = succ[i] = True
            elif self.t[i] >= self.max_episode_steps:
                done[i] = True
            length[i] = self.t[i] if done[i] else 0
        for i in np.nonzero(done)[0]:
            self.final_images[i] = self._img(i)
            self._start(int(i))
        t = torch.from_numpy
        return ChunkStep(self.observe(), t(succ.astype(np.float32)), t(done), t(succ), t(done & ~succ), t(ex),
                         t(succ.astype(np.float32)), t(length))

    def close(self):
        self.closed = True


def _fake_eval(tmp_path=None, **kw):
    FakeLibero.instances.clear()
    args = {"task_ids": [0, 1, 2], "init_states": 5, "num_envs": 2, "num_steps": 2, "chunk_steps": 2, "seed": 3,
            "env_factory": FakeLibero}
    args.update(kw)
    return evaluate_libero(_tiny_policy(), "libero_goal", **args)


def _expected(task: int, init: int, limit: int = 12, chunk: int = 2) -> tuple[bool, int]:
    if (task + init) % 2 == 0 and (1 + init % 3) * chunk <= limit:
        return True, (1 + init % 3) * chunk
    return False, limit


# ---------------------------------------------------------------------------------------- scheduling
def test_every_pair_runs_once_and_rates_are_per_task_and_suite():
    r = _fake_eval()
    assert r["episodes"] == 15 and [t["episodes"] for t in r["tasks"]] == [5, 5, 5]
    pairs = [(e["task_id"], e["init_state"]) for e in r["episode_results"]]
    assert pairs == [(t, i) for t in range(3) for i in range(5)]
    # two groups of envs (tasks 0, 1 then task 2), each closed; every counted episode started from its pin
    envs = FakeLibero.instances
    assert [e.task_of_env for e in envs] == [[0, 1], [2, 2]] and all(e.closed for e in envs)
    started = sorted((t, k) for e in envs for (_i, t, k, pinned) in e.started if pinned)
    for t in range(3):
        for k in range(5):
            assert started.count((t, k)) == 1, (t, k, started)
    for e in r["episode_results"]:
        assert (e["success"], e["length"]) == _expected(e["task_id"], e["init_state"]), e
    for t in r["tasks"]:
        k = sum(_expected(t["task_id"], i)[0] for i in range(5))
        assert t["successes"] == k and t["success_rate"] == k / 5 and t["ci_low"] <= k / 5 <= t["ci_high"]
        assert t["name"] == f"TASK_{t['task_id']}" and t["instruction"] == f"do task {t['task_id']}"
    k = sum(t["successes"] for t in r["tasks"])
    assert r["successes"] == k and r["success_rate"] == k / 15 and r["ci_low"] < r["success_rate"] < r["ci_high"]
    text = format_libero_result(r)
    assert "libero_goal: success" in text and "15 episodes (3 tasks x 5 init states)" in text
    json.dumps(r)  # the result is JSON-serializable (the CLI's --json)


def test_explicit_init_states_more_envs_than_tasks_and_determinism():
    a = _fake_eval(task_ids=[4], init_states=[7, 3, 11], num_envs=8)
    (env,) = FakeLibero.instances
    assert env.num_envs == 3  # no more workers than pairs
    assert [(e["task_id"], e["init_state"]) for e in a["episode_results"]] == [(4, 7), (4, 3), (4, 11)]
    assert a["tasks"][0]["task_id"] == 4
    b = _fake_eval(task_ids=[4], init_states=[7, 3, 11], num_envs=8)
    assert a["episode_results"] == b["episode_results"]


def test_worker_failure_reruns_the_episode():
    r = _fake_eval(task_ids=[0], init_states=4, num_envs=2, env_kwargs={"fail_once": {(0, 1), (0, 2)}})
    assert [e["init_state"] for e in r["episode_results"]] == [0, 1, 2, 3]
    for e in r["episode_results"]:
        assert not e["worker_failure"] and (e["success"], e["length"]) == _expected(0, e["init_state"])
    # with no reruns allowed the cut-short episode counts as a failure, once
    r = _fake_eval(task_ids=[0], init_states=3, num_envs=1, env_kwargs={"fail_once": {(0, 0)}},
                   max_retries=0)
    e0 = r["episode_results"][0]
    assert e0["worker_failure"] and not e0["success"] and r["episodes"] == 3


def test_noise_fn_is_used():
    calls = []

    def noise(policy, obs, gen):
        calls.append(obs.images.shape[0])
        c = policy.config
        return torch.zeros(obs.images.shape[0], c.action_horizon, c.action_dim)

    r = _fake_eval(task_ids=[1], init_states=2, num_envs=2, noise_fn=noise)
    assert calls and all(b == 2 for b in calls) and r["config"]["noise"] == "custom"


def test_videos_named_and_decodable(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from flowrl.eval_libero import read_video

    r = _fake_eval(task_ids=[0, 1], init_states=3, num_videos=4, video_dir=tmp_path / "v")
    names = sorted(p.name for p in (tmp_path / "v").iterdir())
    want = []
    for t, i in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        ok, length = _expected(t, i)
        want.append((f"libero_goal_task{t}_init{i}_{'success' if ok else 'fail'}.mp4", length))
    assert names == sorted(n for n, _ in want)
    assert sorted(os.path.basename(v) for v in r["videos"]) == names
    for name, length in want:
        frames, fps = read_video(tmp_path / "v" / name)
        assert frames.shape == (1 + length // 2, S, 2 * S, 3), name  # start + one per chunk; agent view | wrist
        assert fps == pytest.approx(10.0)  # 20 Hz control, 2 steps per chunk
        # the agent view encodes the chunk count (green) and the wrist half is grey 200
        green = frames[:, S // 2, S // 2, 1].astype(int)
        assert np.abs(green - 40 * np.arange(len(green))).max() <= 8, green
        assert abs(int(frames[0, S // 2, S + S // 2, 0]) - 200) <= 8
    assert r["episode_results"][5]["video"] is None  # (1, 2): past the first 4


def test_video_frame_and_odd_sizes(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from flowrl.eval_libero import read_video, video_frame, write_video

    img = torch.stack([torch.full((3, 5, 5), -1.0), torch.full((3, 5, 5), 1.0)])
    f = video_frame(img)
    assert f.shape == (5, 10, 3) and f.dtype == np.uint8 and f[0, 0, 0] == 0 and f[0, 9, 0] == 255
    assert video_frame(img, wrist=False).shape == (5, 5, 3)
    write_video(tmp_path / "odd.mp4", [f, f, f], fps=4)
    frames, _ = read_video(tmp_path / "odd.mp4")
    assert frames.shape == (3, 6, 10, 3)  # padded to even sizes


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, arg", [
    ({"suite": "libero_nope"}, "suite"),
    ({"task_ids": [10]}, "task_ids"),
    ({"task_ids": [-1]}, "task_ids"),
    ({"task_ids": []}, "task_ids"),
    ({"init_states": 51}, "init_states"),
    ({"init_states": 0}, "init_states"),
    ({"init_states": [0, 50]}, "init_states"),
    ({"init_states": [1, 1]}, "init_states"),
])
def test_bad_arguments_name_the_argument(kw, arg):
    args = {"suite": "libero_spatial", "task_ids": None, "init_states": 50, **kw}
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        check_libero_args(args["suite"], args["task_ids"], args["init_states"])
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        evaluate_libero(_tiny_policy(), env_factory=FakeLibero, **args)  # before any env is built


def test_check_args_defaults():
    assert check_libero_args("libero_90", None, 2) == (list(range(90)), [0, 1])
    assert check_libero_args("libero_10", [9, 0], [49, 0]) == ([9, 0], [49, 0])
    with pytest.raises(ValueError, match=r"^video_dir:"):
        evaluate_libero(_tiny_policy(), num_videos=1, env_factory=FakeLibero)
    with pytest.raises(ValueError, match=r"^image_size:"):
        evaluate_libero(_tiny_policy(), image_size=32, env_factory=FakeLibero)


def test_cli_bad_libero_arguments(tmp_path):
    from flowrl.eval import main

    _tiny_policy().save_pretrained(str(tmp_path / "pol"))
    for argv, arg in ((["--suite", "libero_nope"], "suite"), (["--task-ids", "0,12"], "task_ids"),
                      (["--init-states", "60"], "init_states"), (["--task-ids", "a"], "task_ids")):
        base = ["--checkpoint", str(tmp_path / "pol")]
        if "--suite" not in argv:
            base += ["--suite", "libero_object"]
        with pytest.raises(ValueError, match=rf"^{arg}:"):
            main(base + argv)


# ---------------------------------------------------------------------------------------- the CLI on VLA-FPO
@pytest.fixture(scope="module")
def vla_fpo_checkpoint(tmp_path_factory):
    """A tiny VLA-FPO run on the reaching task (1 iteration), its checkpoint dir."""
    from flowrl.checkpoint import latest_checkpoint
    from flowrl.train import main

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    run = tmp_path_factory.mktemp("vla") / "run"
    main([f"run_dir={run}", "algo.name=vla_fpo", "algo.fpo_pairs=2", "model.overrides.action_horizon=10",
          "algo.num_steps=2", "env.num_envs=4", "algo.rollout_chunks=2", "algo.epochs=1", "algo.minibatch_size=4",
          "env.max_episode_steps=10", "iterations=1", "checkpoint_every=1", "eval_episodes=0", "plot=false",
          "tensorboard=false"])
    ck = latest_checkpoint(run)
    assert (ck / "latent_actor.safetensors").is_file()
    from safetensors import safe_open

    from flowrl.models.weights import DIGEST_KEY

    with safe_open(str(ck / "latent_actor.safetensors"), framework="pt") as f:
        assert DIGEST_KEY in (f.metadata() or {}), "the trainer wrote the latent actor without its digest"
    return ck


def _rebuild(ck):
    """The trained policy and VLA-FPO algorithm (latent actor loaded), rebuilt by hand from the checkpoint."""
    from safetensors.torch import load_file

    from flowrl.config import TrainConfig, apply_overrides
    from flowrl.models import from_pretrained
    from flowrl.train import build_algorithm, build_env

    saved = json.loads((ck / "train_config.json").read_text())
    cfg = apply_overrides(TrainConfig(), {"env": saved["env"], "algo": saved["algo"]})
    cfg.env.num_envs = 2
    env = build_env(cfg)
    policy = from_pretrained(str(ck / "policy")).eval()
    algo = build_algorithm(cfg)
    algo.trainable_module(policy, env).load_state_dict(load_file(str(ck / "latent_actor.safetensors")))
    return cfg, env, policy, algo


def test_cli_evaluates_vla_fpo_with_its_latent_actor(vla_fpo_checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from flowrl.algos.vla_fpo import VLAFPO
    from flowrl.eval import evaluate, main

    # give the actor an unmistakable drift so that steering by it changes the episodes
    ck = vla_fpo_checkpoint
    sd = load_file(str(ck / "latent_actor.safetensors"))
    bias = "actor.net.4.bias"  # the velocity's output bias: v ≈ −6, so the latent drifts by +6·η
    assert sd[bias].numel() == 10 * 2  # H x the env's real action dims
    sd[bias] = torch.full_like(sd[bias], -6.0)
    save_file(sd, str(ck / "latent_actor.safetensors"))

    seen = []
    orig = VLAFPO.eval_noise

    def spy(self, policy, obs, gen):
        seen.append(float(self.modules.actor.state_dict()[bias.removeprefix("actor.")].mean()))
        return orig(self, policy, obs, gen)

    monkeypatch.setattr(VLAFPO, "eval_noise", spy)
    out = tmp_path / "r.json"
    r = main(["--checkpoint", str(ck), "--episodes", "8", "--num-envs", "2", "--seed", "5", "--json", str(out)])
    assert seen and all(v == -6.0 for v in seen), "the CLI did not sample through the checkpoint's latent actor"
    assert r["noise"] == "vla_fpo latent actor"
    assert json.loads(out.read_text())["success_rate"] == r["success_rate"]

    cfg, env, policy, algo = _rebuild(ck)
    want = evaluate(policy, env, 8, 5, cfg.algo.num_steps, algo.eval_noise)
    for k in ("success_rate", "ci_low", "ci_high", "episodes", "return"):
        assert r[k] == want[k], (k, r[k], want[k])
    # the same policy with plain N(0, I) noise acts differently: the latents differ by the drift
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    obs = env.reset(seed=0)
    x_actor = algo.eval_noise(policy, obs, gen_a)
    x_plain = torch.randn(x_actor.shape, generator=gen_b)
    assert (x_actor - x_plain)[..., :2].mean() > 1.0  # the actor steers the env's real action dims
    # paired with π0's own evaluation: the padded dims are exactly π0's draw
    assert x_actor.shape[-1] > 2 and torch.equal(x_actor[..., 2:], x_plain[..., 2:])
    # an untrained actor (zero last layer) is the identity map: its evaluation is π0's, draw for draw
    with torch.no_grad():
        algo.modules.actor.net[-1].weight.zero_()
        algo.modules.actor.net[-1].bias.zero_()
    assert evaluate(policy, env, 8, 5, cfg.algo.num_steps, algo.eval_noise) == evaluate(
        policy, env, 8, 5, cfg.algo.num_steps)


def test_cli_splits_the_episodes_over_torchrun_ranks(vla_fpo_checkpoint, tmp_path):
    """``torchrun --nproc_per_node 2 -m flowrl.eval``: rank r evaluates the global envs [2r, 2r + 2) with its own
    generator (seed + 1 000 003·r), rounds of 4 episodes counted rank-major; rank 0 alone prints and writes the
    JSON. The expected result is rebuilt here from those rules, one rank after the other."""
    import subprocess
    import sys
    from pathlib import Path

    from flowrl.eval import run_episodes, wilson_interval
    from flowrl.train import build_env

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    p = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "flowrl.eval", "--checkpoint", str(vla_fpo_checkpoint), "--episodes", "6",
                        "--num-envs", "2", "--seed", "5", "--json", str(out)], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert p.stdout.count("success ") == 1 and "over 6 episodes on 2 ranks" in p.stdout, p.stdout
    r = json.loads(out.read_text())
    cfg, _, policy, algo = _rebuild(vla_fpo_checkpoint)
    envs = [build_env(cfg, rank, for_eval=True, world=2) for rank in (0, 1)]
    gens = [torch.Generator().manual_seed(5 + 1_000_003 * rank) for rank in (0, 1)]
    succ, rets = [], []
    for rnd in range(2):
        for rank in (0, 1):
            s_, r_ = run_episodes(policy, envs[rank], 5 + rnd, gens[rank], cfg.algo.num_steps, algo.eval_noise)
            succ += s_.tolist()
            rets += r_.tolist()
    succ, rets = succ[:6], rets[:6]
    assert r["episodes"] == 6 and r["ranks"] == 2 and r["success_rate"] == sum(succ) / 6, (r, succ)
    assert (r["ci_low"], r["ci_high"]) == wilson_interval(sum(succ), 6)
    assert r["return"] == pytest.approx(sum(rets) / 6, abs=1e-6)


def test_cli_vla_fpo_without_latent_actor_fails_loudly(vla_fpo_checkpoint, tmp_path):
    import shutil

    from flowrl.eval import main

    ck = tmp_path / "ck"
    shutil.copytree(vla_fpo_checkpoint, ck)
    (ck / "latent_actor.safetensors").unlink()
    with pytest.raises(ValueError, match=r"latent_actor\.safetensors"):
        main(["--checkpoint", str(ck), "--episodes", "2", "--num-envs", "2"])



def test_cli_vla_fpo_latent_actor_with_changed_bytes_fails_loudly(vla_fpo_checkpoint, tmp_path):
    """A bit flipped in the latent actor's tensor data loaded as another actor, silently."""
    import shutil
    import struct

    from safetensors.torch import load_file, save_file

    from flowrl.eval import main
    from flowrl.models.weights import DIGEST_KEY, tensor_digest

    ck = tmp_path / "ck"
    shutil.copytree(vla_fpo_checkpoint, ck)
    path = ck / "latent_actor.safetensors"
    sd = load_file(str(path))  # re-saved with its digest (another test edits the module's checkpoint)
    save_file(sd, str(path), metadata={"format": "pt", DIGEST_KEY: tensor_digest(sd)})
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"latent_actor\.safetensors: the weights do not match the SHA-256"):
        main(["--checkpoint", str(ck), "--episodes", "2", "--num-envs", "2"])


def test_noise_sensitivity_scale_one_is_the_plain_evaluation(vla_fpo_checkpoint, tmp_path):
    """benchmarks/noise_sensitivity.py: scale 1 is exactly the default N(0, I) evaluation of π0; a missing
    checkpoint fails with its path."""
    import sys
    from pathlib import Path

    from flowrl.config import TrainConfig, apply_overrides
    from flowrl.eval import evaluate
    from flowrl.models import from_pretrained
    from flowrl.train import build_env

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from noise_sensitivity import main, success_by_scale

    ck = vla_fpo_checkpoint
    r, _ = success_by_scale(ck, [1.0, 0.0], episodes=8, num_envs=4, seed=3)
    saved = json.loads((ck / "train_config.json").read_text())
    cfg = apply_overrides(TrainConfig(), {"env": saved["env"]})
    cfg.env.num_envs = 4
    env = build_env(cfg, for_eval=True)
    want = evaluate(from_pretrained(str(ck / "policy")).eval(), env, 8, 3, saved["algo"]["num_steps"])
    assert r[0] == want["success_rate"]
    assert 0.0 <= r[1] <= 1.0
    out = tmp_path / "t.md"
    table = main([str(ck), "--scales", "0", "1", "--episodes", "4", "--num-envs", "4", "--out", str(out)])
    assert table.count("\n") == 2 and "success at 1·N(0, I)" in out.read_text()
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="scales"):
        main([str(ck), "--scales", "-1"])
    # best of M draws: M = 1 is the plain evaluation; more draws of the same scenes never do worse
    # within one round of num_envs episodes (its first draw is the plain evaluation's)
    from noise_sensitivity import best_of, best_of_draws

    assert best_of(ck, 1, episodes=8, num_envs=4, seed=3) == want["success_rate"]
    one = best_of(ck, 1, episodes=4, num_envs=4, seed=5)
    assert best_of(ck, 3, episodes=4, num_envs=4, seed=5) >= one
    with pytest.raises(ValueError, match="draws"):
        best_of_draws(None, env, 4, 0, 2, 0)
    table = main([str(ck), "--scales", "1", "--best-of", "2", "--episodes", "4", "--num-envs", "4"])
    assert "best of 2 N(0, I) draws" in table
    with pytest.raises(SystemExit, match="best-of"):
        main([str(ck), "--best-of", "-1"])


def test_noise_sensitivity_learned_choice(vla_fpo_checkpoint):
    """benchmarks/noise_sensitivity.py --learned-choice: the pick is one of each scene's draws (never
    better than the best of them), the rates are per-scene fractions; bad settings fail by name."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from noise_sensitivity import _load, learned_choice, main

    _, policy, env = _load(vla_fpo_checkpoint, 4)
    assert (env.chunk_steps, env.max_episode_steps) == (5, 10)
    with pytest.raises(ValueError, match="one chunk"):
        learned_choice(policy, env, rounds=2, draws=2, seed=1, num_steps=2)
    env.chunk_steps = 10  # one chunk per episode (the policy's horizon is 10)
    r = learned_choice(policy, env, rounds=2, draws=3, seed=1, num_steps=2, steps=10, hidden=16)
    assert set(r) == {"mean", "best", "picked", "picked_train"}
    assert 0.0 <= r["mean"] <= r["best"] <= 1.0
    assert r["picked"] <= r["best"] and r["picked_train"] <= 1.0
    assert all(abs(r[k] * 4 - round(r[k] * 4)) < 1e-6 for k in ("best", "picked", "picked_train"))
    with pytest.raises(ValueError, match="rounds"):
        learned_choice(policy, env, rounds=1, draws=3, seed=1, num_steps=2)
    with pytest.raises(SystemExit, match="learned-choice"):
        main([str(vla_fpo_checkpoint), "--learned-choice", "2"])


@pytest.mark.parametrize("vary", ["real", "padded"])
def test_noise_sensitivity_best_of_part_of_the_noise(vla_fpo_checkpoint, vary):
    """benchmarks/noise_sensitivity.py --best-of-vary: between a scene's draws only the named dims are
    redrawn (the others are the same noise at every draw); a bad choice fails by name."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from noise_sensitivity import _load, best_of_draws, main

    from flowrl.algos.base import masks_for

    _, policy, env = _load(vla_fpo_checkpoint, 4)
    real = masks_for(env, policy, torch.device("cpu"))[0]
    assert 0 < int(real.sum()) < real.numel()  # the env has fewer dims than π0
    first: list[torch.Tensor] = []  # the noise of each draw's first chunk (right after its reset)
    sample, reset, fresh = policy.sample_actions, env.reset, [False]

    def record(obs, **kw):
        if fresh[0]:
            first.append(kw["noise"].clone())
            fresh[0] = False
        return sample(obs, **kw)

    def mark(**kw):
        fresh[0] = True
        return reset(**kw)

    policy.sample_actions, env.reset = record, mark
    rate = best_of_draws(policy, env, episodes=4, seed=2, num_steps=2, draws=3, vary=vary)
    assert 0.0 <= rate <= 1.0 and len(first) == 3  # one round of 4 scenes, 3 draws
    fixed, drawn = (~real, real) if vary == "real" else (real, ~real)
    for other in first[1:]:
        assert torch.equal(other[:, :, fixed], first[0][:, :, fixed])
        assert not torch.equal(other[:, :, drawn], first[0][:, :, drawn])
    with pytest.raises(ValueError, match="vary"):
        best_of_draws(policy, env, 4, 0, 2, 2, vary="some")
    table = main([str(vla_fpo_checkpoint), "--scales", "1", "--best-of", "2", "--best-of-vary", "all", vary,
                  "--episodes", "4", "--num-envs", "4"])
    assert f"({vary} dims redrawn)" in table and table.splitlines()[2].count("|") == 6


def test_cli_takes_a_run_directory_for_its_latest_checkpoint(vla_fpo_checkpoint, tmp_path):
    from flowrl.eval import main, resolve_checkpoint

    ck = vla_fpo_checkpoint
    run_dir = ck.parent.parent
    assert resolve_checkpoint(run_dir) == ck and resolve_checkpoint(run_dir / "checkpoints") == ck
    assert resolve_checkpoint(ck) == ck
    args = ["--episodes", "4", "--num-envs", "2", "--seed", "1"]
    assert main(["--checkpoint", str(run_dir), *args]) == main(["--checkpoint", str(ck), *args])
    with pytest.raises(SystemExit, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")


def test_tokenizer_that_does_not_fit_the_policy_fails_before_any_worker_starts(monkeypatch):
    """LiberoEnv's word tokenizer pads to 32 tokens: a policy with max_token_len 8 used to fail only after
    its workers had started (~15 s), in the first sample_actions."""
    import flowrl.eval_libero as el

    def no_env(*a, **k):
        raise AssertionError("an env was built before the tokenizer check")

    monkeypatch.setattr(el, "_make_env", no_env)
    with pytest.raises(ValueError, match=r"tokenizer: .* 32 tokens per instruction, above the policy.s max_token_len"):
        evaluate_libero(_tiny_policy(), "libero_spatial", [0], 1, chunk_steps=4)
    with pytest.raises(ValueError, match=r"vocabulary of 4096, above the policy's vocab_size=64"):
        evaluate_libero(_tiny_policy(), "libero_spatial", [0], 1, chunk_steps=4, env_kwargs={"max_token_len": 8})
    with pytest.raises(ValueError, match="above the policy's max_token_len=8"):
        evaluate_libero(_tiny_policy(), "libero_spatial", [0], 1, chunk_steps=4, tokenizer="byte")


# ---------------------------------------------------------------------------------------- evaluation over ranks
def _two_rank_eval(tmp_path, mode: str) -> list[dict]:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(repo / "tests" / "dist_eval_worker.py"), str(tmp_path), mode],
                              env={**base, "RANK": str(r)}, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_evaluation_split_over_two_ranks_equals_one_rank_of_all_envs(tmp_path):
    """evaluate(rank=, world=2) on the trainer's per-rank evaluation envs (3 each): rank r holds the global envs
    [3r, 3r + 3), so with noise that does not depend on the generator the episodes (rounds of 6, rank-major) are
    those of one rank evaluating 6 envs: 4 and 5 episodes (a part of round 1, where the order counts: only
    global env 4 succeeds) and 8 (a second round); both ranks return the whole result."""
    from flowrl.config import load_config
    from flowrl.eval import evaluate
    from flowrl.train import build_env, build_policy

    r0, r1 = _two_rank_eval(tmp_path, "zero")
    cfg = load_config(None, ["model.overrides.action_horizon=10", "algo.num_steps=2", "env.num_envs=6"])
    env = build_env(cfg, for_eval=True)
    torch.manual_seed(0)
    policy = build_policy(cfg, env).eval()

    def zero_noise(policy, obs, gen):
        return torch.zeros(obs.state.shape[0], policy.config.action_horizon, policy.config.action_dim)

    rates = []
    for n in (4, 5, 8):
        want = evaluate(policy, env, n, 11, 2, zero_noise)
        rates.append(want["success_rate"])
        for r in (r0, r1):
            got = r[str(n)]
            assert got["episodes"] == n and got["success_rate"] == want["success_rate"], (n, got, want)
            assert got["return"] == pytest.approx(want["return"], abs=1e-6)
        assert r0[str(n)] == r1[str(n)]
    assert rates[:2] == [0.0, 0.2], rates  # the check above could see a wrong order
    env.reset(seed=11)
    assert r0["targets"] + r1["targets"] == env.targets.tolist()  # the ranks' scenes: one env of 6, split


def test_evaluation_over_ranks_keeps_the_ranks_in_step(tmp_path):
    """A round ends when every rank's episodes are over, not each rank's own: under ZeRO-3 every policy forward
    is a collective, and a rank that stopped early paired its next collectives with the wrong ones (gloo:
    "Received data size doesn't match", NCCL: a hang). Rank 0's episodes end at their first chunk, rank 1's run
    to the limit (4 chunks): both make 4 policy calls; success counts only each env's first episode."""
    r0, r1 = _two_rank_eval(tmp_path, "lockstep")
    assert r0["policy_calls"] == r1["policy_calls"] == 4, (r0["policy_calls"], r1["policy_calls"])
    assert r0["result"] == r1["result"] and r0["result"]["success_rate"] == 0.5, r0["result"]


def test_evaluation_over_ranks_refuses_envs_of_different_sizes_on_every_rank(tmp_path):
    for r in _two_rank_eval(tmp_path, "mismatch"):
        assert "every rank needs an env of the same size, got num_envs [3, 4]" in r["error"], r


def test_evaluation_world_arguments_are_checked():
    from flowrl.config import load_config
    from flowrl.eval import evaluate
    from flowrl.train import build_env, build_policy

    cfg = load_config(None, ["model.overrides.action_horizon=10", "algo.num_steps=2", "env.num_envs=2"])
    env = build_env(cfg, for_eval=True)
    policy = build_policy(cfg, env).eval()
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\), got 1"):
        evaluate(policy, env, 2, rank=1)
    with pytest.raises(ValueError, match="world must be an int >= 1, got 0"):
        evaluate(policy, env, 2, world=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match=r"world=2 needs an initialized torch\.distributed process group"):
            evaluate(policy, env, 2, rank=1, world=2)
