"""Success rate of a policy over N episodes, with a Wilson 95% confidence interval.

    python -m flowrl.eval --checkpoint runs/default --episodes 200     # the run's latest checkpoint
    python -m flowrl.eval --checkpoint runs/default/checkpoints/iter_000019 --episodes 200
    python -m flowrl.eval --checkpoint runs/pi0_libero_spatial_fpo [--suite libero_spatial] \\
        [--task-ids 0,1] [--init-states 50] [--videos 3 --video-dir videos] [--json result.json]

On the built-in task the episodes can be split over processes (GPUs):
``torchrun --nproc_per_node 4 -m flowrl.eval --checkpoint runs/default --episodes 1000`` (each rank runs
``--num-envs`` envs, rounds of ranks·num-envs episodes; rank 0 prints and writes ``--json``).

``--checkpoint`` is a trainer checkpoint (``<run_dir>/checkpoints/iter_N``), a run directory or
its ``checkpoints/`` folder (then the checkpoint ``latest`` points at), or a policy directory.

The env is rebuilt from the run's ``train_config.json`` (beside the checkpoint or one level up).
On LIBERO (the run's ``env.name == libero``, or ``--suite``) every (task, init state) pair runs
once (:func:`flowrl.eval_libero.evaluate_libero`) and a per-task table is printed. A VLA-FPO
checkpoint (``latent_actor.safetensors`` + ``algo.name == vla_fpo``) is evaluated through its
latent actor: the frozen π0 decodes the actor's latents, as in training.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from flowrl.algos.base import to_policy_obs
from flowrl.dist import any_rank, collective_device
from flowrl.envs.base import VecEnv

__all__ = ["eval_actions", "evaluate", "load_vla_fpo_noise", "main", "run_config", "run_episodes",
           "wilson_interval"]


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
def eval_actions(policy: Any, obs: Any, gen: torch.Generator, num_steps: int, noise_fn: Any = None) -> torch.Tensor:
    """One chunk per env ``(B, H, D)`` float32 by ODE sampling from fresh initial noise: ``noise_fn(policy,
    obs, gen)`` (VLA-FPO's actor) or ``N(0, I)`` drawn from ``gen``. ``obs``: the env's EnvObs of B envs."""
    dev = next(policy.parameters()).device
    cfg = policy.config
    pobs = to_policy_obs(obs.to(dev), policy)
    if noise_fn is not None:
        x0 = noise_fn(policy, obs, gen)
    else:
        x0 = torch.randn(obs.state.shape[0], cfg.action_horizon, cfg.action_dim, generator=gen).to(dev)
    return policy.sample_actions(pobs, mode="ode", num_steps=num_steps, noise=x0, return_chain=False).actions.float()


@torch.no_grad()
def run_episodes(policy: Any, env: VecEnv, seed: int, gen: torch.Generator, num_steps: int,
                 noise_fn: Any = None, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reset every env with ``seed`` and run each one's first episode with ODE sampling (noise from
    ``gen``, or ``noise_fn`` as in :func:`eval_actions`). Returns success ``(B,)`` bool and return
    ``(B,)`` of those episodes, on the CPU. ``world > 1``: a collective; the round stops when every rank's
    episodes are over (the ranks stay in step: under ZeRO-3 every policy forward is a collective)."""
    obs = env.reset(seed=seed)
    alive = torch.ones(env.num_envs, dtype=torch.bool)
    succ = torch.zeros(env.num_envs, dtype=torch.bool)
    ret = torch.zeros(env.num_envs)
    for _ in range(math.ceil(env.max_episode_steps / env.chunk_steps)):
        step = env.step(eval_actions(policy, obs, gen, num_steps, noise_fn))
        succ |= alive & step.success.cpu()
        ret += torch.where(alive, step.reward.cpu(), torch.zeros(env.num_envs))
        alive &= ~step.done.cpu()
        obs = step.obs
        if not any_rank(bool(alive.any()), world):
            break
    return succ, ret


def _gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' equal-sized ``(2, B)`` float64 rows, concatenated rank-major ``(2, world·B)`` on the CPU
    (through the device NCCL needs, or the host for gloo)."""
    dev = collective_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(world)]
    torch.distributed.all_gather(parts, x.to(dev))
    return torch.cat([t.cpu() for t in parts], dim=1)


def _check_world(env: VecEnv, rank: int, world: int) -> None:
    """``rank`` / ``world`` against the process group, and every rank's env of the same size (an
    ``all_gather`` of unequal rows would fail or hang)."""
    dist = torch.distributed
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"evaluate: world must be an int >= 1, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"evaluate: rank must be an int in [0, {world}), got {rank!r}")
    if world == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluate: world={world} needs an initialized torch.distributed process group "
                         "(every rank calls evaluate)")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"evaluate: rank={rank}, world={world} do not match the process group's rank "
                         f"{dist.get_rank()} of {dist.get_world_size()}")
    sizes = _gather_rows(torch.full((2, 1), float(env.num_envs), dtype=torch.float64), world)[0]
    if (sizes != sizes[0]).any():
        raise ValueError(f"evaluate: every rank needs an env of the same size, got num_envs {sizes.long().tolist()} "
                         "(ranks 0, 1, ...)")


@torch.no_grad()
def evaluate(policy: Any, env: VecEnv, episodes: int, seed: int = 12345, num_steps: int = 10,
             noise_fn: Any = None, *, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Success rate over ``episodes`` episodes with ODE sampling (fresh noise per chunk).

    Runs rounds of ``env.num_envs`` episodes: each round resets every env and counts only its
    first episode, so short (successful) episodes are not over-counted. ``noise_fn(policy, obs,
    generator) -> (B, H, D)`` supplies the initial latents (VLA-FPO's actor); default ``N(0, I)``.
    Returns the success rate, its Wilson 95% interval and the mean return.

    ``world > 1`` splits the episodes over the ranks of the initialized ``torch.distributed`` group (a
    collective: every rank calls it with the same ``episodes`` and ``seed`` and an env of the same size
    ``B`` that holds its own global envs, as the trainer's ``build_env(cfg, rank, for_eval=True,
    world=world)``): rounds of ``world·B`` episodes, counted rank-major (rank 0's envs, then rank 1's, ...);
    rank ``r`` draws its noise from a generator seeded ``seed + 1_000_003·r``; every rank returns the whole
    result. On the built-in task the scenes are then those of one rank evaluating ``world·B`` envs (the
    noise draws are not). ``world = 1`` is the plain single-process evaluation.
    """
    if episodes < 1:
        raise ValueError(f"evaluate: episodes must be >= 1, got {episodes}")
    _check_world(env, rank, world)
    gen = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    succ: list[bool] = []
    rets: list[float] = []
    rnd = 0
    while len(succ) < episodes:
        r_succ, r_ret = run_episodes(policy, env, seed + rnd, gen, num_steps, noise_fn, world)
        rnd += 1
        rows = torch.stack([r_succ.double(), r_ret.double()])
        if world > 1:
            rows = _gather_rows(rows, world)
        take = min(rows.shape[1], episodes - len(succ))
        succ += rows[0, :take].bool().tolist()
        rets += rows[1, :take].tolist()
    k = sum(succ)
    lo, hi = wilson_interval(k, len(succ))
    return {"success_rate": k / len(succ), "ci_low": lo, "ci_high": hi, "episodes": float(len(succ)),
            "return": sum(rets) / len(rets)}


