"""One rank of a two-rank ``flowrl.eval.evaluate`` on the built-in task, for tests/test_eval.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_eval_worker.py OUT MODE

Builds the trainer's evaluation env of this rank (``build_env(cfg, rank, for_eval=True, world=2)``, 3
envs) and the tiny policy from a fixed seed, evaluates 4, 5 and 8 episodes from seed 11 over a gloo group
and writes ``OUT/rank{r}.json``: the results and the rank's scene (its envs' targets after the reset).
MODE ``zero``: initial noise 0 (then the episodes equal one rank's evaluation of 6 envs); ``gen``: the
default N(0, I) draws; ``mismatch``: rank 1 builds 4 envs (evaluate must refuse on every rank); ``lockstep``:
rank 0's episodes end at once, rank 1's run to the limit (both ranks must make the same policy calls).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERRIDES = ["model.overrides.action_horizon=10", "algo.num_steps=2", "env.num_envs=3"]


def zero_noise(policy, obs, gen):
    c = policy.config
    return torch.zeros(obs.state.shape[0], c.action_horizon, c.action_dim)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from flowrl.config import load_config
    from flowrl.eval import evaluate
    from flowrl.train import build_env, build_policy

    over = list(OVERRIDES)
    if mode == "mismatch" and rank == 1:
        over.append("env.num_envs=4")
    if mode == "lockstep":  # rank 0's episodes all end at their first chunk, rank 1's run to the time limit
        over += ["env.chunk_steps=5", "env.max_episode_steps=20", f"env.success_radius={3.0 if rank == 0 else 1e-6}"]
    cfg = load_config(None, over)
    env = build_env(cfg, rank, for_eval=True, world=world)
    torch.manual_seed(0)
    policy = build_policy(cfg, env).eval()
    r: dict = {}
    if mode == "lockstep":
        calls = []
        forward = policy.sample_actions
        policy.sample_actions = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        r["result"] = evaluate(policy, env, 6, 11, 2, rank=rank, world=world)
        r["policy_calls"] = len(calls)
        env.reset(seed=11)
        r["targets"] = env.targets.tolist()
        (out / f"rank{rank}.json").write_text(json.dumps(r))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return
    try:
        for n in (4, 5, 8):
            r[str(n)] = evaluate(policy, env, n, 11, 2, zero_noise if mode == "zero" else None, rank=rank,
                                 world=world)
    except ValueError as e:
        r["error"] = str(e)
    env.reset(seed=11)
    r["targets"] = env.targets.tolist()
    (out / f"rank{rank}.json").write_text(json.dumps(r))
    torch.distributed.barrier()  # neither rank leaves while the other may still read from it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
