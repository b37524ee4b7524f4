"""How much a reaching-task checkpoint's success depends on the scale of its initial noise.

The success rate of ODE sampling from ``s · N(0, I)`` initial noise for several scales ``s``
(``s = 0``: the flow's deterministic "mode" action). A policy whose success does not move with
``s`` maps every noise to nearly the same action chunk: steering its noise (VLA-FPO's latent actor)
has nothing to work with, and only updates of the policy itself can improve it.

    python benchmarks/noise_sensitivity.py runs/rl_table/seed0/sft/checkpoints/iter_000014 [--scales 0 0.5 1]

``--best-of M`` adds the success of the best of M draws: an episode counts if any of M rollouts of
the same scene (the env reset with the same seed), each with fresh ``N(0, I)`` noise, succeeds: how
far a state-conditioned choice of noise alone could take this π0 (a ceiling for VLA-FPO's actor).
``--best-of-vary real padded`` redraws only part of the noise between a scene's draws: the env's
real action dims (what the actor controls) or only π0's padded dims (what it leaves to chance).

``--learned-choice R`` (with ``--best-of M``) asks how much of that ceiling can be *learned*: R rounds
of ``num_envs`` scenes, each scene run with M fresh noises; a classifier ``Q(state, noise) → success``
(an MLP on standardized features, the noise in the env's real action dims) is fit on the first
R − 1 rounds and picks, in the held-out last round, one of each scene's M noises. Reported: the
held-out success of the picked noise (and of a training round's pick, which shows how much the
classifier memorizes). A pick near the plain N(0, I) success means the good noises follow no
pattern in the state that this much data reveals, however high the best of M is.

Prints one markdown row per checkpoint; ``--out`` appends the table (with commit, date, device) to a file.
For a VLA-FPO checkpoint its frozen π0 is measured (the latent actor is not used: the question is how
much π0's own noise matters).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    if (checkpoint / "latent_actor.safetensors").is_file():  # the question is about π0's own noise
        print(f"# {checkpoint}: a VLA-FPO checkpoint; its frozen π0 is measured, without the latent actor", flush=True)
    policy = from_pretrained(str(checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint)).eval()
    return cfg, policy, build_env(cfg, for_eval=True)


@contextmanager
def _opened(checkpoint: Path, num_envs: int) -> Iterator[tuple[Any, Any, Any]]:
    """:func:`_load`, closing the env on exit."""
    cfg, policy, env = _load(checkpoint, num_envs)
    try:
        yield cfg, policy, env
    finally:
        env.close()


def success_by_scale(checkpoint: Path, scales: list[float], episodes: int, num_envs: int,
                     seed: int) -> tuple[list[float], int]:
    """Success rate ``[len(scales)]`` of ``checkpoint`` (a trainer checkpoint ``iter_N/``) with initial
    noise ``s · N(0, I)``, on the env of its run's ``train_config.json``; and the run's ``num_demos``."""
    from flowrl.eval import evaluate

    out = []
    with _opened(checkpoint, num_envs) as (cfg, policy, env):
        for s in scales:
            def noise(p: Any, obs: Any, gen: torch.Generator, s: float = s) -> torch.Tensor:
                return s * torch.randn(obs.state.shape[0], p.config.action_horizon, p.config.action_dim, generator=gen)

            out.append(evaluate(policy, env, episodes, seed, cfg.algo.num_steps, noise)["success_rate"])
    return out, cfg.algo.num_demos


@torch.no_grad()
def best_of_draws(policy: Any, env: Any, episodes: int, seed: int, num_steps: int, draws: int,
                  vary: str = "all") -> float:
    """Share of ``episodes`` episodes in which at least one of ``draws`` rollouts of the same scene
    (``env.reset(seed=...)`` again), each from fresh ``N(0, I)`` noise, succeeds. Rounds and random
    draws follow :func:`flowrl.eval.evaluate`, so ``draws = 1`` is its success rate.

    ``vary`` redraws only part of the noise ``(B, H, D)`` between a scene's draws: ``"real"`` the
    env's real action dims (the padded ones stay one draw per scene: what VLA-FPO's actor controls),
    ``"padded"`` only π0's padded dims (the real ones fixed: how much the noise the actor leaves to
    chance decides an episode); ``"all"`` (default) the whole noise.
    """
    from flowrl.algos.base import masks_for
    from flowrl.eval import run_episodes

    if draws < 1:
        raise ValueError(f"best_of_draws: draws must be >= 1, got {draws}")
    if vary not in ("all", "real", "padded"):
        raise ValueError(f"best_of_draws: vary must be 'all', 'real' or 'padded', got {vary!r}")
    gen = torch.Generator().manual_seed(seed)
    keep = None if vary == "all" else masks_for(env, policy, torch.device("cpu"))[0]
    if keep is not None and vary == "real":
        keep = ~keep  # the dims that stay fixed across a scene's draws
    got: list[bool] = []
    rnd = 0
    while len(got) < episodes:
        hit = torch.zeros(env.num_envs, dtype=torch.bool)
        noise_fn = None
        if keep is not None:
            c = policy.config
            fixed = torch.randn(env.num_envs, c.action_horizon, c.action_dim, generator=gen)

            def noise_fn(p: Any, obs: Any, g: torch.Generator, fixed: torch.Tensor = fixed) -> torch.Tensor:
                x = torch.randn(obs.state.shape[0], p.config.action_horizon, p.config.action_dim, generator=g)
                x[:, :, keep] = fixed[: x.shape[0], :, keep]
                return x
        for _ in range(draws):
            hit |= run_episodes(policy, env, seed + rnd, gen, num_steps, noise_fn)[0]
        rnd += 1
        got += hit[: min(env.num_envs, episodes - len(got))].tolist()
    return sum(got) / len(got)


def best_of(checkpoint: Path, draws: int, episodes: int, num_envs: int, seed: int, vary: str = "all") -> float:
    """:func:`best_of_draws` for a trainer checkpoint on the env of its run."""
    with _opened(checkpoint, num_envs) as (cfg, policy, env):
        return best_of_draws(policy, env, episodes, seed, cfg.algo.num_steps, draws, vary)


@torch.no_grad()
def _draw_outcomes(policy: Any, env: Any, seed: int, gen: torch.Generator, num_steps: int,
                   draws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round: every env reset with ``seed`` and run ``draws`` times with fresh N(0, I) noise.
    Returns state ``(B, S)``, noise in the real action dims ``(M, B, H·A)`` and success ``(M, B)``."""
    from flowrl.algos.base import masks_for
    from flowrl.eval import run_episodes

    dim_mask = masks_for(env, policy, torch.device("cpu"))[0]
    states: list[torch.Tensor] = []  # the round's scenes: the same state at every draw's reset
    noises: list[torch.Tensor] = []

    def noise_fn(p: Any, obs: Any, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(obs.state.shape[0], p.config.action_horizon, p.config.action_dim, generator=g)
        if not states:
            states.append(obs.state.float().cpu())
        noises.append(x[:, :, dim_mask].flatten(1))
        return x

    succ = [run_episodes(policy, env, seed, gen, num_steps, noise_fn)[0] for _ in range(draws)]
    return states[0], torch.stack(noises), torch.stack(succ).float()


def _learned(checkpoint: Path, rounds: int, draws: int, num_envs: int, seed: int) -> dict[str, float]:
    """:func:`learned_choice` for a trainer checkpoint on the env of its run."""
    with _opened(checkpoint, num_envs) as (cfg, policy, env):
        return learned_choice(policy, env, rounds, draws, seed, cfg.algo.num_steps)


def learned_choice(policy: Any, env: Any, rounds: int, draws: int, seed: int, num_steps: int,
                   steps: int = 4000, hidden: int = 512) -> dict[str, float]:
    """Fit ``Q(state, noise) → success`` on ``rounds − 1`` rounds of ``env.num_envs`` scenes × ``draws``
    noises; return the success of the plain draw (``mean``), of the best of the draws (``best``) and
    of the draw ``Q`` picks per scene, on the held-out last round (``picked``) and on the first
    training round (``picked_train``). Episodes must be one chunk long (the noise decides the whole
    episode)."""
    if rounds < 2 or draws < 2:
        raise ValueError(f"learned_choice: need rounds >= 2 and draws >= 2, got {rounds} and {draws}")
    if env.chunk_steps < env.max_episode_steps:
        raise ValueError(f"learned_choice: an episode must be one chunk (chunk_steps {env.chunk_steps} < "
                         f"max_episode_steps {env.max_episode_steps})")
    gen = torch.Generator().manual_seed(seed)
    data = [_draw_outcomes(policy, env, seed + r, gen, num_steps, draws) for r in range(rounds)]

    def feats(st: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (B, S), (M, B, L) -> (M, B, S + L)
        return torch.cat([st.expand(x.shape[0], *st.shape), x], dim=-1)

    f_tr = torch.cat([feats(s, x).flatten(0, 1) for s, x, _ in data[:-1]])
    y_tr = torch.cat([y.flatten() for _, _, y in data[:-1]])
    mu, sd = f_tr.mean(0), f_tr.std(0).clamp_min(1e-3)
    with torch.random.fork_rng():  # the classifier's init from ``seed``, the caller's RNG untouched
        torch.manual_seed(seed)
        q = torch.nn.Sequential(torch.nn.Linear(f_tr.shape[1], hidden), torch.nn.SiLU(),
                                torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(len(y_tr), (256,), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(q((f_tr[idx] - mu) / sd).squeeze(-1), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def pick(r: int) -> float:
        s, x, y = data[r]
        with torch.no_grad():
            choice = q((feats(s, x) - mu) / sd).squeeze(-1).argmax(0)  # (B,)
        return float(y[choice, torch.arange(y.shape[1])].mean())

    y = data[-1][2]
    return {"mean": float(y.mean()), "best": float(y.amax(0).mean()), "picked": pick(rounds - 1),
            "picked_train": pick(0)}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="trainer checkpoint directories (iter_N/)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--episodes", type=int, default=512)
    p.add_argument("--num-envs", type=int, default=128)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--best-of", type=int, default=0, metavar="M",
                   help="add the best of M N(0, I) draws per scene (0: off)")
    p.add_argument("--best-of-vary", nargs="+", default=["all"], choices=["all", "real", "padded"],
                   help="with --best-of M: a column per choice; redraw the whole noise between a scene's draws "
                        "(all), only the env's real action dims (real), or only π0's padded dims (padded)")
    p.add_argument("--learned-choice", type=int, default=0, metavar="R",
                   help="with --best-of M: R rounds of num_envs scenes, a classifier fit on R - 1 picks one of M "
                        "noises per scene of the last (0: off)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.scales):
        raise SystemExit("noise_sensitivity: --scales must be >= 0")
    if args.best_of < 0:
        raise SystemExit("noise_sensitivity: --best-of must be >= 0")
    if args.learned_choice and (args.learned_choice < 2 or args.best_of < 2):
        raise SystemExit("noise_sensitivity: --learned-choice needs R >= 2 rounds and --best-of M >= 2")
    what = {"all": "", "real": " (real dims redrawn)", "padded": " (padded dims redrawn)"}
    extra = [f"best of {args.best_of} N(0, I) draws{what[v]}" for v in args.best_of_vary] if args.best_of else []
    if args.learned_choice:
        extra += [f"held-out: N(0, I) / best of {args.best_of} / learned pick of {args.best_of}",
                  "learned pick on a training round"]
    cols = [f"success at {s:g}·N(0, I)" for s in args.scales] + extra
    lines = ["| checkpoint | demos | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for c in args.checkpoints:
        ck = Path(c)
        if not ck.is_dir():
            raise SystemExit(f"noise_sensitivity: checkpoint directory {ck} does not exist")
        r, demos = success_by_scale(ck, args.scales, args.episodes, args.num_envs, args.seed)
        if args.best_of:
            r += [best_of(ck, args.best_of, args.episodes, args.num_envs, args.seed, v) for v in args.best_of_vary]
        cells = [f"{v:.3f}" for v in r]
        if args.learned_choice:
            lc = _learned(ck, args.learned_choice, args.best_of, args.num_envs, args.seed)
            cells += [f"{lc['mean']:.3f} / {lc['best']:.3f} / {lc['picked']:.3f}", f"{lc['picked_train']:.3f}"]
        lines.append(f"| {c} | {demos} | " + " | ".join(cells) + " |")
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
