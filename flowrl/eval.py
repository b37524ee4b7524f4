"""Success rate of a policy over N episodes, with a Wilson 95% confidence interval.

    python -m flowrl.eval --checkpoint runs/default/checkpoints/iter_000020 --episodes 200
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from flowrl.algos.base import to_policy_obs
from flowrl.envs.base import VecEnv

__all__ = ["evaluate", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def evaluate(policy: Any, env: VecEnv, episodes: int, seed: int = 12345, num_steps: int = 10,
             noise_fn: Any = None) -> dict[str, float]:
    """Success rate over ``episodes`` episodes with ODE sampling (fresh noise per chunk).

    Runs rounds of ``env.num_envs`` episodes: each round resets every env and counts only its
    first episode, so short (successful) episodes are not over-counted. ``noise_fn(policy, obs,
    generator) -> (B, H, D)`` supplies the initial latents (VLA-FPO's actor); default ``N(0, I)``.
    Returns the success rate, its Wilson 95% interval and the mean return.
    """
    if episodes < 1:
        raise ValueError(f"evaluate: episodes must be >= 1, got {episodes}")
    dev = next(policy.parameters()).device
    cfg = policy.config
    gen = torch.Generator().manual_seed(seed)
    succ: list[bool] = []
    rets: list[float] = []
    max_chunks = math.ceil(env.max_episode_steps / env.chunk_steps)
    rnd = 0
    while len(succ) < episodes:
        obs = env.reset(seed=seed + rnd)
        rnd += 1
        alive = torch.ones(env.num_envs, dtype=torch.bool)
        r_succ = torch.zeros(env.num_envs, dtype=torch.bool)
        r_ret = torch.zeros(env.num_envs)
        for _ in range(max_chunks):
            pobs = to_policy_obs(obs.to(dev), policy)
            if noise_fn is not None:
                x0 = noise_fn(policy, obs, gen)
            else:
                x0 = torch.randn(env.num_envs, cfg.action_horizon, cfg.action_dim, generator=gen).to(dev)
            act = policy.sample_actions(pobs, mode="ode", num_steps=num_steps, noise=x0, return_chain=False).actions
            step = env.step(act.float())
            d = step.done.cpu()
            r_succ |= alive & step.success.cpu()
            r_ret += torch.where(alive, step.reward.cpu(), torch.zeros(env.num_envs))
            alive &= ~d
            obs = step.obs
            if not alive.any():
                break
        take = min(env.num_envs, episodes - len(succ))
        succ += r_succ[:take].tolist()
        rets += r_ret[:take].tolist()
    k = sum(succ)
    lo, hi = wilson_interval(k, len(succ))
    return {"success_rate": k / len(succ), "ci_low": lo, "ci_high": hi, "episodes": float(len(succ)),
            "return": sum(rets) / len(rets)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    import json
    from pathlib import Path

    from flowrl.config import TrainConfig, apply_overrides
    from flowrl.models import from_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a trainer checkpoint directory (iter_N/) or a policy directory (safetensors + config)")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--num-steps", type=int, default=None, help="denoising steps K (default: the run's)")
    args = p.parse_args(argv)
    ck = Path(args.checkpoint)
    if not ck.is_dir():
        raise SystemExit(f"flowrl.eval: checkpoint directory {ck} does not exist")
    run_cfg = next((d / "train_config.json" for d in (ck, ck.parent) if (d / "train_config.json").is_file()), None)
    policy = from_pretrained(str(ck / "policy" if (ck / "policy").is_dir() else ck)).eval()
    cfg = TrainConfig()
    if run_cfg is not None:  # the env the policy was trained on
        saved = json.loads(run_cfg.read_text())
        apply_overrides(cfg, {"env": saved["env"], "algo": {"num_steps": saved["algo"]["num_steps"]}})
    cfg.env.num_envs = args.num_envs
    from flowrl.train import build_env

    env = build_env(cfg)
    try:
        r = evaluate(policy, env, args.episodes, args.seed, args.num_steps or cfg.algo.num_steps)
    finally:
        env.close()
    print(f"success {r['success_rate']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}) over "
          f"{int(r['episodes'])} episodes; mean return {r['return']:.3f}")
    return r


if __name__ == "__main__":
    main()
