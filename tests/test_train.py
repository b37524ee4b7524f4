"""The trainer end to end on CPU with the tiny policy: every algorithm, learning, resume, SIGKILL, bad configs,
and two DeepSpeed ranks against one (ZeRO 1, 2, 3).

In-process runs go through ``flowrl.train.main`` (torch.distributed is initialized once per process, world
size 1, on a free port); launcher-based and kill tests use subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowrl.checkpoint import latest_checkpoint
from flowrl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "flowrl" / "train.py"
# the tiny policy, tiny rollouts, no plots/tensorboard
TINY = ["model.overrides.action_horizon=10", "algo.num_steps=2", "env.num_envs=4", "algo.rollout_chunks=2",
        "algo.epochs=1", "algo.minibatch_size=4", "plot=false", "tensorboard=false"]
TIMING = {"rollout_s", "update_s", "rollout_samples_per_s", "update_samples_per_s", "rollout_fraction", "peak_rss_gb"}
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    """In-process train() initializes a world-size-1 gloo group once; give it a free port."""
    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(_free_port())
    yield


def _sub_env(**extra: str) -> dict[str, str]:
    """An environment for child processes: no distributed variables inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


def _run(run_dir: Path, *overrides: str, resume: bool = False) -> dict:
    from flowrl.train import main

    return main([f"run_dir={run_dir}", *TINY, *overrides, *(["--resume"] if resume else [])])


def _params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}


# ---------------------------------------------------------------------------------------- 1. smoke, every algorithm
ALGO_OVERRIDES = {
    "sft": ["algo.sft_steps=2", "algo.sft_batch=8", "algo.num_demos=4", "env.max_episode_steps=10"],
    "arfm": ["algo.sft_steps=2", "algo.sft_batch=8", "algo.num_demos=4", "env.max_episode_steps=10"],
    "fpo": ["algo.fpo_pairs=2"],
    "flow_noise_ppo": [],
    "flow_sde_ppo": [],
    "grpo": ["algo.group_size=2", "env.max_episode_steps=10"],
    "vla_fpo": ["algo.fpo_pairs=2"],
}


@pytest.mark.parametrize("algo", list(ALGO_OVERRIDES))
def test_smoke_every_algorithm(tmp_path, algo):
    from flowrl.models import from_pretrained

    run_dir = tmp_path / "run"
    res = _run(run_dir, f"algo.name={algo}", "iterations=1", "checkpoint_every=1", "eval_episodes=0",
               *ALGO_OVERRIDES[algo])
    (h,) = res["history"]
    losses = {k: v for k, v in h.items() if k.endswith("loss")}
    assert losses, f"{algo}: no loss in the metrics {sorted(h)}"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"iteration": 0.0' in lines[0]
    assert 0.05 < h["peak_rss_gb"] < 64, h["peak_rss_gb"]  # this process's peak memory, GiB

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "iter_000000"
    assert (ckpt / "policy" / "model.safetensors").is_file() and (ckpt / "policy" / "config.json").is_file()
    assert (ckpt / "ds").is_dir() and any((ckpt / "ds").iterdir())
    st = torch.load(ckpt / "trainer_rank0.pt", weights_only=False)
    assert st["iteration"] == 0 and len(st["history"]) == 1

    if algo == "sft":  # the eval CLI rebuilds the run's env from the checkpoint's train_config.json
        from flowrl.eval import main as eval_main

        r = eval_main(["--checkpoint", str(ckpt), "--episodes", "4", "--num-envs", "2"])
        assert r["episodes"] == 4 and 0.0 <= r["ci_low"] <= r["success_rate"] <= r["ci_high"] <= 1.0
    if algo == "vla_fpo":  # π0 frozen: the trained latent actor + critics are saved beside it
        assert (ckpt / "latent_actor.safetensors").is_file()
    trained = _params(res["policy"])
    loaded = _params(from_pretrained(str(ckpt / "policy")))
    assert trained.keys() == loaded.keys()
    for k in trained:
        assert torch.equal(trained[k], loaded[k]), f"{algo}: {k} differs after the checkpoint round trip"


@pytest.mark.parametrize("algo", ["fpo", "grpo"])
def test_pipelined_rollout_trains_and_resumes(tmp_path, algo):
    """env.pipeline_groups=2: the rollout interleaves two ReachEnvs; checkpoint and resume go through them."""
    run_dir = tmp_path / "run"
    common = [f"algo.name={algo}", "env.pipeline_groups=2", "checkpoint_every=1", "eval_episodes=0",
              *ALGO_OVERRIDES[algo]]
    res = _run(run_dir, *common, "iterations=1")
    (h,) = res["history"]
    assert h["samples"] >= 4 and all(torch.isfinite(torch.tensor(v)) for k, v in h.items() if k.endswith("loss"))
    st = torch.load(latest_checkpoint(run_dir) / "trainer_rank0.pt", weights_only=False)
    assert len(st["env"]["pipelined"]) == 2
    res = _run(run_dir, *common, "iterations=2", resume=True)
    assert len(res["history"]) == 2


# ---------------------------------------------------------------------------------------- 2. learning signal
def test_sft_learns_the_easy_variant(tmp_path):
    """SFT on perfect demos of the trivially easy variant (one target, its position and the goal in the state).

    Tuned for speed: 2 iterations x 25 steps of batch 32 at lr 1e-3 (the default 3e-4 is too slow for this
    budget; 2 x 15 steps at 3e-3 only reached 0.06 -> 0.125) on 32 demo episodes, 16 evaluation episodes
    of at most 20 steps. Untrained, the tiny policy succeeds in ~6 % of them (fixed seeds: deterministic).
    """
    res = _run(tmp_path / "run", "algo.name=sft", "env.state_with_goal=true", "env.num_targets=1",
               "env.expert_quality=1.0", "env.num_envs=16", "env.max_episode_steps=20", "eval_episodes=16",
               "checkpoint_every=0", "iterations=2", "algo.sft_steps=25", "algo.sft_batch=32", "algo.num_demos=32",
               "algo.sft_lr=1e-3", "seed=0")
    before, after = res["eval_before"]["success_rate"], res["eval_after"]["success_rate"]
    cfm = [h["cfm_loss"] for h in res["history"]]
    assert cfm[-1] < cfm[0], cfm
    assert after >= before + 0.25, f"SFT did not learn: success {before:.3f} -> {after:.3f} (cfm loss {cfm})"


