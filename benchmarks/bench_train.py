"""Trainer throughput per algorithm: rollout and update samples/s on the built-in reach task.

For each algorithm (FPO, VLA-FPO, Flow-Noise PPO, Flow-SDE PPO, GRPO, SFT, ARFM) the script builds
the env, policy and algorithm exactly as ``flowrl/train.py`` does (``build_env``, ``build_policy``,
``build_algorithm`` on ``flowrl/configs/reach_<algo>.yaml``, ``reach_fpo.yaml`` with
``algo.name=vla_fpo`` for VLA-FPO) and times, after ``--warmup`` untimed repetitions, the median
over ``--reps`` of:

* **rollout**: one ``algo.rollout(env, policy, obs)`` (the policy in eval mode, no gradients):
  samples (one per env and chunk: the training samples the rollout returns) per second, and env
  steps per second (actions the envs executed: the sum of ``ChunkStep.executed``). GRPO's rollout
  runs every env's episode to its end from a reset; SFT / ARFM's is the collection of the expert
  demonstrations (done once per run in training: their iterations reuse it).
* **update**: ``--update-steps`` minibatches of ``algo.minibatches(batch)`` on the last rollout's
  batch, each ``algo.loss`` → ``backward`` → gradient clipping (``algo.max_grad_norm``) →
  ``optimizer.step`` (+ ``algo.after_step``): samples processed per second. The optimizer is a
  plain ``torch.optim.AdamW`` on the trainable module (the trainer's parameter groups; VLA-FPO:
  ``algo.trainable_module(policy, env)``), not DeepSpeed's engine: the numbers measure the
  algorithm, not the launcher.

A second table compares the rollout of one algorithm (``--pipeline-algo``, FPO) with
``env.pipeline_groups`` 1 and 2, side by side in one process (repetitions interleaved). On the
reach env (batched torch ops, no subprocesses) no gain is expected: the gain comes with envs that
step elsewhere while the policy acts (LIBERO's worker processes). ``--libero`` adds that row with
2 LIBERO workers (one per group when pipelined), 64² cameras, fast rendering and the tiny policy.

Timings are wall clock with ``torch.cuda.synchronize()`` around each timed section on a GPU.

    python benchmarks/bench_train.py                                  # CPU: tiny model, 32 envs
    python benchmarks/bench_train.py --model small                    # on a GPU (CUDA used when available)
    python benchmarks/bench_train.py --algos fpo,grpo --num-envs 16 --reps 5 --out benchmarks/RESULTS.md
    python benchmarks/bench_train.py --libero                         # + the LIBERO pipelining row
    python benchmarks/bench_train.py --quick                          # tiny sizes: a smoke test (CI)
    python benchmarks/bench_train.py --set env.image_size=112 --set algo.fpo_pairs=4   # config overrides
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # flowrl from a source checkout
from bench_ops import ResultsBlock, _cell, _commit, _device_name, _reason, release_cuda

from flowrl.config import TrainConfig, load_config
from flowrl.envs.base import ChunkStep, VecEnv
from flowrl.train import _optimizer, build_algorithm, build_env, build_policy

ALGOS = ("fpo", "vla_fpo", "flow_noise_ppo", "flow_sde_ppo", "grpo", "sft", "arfm")
CONFIGS = Path(__file__).resolve().parents[1] / "flowrl" / "configs"
#: ``--quick``: the smallest sizes that still run every code path (a smoke test, not a measurement)
QUICK = ["env.num_envs=4", "env.max_episode_steps=10", "algo.rollout_chunks=2", "algo.minibatch_size=4",
         "algo.epochs=1", "algo.fpo_pairs=2", "algo.num_steps=2", "algo.group_size=2", "algo.num_demos=4",
         "algo.sft_batch=4", "algo.sft_steps=2"]
LIBERO = ["env.name=libero", "env.num_envs=2", "env.suite=libero_spatial", "env.task_ids=[0,1]",
          "env.image_size=64", "env.fast_render=true", "env.settle_steps=5", "env.chunk_steps=5"]


# ---------------------------------------------------------------------------------------- helpers
def make_config(algo: str, model: str, overrides: list[str]) -> TrainConfig:
    """The trainer's config for ``algo`` on the reach task (its YAML, else reach_fpo's), overridden."""
    path = CONFIGS / f"reach_{algo}.yaml"
    if not path.exists():
        path = CONFIGS / "reach_fpo.yaml"
    return load_config(path, [f"algo.name={algo}", f"model.config={model}", "env.pipeline_groups=1", "sft_iterations=0",
                              *overrides])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())``, the device synchronized before and after."""
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t0, out


