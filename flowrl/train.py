"""flowrl's trainer: online RL (FPO, VLA-FPO, Flow-Noise/Flow-SDE PPO, GRPO), offline ARFM and SFT.

    deepspeed flowrl/train.py --config flowrl/configs/reach_fpo.yaml [key.sub=value ...] [--resume]
    deepspeed --num_gpus 2 flowrl/train.py ...      # two ranks (gloo on CPU, nccl on GPUs)
    python flowrl/train.py ...                      # one process, no launcher

Each rank runs its own envs and rollouts; the update goes through a DeepSpeed engine (ZeRO
stage and bf16 from the config). Checkpoints (DeepSpeed state + the policy in safetensors +
each rank's trainer state) are written atomically every ``checkpoint_every`` iterations;
``--resume`` continues from the latest one exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

if __package__ in (None, ""):  # started as a script: `deepspeed flowrl/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowrl.algos.base import Algorithm
from flowrl.checkpoint import finalize_checkpoint, latest_checkpoint, staging_dir, write_atomic
from flowrl.config import ConfigError, TrainConfig, load_config
from flowrl.dist import collective_device

__all__ = ["build_algorithm", "build_env", "build_policy", "main", "train"]


# ---------------------------------------------------------------------------------------- builders
def build_algorithm(cfg: TrainConfig, name: str | None = None, seed: int = 0, env_seed: int | None = None) -> Algorithm:
    """The algorithm object for ``name`` (default ``cfg.algo.name``), its generator seeded ``seed``.
    ``env_seed`` (default ``seed``): the base of GRPO's per-iteration reset seeds and of SFT / ARFM's
    demonstration resets (the trainer gives every rank the run's seed: ranks hold their own global envs)."""
    from flowrl.algos.flow_ppo import FlowNoisePPO, FlowSDEPPO
    from flowrl.algos.fpo import FPO
    from flowrl.algos.grpo import GRPO
    from flowrl.algos.offline import ARFM, SFT

    name = name or cfg.algo.name
    table: dict[str, Any] = {"sft": SFT, "arfm": ARFM, "fpo": FPO, "flow_noise_ppo": FlowNoisePPO,
                             "flow_sde_ppo": FlowSDEPPO, "grpo": GRPO}
    if name == "vla_fpo":
        from flowrl.algos.vla_fpo import VLAFPO

        table["vla_fpo"] = VLAFPO
    if name not in table:
        raise ConfigError(f"algo.name: unknown algorithm {name!r}; expected one of {sorted(table)}")
    if name in ("grpo", "sft", "arfm"):  # their env resets: GRPO's per iteration, SFT / ARFM's demonstrations
        return table[name](cfg.algo, seed, env_seed)
    return table[name](cfg.algo, seed)


def build_env(cfg: TrainConfig, rank: int = 0, device: torch.device | str = "cpu",
              pipeline_groups: int | None = None, for_eval: bool = False, world: int = 1) -> Any:
    """This rank's vectorized env: a :class:`~flowrl.envs.PipelinedEnv` of ``pipeline_groups``
    (default ``env.pipeline_groups``) sub-envs when that is > 1, holding consecutive global env
    indices (the same episodes as one env). ``for_eval``: an evaluation env, one group (``evaluate``
    steps every env at once, so groups would not overlap anything) and every env its own scene (no
    GRPO groups), so every algorithm is evaluated on the same episodes. ``world``: the number of ranks;
    rank ``r`` holds the global envs ``[r·num_envs, (r+1)·num_envs)`` (reach: their scenes; LIBERO: their
    places in one init-state schedule), so all ranks with one seed run the episodes of one env of
    ``world·num_envs``."""
    e = cfg.env
    groups = 1 if for_eval else e.pipeline_groups if pipeline_groups is None else pipeline_groups
    if groups < 1 or e.num_envs % groups:
        raise ConfigError(f"env.pipeline_groups={groups} must be >= 1 and divide env.num_envs={e.num_envs}")
    part = e.num_envs // groups
    if e.name == "reach":
        from flowrl.envs import ReachEnv

        def sub(g: int) -> Any:
            env = ReachEnv(part, num_targets=e.num_targets, image_size=e.image_size, chunk_steps=e.chunk_steps,
                           max_episode_steps=e.max_episode_steps, state_with_targets=e.state_with_targets,
                           state_with_goal=e.state_with_goal, state_with_time=e.state_with_time,
                           success_radius=e.success_radius, max_speed=e.max_speed,
                           group_size=cfg.algo.group_size if cfg.algo.name == "grpo" and not for_eval else 1,
                           env_offset=rank * e.num_envs + g * part,
                           device=device)
            env.set_expert_quality(e.expert_quality, e.expert_speed, e.expert_aim_noise)
            return env

        threaded = False  # batched tensor ops on the policy's device: nothing to overlap on a thread
    elif e.name == "libero":
        from flowrl.envs.libero import LiberoEnv  # type: ignore[import-not-found]

        def sub(g: int) -> Any:
            kw: dict[str, Any] = {"num_envs": part, "env_offset": rank * e.num_envs + g * part} if groups > 1 else {}
            if not for_eval and cfg.algo.name == "grpo":
                kw["group_size"] = cfg.algo.group_size
            return LiberoEnv.from_config(e, rank=rank, world=world, **kw)

        threaded = True  # LiberoEnv has a native step_async (workers step while the policy acts): no thread used
    else:
        raise ConfigError(f"env.name: unknown environment {e.name!r}")
    if groups == 1:
        return sub(0)
    from flowrl.envs import PipelinedEnv

    envs: list[Any] = []
    try:
        for g in range(groups):
            envs.append(sub(g))
        return PipelinedEnv(envs, threaded=threaded)
    except BaseException:
        for env in envs:
            env.close()
        raise


def build_policy(cfg: TrainConfig, env: Any) -> Any:
    """The policy: a named config sized to the env, or loaded from ``model.init_from``."""
    from flowrl.models import CheckpointKeyError, Pi0Policy, from_pretrained, get_config

    m = cfg.model
    if m.init_from:
        from flowrl.checkpoint import resolve_checkpoint

        src = resolve_checkpoint(m.init_from)  # a run directory: its latest checkpoint
        if (src / "policy").is_dir():  # a trainer checkpoint
            src = src / "policy"
        # the run's settings replace the checkpoint's (the sizes must match its weights)
        over = {"value_heads": m.num_value_heads, "noise_std_min": cfg.algo.noise_min,
                "noise_std_max": cfg.algo.noise_max, "num_steps": cfg.algo.num_steps, **m.overrides}
        try:
            policy = from_pretrained(str(src), **over)
        except (CheckpointKeyError, TypeError, ValueError) as e:
            raise ConfigError(f"model.init_from={m.init_from}: the checkpoint does not take the run's model settings "
                              f"{over} (model.num_value_heads, algo.noise_min/noise_max/num_steps, "
                              f"model.overrides): {e} (a setting the checkpoint's config.json lacks, such as a lerobot "
                              "checkpoint's vision_heads, is given as model.overrides.<name>=<value>)") from e
        ignored = [f"model.{k}={v!r}" for k, v in (("config", m.config), ("variant", m.variant))
                   if (k == "config" and v != "tiny") or (k == "variant" and v != policy.config.variant)]
        if ignored:
            import warnings

            warnings.warn(f"model.init_from={m.init_from}: {', '.join(ignored)} ignored: the checkpoint's own "
                          f"config is used ({policy.config.variant}, vlm_width {policy.config.vlm_width})",
                          stacklevel=2)
        # float32 master copy whatever the checkpoint's dtype (a bf16 run saves bf16 Gemma weights):
        # DeepSpeed's bf16 mode casts it again, an fp32 run must not train bf16 parameters in place
        policy = policy.float().set_activation_checkpointing(m.activation_checkpointing)
    else:
        over = {"variant": m.variant, "num_cameras": env.num_cameras, "image_size": env.image_size,
                "value_heads": m.num_value_heads, "noise_std_min": cfg.algo.noise_min,
                "noise_std_max": cfg.algo.noise_max, "num_steps": cfg.algo.num_steps,
                "activation_checkpointing": m.activation_checkpointing, **m.overrides}
        if m.config in ("tiny", "small"):
            over.setdefault("vocab_size", max(env.vocab_size, 16))
            over.setdefault("max_token_len", env.max_token_len)
        try:
            pc = get_config(m.config, **over)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: cannot build config {m.config!r} with {over}: {e}") from e
        policy = Pi0Policy(pc)
    pc = policy.config
    if pc.variant == "pi05" and env.state_dim:
        from flowrl.config import warn_once

        warn_once("π0.5 takes no proprioceptive state input here: openpi and lerobot write it into the prompt as "
                  "discretized text, these envs' prompts are the instruction alone; the env's state "
                  f"({env.state_dim} dims; env.state_with_* on reach) is not seen by the policy")
    problems = []
    if env.action_dim > pc.action_dim:
        problems.append(f"env action_dim {env.action_dim} > policy action_dim {pc.action_dim}")
    if pc.variant == "pi0" and env.state_dim > pc.max_state_dim:
        problems.append(f"env state_dim {env.state_dim} > policy max_state_dim {pc.max_state_dim}")
    if env.chunk_steps > pc.action_horizon:
        problems.append(f"env chunk_steps {env.chunk_steps} > policy action_horizon {pc.action_horizon}")
    if env.vocab_size > pc.vocab_size:
        problems.append(f"env vocabulary {env.vocab_size} > policy vocab_size {pc.vocab_size}")
    if env.max_token_len > pc.max_token_len:
        problems.append(f"env instructions of {env.max_token_len} tokens > policy max_token_len {pc.max_token_len}")
    if env.image_size != pc.image_size or env.num_cameras != pc.num_cameras:
        problems.append(f"env images {env.num_cameras}x{env.image_size}² != policy {pc.num_cameras}x{pc.image_size}²")
    if problems:
        raise ConfigError("env/policy dimension mismatch: " + "; ".join(problems))
    if m.freeze != "none":
        policy.freeze(m.freeze)
    return policy


# ---------------------------------------------------------------------------------------- distributed
def _init_distributed() -> tuple[int, int]:
    import deepspeed

    if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        import socket

        with socket.socket() as s:  # one process, no launcher: any free port (runs side by side don't clash)
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29512")):
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        release_shm_names()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def release_shm_names() -> None:
    """Unlink this rank's ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``.

    On CPU, DeepSpeed's shared-memory all-reduce gives every rank such a file (69 MB of RAM) when the process
    group starts and never removes it: every run, even a one-process one, left one behind per rank until reboot
    (16 GB of them here starved a later test into a timeout). Each rank maps every other rank's file while
    ``init_distributed`` runs; after a barrier the names can go, and the mappings stay valid until exit."""
    path = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    path.unlink(missing_ok=True)


def _annealed(lr: float, schedule: str, i: int, n: int) -> float:
    """``lr`` at the i-th of n iterations: ``constant``, ``linear`` ``lr · (1 − i/n)`` or ``cosine``
    ``lr · (1 + cos(π·i/n))/2``."""
    n = max(n, 1)
    if schedule == "linear":
        return lr * (1.0 - i / n)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * i / n))
    return lr