# ---------------------------------------------------------------------------------------- 3. resume exactness
def test_resume_is_exact(tmp_path):
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0", "seed=3"]
    straight = _run(tmp_path / "a", *common, "iterations=4")
    _run(tmp_path / "b", *common, "iterations=2")
    resumed = _run(tmp_path / "b", *common, "iterations=4", resume=True)

    pa, pb = _params(straight["policy"]), _params(resumed["policy"])
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"{k} differs between the straight and the resumed run"
    ha, hb = straight["history"], resumed["history"]
    assert len(ha) == len(hb) == 4
    for i in (2, 3):
        a = {k: v for k, v in ha[i].items() if k not in TIMING}
        b = {k: v for k, v in hb[i].items() if k not in TIMING}
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), f"iteration {i + 1}: {k} {a[k]} != {b[k]}"
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_resume_keeps_the_first_runs_evaluations(tmp_path, capsys):
    """--resume restores the success before training (and after SFT) from the checkpoint: the resumed
    run printed 'success before nan' and its result had no eval_before."""
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=8", "seed=3",
              "sft_iterations=1", "algo.sft_steps=2", "algo.sft_batch=8", "algo.num_demos=4"]
    first = _run(tmp_path / "r", *common, "iterations=1")
    resumed = _run(tmp_path / "r", *common, "iterations=2", resume=True)
    for key in ("eval_before", "eval_after_sft"):
        assert resumed[key] == first[key], key
    assert "success before nan" not in capsys.readouterr().out
    # a resume whose env settings changed would continue the saved episodes under other rules
    with pytest.raises(ConfigError, match=r"--resume.*max_episode_steps"):
        _run(tmp_path / "r", *common, "iterations=3", "env.max_episode_steps=55", resume=True)


def test_run_dir_reuse_and_resume_checks(tmp_path):
    """Found by a fuzzing pass: a fresh run in a directory holding a run with higher-numbered checkpoints had
    its new checkpoint pruned at once (by name) and appended its metrics to the old run's; --resume with another
    algorithm or model size continued silently; damaged checkpoints reached DeepSpeed or torch.load as bare
    errors. Each is now a ConfigError naming what to do, before any work."""
    import shutil

    run = tmp_path / "r"
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0", "seed=3"]
    _run(run, *common, "iterations=2")
    with pytest.raises(ConfigError, match=r"holds the checkpoints of a run \(newest iter_000001\): pass --resume"):
        _run(run, *common, "iterations=1")
    for over, key in (("algo.name=flow_sde_ppo", "algo.name: 'fpo' → 'flow_sde_ppo'"),
                      ("model.overrides.action_horizon=12", "model.overrides: {'action_horizon': 10} → "),
                      ("seed=4", "seed: 3 → 4"), ("algo.lr=1e-3", "algo.lr: ")):
        with pytest.raises(ConfigError, match="the config differs from the one the run was saved with") as ei:
            _run(run, *common, "iterations=3", over, resume=True)
        assert key in str(ei.value) and "model.init_from=" in str(ei.value)
    # damaged checkpoints: each a ConfigError naming the checkpoint
    ck = latest_checkpoint(run)
    bad = tmp_path / "bad"
    for damage, msg in ((lambda c: (c / "trainer_rank0.pt").unlink(), "incomplete: trainer_rank0.pt missing"),
                        (lambda c: shutil.rmtree(c / "ds"), "incomplete: ds missing"),
                        (lambda c: (c / "trainer_rank0.pt").write_bytes(b"garbage\n"),
                         r"trainer_rank\{0\}\.pt is corrupt"),
                        (lambda c: (c / "train_config.json").write_text("{"), "train_config.json is corrupt")):
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(run, bad)
        damage(latest_checkpoint(bad))
        with pytest.raises(ConfigError, match=msg):
            _run(bad, *common, "iterations=3", resume=True)
    # a kill after iteration 3 with checkpoints every 2: the resumed run reruns iteration 3, its metric line once
    (run / "checkpoints" / "latest").write_text(ck.name)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines, lines[-1]]) + "\n")  # a line past the checkpoint
    res = _run(run, *common, "iterations=3", resume=True)
    got = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert got == [0.0, 1.0, 2.0] == [h["iteration"] for h in res["history"]]
    # overwrite=true starts afresh: the old run's checkpoints and metrics are gone
    _run(run, *common, "iterations=1", "overwrite=true")
    assert [p.name for p in (run / "checkpoints").glob("iter_*")] == ["iter_000000"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # a run without checkpoints left metrics only: a new run appended to them
    _run(tmp_path / "m", *common[:2], "checkpoint_every=0", "eval_episodes=0", "iterations=1")
    with pytest.raises(ConfigError, match=r"holds the metrics\.jsonl of a run \(without checkpoints"):
        _run(tmp_path / "m", *common[:2], "checkpoint_every=0", "eval_episodes=0", "iterations=1")


def test_grad_accum_steps_within_each_iteration(tmp_path):
    """algo.grad_accum > 1 let DeepSpeed count micro-batches across iterations: with 2 minibatches per iteration
    and grad_accum=4 no optimizer step was ever taken (the weights never moved), and windows straddled rollouts
    and checkpoints. Now each iteration's minibatches form windows of grad_accum, the last one partial."""
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=0", "eval_episodes=0", "iterations=2"]
    for extra, steps in ((["algo.grad_accum=4"], 1.0), (["algo.grad_accum=4", "algo.epochs=3"], 2.0),
                         (["algo.grad_accum=2"], 1.0)):
        res = _run(tmp_path / "_".join(extra).replace("=", ""), *common, *extra)
        assert [h["optimizer_steps"] for h in res["history"]] == [steps, steps], (extra, res["history"])
        assert all(h["policy_loss"] == h["policy_loss"] for h in res["history"])
    # the weights move in the first iteration (they never did with grad_accum=4)
    first = _run(tmp_path / "one", *common[:-1], "iterations=1", "algo.grad_accum=4", "checkpoint_every=1")
    from flowrl.models import from_pretrained

    before = build_fresh_policy(first["policy"].config)
    after = from_pretrained(str(latest_checkpoint(tmp_path / "one") / "policy"))
    moved = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert moved, "no weight changed after one iteration with grad_accum=4"


def test_grad_accum_under_zero3_accumulates(tmp_path):
    """Under ZeRO-3 each backward of a window overwrote the gradient (DeepSpeed counts a window's passes in
    engine.forward, which the algorithms bypass): a step used only the window's last minibatch. ZeRO-3 now
    matches ZeRO-1 up to rounding."""
    from flowrl.models import from_pretrained

    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0", "iterations=1",
              "algo.grad_accum=2"]
    w = {}
    for z in (1, 3):
        _run(tmp_path / f"z{z}", *common, f"zero_stage={z}")
        w[z] = from_pretrained(str(latest_checkpoint(tmp_path / f"z{z}") / "policy")).state_dict()
    w0 = build_fresh_policy(from_pretrained(str(latest_checkpoint(tmp_path / "z1") / "policy")).config).state_dict()
    upd = sum(float((w[1][k] - w0[k]).square().sum()) for k in w0) ** 0.5
    gap = sum(float((w[1][k] - w[3][k]).square().sum()) for k in w0) ** 0.5
    assert upd > 0 and gap < 0.01 * upd, (gap, upd)