class StepCounter:
    """Counts the env steps executed (``ChunkStep.executed`` summed) by an env, pipelined or not.

    Wraps, on the instances, ``step_wait`` of leaf envs with a native ``step_async`` (their ``step``
    goes through it) and ``step`` of the others (the synchronous ``step_async`` default calls it),
    so every step is counted once whichever path (``step``, ``step_chunks``, pipelined groups,
    threads) ran it. The sums stay on the env's device until :meth:`total` (no syncs while timed).
    """

    def __init__(self, env: VecEnv) -> None:
        self.parts: list[torch.Tensor] = []
        for leaf in getattr(env, "envs", None) or [env]:
            name = "step_wait" if type(leaf).step_async is not VecEnv.step_async else "step"
            orig = getattr(leaf, name)

            def counted(*args: Any, _orig: Callable[..., ChunkStep] = orig, **kwargs: Any) -> ChunkStep:
                out = _orig(*args, **kwargs)
                self.parts.append(out.executed.sum())  # list.append: safe from the pipeline's threads
                return out

            setattr(leaf, name, counted)

    def reset(self) -> None:
        self.parts = []

    def total(self) -> int:
        return sum(int(p) for p in self.parts)


def _rollout(algo: Any, env: VecEnv, policy: Any, obs: Any, counter: StepCounter, dev: torch.device
             ) -> tuple[float, int, int, Any, Any]:
    """One timed rollout: ``(seconds, samples, env steps, batch, next obs)``."""
    if getattr(algo, "on_policy", True) is False:
        algo.data = None  # SFT / ARFM: their rollout is collecting the demonstrations: redo it
    counter.reset()
    policy.eval()
    dt, (batch, obs) = _timed(lambda: algo.rollout(env, policy, obs), dev)
    return dt, len(batch), counter.total(), batch, obs


