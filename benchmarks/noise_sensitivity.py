"""How much a reaching-task checkpoint's success depends on the scale of its initial noise.

The success rate of ODE sampling from ``s · N(0, I)`` initial noise for several scales ``s``
(``s = 0``: the flow's deterministic "mode" action). A policy whose success does not move with
``s`` maps every noise to nearly the same action chunk: steering its noise (VLA-FPO's latent actor)
has nothing to work with, and only updates of the policy itself can improve it.

    python benchmarks/noise_sensitivity.py runs/rl_table/seed0/sft/checkpoints/iter_000014 [--scales 0 0.5 1]

``--best-of M`` adds the success of the best of M draws: an episode counts if any of M rollouts of
the same scene (the env reset with the same seed), each with fresh ``N(0, I)`` noise, succeeds: how
far a state-conditioned choice of noise alone could take this π0 (a ceiling for VLA-FPO's actor).

Prints one markdown row per checkpoint; ``--out`` appends the table (with commit, date, device) to a file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT))  # flowrl from a source checkout


def _load(checkpoint: Path, num_envs: int) -> tuple[Any, Any, Any]:
    """A reaching-task checkpoint's run config, its π0 (eval mode) and an eval env of ``num_envs``."""
    from flowrl.eval import run_config
    from flowrl.models import from_pretrained
    from flowrl.train import build_env

    cfg, saved = run_config(checkpoint)
    if saved is None:
        raise FileNotFoundError(f"no train_config.json in {checkpoint} or one level up")
    if cfg.env.name != "reach":
        raise ValueError(f"{checkpoint}: only reaching-task runs are supported, got env {cfg.env.name!r}")
    cfg.env.num_envs = num_envs
    policy = from_pretrained(str(checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint)).eval()
    return cfg, policy, build_env(cfg, for_eval=True)


def success_by_scale(checkpoint: Path, scales: list[float], episodes: int, num_envs: int,
                     seed: int) -> tuple[list[float], int]:
    """Success rate ``[len(scales)]`` of ``checkpoint`` (a trainer checkpoint ``iter_N/``) with initial
    noise ``s · N(0, I)``, on the env of its run's ``train_config.json``; and the run's ``num_demos``."""
    from flowrl.eval import evaluate

    cfg, policy, env = _load(checkpoint, num_envs)
    out = []
    try:
        for s in scales:
            def noise(p: Any, obs: Any, gen: torch.Generator, s: float = s) -> torch.Tensor:
                return s * torch.randn(obs.state.shape[0], p.config.action_horizon, p.config.action_dim, generator=gen)

            out.append(evaluate(policy, env, episodes, seed, cfg.algo.num_steps, noise)["success_rate"])
    finally:
        env.close()
    return out, cfg.algo.num_demos


@torch.no_grad()
def best_of_draws(policy: Any, env: Any, episodes: int, seed: int, num_steps: int, draws: int) -> float:
    """Share of ``episodes`` episodes in which at least one of ``draws`` rollouts of the same scene
    (``env.reset(seed=...)`` again), each from fresh ``N(0, I)`` noise, succeeds. Rounds and random
    draws follow :func:`flowrl.eval.evaluate`, so ``draws = 1`` is its success rate."""
    from flowrl.eval import run_episodes

    if draws < 1:
        raise ValueError(f"best_of_draws: draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    got: list[bool] = []
    rnd = 0
    while len(got) < episodes:
        hit = torch.zeros(env.num_envs, dtype=torch.bool)
        for _ in range(draws):
            hit |= run_episodes(policy, env, seed + rnd, gen, num_steps)[0]
        rnd += 1
        got += hit[: min(env.num_envs, episodes - len(got))].tolist()
    return sum(got) / len(got)


def best_of(checkpoint: Path, draws: int, episodes: int, num_envs: int, seed: int) -> float:
    """:func:`best_of_draws` for a trainer checkpoint on the env of its run."""
    cfg, policy, env = _load(checkpoint, num_envs)
    try:
        return best_of_draws(policy, env, episodes, seed, cfg.algo.num_steps, draws)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="trainer checkpoint directories (iter_N/)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--episodes", type=int, default=512)
    p.add_argument("--num-envs", type=int, default=128)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--best-of", type=int, default=0, metavar="M",
                   help="add the best of M N(0, I) draws per scene (0: off)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.scales):
        raise SystemExit("noise_sensitivity: --scales must be >= 0")
    if args.best_of < 0:
        raise SystemExit("noise_sensitivity: --best-of must be >= 0")
    extra = [f"best of {args.best_of} N(0, I) draws"] if args.best_of else []
    cols = [f"success at {s:g}·N(0, I)" for s in args.scales] + extra
    lines = ["| checkpoint | demos | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for c in args.checkpoints:
        ck = Path(c)
        if not ck.is_dir():
            raise SystemExit(f"noise_sensitivity: checkpoint directory {ck} does not exist")
        r, demos = success_by_scale(ck, args.scales, args.episodes, args.num_envs, args.seed)
        if args.best_of:
            r.append(best_of(ck, args.best_of, args.episodes, args.num_envs, args.seed))
        lines.append(f"| {c} | {demos} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        from bench_ops import _commit, _device_name  # type: ignore[import-not-found]

        head = (f"\n### Success vs initial-noise scale ({time.strftime('%Y-%m-%d')}, commit {_commit()}, "
                f"{_device_name('cpu')})\n\n`python benchmarks/noise_sensitivity.py "
                f"{' '.join(sys.argv[1:] if argv is None else argv)}`; {args.episodes} episodes per cell\n\n")
        with open(args.out, "a") as f:
            f.write(head + table + "\n")
    return table


if __name__ == "__main__":
    main()