def test_trainer_marks_the_policys_weights_updated_after_each_step(tmp_path, monkeypatch):
    """DeepSpeed's ZeRO optimizers write the new weights through .data: no autograd version counter moves, so
    the policy's stale-cache guard could not see an update made by the trainer's engine. The trainer declares
    each optimizer step (and a resume's load) with mark_weights_updated."""
    from flowrl.models import Pi0Policy

    seen: list[tuple[int, int]] = []  # (plain version-counter sum, generation) at each call
    orig = Pi0Policy.mark_weights_updated

    def mark(self):
        seen.append((sum(q._version for q in self.vlm.parameters()), self._weights_generation))
        return orig(self)

    monkeypatch.setattr(Pi0Policy, "mark_weights_updated", mark)
    res = _run(tmp_path / "z1", "algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0",
               "iterations=2", "zero_stage=1")
    steps = int(sum(h["optimizer_steps"] for h in res["history"]))
    assert steps == 4 and len(seen) == steps, (steps, seen)
    assert len({v for v, _ in seen}) == 1, "DeepSpeed now bumps version counters: the marks may be redundant"
    assert [g for _, g in seen] == list(range(steps))
    seen.clear()
    _run(tmp_path / "z1", "algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0",
         "iterations=3", "zero_stage=1", resume=True)
    # the resume's load (DeepSpeed's load_checkpoint calls load_state_dict, which marks; the trainer marks after
    # it too, for the paths that write through .data), then the third iteration's two steps
    assert len(seen) == 2 + 2, seen


def test_sft_warm_up_of_a_grpo_run_collects_distinct_demos(tmp_path):
    """A GRPO env starts every group from one scene, and the scripted expert then recorded each demonstration
    group_size times (with an exact expert 1024 demo chunks held 256 distinct ones). The SFT warm-up now collects
    from an env with a scene per env."""
    run = tmp_path / "grpo_sft"
    _run(run, "algo.name=grpo", "algo.group_size=4", "env.num_envs=8", "sft_iterations=1", "iterations=0",
         "algo.sft_steps=1", "algo.num_demos=16", "env.max_episode_steps=10", "env.expert_quality=1.0",
         "checkpoint_every=1", "eval_episodes=0")
    st = torch.load(latest_checkpoint(run) / "trainer_rank0.pt", weights_only=False)
    demos = st["sft_algo"]["data"]["data"]["actions"]
    rows = {tuple(r.flatten().tolist()) for r in demos}
    assert len(demos) >= 16 and len(rows) == len(demos), (len(rows), len(demos))


def build_fresh_policy(config):
    """The policy the trainer starts from (seed 0, as the runs above)."""
    from flowrl.models import Pi0Policy

    torch.manual_seed(0)
    return Pi0Policy(config)


def test_zero3_checkpoint_holds_the_full_weights(tmp_path):
    """ZeRO-3 partitions every parameter above DeepSpeed's persistence threshold (1e5 elements): the policy was
    saved from its empty local tensors, shape (0,), and the checkpoint could not be loaded or evaluated."""
    from flowrl.models import from_pretrained

    run = tmp_path / "z3"
    res = _run(run, "algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0", "iterations=1",
               "zero_stage=3", "model.overrides.expert_mlp_dim=2048")
    p = from_pretrained(str(latest_checkpoint(run) / "policy"))
    w = p.state_dict()["expert.layers.0.mlp.up_proj.weight"]
    assert tuple(w.shape) == (2048, p.config.expert_width) and w.abs().sum() > 0
    assert res["history"][0]["optimizer_steps"] == 2.0  # 8 chunks in minibatches of 4


def test_init_from_run_dirs_and_resume_schedule_checks(tmp_path):
    """model.init_from took only a checkpoint or policy directory (a run directory failed after DeepSpeed had
    started); a resume with another iteration count silently reshaped an annealed learning-rate schedule."""
    from flowrl.train import build_env, build_policy

    run = tmp_path / "r"
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=0"]
    _run(run, *common, "iterations=1", "algo.lr_schedule=linear")
    for src in (run, run / "checkpoints"):
        cfg = load_config(None, [f"run_dir={tmp_path / 'b'}", *TINY, f"model.init_from={src}"])
        assert build_policy(cfg, build_env(cfg)).config.action_horizon == 10
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "not_a_policy").mkdir()
    for src, msg in ((tmp_path / "empty_run", "has no complete checkpoint"),
                     (tmp_path / "not_a_policy", "holds no model.safetensors")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [*TINY, f"model.init_from={src}"])
    with pytest.raises(ConfigError, match="the learning-rate schedule anneals over iterations"):
        _run(run, *common, "iterations=3", "algo.lr_schedule=linear", resume=True)