def _parse_ids(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers like 0,1,2, got {text!r}") from None


def load_vla_fpo_noise(ckpt: Any, policy: Any, cfg: Any, env: Any = None) -> Any:
    """The VLA-FPO latent actor of a trainer checkpoint, as an ``eval_noise`` callable.

    Rebuilds the algorithm from the run's config (``flowrl.train.build_algorithm``), builds its
    trainable module (latent actor + Q-ensemble, π0 frozen) on the policy's device and loads
    ``ckpt/latent_actor.safetensors`` into it (strictly).

    Args:
        ckpt: the checkpoint directory (``iter_N/``).
        policy: the checkpoint's π0 (already on the evaluation device).
        cfg: the run's :class:`~flowrl.config.TrainConfig` (``algo`` as saved).
        env: passed to ``trainable_module`` (which reads only the policy's config).

    Returns:
        ``algo.eval_noise``: ``(policy, obs, generator) → (B, H, D)``.
    """
    from pathlib import Path

    from flowrl.models.weights import check_digest, read_safetensors
    from flowrl.train import build_algorithm

    path = Path(ckpt) / "latent_actor.safetensors"
    algo = build_algorithm(cfg)
    module = algo.trainable_module(policy, env)  # type: ignore[attr-defined]
    state, meta = read_safetensors(path)
    check_digest(path, state, meta)
    dev = next(policy.parameters()).device
    try:
        module.load_state_dict({k: v.to(dev) for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: does not match the VLA-FPO modules built from the run's train_config.json "
                         f"(algo.vla_ensemble, the policy's sizes): {e}") from e
    module.eval()
    return algo.eval_noise  # type: ignore[attr-defined]


def resolve_checkpoint(path: Path, prog: str = "flowrl.eval") -> Path:
    """``path`` itself, or for a run directory (or its ``checkpoints/`` folder) its latest complete
    checkpoint (:func:`flowrl.checkpoint.resolve_checkpoint`); a missing directory, a run without a
    checkpoint, or a directory that holds none exits with a message (from ``prog``) naming it."""
    from flowrl.checkpoint import resolve_checkpoint as resolve

    try:
        ck = resolve(path)
    except FileNotFoundError as e:
        raise SystemExit(f"{prog}: {e}") from None
    if ck != path:
        print(f"{prog}: {path} -> its latest checkpoint {ck}", flush=True)
    if not ((ck / "policy").is_dir() or (ck / "model.safetensors").is_file()):
        raise SystemExit(f"{prog}: --checkpoint {path} holds no checkpoint: pass a trainer checkpoint (iter_N/, with "
                         "policy/), a run directory or its checkpoints/ (their latest checkpoint), or a policy "
                         "directory (model.safetensors + config.json: this project's, lerobot's or openpi's)")
    return ck


def run_config(checkpoint: Path) -> tuple[Any, dict[str, Any] | None]:
    """The run's ``TrainConfig`` (its env and algorithm settings; defaults elsewhere) from the
    ``train_config.json`` beside ``checkpoint`` or one level up, and that file's dict (``None``, with a
    default config, when there is none)."""
    import json

    from flowrl.config import AlgoConfig, TrainConfig, apply_overrides

    found = next((d / "train_config.json" for d in (checkpoint, checkpoint.parent)
                  if (d / "train_config.json").is_file()), None)
    saved = json.loads(found.read_text()) if found is not None else None
    cfg = TrainConfig()
    if saved is not None:
        known = set(AlgoConfig.__dataclass_fields__)
        apply_overrides(cfg, {"env": saved["env"], "algo": {k: v for k, v in saved["algo"].items() if k in known}})
    return cfg, saved


def _check_cli_args(args: argparse.Namespace) -> None:
    """Range checks of the CLI's numbers, before anything is loaded (0 must not fall back to a default)."""
    for flag, value, low in (("--episodes", args.episodes, 1), ("--num-envs", args.num_envs, 1),
                             ("--num-steps", args.num_steps, 1), ("--max-episode-steps", args.max_episode_steps, 1),
                             ("--videos", args.videos, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.videos and args.video_dir is None:
        raise ValueError(f"--videos {args.videos} needs --video-dir (where the mp4s go)")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this torch has no CUDA device (a CPU build, or no GPU); use cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.json is not None and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a directory: give a file path (its parents are created)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The eval CLI (see the module docstring); returns the result dict (also written by ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a trainer checkpoint directory (iter_N/), a run directory or its checkpoints/ (its latest "
                        "checkpoint), or a policy directory (safetensors + config)")
    p.add_argument("--episodes", type=int, default=100, help="reaching task: episodes")
    p.add_argument("--num-envs", type=int, default=None, help="parallel envs (default: 32 reach, 8 LIBERO)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--num-steps", type=int, default=None, help="denoising steps K (default: the run's)")
    p.add_argument("--device", default=None, help="policy device (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, help="write the result dict to this file")
    g = p.add_argument_group("LIBERO (when the run's env is libero, or --suite is given)")
    g.add_argument("--suite", default=None, help="libero_spatial | libero_object | libero_goal | libero_10 | "
                   "libero_90 (default: the run's)")
    g.add_argument("--task-ids", default=None, help="comma-separated task ids (default: all tasks of the suite)")
    g.add_argument("--init-states", type=int, default=50, help="the first N fixed init states of each task (<= 50)")
    g.add_argument("--videos", type=int, default=0, help="mp4s of the first N episodes (needs --video-dir)")
    g.add_argument("--video-dir", default=None)
    g.add_argument("--no-wrist", action="store_true", help="videos: agent view only")
    g.add_argument("--max-episode-steps", type=int, default=None, help="default: the suite's standard limit")
    g.add_argument("--fast-render", action=argparse.BooleanOptionalAction, default=None,
                   help="no shadows / reflections / multisampling (default: the run's setting)")
    g.add_argument("--flip", choices=("vertical", "rotate180"), default=None, help="default: the run's")
    args = p.parse_args(argv)
    _check_cli_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, own_group = _start_ranks(device)
    try:
        return _main(args, device, rank, world)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _main(args: argparse.Namespace, device: str, rank: int, world: int) -> dict[str, Any]:
    import json

    from flowrl.config import TrainConfig
    from flowrl.models import from_pretrained

    # rank 0 resolves a run's latest checkpoint for all: a trainer finishing one in between would otherwise give
    # the ranks different policies
    ck = resolve_checkpoint(Path(args.checkpoint)) if rank == 0 else Path()
    if world > 1:
        box = [str(ck)]
        torch.distributed.broadcast_object_list(box, src=0)
        ck = Path(box[0])
    cfg, saved = run_config(ck)
    libero = args.suite is not None or cfg.env.name == "libero"
    if not libero:  # LIBERO-only options on a reach run would be silently ignored
        given = [flag for flag, v in (("--task-ids", args.task_ids), ("--videos", args.videos or None),
                                      ("--video-dir", args.video_dir), ("--max-episode-steps", args.max_episode_steps),
                                      ("--fast-render", args.fast_render), ("--flip", args.flip))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: LIBERO-only option(s), but this run's env is "
                             f"{cfg.env.name!r} (pass --suite to evaluate on LIBERO)")
    if libero:  # bad arguments fail before anything is loaded
        from flowrl.eval_libero import check_libero_args

        task_ids, _ = check_libero_args(args.suite or cfg.env.suite, _parse_ids(args.task_ids, "task_ids"),
                                        args.init_states)
    # VLA-FPO: π0 is frozen; the trained latent actor supplies its initial noise
    latent = ck / "latent_actor.safetensors"
    vla = latent.is_file() or (saved is not None and saved["algo"]["name"] == "vla_fpo")
    if vla:
        if saved is None:
            raise ValueError(f"{latent} exists but no train_config.json was found beside it: cannot rebuild the "
                             "VLA-FPO latent actor (and evaluating the bare π0 would be wrong)")
        if saved["algo"]["name"] != "vla_fpo":
            raise ValueError(f"{latent} exists but the run's algo.name is {saved['algo']['name']!r}, not vla_fpo")
        if not latent.is_file():
            raise ValueError(f"{ck} is a VLA-FPO checkpoint without latent_actor.safetensors (saved with "
                             "zero_stage=3?): evaluating its frozen π0 alone would not evaluate the trained policy")
    if world > 1 and libero:
        raise ValueError(f"WORLD_SIZE={world}: the LIBERO evaluation runs in one process (its env workers run in "
                         "parallel; --num-envs sets how many): start it without torchrun")
    if world > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"  # this rank's GPU (LOCAL_RANK)
    policy = from_pretrained(str(ck / "policy" if (ck / "policy").is_dir() else ck)).to(device).eval()
    num_steps = args.num_steps or cfg.algo.num_steps
    noise_fn, noise_name = None, "N(0, I)"
    r: dict[str, Any]
    if libero:
        from flowrl.eval_libero import evaluate_libero, format_libero_result

        e = cfg.env
        from_run = saved is not None and e.name == "libero"
        default_mes = TrainConfig().env.max_episode_steps
        mes = args.max_episode_steps or (e.max_episode_steps if from_run and e.max_episode_steps != default_mes
                                         else None)
        if vla:
            noise_fn, noise_name = load_vla_fpo_noise(ck, policy, cfg), "vla_fpo latent actor"
        r = evaluate_libero(
            policy, args.suite or e.suite, task_ids, args.init_states, num_envs=args.num_envs or 8,
            num_steps=num_steps, seed=args.seed, noise_fn=noise_fn, video_dir=args.video_dir,
            num_videos=args.videos, video_wrist=not args.no_wrist, image_size=policy.config.image_size,
            fast_render=args.fast_render if args.fast_render is not None else (from_run and e.fast_render),
            flip=args.flip or (e.flip if from_run else "vertical"),
            chunk_steps=e.chunk_steps if from_run else min(5, policy.config.action_horizon),
            max_episode_steps=mes, settle_steps=e.settle_steps if from_run else 10, log=print)
        r["config"]["noise"] = noise_name
        r["noise"] = noise_name
        print(format_libero_result(r))
        print(f"initial noise: {noise_name}; checkpoint {ck}")
    else:
        cfg.env.num_envs = args.num_envs or 32
        from flowrl.train import build_env

        # one group (evaluate() steps every env at once); rank r: the global envs [r·B, (r+1)·B)
        env = build_env(cfg, rank, for_eval=True, world=world)
        try:
            if vla:
                noise_fn, noise_name = load_vla_fpo_noise(ck, policy, cfg, env), "vla_fpo latent actor"
            r = dict(evaluate(policy, env, args.episodes, args.seed, num_steps, noise_fn, rank=rank, world=world))
        finally:
            env.close()
        r["noise"] = noise_name
        if world > 1:
            r["ranks"] = world
        if rank == 0:
            print(f"success {r['success_rate']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}) over "
                  f"{int(r['episodes'])} episodes{f' on {world} ranks' if world > 1 else ''}; mean return "
                  f"{r['return']:.3f}; initial noise: {noise_name}")
    if args.json and rank == 0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


def _start_ranks(device: str) -> tuple[int, int, bool]:
    """``(rank, world, started)`` of a ``torchrun`` launch (WORLD_SIZE > 1: each rank takes the GPU ``LOCAL_RANK``
    and the default process group is started, NCCL on CUDA, else gloo, unless the caller has one: ``started``
    says whether it was started here, to be destroyed at the end); ``(0, 1, False)`` for one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    dist = torch.distributed
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), started


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad arguments (ConfigError is one too), missing files
        print(f"flowrl.eval: error: {e}", file=sys.stderr)
        sys.exit(2)
