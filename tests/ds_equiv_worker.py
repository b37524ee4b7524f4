"""One DeepSpeed update of the tiny policy on a fixed synthetic batch, for tests/test_train.py.

    python tests/ds_equiv_worker.py OUT_DIR 1 2 3                    # world size 1 (env vars set by the test)
    deepspeed --num_gpus 2 tests/ds_equiv_worker.py OUT_DIR 1 2 3    # two ranks, the global batch split

For each ZeRO stage given: build the tiny policy from a fixed seed, take the global batch (the
reach env's observations at a fixed seed, random action chunks, one (ε, τ) pair per chunk, all
from fixed generators), give each rank its contiguous slice, do one engine step of SGD on the
mean per-sample CFM loss of the local slice (DeepSpeed averages gradients over ranks, so this
is the mean over the global batch), and write the parameters after the step (gathered, rank 0)
to ``OUT_DIR/stage{z}_ws{world}.pt`` together with the initial ones and the global loss.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH = 8
LR = 0.5
CLIP = 1.0


def gathered(module: torch.nn.Module, stage: int):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == 3 and GATHER)


GATHER = os.environ.get("EQUIV_GATHER", "0") == "1"  # 1: wrap loss/backward in GatheredParameters


def one_step(stage: int, out_dir: Path) -> None:
    import deepspeed

    from flowrl.algos.base import masks_for, to_policy_obs
    from flowrl.algos.fpo import draw_pairs
    from flowrl.config import load_config
    from flowrl.train import build_env, build_policy

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = load_config(None, [f"env.num_envs={GLOBAL_BATCH}", "model.overrides.action_horizon=10", "algo.num_steps=2"])
    env = build_env(cfg)
    torch.manual_seed(1234)
    policy = build_policy(cfg, env)
    init = {n: p.detach().clone() for n, p in policy.named_parameters()}
    obs = env.reset(seed=5)
    gen = torch.Generator().manual_seed(99)
    pc = policy.config
    actions = torch.rand(GLOBAL_BATCH, pc.action_horizon, pc.action_dim, generator=gen) * 2 - 1
    noise, tau = draw_pairs(GLOBAL_BATCH, 1, pc.action_horizon, pc.action_dim, gen, torch.device("cpu"))
    dim_mask, step_mask = masks_for(env, policy, torch.device("cpu"))
    if GLOBAL_BATCH % world:
        raise SystemExit(f"global batch {GLOBAL_BATCH} not divisible by world size {world}")
    local = GLOBAL_BATCH // world
    idx = torch.arange(rank * local, (rank + 1) * local)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    ds_cfg = {"train_micro_batch_size_per_gpu": local, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": False}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=opt, config=ds_cfg)
    module = engine.module
    pobs = to_policy_obs(obs.index(idx), module)
    with gathered(module, stage):
        per = module.cfm_losses(pobs, actions[idx], noise[idx], tau[idx], dim_mask=dim_mask, step_mask=step_mask)
        loss = per[:, 0].float().mean()
        engine.backward(loss)
    engine.step()
    global_loss = loss.detach().clone()
    torch.distributed.all_reduce(global_loss)
    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        after = {n: p.detach().clone() for n, p in params}
    if rank == 0:
        torch.save({"init": init, "after": after, "loss": float(global_loss) / world},
                   out_dir / f"stage{stage}_ws{world}.pt")
    torch.distributed.barrier()


def main() -> None:
    import deepspeed

    args = [a for a in sys.argv[1:] if not a.startswith("--")]  # the launcher appends --local_rank=N
    out_dir = Path(args[0])
    stages = [int(s) for s in args[1:]] or [1, 2, 3]
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29533")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    from flowrl.train import release_shm_names

    release_shm_names()  # DeepSpeed's CPU shared-memory buffer: its /dev/shm name would outlive the process
    for stage in stages:
        one_step(stage, out_dir)


if __name__ == "__main__":
    main()