# ---------------------------------------------------------------------------------------- 4. SIGKILL mid-run
def test_sigkill_leaves_a_complete_checkpoint_and_resume_finishes(tmp_path):
    from flowrl.models import from_pretrained

    run_dir = tmp_path / "run"
    args = [sys.executable, str(TRAIN), f"run_dir={run_dir}", *TINY, "algo.name=fpo", "algo.fpo_pairs=2",
            "iterations=50", "checkpoint_every=1", "eval_episodes=0"]
    log = open(tmp_path / "log.txt", "wb")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_sub_env(), stdout=log, stderr=subprocess.STDOUT)
    root = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (root / "latest").exists():  # the first checkpoint is published
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        first = (root / "latest").read_text()
        while not any(root.glob(".staging_iter_*")):  # ... and a later one is being written: kill it now
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.is_dir() and ckpt.name >= first
    it = int(ckpt.name.split("_")[1])
    from_pretrained(str(ckpt / "policy"))  # the safetensors load
    st = torch.load(ckpt / "trainer_rank0.pt", weights_only=False)
    assert st["iteration"] == it and len(st["history"]) == it + 1
    assert (ckpt / "ds" / "mp_rank_00_model_states.pt").is_file()

    end = it + 3
    done = subprocess.run([*args[:-3], f"iterations={end}", "checkpoint_every=1", "eval_episodes=0", "--resume"],
                          cwd=tmp_path, env=_sub_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt}" in done.stdout
    final = latest_checkpoint(run_dir)
    assert final is not None and final.name == f"iter_{end - 1:06d}"
    assert torch.load(final / "trainer_rank0.pt", weights_only=False)["iteration"] == end - 1
    assert not any(root.glob(".staging_iter_*"))


# ---------------------------------------------------------------------------------------- 5. bad configs
BAD_CLI = {
    "unknown algorithm": (["algo.name=ppo_magic"], "unknown algorithm 'ppo_magic'"),
    "unknown key": (["algo.learning_rate=1e-3"], "unknown config key 'algo.learning_rate'"),
    "wrong type": (["env.num_envs=many"], "env.num_envs: expected an int"),
    "grpo batch": (["algo.name=grpo", "env.num_envs=6", "algo.group_size=4"], "divisible by algo.group_size=4"),
    "missing init_from": (["model.init_from=/nonexistent/ckpt"], "model.init_from"),
    "resume without checkpoint": (["--resume"], "--resume: no complete checkpoint"),
    "critic side": (["algo.critic_side=actor"], "algo.critic_side must be auto, expert or vlm"),
    "expert speed": (["env.expert_speed=0"], "env.expert_speed must be in (0, 1]"),
    "aim noise": (["env.expert_aim_noise=-1"], "env.expert_aim_noise must be >= 0"),
    "reach radius": (["env.success_radius=0"], "env.success_radius and env.max_speed must be > 0"),
    "sft lr schedule": (["algo.sft_lr_schedule=linear"], "algo.sft_lr_schedule must be constant or cosine"),
    "rl lr schedule": (["algo.lr_schedule=step"], "algo.lr_schedule must be constant, linear or cosine"),
    "vla hidden": (["algo.vla_hidden=0"], "algo.vla_hidden must be >= 1"),
    "vla value samples": (["algo.vla_value_samples=-1"], "algo.vla_value_samples must be >= 0"),
    "vla ratio": (["algo.vla_ratio=raw"], "algo.vla_ratio must be standardized or absolute"),
    # refused after the run directory was created (when the policy is built): it is removed again
    "env/policy mismatch": (["model.overrides.action_dim=1"], "env action_dim 2 > policy action_dim 1"),
}


def test_offline_lr_schedule():
    """SFT / ARFM learning rate per iteration: constant, or cosine over the offline phase's iterations (the SFT
    warm-up's, or the run's when SFT / ARFM is the algorithm); a function of the iteration alone (resume)."""
    from flowrl.config import TrainConfig
    from flowrl.train import offline_lr

    cfg = TrainConfig()
    cfg.algo.sft_lr, cfg.sft_iterations, cfg.iterations = 2e-3, 4, 10
    assert [offline_lr(cfg, i) for i in range(4)] == [2e-3] * 4
    cfg.algo.sft_lr_schedule = "cosine"
    lrs = [offline_lr(cfg, i) for i in range(4)]
    assert lrs[0] == 2e-3 and abs(lrs[2] - 1e-3) < 1e-12 and 0 < lrs[3] < lrs[2] < lrs[1] < lrs[0]
    cfg.sft_iterations = 0  # a standalone SFT / ARFM run: over `iterations`
    assert abs(offline_lr(cfg, 5) - 1e-3) < 1e-12 and offline_lr(cfg, 0) == 2e-3


