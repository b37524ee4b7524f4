"""The acceptance table of the built-in task: SFT, then each RL algorithm from the SFT checkpoint.

For every seed: SFT on the scripted expert's imperfect demonstrations (``sft_iterations``
iterations, evaluated), then each online algorithm started from that SFT checkpoint for the
same number of iterations (the same env-step budget: ``iterations · num_envs · rollout_chunks ·
chunk_steps``), ARFM on the same offline data as SFT, and the VLA-FPO ablation (no clipping,
K = 1 latent step, a single critic, the paper's standardized ratio). Every run is a separate ``python flowrl/train.py``
process; success is the trainer's own evaluation (``eval_episodes`` episodes, ODE sampling).

    python benchmarks/rl_table.py --seeds 0 1 2 --out benchmarks/RESULTS.md
    python benchmarks/rl_table.py --algos fpo grpo --seeds 0 --set algo.lr=3e-4

Prints a markdown table (mean ± std over seeds, and each seed's value); ``--out`` appends it,
with the settings, commit and date, and ``--json`` writes every run's numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT))  # flowrl from a source checkout

# the task of the table is the configs' own (flowrl/configs/reach_*.yaml): an imprecise expert
# (a per-episode aim offset, ~50 % of its one-chunk demonstrations miss), so SFT lands well below
# the expert and RL has to sharpen the policy's action distribution onto the target
TASK = ["tensorboard=false", "plot=false"]
RL_ALGOS = ("fpo", "vla_fpo", "flow_noise_ppo", "flow_sde_ppo", "grpo")
ABLATIONS = {"vla_fpo (no clipping)": ["algo.vla_clip=false"], "vla_fpo (K = 1)": ["algo.vla_latent_steps=1"],
             "vla_fpo (single critic)": ["algo.vla_ensemble=1"],
             "vla_fpo (standardized ratio)": ["algo.vla_ratio=standardized"]}
CONFIG = {"fpo": "reach_fpo.yaml", "vla_fpo": "reach_vla_fpo.yaml", "flow_noise_ppo": "reach_flow_noise_ppo.yaml",
          "flow_sde_ppo": "reach_flow_sde_ppo.yaml", "grpo": "reach_grpo.yaml", "sft": "reach_sft.yaml",
          "arfm": "reach_arfm.yaml"}


def weights_digest(checkpoint: str | Path) -> str:
    """The first 16 hex digits of a sha256 over a checkpoint's policy weights.

    Hashes every tensor of ``checkpoint/policy/*.safetensors`` (name, dtype, shape and bytes, in
    name order), not the files, so it identifies the weights themselves: two runs that evaluate
    identically can still have started RL from different weights, and only this tells them apart.
    """
    import torch
    from safetensors import safe_open

    files = sorted((Path(checkpoint) / "policy").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"weights_digest: no policy/*.safetensors under {checkpoint}")
    h = hashlib.sha256()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def host_kind() -> str:
    """What, besides the code and the seed, decides a CPU run's weights bit for bit: the CPU's
    vector capability and the intra-op thread count (float reductions split differently). Runs of
    one commit and seed on the same kind give identical weights; on another kind they can differ
    in the last bits while evaluating identically."""
    import torch

    return f"{torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()} threads"


def _init_from(overrides: list[str]) -> str | None:
    inits = [o.split("=", 1)[1] for o in overrides if o.startswith("model.init_from=")]
    return inits[-1] if inits else None


def run(name: str, algo: str, overrides: list[str], out_dir: Path, log: bool = True, reuse: bool = False) -> dict:
    """One trainer process; returns success before/after, env steps, wall time, the commit, and the
    digests (:func:`weights_digest`) of the final checkpoint (``weights``) and of the one RL started
    from (``init_weights``); also written to ``<run>.result.json``. With ``reuse`` a run whose result
    file exists is not run again, after checking that its checkpoint still has the recorded weights
    and, for an RL run, that it started from the checkpoint it is now given (same digest)."""
    from flowrl.checkpoint import latest_checkpoint

    run_dir = out_dir / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
    done = out_dir / f"{run_dir.name}.result.json"
    init = _init_from(overrides)
    if reuse and done.is_file():
        r = json.loads(done.read_text())
        ckpt = latest_checkpoint(run_dir)
        if "weights" in r and ckpt is not None and (now := weights_digest(ckpt)) != r["weights"]:
            raise RuntimeError(f"{name}: {ckpt} does not hold the weights {done} was recorded with "
                               f"(digest {now}, recorded {r['weights']}); rerun it without --reuse or "
                               "restore the checkpoint")
        if init is not None and "init_weights" in r and (now := weights_digest(init)) != r["init_weights"]:
            raise RuntimeError(f"{name}: {done} started from weights {r['init_weights']}, but the run would now "
                               f"start from {init} (digest {now}); rerun it without --reuse")
        if log:
            print(f"  {name:28s} success {r['before']:.3f} -> {r['after']:.3f}  (reused {done})", flush=True)
        return {**r, "reused": True}
    config = ROOT / "flowrl" / "configs" / CONFIG[algo]
    cmd = [sys.executable, str(ROOT / "flowrl" / "train.py"), "--config", str(config),
           f"run_dir={run_dir}", "overwrite=true", f"algo.name={algo}", *TASK, *overrides]  # a rerun starts afresh
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    (out_dir / f"{run_dir.name}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: trainer failed (exit {p.returncode}); log: {out_dir / (run_dir.name + '.log')}\n"
                           + (p.stdout + p.stderr)[-2000:])
    m = re.search(r"success before ([0-9.]+) -> after ([0-9.]+)", p.stdout)
    if m is None:
        raise RuntimeError(f"{name}: no evaluation line in the trainer's output")
    steps = 0.0
    mf = run_dir / "metrics.jsonl"
    if mf.is_file():
        steps = sum(json.loads(line).get("env_steps", 0.0) for line in mf.read_text().splitlines()
                    if not json.loads(line).get("phase_sft"))
    from bench_ops import _commit  # type: ignore[import-not-found]

    r = {"before": float(m.group(1)), "after": float(m.group(2)), "env_steps": steps, "wall_s": wall,
         "commit": _commit(), "host": host_kind()}
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        r["weights"] = weights_digest(ckpt)
    if init is not None:
        r["init_weights"] = weights_digest(init)
    done.write_text(json.dumps(r))
    if log:
        print(f"  {name:28s} success {r['before']:.3f} -> {r['after']:.3f}  env steps {steps:.0f}  {wall:.0f} s",
              flush=True)
    return r


def grpo_envs(overrides: list[str]) -> int:
    """GRPO's ``num_envs`` for the on-policy algorithms' env-step budget per iteration.

    On-policy iterations step ``num_envs · rollout_chunks · H'`` env steps (FPO's config); a GRPO
    iteration runs one episode per env (at most ``ceil(T / H') · H'`` steps each), so GRPO runs
    as many iterations with that many more envs (rounded down to whole groups; its measured env
    steps, at most the budget, are in the table).
    """
    from flowrl.config import load_config

    ref = load_config(ROOT / "flowrl" / "configs" / CONFIG["fpo"], [*TASK, *overrides])
    cfg = load_config(ROOT / "flowrl" / "configs" / CONFIG["grpo"], ["algo.name=grpo", *TASK, *overrides])
    budget = ref.env.num_envs * ref.algo.rollout_chunks * ref.env.chunk_steps
    per_env = -(-cfg.env.max_episode_steps // cfg.env.chunk_steps) * cfg.env.chunk_steps
    g = cfg.algo.group_size
    return max(g, budget // per_env // g * g)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="*", default=list(RL_ALGOS), choices=RL_ALGOS,
                   help="online algorithms (none: only SFT and ARFM)")
    p.add_argument("--no-arfm", action="store_true")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--sft-iterations", type=int, default=15)
    p.add_argument("--iterations", type=int, default=30, help="RL iterations (the shared env-step budget)")
    p.add_argument("--eval-episodes", type=int, default=512)
    p.add_argument("--set", nargs="*", default=[], help="extra trainer overrides for every run")
    p.add_argument("--work-dir", default="runs/rl_table")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    p.add_argument("--json", default=None)
    p.add_argument("--reuse", action="store_true",
                   help="do not rerun a run whose result is in the work dir (to add algorithms to a table)")
    args = p.parse_args(argv)
    for flag, value in (("--sft-iterations", args.sft_iterations), ("--iterations", args.iterations),
                        ("--eval-episodes", args.eval_episodes)):
        if value < 1:  # the SFT run's checkpoint starts every RL run; success is what the table compares
            p.error(f"{flag} must be >= 1, got {value}")
    from flowrl.checkpoint import latest_checkpoint

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[float]] = {}
    runs: dict[str, list[dict]] = {}

    def add(name: str, r: dict) -> None:
        rows.setdefault(name, []).append(r["after"])
        runs.setdefault(name, []).append(r)

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        common = [f"seed={seed}", f"eval_episodes={args.eval_episodes}", *args.set]
        sd = work / f"seed{seed}"
        sd.mkdir(exist_ok=True)
        sft = run("sft", "sft", [*common, "iterations=0", f"sft_iterations={args.sft_iterations}",
                                 f"checkpoint_every={args.sft_iterations}"], sd, reuse=args.reuse)
        add("sft", sft)
        init = latest_checkpoint(sd / "sft")
        if init is None:
            raise RuntimeError(f"the SFT run wrote no checkpoint under {sd / 'sft'}")
        if not args.no_arfm:
            add("arfm", run("arfm", "arfm", [*common, f"iterations={args.sft_iterations}", "sft_iterations=0",
                                             f"checkpoint_every={args.sft_iterations}"], sd, reuse=args.reuse))
        rl = [(a, a, []) for a in args.algos]
        if not args.no_ablation and "vla_fpo" in args.algos:
            rl += [(n, "vla_fpo", o) for n, o in ABLATIONS.items()]
        for name, algo, extra in rl:
            if algo == "grpo":
                extra = [*extra, f"env.num_envs={grpo_envs([*common, *extra])}"]
            its = args.iterations
            add(name, run(name, algo, [*common, "sft_iterations=0", f"iterations={its}", f"checkpoint_every={its}",
                                       f"model.init_from={init}", *extra], sd, reuse=args.reuse))
    table = format_table(rows, runs)
    print(table)
    if args.out:
        from bench_ops import _commit, _device_name  # type: ignore[import-not-found]

        wall = sum(r["wall_s"] for rs in runs.values() for r in rs)
        sft_w = [r.get("weights", "not recorded") for r in runs.get("sft", [])]
        hosts = sorted({r["host"] for r in runs.get("sft", []) if "host" in r})
        reused = [f"{n} ({', '.join(sorted({r.get('commit', 'commit not recorded') for r in rs}))})"
                  for n, rs in runs.items() if any(r.get("reused") for r in rs)]
        head = (f"\n### Built-in task: success after SFT and after RL ({time.strftime('%Y-%m-%d')}, commit "
                f"{_commit()}, {_device_name('cpu')}, {wall:.0f} s of runs)\n\n"
                f"`python benchmarks/rl_table.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
                f"iterations {args.iterations}, SFT iterations {args.sft_iterations}, {args.eval_episodes} "
                f"evaluation episodes; the task of flowrl/configs/reach_*.yaml"
                + (f"; rows reused from earlier runs in {args.work_dir} (`--reuse`; the commit they ran at): "
                   f"{', '.join(reused)}" if reused else "")
                + (f"; SFT checkpoints (`weights_digest`, per seed): {', '.join(sft_w)}" if sft_w else "")
                + (f" (trained on {', '.join(hosts)}; the digest depends on it, see `host_kind`)" if hosts else "")
                + "\n\n")
        with open(args.out, "a") as f:
            f.write(head + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return runs


def format_table(rows: dict[str, list[float]], runs: dict[str, list[dict]]) -> str:
    sft = rows.get("sft", [])
    lines = ["| method | success (mean ± std) | Δ vs SFT (points) | per seed | env steps |", "|---|---|---|---|---|"]
    for name, vals in rows.items():
        steps = statistics.fmean(r["env_steps"] for r in runs[name])
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        delta = "" if name == "sft" or len(sft) != len(vals) else \
            f"{100 * statistics.fmean(v - s for v, s in zip(vals, sft)):+.1f}"
        per = ", ".join(f"{v:.3f}" for v in vals)
        lines.append(f"| {name} | {mean:.3f} ± {std:.3f} | {delta} | {per} | {steps:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
