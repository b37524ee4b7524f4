"""How much a reaching-task checkpoint's success depends on the scale of its initial noise.

The success rate of ODE sampling from ``s · N(0, I)`` initial noise for several scales ``s``
(``s = 0``: the flow's deterministic "mode" action). A policy whose success does not move with
``s`` maps every noise to nearly the same action chunk: steering its noise (VLA-FPO's latent actor)
has nothing to work with, and only updates of the policy itself can improve it.

    python benchmarks/noise_sensitivity.py runs/rl_table/seed0/sft/checkpoints/iter_000014 [--scales 0 0.5 1]

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


def success_by_scale(checkpoint: Path, scales: list[float], episodes: int, num_envs: int,
                     seed: int) -> tuple[list[float], int]:
    """Success rate ``[len(scales)]`` of ``checkpoint`` (a trainer checkpoint ``iter_N/``) with initial
    noise ``s · N(0, I)``, on the env of its run's ``train_config.json``; and the run's ``num_demos``."""
    from flowrl.eval import evaluate, run_config
    from flowrl.models import from_pretrained
    from flowrl.train import build_env

    cfg, saved = run_config(checkpoint)
    if saved is None:
        raise FileNotFoundError(f"no train_config.json in {checkpoint} or one level up")
    if cfg.env.name != "reach":
        raise ValueError(f"{checkpoint}: only reaching-task runs are supported, got env {cfg.env.name!r}")
    cfg.env.num_envs = num_envs
    policy = from_pretrained(str(checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint)).eval()
    env = build_env(cfg, for_eval=True)
    out = []
    try:
        for s in scales:
            def noise(p: Any, obs: Any, gen: torch.Generator, s: float = s) -> torch.Tensor:
                return s * torch.randn(obs.state.shape[0], p.config.action_horizon, p.config.action_dim, generator=gen)

            out.append(evaluate(policy, env, episodes, seed, cfg.algo.num_steps, noise)["success_rate"])
    finally:
        env.close()
    return out, cfg.algo.num_demos


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="trainer checkpoint directories (iter_N/)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--episodes", type=int, default=512)
    p.add_argument("--num-envs", type=int, default=128)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.scales):
        raise SystemExit("noise_sensitivity: --scales must be >= 0")
    lines = ["| checkpoint | demos | " + " | ".join(f"success at {s:g}·N(0, I)" for s in args.scales) + " |",
             "|---|---|" + "---|" * len(args.scales)]
    for c in args.checkpoints:
        ck = Path(c)
        if not ck.is_dir():
            raise SystemExit(f"noise_sensitivity: checkpoint directory {ck} does not exist")
        r, demos = success_by_scale(ck, args.scales, args.episodes, args.num_envs, args.seed)
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