def test_rl_lr_schedule():
    """The RL actor's learning rate per iteration: constant, linear or cosine over the RL iterations, which
    start after the SFT warm-up; never negative, and a function of the iteration alone (resume)."""
    from flowrl.config import TrainConfig
    from flowrl.train import rl_lr

    cfg = TrainConfig()
    cfg.algo.lr, cfg.sft_iterations, cfg.iterations = 4e-3, 3, 8
    assert [rl_lr(cfg, i) for i in range(3, 11)] == [4e-3] * 8
    cfg.algo.lr_schedule = "linear"
    lrs = [rl_lr(cfg, i) for i in range(3, 11)]
    assert lrs[0] == 4e-3 and abs(lrs[4] - 2e-3) < 1e-12 and abs(lrs[-1] - 0.5e-3) < 1e-12
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    cfg.algo.lr_schedule = "cosine"
    lrs = [rl_lr(cfg, i) for i in range(3, 11)]
    assert lrs[0] == 4e-3 and abs(lrs[4] - 2e-3) < 1e-12 and 0 < lrs[-1] < lrs[-2]
    cfg.sft_iterations = 0
    assert rl_lr(cfg, 0) == 4e-3 and abs(rl_lr(cfg, 4) - 2e-3) < 1e-12


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_config_cli_exits_2(tmp_path, case):
    over, msg = BAD_CLI[case]
    run_dir = tmp_path / "runs" / "run"
    p = subprocess.run([sys.executable, str(TRAIN), f"run_dir={run_dir}", *TINY, *over], cwd=tmp_path,
                       env=_sub_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "configuration error" in p.stderr and msg in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    # a refused run leaves nothing behind (the CLI used to create an empty run_dir), nor the parents it made
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_config_in_process_raises(tmp_path, case):
    over, msg = BAD_CLI[case]
    with pytest.raises(ConfigError, match=None) as ei:
        _run(tmp_path / "run", *over)
    assert msg in str(ei.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("over, msg", [
    (["model.overrides.action_dim=1"], "env action_dim 2 > policy action_dim 1"),
    (["model.overrides.max_state_dim=4"], "env state_dim 8 > policy max_state_dim 4"),
    (["model.overrides.max_token_len=4"], "env instructions of 8 tokens > policy max_token_len 4"),
], ids=["action_dim", "max_state_dim", "max_token_len"])
def test_env_policy_mismatch_is_a_config_error(tmp_path, over, msg):
    with pytest.raises(ConfigError, match="env/policy dimension mismatch") as ei:
        _run(tmp_path / "run", "iterations=1", *over)
    assert msg in str(ei.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_load_config_checks_before_work():
    with pytest.raises(ConfigError, match="expected a bool"):
        load_config(None, ["plot=maybe"])
    with pytest.raises(ConfigError, match=r"algo.dual_clip must be > 1"):
        load_config(None, ["algo.dual_clip=0.5"])
    with pytest.raises(ConfigError, match="must be divisible"):
        load_config(None, ["algo.name=grpo", "env.num_envs=8", "algo.group_size=3"])
    load_config(None, ["algo.name=grpo", "env.num_envs=8", "algo.group_size=4"])


def test_grpo_groups_only_in_training_envs():
    """GRPO's rollout envs share a scene per group; its evaluation envs do not (every algorithm is
    evaluated on the same episodes), and the env knobs of the config reach the env."""
    from flowrl.train import build_env

    cfg = load_config(None, ["algo.name=grpo", "env.num_envs=8", "algo.group_size=4", "env.success_radius=0.1",
                             "env.max_speed=0.2", "env.expert_aim_noise=0.3"])
    train_env, eval_env = build_env(cfg), build_env(cfg, for_eval=True)
    assert train_env.group_size == 4 and eval_env.group_size == 1
    assert eval_env.success_radius == 0.1 and eval_env.max_speed == 0.2 and eval_env.expert_aim_noise == 0.3
    train_env.reset(seed=0), eval_env.reset(seed=0)
    assert torch.equal(train_env.targets[0], train_env.targets[3]) and not torch.equal(train_env.targets[0],
                                                                                         train_env.targets[4])
    assert not torch.equal(eval_env.targets[0], eval_env.targets[1])


def test_ranks_hold_consecutive_global_envs():
    """build_env(rank=r, world=W) on the built-in task: rank r's envs are the global envs [r·B, (r+1)·B) of one
    env of W·B (training, with GRPO groups, and evaluation), so ranks sharing the run's seed run distinct scenes
    (they used to differ only by a per-rank reset seed, and every rank evaluated the same scenes)."""
    from flowrl.train import build_env

    for extra, for_eval in (([], False), (["algo.name=grpo", "algo.group_size=2"], False), ([], True)):
        whole = build_env(load_config(None, ["env.num_envs=8", *extra]), for_eval=for_eval)
        whole.reset(seed=5)
        cfg = load_config(None, ["env.num_envs=4", *extra])
        parts = [build_env(cfg, rank=r, for_eval=for_eval, world=2) for r in (0, 1)]
        for e in parts:
            e.reset(seed=5)
        assert torch.equal(torch.cat([e.targets for e in parts]), whole.targets), (extra, for_eval)
        assert not torch.equal(parts[0].targets, parts[1].targets)


def test_grpo_reset_seeds_are_apart_from_the_evaluations():
    """GRPO's iteration k resets with 1 000 000 007 + 7919·env_seed + k: with base 0, seed 0's iteration 77 reset
    the training envs with the evaluation's seed (seed + 77), i.e. trained on the evaluation's scenes. The
    trainer gives every rank the run's seed as env_seed (ranks hold their own global envs)."""
    from flowrl.train import build_algorithm

    cfg = load_config(None, ["algo.name=grpo", "env.num_envs=4", "algo.group_size=2"])
    for seed in range(3):
        base = build_algorithm(cfg, seed=seed).iteration_seed
        assert build_algorithm(cfg, seed=seed + 1000, env_seed=seed).iteration_seed == base
        train = {base + k for k in range(1, 100_001)} | {base + k + 10**6 for k in range(1, 100_001)}
        evals = {seed + 77 + r for r in range(10_000)} | {1000 * seed, 1000 * seed + 1}
        assert not train & evals, seed


def test_train_closes_its_envs_when_it_returns_or_raises(tmp_path, monkeypatch):
    """train() closes the envs it built (LIBERO's worker processes used to outlive it until garbage collection,
    longer when an exception's traceback held them): the rollout env, and each evaluation's env after it."""
    import flowrl.eval
    from flowrl.envs import ReachEnv

    closed: list[int] = []
    monkeypatch.setattr(ReachEnv, "close", lambda self: closed.append(id(self)))
    _run(tmp_path / "a", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "checkpoint_every=1",
         "eval_episodes=2")
    assert len(closed) == 3 and len(set(closed)) == 3, closed  # the rollout env, two evaluation envs
    closed.clear()

    def fail(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(flowrl.eval, "evaluate", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _run(tmp_path / "b", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "checkpoint_every=1",
             "eval_episodes=2")
    assert len(closed) == 2, closed  # the evaluation's env, then the rollout env


def test_rl_after_an_sft_warm_up_starts_from_the_same_reset_evaluated_or_not(tmp_path, monkeypatch):
    """After the SFT warm-up the RL phase resets the envs with seed·1000 + 1; the reset sat inside the
    evaluation's branch, so with eval_episodes=0 RL went on from SFT's own reset (another seed, rank-dependent)."""
    from flowrl.envs import ReachEnv

    seeds: list[int | None] = []
    real = ReachEnv.reset
    monkeypatch.setattr(ReachEnv, "reset", lambda self, seed=None: (seeds.append(seed), real(self, seed))[1])
    _run(tmp_path / "a", "algo.name=fpo", "algo.fpo_pairs=2", "seed=2", "sft_iterations=1", "iterations=1",
         "eval_episodes=0", "checkpoint_every=0", "algo.num_demos=4", "algo.sft_steps=1", "algo.sft_batch=4",
         "env.max_episode_steps=10")
    assert seeds == [2000, 10_003, 3, 2001], seeds  # start; SFT's demos and its reset; RL


def test_an_algorithm_that_yields_more_minibatches_than_it_said_is_an_error(tmp_path, monkeypatch):
    """The trainer plans its gradient-accumulation windows (and, over ranks, the agreed count) from
    num_minibatches(); taking at most that many must not hide a minibatches() that yields more."""
    from flowrl.algos.fpo import FPO

    orig = FPO.minibatches

    def twice(self, batch):
        yield from orig(self, batch)
        yield from orig(self, batch)

    monkeypatch.setattr(FPO, "minibatches", twice)
    with pytest.raises(RuntimeError, match="minibatches\\(\\) yielded more than 2, num_minibatches\\(\\) said 2"):
        _run(tmp_path / "a", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "checkpoint_every=0",
             "eval_episodes=0")


# ---------------------------------------------------------------------------------------- 6. two ranks == one rank
WORKER = REPO / "tests" / "ds_equiv_worker.py"


def _compare(one: Path, two: Path, stage: int) -> None:
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (stage, a["loss"], b["loss"])
    moved = 0.0
    for k in a["after"]:
        assert torch.equal(a["init"][k], b["init"][k]), f"stage {stage}: different initial {k}"
        da, db = a["after"][k] - a["init"][k], b["after"][k] - b["init"][k]
        torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"ZeRO-{stage} {k}: {m}")
        moved = max(moved, float(da.abs().max()))
    assert moved > 1e-3, f"stage {stage}: the update did not move the parameters"


def test_two_ranks_equal_one_rank_zero_1_2_3(tmp_path):
    """One SGD step (gradient clipping on) of the tiny policy on a fixed global batch of 8: world size 1 vs
    ``deepspeed --num_gpus 2`` (4 per rank), for ZeRO 1, 2 and 3.

    ZeRO-3 runs the policy as the trainer does, with partitioned parameters gathered by DeepSpeed's module hooks
    (the policy uses its weights only inside module forwards).
    """
    env1 = _sub_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    p1 = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "ws1"), "1", "2", "3"], cwd=REPO, env=env1,
                        capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    launcher = Path(sys.executable).with_name("deepspeed")
    p2 = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(WORKER),
                         str(tmp_path / "ws2"), "1", "2", "3"], cwd=REPO, env=_sub_env(), capture_output=True,
                        text=True, timeout=400)
    assert p2.returncode == 0, (p2.stdout + p2.stderr)[-3000:]
    for stage in (1, 2, 3):
        _compare(tmp_path / "ws1" / f"stage{stage}_ws1.pt", tmp_path / "ws2" / f"stage{stage}_ws2.pt", stage)