def offline_lr(cfg: TrainConfig, it: int) -> float:
    """The SFT / ARFM learning rate of iteration ``it``: ``algo.sft_lr``, or with ``algo.sft_lr_schedule
    = cosine`` ``sft_lr · (1 + cos(π·i/n))/2`` for the i-th of the n offline iterations (the SFT warm-up's
    ``sft_iterations``, or ``iterations`` when SFT / ARFM is the run's algorithm)."""
    i, n = (it, cfg.sft_iterations) if it < cfg.sft_iterations else (it - cfg.sft_iterations, cfg.iterations)
    return _annealed(cfg.algo.sft_lr, cfg.algo.sft_lr_schedule, i, n)


def rl_lr(cfg: TrainConfig, it: int) -> float:
    """The RL phase's actor learning rate at iteration ``it`` (counted from the run's start, SFT warm-up
    included): ``algo.lr``, or over the i-th of the n = ``iterations`` RL iterations ``lr · (1 − i/n)``
    (``linear``, the annealing of common PPO implementations) or ``lr · (1 + cos(π·i/n))/2`` (``cosine``).
    A function of the iteration alone, so ``--resume`` continues the schedule exactly."""
    return _annealed(cfg.algo.lr, cfg.algo.lr_schedule, it - cfg.sft_iterations, cfg.iterations)