def _update(algo: Any, module: torch.nn.Module, policy: Any, opt: torch.optim.Optimizer, batch: Any, steps: int,
            max_grad_norm: float, dev: torch.device) -> tuple[float, int, int]:
    """``steps`` optimizer steps on minibatches of ``batch``, timed: ``(seconds, samples, steps done)``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    policy.train()
    module.train()

    def run() -> tuple[int, int]:
        n = k = 0
        loss = None
        for mb in itertools.islice(algo.minibatches(batch), steps):
            loss, _ = algo.loss(module, mb)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(algo, "after_step"):
                algo.after_step()
            n += len(mb)
            k += 1
        if loss is not None and not torch.isfinite(loss):
            raise FloatingPointError(f"{algo.name}: non-finite loss {float(loss)}")
        return n, k

    dt, (n, k) = _timed(run, dev)
    return dt, n, k


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------- benchmarks
def bench_algo(algo_name: str, model: str, overrides: list[str], dev: torch.device, dtype: torch.dtype,
               warmup: int, reps: int, update_steps: int) -> dict[str, Any]:
    """Rollout and update throughput of one algorithm (see the module docstring)."""
    cfg = make_config(algo_name, model, overrides)
    torch.manual_seed(cfg.seed)
    env = build_env(cfg, 0, dev)
    try:
        policy = build_policy(cfg, env).to(dev)
        if dtype != torch.float32:
            policy.set_precision(dtype)
        algo = build_algorithm(cfg, seed=cfg.seed)
        module = algo.trainable_module(policy, env) if hasattr(algo, "trainable_module") else policy
        opt = _optimizer(module, cfg)
        if algo_name in ("sft", "arfm"):
            opt.param_groups[0]["lr"] = cfg.algo.sft_lr
        counter = StepCounter(env)
        obs = env.reset(seed=cfg.seed)
        roll: list[tuple[float, int, int]] = []
        batch = None
        for r in range(warmup + reps):
            dt, n, steps, batch, obs = _rollout(algo, env, policy, obs, counter, dev)
            if r >= warmup:
                roll.append((dt, n, steps))
        upd: list[tuple[float, int, int]] = []
        for r in range(warmup + reps):
            res = _update(algo, module, policy, opt, batch, update_steps, cfg.algo.max_grad_norm, dev)
            if r >= warmup:
                upd.append(res)
    finally:
        env.close()
    return {
        "algo": algo_name, "model": model, "num_envs": cfg.env.num_envs,
        "rollout_samples": _med([n for _, n, _ in roll]), "rollout_ms": 1e3 * _med([t for t, _, _ in roll]),
        "rollout_sps": _med([n / t for t, n, _ in roll]), "env_steps_ps": _med([s / t for t, _, s in roll]),
        "update_steps": _med([k for _, _, k in upd]), "update_samples": _med([n for _, n, _ in upd]),
        "update_ms": 1e3 * _med([t for t, _, _ in upd]), "update_sps": _med([n / t for t, n, _ in upd]),
    }


def bench_pipeline(env_label: str, algo_name: str, model: str, overrides: list[str], dev: torch.device,
                   dtype: torch.dtype, warmup: int, reps: int) -> dict[str, Any]:
    """Rollout throughput with ``env.pipeline_groups`` 1 and 2, interleaved in one process."""
    cfg = make_config(algo_name, model, overrides)
    envs: dict[int, VecEnv] = {}
    try:
        for g in (1, 2):
            envs[g] = build_env(cfg, 0, dev, pipeline_groups=g)
        torch.manual_seed(cfg.seed)
        policy = build_policy(cfg, envs[1]).to(dev)
        if dtype != torch.float32:
            policy.set_precision(dtype)
        algos = {g: build_algorithm(cfg, seed=cfg.seed) for g in envs}
        for g, a in algos.items():
            if hasattr(a, "trainable_module"):
                a.trainable_module(policy, envs[g])
        counters = {g: StepCounter(e) for g, e in envs.items()}
        obs = {g: e.reset(seed=cfg.seed) for g, e in envs.items()}
        res: dict[int, list[tuple[float, int, int]]] = {1: [], 2: []}
        for r in range(warmup + reps):
            for g in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate who goes first
                dt, n, steps, _, obs[g] = _rollout(algos[g], envs[g], policy, obs[g], counters[g], dev)
                if r >= warmup:
                    res[g].append((dt, n, steps))
    finally:
        for e in envs.values():
            e.close()
    sps = {g: _med([n / t for t, n, _ in v]) for g, v in res.items()}
    esps = {g: _med([s / t for t, _, s in v]) for g, v in res.items()}
    return {"env": env_label, "algo": algo_name, "model": model, "num_envs": cfg.env.num_envs,
            "sps1": sps[1], "sps2": sps[2], "esps1": esps[1], "esps2": esps[2], "ratio": sps[2] / sps[1]}


# ---------------------------------------------------------------------------------------- output
ALGO_PARAGRAPH = ("Rollout: samples (one per env and chunk) and executed env steps per second of `algo.rollout` "
                  "(SFT / ARFM: collecting the expert demonstrations, done once per run). Update: samples per second "
                  "through loss → backward → clip → AdamW step. Medians over the repetitions.")
ALGO_COLUMNS = ["algorithm", "model", "envs", "rollout samples", "rollout ms", "rollout samples/s", "env steps/s",
                "update steps", "update samples", "update ms", "update samples/s"]
PIPE_PARAGRAPH = ("Pipelined rollout (`env.pipeline_groups` 2 vs 1, same process, repetitions interleaved). "
                  "The reach env steps as batched torch ops in the caller: no gain expected there; subprocess "
                  "envs (LIBERO) step while the policy acts for the other group.")
PIPE_COLUMNS = ["env", "algorithm", "model", "envs", "samples/s (1 group)", "samples/s (2 groups)", "env steps/s (1)",
                "env steps/s (2)", "2 groups / 1"]


def _algo_cells(r: dict) -> list[object]:
    if "skipped" in r:  # the measurement failed (e.g. out of memory): the row says why, the others go on
        return [r["algo"], r["model"], r["num_envs"], f"skipped: {r['skipped']}", *["-"] * (len(ALGO_COLUMNS) - 4)]
    return [r["algo"], r["model"], r["num_envs"], f"{r['rollout_samples']:.0f}", f"{r['rollout_ms']:.1f}",
            f"{r['rollout_sps']:.1f}", f"{r['env_steps_ps']:.1f}", f"{r['update_steps']:.0f}",
            f"{r['update_samples']:.0f}", f"{r['update_ms']:.1f}", f"{r['update_sps']:.1f}"]


def _pipe_cells(r: dict) -> list[object]:
    if "skipped" in r:
        return [r["env"], r["algo"], r["model"], r["num_envs"], f"skipped: {r['skipped']}",
                *["-"] * (len(PIPE_COLUMNS) - 5)]
    return [r["env"], r["algo"], r["model"], r["num_envs"], f"{r['sps1']:.1f}", f"{r['sps2']:.1f}",
            f"{r['esps1']:.1f}", f"{r['esps2']:.1f}", f"{r['ratio']:.2f}x"]


def _table(columns: list[str], rows: list[list[object]]) -> list[str]:
    return [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}",
            *(f"| {' | '.join(_cell(c) for c in cells)} |" for cells in rows)]


def markdown(rows: list[dict], pipe_rows: list[dict], header: str) -> str:
    """The whole run's tables (printed at the end; ``--out`` records the same rows as they are measured)."""
    lines = [header]
    if rows:  # (--algos '' runs only the pipelined rows)
        lines += ["", ALGO_PARAGRAPH, "", *_table(ALGO_COLUMNS, [_algo_cells(r) for r in rows])]
    if pipe_rows:
        lines += ["", PIPE_PARAGRAPH, "", *_table(PIPE_COLUMNS, [_pipe_cells(r) for r in pipe_rows])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="tiny", help="tiny | small (policy config)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (Gemma weights, Pi0Policy.set_precision)")
    ap.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {ALGOS}")
    ap.add_argument("--num-envs", type=int, default=None, help="env.num_envs (default: the config's, 32)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    ap.add_argument("--update-steps", type=int, default=8, help="optimizer steps per update repetition")
    ap.add_argument("--pipeline-algo", default="fpo", help="algorithm of the pipeline_groups 1 vs 2 row ('' skips)")
    ap.add_argument("--libero", action="store_true", help="add the pipelined-vs-not row on LIBERO (2 workers)")
    ap.add_argument("--quick", action="store_true", help="very small sizes, 1 rep, no warm-up (CI smoke test)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default=None, help="append the markdown block (with device, commit, date) to FILE")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    algos = [a for a in args.algos.split(",") if a]
    bad = [a for a in algos if a not in ALGOS]
    if bad:
        ap.error(f"--algos: unknown {bad}; known: {ALGOS}")
    if args.pipeline_algo and args.pipeline_algo not in ALGOS:  # it ran after the whole table
        ap.error(f"--pipeline-algo: unknown {args.pipeline_algo!r}; known: {ALGOS} ('' skips the row)")
    if args.reps < 1 or args.warmup < 0 or args.update_steps < 1 or (args.num_envs is not None and args.num_envs < 1):
        ap.error(f"need --reps >= 1, --warmup >= 0, --update-steps >= 1, --num-envs >= 1; got {args.reps}, "
                 f"{args.warmup}, {args.update_steps}, {args.num_envs}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch has no CUDA device")
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # the table must not be lost after all the work
    overrides = list(QUICK) if args.quick else []
    if args.num_envs is not None:
        overrides.append(f"env.num_envs={args.num_envs}")
    overrides += args.set
    warmup, reps, update_steps = (0, 1, 2) if args.quick else (args.warmup, args.reps, args.update_steps)
    # a bad --set is an error before any work (a failure inside a measurement is that row's skip reason)
    envs_of = {a: make_config(a, args.model, overrides).env.num_envs for a in {*algos, args.pipeline_algo or "fpo"}}
    import flowkernels

    if dev.type == "cuda":  # the trainer's setting on a GPU: no host syncs for value checks
        flowkernels.set_value_checks(False)
    device_name = _device_name(dev.type)
    header = (f"## bench_train ({_dt.date.today().isoformat()}, {_commit()}, {device_name}, torch "
              f"{torch.__version__}, {args.dtype}, optimizer: torch AdamW (no DeepSpeed), warm-up {warmup}, "
              f"reps {reps}{', --quick' if args.quick else ''})")
    print(f"# {header[3:]}", flush=True)
    out = Path(args.out) if args.out else None
    # every row is appended as it is measured (a run cut by a time limit keeps its rows); a failing measurement
    # (out of memory with --model small, a LIBERO worker that cannot start) is a skip row, and the others go on
    algo_block = ResultsBlock(out, header, ALGO_PARAGRAPH, ALGO_COLUMNS)
    pipe_block = ResultsBlock(out, f"{header}: pipelined rollout", PIPE_PARAGRAPH, PIPE_COLUMNS)
    rows: list[dict] = []
    for a in algos:
        try:
            r = bench_algo(a, args.model, overrides, dev, dtype, warmup, reps, update_steps)
            print(f"{a:<15} rollout {r['rollout_sps']:9.1f} samples/s {r['env_steps_ps']:9.1f} env steps/s | "
                  f"update {r['update_sps']:9.1f} samples/s", flush=True)
        except Exception as e:  # recorded as the row's skip reason
            release_cuda(dev.type)
            r = {"algo": a, "model": args.model, "num_envs": envs_of[a], "skipped": _reason(e)}
            print(f"{a:<15} skipped: {r['skipped']}", flush=True)
        rows.append(r)
        algo_block.add(_algo_cells(r))
    pipe_rows: list[dict] = []

    def pipeline(label: str, algo: str, model: str, over: list[str]) -> None:
        num_envs = make_config(algo, model, over).env.num_envs
        try:
            r = bench_pipeline(label, algo, model, over, dev, dtype, warmup, reps)
            print(f"pipelined {r['env']} {r['algo']}: {r['sps1']:.1f} -> {r['sps2']:.1f} samples/s "
                  f"({r['ratio']:.2f}x)", flush=True)
        except Exception as e:  # the same
            release_cuda(dev.type)
            r = {"env": label, "algo": algo, "model": model, "num_envs": num_envs, "skipped": _reason(e)}
            print(f"pipelined {label} {algo}: skipped: {r['skipped']}", flush=True)
        pipe_rows.append(r)
        pipe_block.add(_pipe_cells(r))

    if args.pipeline_algo:
        pipeline("reach", args.pipeline_algo, args.model, overrides)
    if args.libero:
        from flowrl.envs.libero import libero_unavailable_reason

        reason = libero_unavailable_reason()
        if reason:
            print(f"--libero: skipped: {reason}", flush=True)
        else:
            lib = [*LIBERO, *(["algo.rollout_chunks=2"] if args.quick else [])]
            pipeline("libero_spatial 64² fast", args.pipeline_algo or "fpo", "tiny", [*overrides, *lib])
    text = markdown(rows, pipe_rows, header)
    print()
    print(text, end="")
    if out is not None:
        print(f"appended to {out}")
    return {"rows": rows, "pipeline": pipe_rows, "markdown": text}


if __name__ == "__main__":
    main()
    sys.exit(0)