# ---------------------------------------------------------------------------------------- logging backends
def test_logging_backend_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="wandb must be off, offline or online"):
        load_config(None, ["wandb=yes"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb=offline needs the wandb package: pip install -e \.\[wandb\]"):
        load_config(None, ["wandb=offline", "tensorboard=false"])
    with pytest.raises(ConfigError, match="tensorboard=true needs the tensorboard package"):
        load_config(None, ["tensorboard=true"])
    load_config(None, ["tensorboard=false"])  # neither asked for: no error


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: a 7-byte ``:W&B`` header, then LevelDB-log framing (32 KiB
    blocks; each chunk a CRC, length, type FULL/FIRST/MIDDLE/LAST) around ``wandb_internal_pb2.Record``s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, out, buf, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4) and buf:
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _wandb_logged(run_file: Path) -> tuple[dict, dict[int, dict[str, float]], dict[str, float]]:
    """(run record, history by step, summary updates) of one offline run file."""
    import json

    run, history, summary = None, {}, {}
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
            history[int(row["_step"])] = row
        elif kind == "summary":
            summary.update({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.summary.update})
    return run, history, summary


def _wandb_closed(run: Path, timeout: float = 60.0) -> str:
    """Wait until wandb-core has closed ``run``'s stream, and return its internal log.

    ``Run.finish()`` waits for the exit record, but tells the service that the run is done without waiting
    (``inform_finish``), and the stream flushes its transaction log only when it closes, a little later:
    read right after ``finish()``, about one run file in a hundred is still empty (measured with wandb
    0.31: 1 of 120 runs; 0 of 400 after this wait; CI once failed on it). Read a file only after
    ``stream: all finished``; a resumed run starts only after its predecessor's stream is gone."""
    import time

    log = run / "logs" / "debug-internal.log"
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        if "stream: all finished" in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"wandb-core did not close the stream of {run} within {timeout} s:\n{text[-3000:]}")
        time.sleep(0.1)


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    """wandb=offline logs every iteration's metrics under run_dir/wandb; --resume continues the same W&B run."""
    pytest.importorskip("wandb", reason="wandb is optional (pip install -e .[wandb])")
    import math

    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    common = ["algo.name=fpo", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=4", "wandb=offline"]
    first = _run(run_dir, *common, "iterations=2")
    run_id = (run_dir / "wandb_id").read_text().strip()
    (run1,) = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    _wandb_closed(run1)
    run, history, summary = _wandb_logged(run1 / f"run-{run_id}.wandb")
    assert run.run_id == run_id and run.project == "flowrl" and not run.resumed
    assert sorted(history) == [0, 1]
    for step, metrics in enumerate(first["history"]):
        logged = history[step]
        for k, v in metrics.items():
            if math.isfinite(v):
                assert logged[k] == pytest.approx(v), (step, k)
            else:
                assert k not in logged, (step, k)  # non-finite values are left out, as for TensorBoard
    assert summary["eval_before/success_rate"] == pytest.approx(first["eval_before"]["success_rate"])
    assert summary["eval_after/success_rate"] == pytest.approx(first["eval_after"]["success_rate"])

    second = _run(run_dir, *common, "iterations=3", resume=True)
    assert (run_dir / "wandb_id").read_text().strip() == run_id  # the same W&B run, resumed
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2
    internal = _wandb_closed(runs[-1])
    _, history, _ = _wandb_logged(runs[-1] / f"run-{run_id}.wandb")
    kinds = [r.WhichOneof("record_type") for r in _wandb_records(runs[-1] / f"run-{run_id}.wandb")]
    assert sorted(history) == [2], (kinds, internal[-3000:])
    assert history[2]["policy_loss"] == pytest.approx(second["history"][-1]["policy_loss"])


def test_progress_bar(tmp_path, capsys):
    """progress=true draws rank 0's bar on stderr (iterations done / total, the algorithm, success, rollout
    throughput), the per-iteration log lines print above it; progress=false draws nothing."""
    _run(tmp_path / "a", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=2", "checkpoint_every=0",
         "eval_episodes=0", "progress=true")
    out, err = capsys.readouterr()
    assert "flowrl: 100%" in err and "2/2" in err and "algo=fpo" in err and "rollout/s=" in err, err[-2000:]
    assert "[flowrl] it 2/2 [fpo]" in out + err
    _run(tmp_path / "b", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "checkpoint_every=0",
         "eval_episodes=0", "progress=false")
    out, err = capsys.readouterr()
    assert "flowrl:" not in err and "[flowrl] it 1/1 [fpo]" in out
    with pytest.raises(ConfigError, match="progress must be auto, true or false"):
        load_config(None, ["progress=sometimes"])


@pytest.mark.parametrize("algo", ["fpo", "vla_fpo"])
def test_bf16_training(tmp_path, algo):
    """bf16=true (the default on a GPU; DeepSpeed's bf16 mode, here on CPU): training, checkpoints, --resume and
    evaluation run; DeepSpeed casts the module it trains to bf16, VLA-FPO's frozen π0 gets bf16 Gemma weights;
    a bf16 checkpoint initializes a float32 run as float32."""
    run_dir = tmp_path / "run"
    common = [f"algo.name={algo}", "algo.fpo_pairs=2", "checkpoint_every=1", "eval_episodes=4", "bf16=true"]
    res = _run(run_dir, *common, "iterations=2")
    for h in res["history"]:
        assert all(torch.isfinite(torch.tensor(h[k])) for k in ("policy_loss", "cfm_loss")), h
    policy = res["policy"]
    assert policy.compute_dtype == torch.bfloat16
    if algo == "fpo":
        assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    else:
        assert policy.action_in_proj.weight.dtype == torch.float32  # set_precision: Gemma only
    res = _run(run_dir, *common, "iterations=3", resume=True)
    assert [h["iteration"] for h in res["history"]] == [0.0, 1.0, 2.0]
    if algo == "fpo":
        from flowrl.train import build_env, build_policy

        cfg = load_config(None, [f"run_dir={tmp_path / 'b'}", *TINY, "bf16=false",
                                 f"model.init_from={latest_checkpoint(run_dir)}"])
        p32 = build_policy(cfg, build_env(cfg))
        assert {p.dtype for p in p32.parameters()} == {torch.float32}


@pytest.mark.parametrize("algo", ["fpo", "vla_fpo"])
def test_two_rank_training_loop(tmp_path, algo):
    """``deepspeed --num_gpus 2 flowrl/train.py`` on CPU (gloo): the whole loop runs on two ranks, rank 0 writes
    the metrics (means over the ranks; peak memory is the busiest rank's) and a checkpoint; the evaluation is
    split over the ranks (7 episodes: rank 0's 4, rank 1's first 3) and every rank holds the whole result.
    VLA-FPO: the ranks' target Q-heads are one network (each rank copied its own random critic before the engine
    broadcast rank 0's, so the ranks' TD targets came from different networks)."""
    run_dir = tmp_path / "run"
    launcher = Path(sys.executable).with_name("deepspeed")
    port = _free_port()
    p = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(TRAIN),
                        f"run_dir={run_dir}", *TINY, f"algo.name={algo}", "algo.fpo_pairs=2", "iterations=1",
                        "checkpoint_every=1", "eval_episodes=7"],
                       cwd=REPO, env=_sub_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    # DeepSpeed's CPU shared-memory all-reduce buffers (69 MB of RAM per rank) do not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    (line,) = (run_dir / "metrics.jsonl").read_text().splitlines()
    m = json.loads(line)
    assert math.isfinite(m["policy_loss"]) and 0.0 <= m["success_rate"] <= 1.0, m
    assert 0.05 < m["peak_rss_gb"] < 64, m
    ck = latest_checkpoint(run_dir)
    assert ck is not None
    ev = [torch.load(ck / f"trainer_rank{r}.pt", weights_only=False)["evals"]["eval_before"] for r in (0, 1)]
    assert ev[0] == ev[1] and ev[0]["episodes"] == 7.0, ev  # the split itself: tests/test_eval.py
    assert "success before" in p.stdout and "-> after" in p.stdout
    if algo == "vla_fpo":
        tgt = [torch.load(ck / f"trainer_rank{r}.pt", weights_only=False)["algo"]["target"] for r in (0, 1)]
        assert tgt[0].keys() == tgt[1].keys() and all(torch.equal(tgt[0][k], tgt[1][k]) for k in tgt[0])