def _ds_config(cfg: TrainConfig) -> dict[str, Any]:
    bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and torch.cuda.is_available())
    return {
        "train_micro_batch_size_per_gpu": cfg.algo.minibatch_size,
        "gradient_accumulation_steps": cfg.algo.grad_accum,
        "gradient_clipping": cfg.algo.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(policy: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    critic, actor = [], []
    for n, p in policy.named_parameters():
        if p.requires_grad:
            (critic if "value" in n else actor).append(p)
    if not actor and not critic:
        raise ConfigError("model.freeze left no trainable parameters")
    groups = [{"params": actor, "lr": cfg.algo.lr}]
    if critic:
        groups.append({"params": critic, "lr": cfg.algo.critic_lr})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.algo.lr, weight_decay=0.0)


#: per-episode means of a rollout: averaged over the ranks weighted by each rank's ``episodes``
_PER_EPISODE = ("success_rate", "return")


def _all_reduce(stats: dict[str, float], world: int, op: str = "mean") -> dict[str, float]:
    """``stats`` reduced over the ranks: their ``"mean"``, or their ``"max"`` (peak memory: the busiest rank's).

    A non-finite value (a rank whose rollout ended no episode has no success rate) is left out: the mean is over
    the ranks with a finite value, NaN when none has one. ``success_rate`` and ``return`` are weighted by each
    rank's ``episodes`` (the mean over all the ranks' episodes), the rest by rank."""
    if world == 1:
        return stats
    keys = sorted(stats)
    # every rank must reduce the same keys in the same order (else values pair up silently with other keys)
    crc = float(zlib.crc32("\0".join(keys).encode()))
    check = torch.tensor([crc, -crc], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MAX)
    if check[0].item() != -check[1].item():
        raise RuntimeError(f"metrics over the ranks: this rank's keys {keys} differ from another rank's")
    if op == "max":
        t = torch.tensor([stats[k] if math.isfinite(stats[k]) else -math.inf for k in keys], dtype=torch.float64,
                         device=collective_device())  # NCCL reduces CUDA tensors only (a CPU one was an error there)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return {k: float(v) if math.isfinite(v) else math.nan for k, v in zip(keys, t.tolist())}
    eps = stats.get("episodes", math.nan)
    weights = [eps if k in _PER_EPISODE and math.isfinite(eps) else 1.0 for k in keys]
    num = [stats[k] * w if math.isfinite(stats[k]) and w > 0 else 0.0 for k, w in zip(keys, weights)]
    den = [w if math.isfinite(stats[k]) and w > 0 else 0.0 for k, w in zip(keys, weights)]
    t = torch.tensor(num + den, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    n, d = t[: len(keys)].tolist(), t[len(keys):].tolist()
    return {k: a / b if b > 0 else math.nan for k, a, b in zip(keys, n, d)}


def _min_over_ranks(n: int, world: int) -> int:
    """The smallest of the ranks' ``n`` (a collective)."""
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (``getrusage``: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# ---------------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Run the configured training; returns the final metrics (and evaluation before/after), the ``history`` and
    the trained ``policy``.

    The envs it builds are closed when it returns or raises (LIBERO's worker processes end with it). With
    ``zero_stage=3`` the returned policy is the engine's module, whose partitioned parameters hold no local
    values outside the engine's forward: load the weights from the run's last checkpoint (``policy/``)."""
    opened: list[Any] = []
    run_dir = Path(cfg.run_dir).absolute()
    missing = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # innermost first
    try:
        return _train(cfg, resume, log, opened)
    except BaseException:
        # a run refused before it wrote anything leaves no empty run_dir (nor the parents it created) behind
        for d in missing:
            try:
                d.rmdir()  # only when empty
            except FileNotFoundError:  # another rank removed it already
                continue
            except OSError:
                break
        raise
    finally:
        for env in reversed(opened):
            env.close()


def _train(cfg: TrainConfig, resume: bool, log: Any, opened: list[Any]) -> dict[str, Any]:
    import deepspeed

    run_dir = Path(cfg.run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    rank, world = _init_distributed()
    from flowrl.config import validate

    validate(cfg, world)
    if ckpt is not None:
        _check_resume(ckpt, cfg, world, rank)
    else:
        _prepare_fresh_run_dir(run_dir, cfg, rank)
    run_dir.mkdir(parents=True, exist_ok=True)  # after the checks (train() removes it again if a later one fails)
    # the policy's random initialization (no model.init_from) is the same on every rank: deepspeed.initialize
    # broadcasts rank 0's parameters of the module it trains, but VLA-FPO's frozen π0 is not that module
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

    if cuda:  # flowkernels' value checks read tensors back to the host: none inside the rollout loop on a GPU
        import flowkernels

        flowkernels.set_value_checks(False)
    env = build_env(cfg, rank, dev, world=world)
    opened.append(env)
    policy = build_policy(cfg, env).to(dev)
    if rank:  # each rank's own stream from here (rank 0 goes on with its stream: one-rank runs are unchanged)
        torch.manual_seed(cfg.seed + 1000 * rank)
    main_algo = build_algorithm(cfg, seed=cfg.seed + 1000 * rank, env_seed=cfg.seed)
    if hasattr(main_algo, "world"):  # GRPO: its rollout's early stop is agreed over the ranks
        main_algo.world = world
    sft_algo = (build_algorithm(cfg, "sft", seed=cfg.seed + 1000 * rank + 1, env_seed=cfg.seed + 1)
                if cfg.sft_iterations else None)
    total = cfg.sft_iterations + cfg.iterations
    # a GRPO env starts each group from one scene: the SFT warm-up's scripted expert would then record each demo
    # group_size times; it collects from an env with a scene per env (as the evaluation env)
    grouped = sft_algo is not None and cfg.algo.name == "grpo"
    sft_env = build_env(cfg, rank, dev, for_eval=True, world=world) if grouped else env
    if sft_env is not env:
        opened.append(sft_env)
    # VLA-FPO trains its own latent actor + Q-ensemble (π0 frozen); the others train the policy
    module = main_algo.trainable_module(policy, env) if hasattr(main_algo, "trainable_module") else policy
    opt = _optimizer(module, cfg)
    ds_config = _ds_config(cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
    if world > 1 and hasattr(main_algo, "after_engine_init"):  # VLA-FPO: its target copies rank 0's critic
        main_algo.after_engine_init()
    # bf16: DeepSpeed casts the module it trains (fp32 master weights in the optimizer); the policy runs
    # with all-bf16 parameters (its projections and heads take inputs in their weights' dtype and return
    # float32). VLA-FPO's frozen π0 is not in the engine: its Gemma weights go to bf16 (lerobot's rule).
    if ds_config["bf16"]["enabled"] and module is not policy:
        policy.set_precision(torch.bfloat16)
    start_iter, history, evals = 0, [], {}
    # one seed on every rank: build_env's env_offset gives each rank its own global envs (reach: scenes; LIBERO:
    # places in one schedule of init states and MuJoCo seeds, which a per-rank seed would shift onto its
    # neighbours' episodes)
    rank_seed = cfg.seed * 1000
    obs = env.reset(seed=rank_seed)
    if ckpt is not None:
        # this rank's own file first (no collective): every rank learns whether any failed, and all exit alike
        # (a rank whose file was corrupt used to exit while the others went on into a collective)
        failed: Exception | None = None
        try:
            st = torch.load(ckpt / f"trainer_rank{rank}.pt", weights_only=False)
        except Exception as e:  # torch.load's unpickling errors
            failed = e
        bad = _ranks_failing(failed is not None, rank, world)
        if bad:
            why = f"{type(failed).__name__}: {failed}" if failed is not None else f"rank(s) {bad} could not load theirs"
            raise ConfigError(f"--resume: checkpoint {ckpt}: trainer_rank{{{','.join(map(str, bad))}}}.pt is "
                              f"corrupt ({why})") from failed
        try:
            engine.load_checkpoint(str(ckpt), tag="ds")
        except Exception as e:  # DeepSpeed's bare asserts, size mismatches
            raise ConfigError(f"--resume: checkpoint {ckpt}: its DeepSpeed state (ds/) is incomplete or corrupt, or "
                              f"does not fit this run's model: {type(e).__name__}: {e}") from e
        failed = None
        try:
            env.load_state_dict(st["env"])
        except ValueError as e:  # e.g. the env's settings were changed between the runs
            failed = e
        bad = _ranks_failing(failed is not None, rank, world)  # every rank stops (not one, leaving the others waiting)
        if bad:
            why = str(failed) if failed is not None else f"rank(s) {bad} could not restore their envs' state"
            if "env_offset" in why:
                why += (" (a multi-rank run of the built-in task saved before each rank's envs became the global envs "
                        "[rank·num_envs, (rank+1)·num_envs): continue it with the commit that wrote it, or start a "
                        "new run from it with model.init_from)")
            raise ConfigError(f"--resume from {ckpt}: {why}") from failed
        main_algo.load_state_dict(st["algo"])
        policy.mark_weights_updated()  # DeepSpeed loaded the weights through .data
        if sft_algo is not None and "sft_algo" in st:
            sft_algo.load_state_dict(st["sft_algo"])
        torch.set_rng_state(st["torch_rng"])
        start_iter, history = st["iteration"] + 1, st["history"]
        evals = st.get("evals", {})  # the evaluations before (and after SFT) of the first run
        if rank == 0:  # lines of iterations run after this checkpoint (before a kill) are dropped: rerun now
            write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
        obs = env.observe() if hasattr(env, "observe") else env.reset()
        log(f"[flowrl] resumed from {ckpt} at iteration {start_iter}")
        if start_iter >= total:
            hint = (" (raise iterations to continue)" if cfg.algo.lr_schedule == "constant" else
                    " (its learning-rate schedule ends here; start a new run with model.init_from to train on)")
            log(f"[flowrl] the checkpoint is at iteration {start_iter} of {total}: nothing left to train{hint}")

    writer = None
    if rank == 0 and cfg.tensorboard:  # validate() checked that tensorboard is installed
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    wb = _wandb_run(cfg, run_dir) if rank == 0 and cfg.wandb != "off" else None
    from tqdm import tqdm

    show = rank == 0 and (cfg.progress == "true" or (cfg.progress == "auto" and sys.stderr.isatty()))
    bar = tqdm(total=total, initial=start_iter, desc="flowrl", unit="it", disable=not show, dynamic_ncols=True,
               file=sys.stderr)
    if show and log is print:
        log = bar.write  # log lines above the bar, not through it
    from flowrl.eval import evaluate

    def run_eval(noise_fn: Any = None) -> dict[str, float]:
        """The success of ``eval_episodes`` episodes from seed ``seed + 77``, split over the ranks (one result,
        on every rank); an env of its own (evaluate() steps all envs at once: no pipeline groups), closed after."""
        ev = build_env(cfg, rank, dev, for_eval=True, world=world)
        try:
            return evaluate(policy, ev, cfg.eval_episodes, cfg.seed + 77, cfg.algo.num_steps, noise_fn,
                            rank=rank, world=world)
        finally:
            ev.close()

    result: dict[str, Any] = dict(evals)
    if cfg.eval_episodes and start_iter == 0:
        policy.eval()
        result["eval_before"] = run_eval(getattr(main_algo, "eval_noise", None))
        if rank == 0:
            log(f"[flowrl] success before: {result['eval_before']['success_rate']:.3f}")
    for it in range(start_iter, total):
        algo = sft_algo if it < cfg.sft_iterations else main_algo
        if sft_algo is not None and it == cfg.sft_iterations:
            if cfg.eval_episodes:
                policy.eval()
                result["eval_after_sft"] = run_eval()
                if rank == 0:
                    log(f"[flowrl] success after SFT: {result['eval_after_sft']['success_rate']:.3f}")
            obs = env.reset(seed=rank_seed + 1)  # the RL phase starts from fresh episodes, evaluated or not
        opt.param_groups[0]["lr"] = offline_lr(cfg, it) if algo.name in ("sft", "arfm") else rl_lr(cfg, it)
        t0 = time.perf_counter()
        policy.eval()
        batch, obs = algo.rollout(sft_env if algo is sft_algo else env, policy, obs)
        t_roll = time.perf_counter() - t0
        policy.train()
        t1 = time.perf_counter()
        agg: dict[str, list[float]] = {}
        # gradient accumulation: one optimizer step per ga consecutive minibatches, within the iteration (a
        # window never straddles two rollouts or a checkpoint); a last partial window of r minibatches steps
        # on their mean (losses scaled by ga/r: DeepSpeed divides each by ga)
        ga = cfg.algo.grad_accum
        # every rank takes the same number of optimizer steps (each one reduces the gradients over the ranks).
        # GRPO's batch is its envs' episodes, of rank-dependent lengths: it splits every rank's batch into the
        # same number of minibatches itself (GRPO.minibatches). Should another algorithm's ranks still differ,
        # every rank takes the smallest count and leaves its extra minibatches out (the metric minibatches_skipped)
        own = algo.num_minibatches(batch)
        count = _min_over_ranks(own, world)
        tail = count % ga
        n_mb = n_steps = processed = 0
        mbs = algo.minibatches(batch)
        for mb in itertools.islice(mbs, count):
            loss, st = algo.loss(engine.module, mb)
            # a non-finite loss stops every rank (the others would wait in the next gradient reduction); one host
            # read: the flag is reduced on the device first
            flag = (~torch.isfinite(loss.detach())).reshape(1).float()
            if world > 1:
                flag = flag.to(collective_device())
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if bool(flag.item()):
                bad = not bool(torch.isfinite(loss))
                raise FloatingPointError(f"iteration {it}: non-finite loss {float(loss)} ({st})" if bad else
                                         f"iteration {it}: another rank's loss is non-finite (its log says which)")
            n_mb += 1
            boundary = n_mb % ga == 0 or n_mb == count
            if ga > 1:
                engine.set_gradient_accumulation_boundary(boundary)
                # ZeRO-3 counts a window's backward passes in engine.forward, which the algorithms bypass (they call
                # the module): without this each backward overwrote the window's gradient instead of adding to it
                clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
                if cfg.zero_stage == 3 and clear is not None:
                    clear()
                if tail and n_mb > count - tail:
                    loss = loss * (ga / tail)
            engine.backward(loss)
            engine.step()
            if boundary:
                n_steps += 1
                if module is policy:  # DeepSpeed's ZeRO/bf16 optimizers write through .data: no version bump
                    policy.mark_weights_updated()
                if hasattr(algo, "after_step"):
                    algo.after_step()
            # GRPO's padding minibatches (one sample at weight 0) are left out of the metrics
            if getattr(mb, "loss_weight", 1.0) != 0:
                processed += len(mb)
                for k, v in st.items():
                    agg.setdefault(k, []).append(float(v))
        # a rank that took all its minibatches must have no more (the cap above must not hide a miscount)
        if n_mb != count or (own == count and next(mbs, None) is not None):
            raise RuntimeError(f"{type(algo).__name__}: minibatches() yielded {'more than ' if n_mb == count else ''}"
                               f"{n_mb}, num_minibatches() said {own}")
        t_upd = time.perf_counter() - t1
        metrics = {k: sum(v) / len(v) for k, v in agg.items()}
        metrics.update({k: float(v) for k, v in batch.stats.items()})
        metrics.update(rollout_s=t_roll, update_s=t_upd, samples=float(len(batch)), lr=float(opt.param_groups[0]["lr"]),
                       optimizer_steps=float(n_steps), minibatches_skipped=float(own - count),
                       rollout_samples_per_s=len(batch) / max(t_roll, 1e-9),
                       update_samples_per_s=processed / max(t_upd, 1e-9),
                       rollout_fraction=t_roll / max(t_roll + t_upd, 1e-9))
        peaks = {"peak_rss_gb": _peak_rss_gb()}  # the process's high-water mark so far (CPU memory)
        if torch.cuda.is_available():
            peaks["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30  # this iteration's
            torch.cuda.reset_peak_memory_stats()
        metrics = _all_reduce(metrics, world)
        metrics.update(_all_reduce(peaks, world, op="max"))
        metrics["iteration"] = float(it)
        metrics["phase_sft"] = float(algo is sft_algo)
        history.append(metrics)
        if rank == 0:
            line = " ".join(f"{k}={metrics[k]:.4g}" for k in ("success_rate", "return", "policy_loss", "cfm_loss",
                                                                "approx_kl", "clip_frac", "rollout_s", "update_s")
                            if k in metrics)
            log(f"[flowrl] it {it + 1}/{total} [{algo.name}] {line}")
            if writer is not None:
                for k, v in metrics.items():
                    if math.isfinite(v):
                        writer.add_scalar(k, v, it)
            if wb is not None:
                wb.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=it)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            post = {"algo": algo.name}
            if math.isfinite(metrics.get("success_rate", math.nan)):
                post["success"] = f"{metrics['success_rate']:.3f}"
            if "rollout_samples_per_s" in metrics:
                post["rollout/s"] = f"{metrics['rollout_samples_per_s']:.3g}"
            bar.set_postfix(post, refresh=False)
        bar.update(1)
        last = it == total - 1
        if cfg.checkpoint_every and ((it + 1) % cfg.checkpoint_every == 0 or last):
            save_checkpoint(engine, policy, env, main_algo, sft_algo, cfg, it, history, rank,
                            evals={k: v for k, v in result.items() if k.startswith("eval_")})
    bar.close()
    if cfg.eval_episodes:
        policy.eval()
        result["eval_after"] = run_eval(getattr(main_algo, "eval_noise", None))
        if rank == 0:
            before = result.get("eval_before", {}).get("success_rate", float("nan"))
            log(f"[flowrl] success before {before:.3f} -> after {result['eval_after']['success_rate']:.3f}")
    if rank == 0 and cfg.plot and history:
        _plot(history, run_dir / "curves.png")
    if writer is not None:
        writer.close()
    if wb is not None:
        for key in ("eval_before", "eval_after_sft", "eval_after"):
            if key in result:
                wb.summary[f"{key}/success_rate"] = result[key]["success_rate"]
        wb.finish()
    result["history"] = history
    result["policy"] = policy
    return result


def save_checkpoint(engine: Any, policy: Any, env: Any, algo: Algorithm, sft_algo: Algorithm | None,
                    cfg: TrainConfig, it: int, history: list, rank: int, evals: dict | None = None) -> None:
    """Write the checkpoint of iteration ``it`` into a staging directory, then publish it atomically.

    ``evals``: the evaluations so far (``eval_before``, ``eval_after_sft``), restored by ``--resume``
    so that the resumed run's summary still has them."""
    stage = staging_dir(cfg.run_dir, it)
    if rank == 0:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    engine.save_checkpoint(str(stage), tag="ds")
    import io

    buf = io.BytesIO()
    state = {"env": env.state_dict(), "algo": algo.state_dict(), "torch_rng": torch.get_rng_state(),
             "iteration": it, "history": history, "evals": evals or {}}
    if sft_algo is not None:
        state["sft_algo"] = sft_algo.state_dict()
    torch.save(state, buf)
    write_atomic(stage / f"trainer_rank{rank}.pt", buf.getvalue())
    full = _gathered_state_dict(policy, rank) if cfg.zero_stage == 3 else None  # a collective: every rank
    if rank == 0:
        policy.save_pretrained(str(stage / "policy"), state_dict=full)
        if engine.module is not policy and cfg.zero_stage < 3:  # VLA-FPO: the latent actor + critics too
            from flowrl.models.weights import save_safetensors

            actor = {k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()}
            save_safetensors(actor, stage / "latent_actor.safetensors", {"format": "pt"})
        write_atomic(stage / "train_config.json", json.dumps(_asdict(cfg), indent=1).encode())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        finalize_checkpoint(cfg.run_dir, it)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _wandb_run(cfg: TrainConfig, run_dir: Path) -> Any:
    """Rank 0's Weights & Biases run (``wandb=offline`` writes under ``run_dir/wandb``; ``wandb sync`` uploads it).

    The run id is kept in ``run_dir/wandb_id``, so ``--resume`` continues the same W&B run.
    """
    import secrets

    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        write_atomic(id_file, run_id.encode())
    try:
        return wandb.init(project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb, id=run_id, resume="allow",
                          name=run_dir.name, config=_asdict(cfg))
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as e:
        raise ConfigError(f"wandb={cfg.wandb}: W&B did not start ({type(e).__name__}: {e}); log in (`wandb login` "
                          "or WANDB_API_KEY), or use wandb=offline (`wandb sync` uploads later) or wandb=off") from e


def _ranks_failing(failed: bool, rank: int, world: int) -> list[int]:
    """The ranks for which ``failed`` is True (a collective: every rank calls it)."""
    if not torch.distributed.is_initialized() or world == 1:
        return [rank] if failed else []
    flags = torch.zeros(world, dtype=torch.int64, device=collective_device())  # NCCL reduces CUDA tensors only
    flags[rank] = int(failed)
    torch.distributed.all_reduce(flags)
    return [r for r in range(world) if flags[r]]


def _gathered_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 module on rank 0 (None elsewhere): each partitioned parameter is
    gathered in turn (every rank takes part, in the same order), so at most one is whole at a time. Its
    local tensors are empty outside the engine's forward: saving them wrote shape-(0,) weights."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if hasattr(t, "ds_id"):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if rank == 0:
                    out[name] = t.detach().cpu().clone()
        elif rank == 0:
            out[name] = t.detach().cpu().clone()
    return out if rank == 0 else None


def _check_resume(ckpt: Path, cfg: TrainConfig, world: int, rank: int) -> None:
    """Before any work: the checkpoint has its files, was saved by as many ranks, and the config equals the
    one it was saved with (except :data:`~flowrl.config.RESUME_MAY_CHANGE`): a resumed run must continue
    the same training."""
    from flowrl.config import RESUME_MAY_CHANGE, resume_changes

    missing = [n for n in ("ds", "policy", "train_config.json", f"trainer_rank{rank}.pt") if not (ckpt / n).exists()]
    if missing:
        raise ConfigError(f"--resume: checkpoint {ckpt} is incomplete: {', '.join(missing)} missing")
    saved_ranks = len(list(ckpt.glob("trainer_rank*.pt")))
    if saved_ranks != world:
        raise ConfigError(f"--resume: checkpoint {ckpt} was saved by {saved_ranks} rank(s), this run has {world}: "
                          "each rank continues its own envs; resume with the same number of ranks")
    try:
        saved = json.loads((ckpt / "train_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--resume: {ckpt / 'train_config.json'} is corrupt: {e}") from e
    changes = resume_changes(saved, cfg)
    a = cfg.algo
    annealed = a.lr_schedule != "constant" or (a.name in ("sft", "arfm") and a.sft_lr_schedule != "constant")
    if saved.get("iterations", cfg.iterations) != cfg.iterations and annealed:
        changes.append(f"iterations: {saved['iterations']!r} → {cfg.iterations!r} (the learning-rate schedule anneals "
                       "over iterations: another count reshapes it from the checkpoint on)")
    if changes:
        raise ConfigError(f"--resume from {ckpt}: the config differs from the one the run was saved with: "
                          f"{'; '.join(changes)}. A resume continues the same training; only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change. To train on with other settings, start a new "
                          f"run with model.init_from={ckpt}")


def _prepare_fresh_run_dir(run_dir: Path, cfg: TrainConfig, rank: int) -> None:
    """A run without ``--resume`` in a directory holding another run's checkpoints or metrics: an error (its
    checkpoints would be pruned by the new ones and its metrics appended to), or with ``overwrite=true`` that
    run's outputs are deleted first (rank 0; every rank waits for it)."""
    import shutil

    from flowrl.checkpoint import complete_checkpoints

    old = complete_checkpoints(run_dir)
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has looked before rank 0 deletes anything: all decide alike
    if not old and not logged:
        return
    if not cfg.overwrite:
        if old:
            raise ConfigError(f"run_dir={run_dir} holds the checkpoints of a run (newest {old[-1].name}): pass "
                              "--resume to continue it, overwrite=true to delete it and start afresh, or another "
                              "run_dir")
        raise ConfigError(f"run_dir={run_dir} holds the metrics.jsonl of a run (without checkpoints, so it cannot be "
                          "resumed): overwrite=true deletes it and starts afresh, or use another run_dir")
    if rank == 0:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
        for name in ("metrics.jsonl", "curves.png", "wandb_id"):
            (run_dir / name).unlink(missing_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _asdict(cfg: TrainConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def _plot(history: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k in ("success_rate", "return", "policy_loss", "cfm_loss", "approx_kl", "value_loss")
            if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([h["iteration"] for h in history if k in h], [h[k] for h in history if k in h])
        ax.set_title(k)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the built-in reach + FPO defaults)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_intermixed_args(argv)  # `run_dir=x --resume iterations=4` works too
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(args.config, args.overrides, world_size=world)  # fails before any work starts
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"flowrl: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