def _all_reduce_worker(rank: int, init: str, out: str) -> None:
    from flowrl.train import _all_reduce

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # rank 1's rollout ended no episode: no success rate, no return (NaN)
        stats = ({"success_rate": 1.0, "return": 2.0, "episodes": 3.0, "loss": 1.0} if rank == 0 else
                 {"success_rate": math.nan, "return": math.nan, "episodes": 0.0, "loss": 3.0})
        both_nan = {"x": math.nan}
        res = [_all_reduce(stats, 2), _all_reduce(both_nan, 2), _all_reduce({"peak": 1.0 + rank}, 2, op="max")]
        try:  # other keys on the ranks: an error, not values paired with another rank's keys
            _all_reduce({"b": 1.0} if rank == 0 else {"c": 1.0}, 2)
            res.append("no error")
        except RuntimeError as e:
            res.append(str(e))
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


def test_metrics_over_ranks_leave_out_non_finite_values_and_weight_episodes(tmp_path):
    """A rank whose rollout ended no episode (success rate NaN) counted as 0: ranks of 3 successes and of no
    episode logged a success rate of 0.5. Now the per-episode means are weighted by each rank's episodes, and
    non-finite values are left out of every mean (NaN when no rank has one)."""
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    for r in (0, 1):
        agg, nan, peak, keys = json.loads((tmp_path / f"{r}.json").read_text())
        assert "keys" in keys and "differ from another rank's" in keys, keys
        assert agg == {"success_rate": 1.0, "return": 2.0, "episodes": 1.5, "loss": 2.0}, agg
        assert math.isnan(nan["x"]) and peak == {"peak": 2.0}


def test_two_rank_grpo_with_episodes_of_different_lengths_and_a_resume_one_rank_refuses(tmp_path):
    """GRPO on two ranks with episodes of several chunks: each rank's batch holds its own envs' episodes (of
    different lengths); every rank must take the same number of optimizer steps (each reduces gradients over the
    ranks: unequal counts pair mismatched collectives), and none leaves minibatches out. A resume whose env state
    one rank cannot restore stops every rank with the ConfigError (only that rank raised, the other waited)."""
    run_dir = tmp_path / "run"
    launcher = Path(sys.executable).with_name("deepspeed")
    common = [f"run_dir={run_dir}", *TINY, "algo.name=grpo", "algo.group_size=2", "env.chunk_steps=5",
              "env.max_episode_steps=20", "env.success_radius=0.4", "algo.minibatch_size=2", "checkpoint_every=1",
              "eval_episodes=0"]

    def launch(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN),
                               *common, *extra], cwd=REPO, env=_sub_env(), capture_output=True, text=True,
                              timeout=600)

    p = launch("iterations=2")
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    hist = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # GRPO splits every rank's batch into the same number of minibatches: none is left out (before: 2 and 3 on
    # average); the samples differ between the ranks (a mean that is not a whole multiple of the envs' chunks)
    assert len(hist) == 2 and all(math.isfinite(h["policy_loss"]) and h["minibatches_skipped"] == 0 for h in hist)
    print("samples (mean over the ranks):", [h["samples"] for h in hist])
    ck = latest_checkpoint(run_dir)
    st = torch.load(ck / "trainer_rank1.pt", weights_only=False)
    st["env"]["settings"]["env_offset"] = 0  # as a multi-rank run saved before ranks held global envs
    torch.save(st, ck / "trainer_rank1.pt")
    p = launch("iterations=3", "--resume")
    assert p.returncode != 0
    err = p.stderr
    assert "env_offset: saved 0, this env 4" in err and "saved before each rank's envs became the global" in err, \
        err[-3000:]
    assert "rank(s) [1] could not restore their envs' state" in err, err[-3000:]  # rank 0 stopped too


def test_init_from_takes_the_runs_model_settings(tmp_path):
    """``model.init_from``: the run's num_steps, Flow-Noise std bounds and model.overrides replace the
    checkpoint's (they were silently the checkpoint's); a value-head count its weights do not have is a
    ConfigError naming the setting, before any work."""
    from flowrl.train import build_env, build_policy

    base = [f"run_dir={tmp_path / 'a'}", *TINY]
    cfg = load_config(None, base)
    env = build_env(cfg)
    build_policy(cfg, env).save_pretrained(tmp_path / "ck")
    cfg = load_config(None, [*base, f"model.init_from={tmp_path / 'ck'}", "algo.num_steps=3", "algo.noise_min=0.05",
                             "algo.noise_max=0.3", "model.overrides.noise_level=0.7"])
    pc = build_policy(cfg, env).config
    assert (pc.num_steps, pc.noise_std_min, pc.noise_std_max, pc.noise_level) == (3, 0.05, 0.3, 0.7)
    cfg = load_config(None, [*base, f"model.init_from={tmp_path / 'ck'}", "model.num_value_heads=3"])
    with pytest.raises(ConfigError, match=r"model\.num_value_heads"):
        build_policy(cfg, env)
    env.close()


def test_wandb_online_without_a_key_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install -e .[wandb])")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ANONYMOUS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no stored key (HOME kept: DeepSpeed's op cache)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(ConfigError, match=r"wandb=online: W&B did not start .*wandb=offline"):
        _run(tmp_path / "run", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "eval_episodes=0",
             "wandb=online")


def test_trainer_fuzz_findings(tmp_path, monkeypatch):
    """Found by a pass over option combinations: Flow-SDE with noise_level 0 trained nothing (every ratio 1, only
    the critic moved); π0.5 with a max_state_dim below the env's state failed mid-run on a state it does not take,
    and took no state without a word; a non-finite loss stopped one rank only (the others would wait)."""
    for algo in (["algo.name=flow_sde_ppo"], ["algo.name=grpo", "algo.grpo_likelihood=flow_sde"]):
        with pytest.raises(ConfigError, match=r"algo\.noise_level must be > 0 for Flow-SDE"):
            load_config(None, [*algo, "algo.noise_level=0"])
    with pytest.warns(UserWarning, match="π0.5 takes no proprioceptive state input here"):
        res = _run(tmp_path / "pi05", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "eval_episodes=2",
                   "model.variant=pi05", "model.overrides.max_state_dim=2")
    assert math.isfinite(res["history"][0]["policy_loss"])
    from flowrl.algos.fpo import FPO

    orig = FPO.loss

    def nan_loss(self, policy, mb):
        loss, st = orig(self, policy, mb)
        return loss * math.nan, st

    monkeypatch.setattr(FPO, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match="iteration 0: non-finite loss nan"):
        _run(tmp_path / "nan", "algo.name=fpo", "algo.fpo_pairs=2", "iterations=1", "eval_episodes=0")
