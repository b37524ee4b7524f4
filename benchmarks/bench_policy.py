"""End-to-end throughput of the π0 policy's hot paths: the cached prefix vs public-port baselines.

Rollout: action chunks/s of ``sample_actions`` (ODE, K 10, H 50) for B observations × N samples
per observation (group size), three providers:

* ``cached``    — this project: one prefix pass, ``N`` rows share its K/V via ``prefix_attention``.
* ``recompute`` — the prefix recomputed at every denoising step for every row (no cache).
* ``clone``     — prefix encoded once, but its K/V expanded per row and cloned at every step
  (what lerobot's ``denoise_step`` does with ``clone_past_key_values``).

Update (forward + backward, VLM trainable): samples/s of ``cfm_losses`` with N 8 (τ, ε) pairs vs
N separate prefix passes, and of ``chain_logprob`` (K 10, Flow-Noise) vs K prefix recomputations.

    python benchmarks/bench_policy.py                       # CPU default: tiny B 1,16,64; small B 1
    python benchmarks/bench_policy.py --configs small --batches 1,16 --no-record
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # flowrl from a source checkout
from bench_ops import _commit, _device_name, _time, quantiles

import flowkernels as fk
from flowrl.models import Observation, Pi0Policy, PrefixCache, get_config
from flowrl.models.policy import _time_grid

RESULTS = Path(__file__).with_name("RESULTS.md")
K = 10


def make_obs(p: Pi0Policy, B: int, dev: str) -> Observation:
    c = p.config
    L = c.max_token_len
    tm = torch.arange(L)[None] < torch.randint(L // 2, L + 1, (B, 1))
    im = torch.ones(B, c.num_cameras, dtype=torch.bool)
    im[::2, -1] = False  # a masked camera on every other row
    state = torch.randn(B, c.max_state_dim) if c.variant == "pi0" else None
    obs = Observation(torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size) * 2 - 1, im,
                      torch.randint(0, c.vocab_size, (B, L)), tm, state)
    return obs.to(dev)


def _denoise(p: Pi0Policy, x: torch.Tensor, cache_for_step, N: int) -> torch.Tensor:
    """The K-step Euler loop with a per-step cache provider (for the baselines)."""
    grid = _time_grid(K)
    tc = p.time_constants(torch.tensor(grid[:K], device=x.device))
    for k in range(K):
        cache, gs = cache_for_step(k)
        feats = p.suffix_features(cache, x, p._select_time(tc, k), gs, p.suffix_rope(cache, gs))
        x = fk.flow_step(x, p.velocity(feats), grid[k], 1.0 / K, "ode").x_next
    return x


def _expand_clone(cache: PrefixCache, N: int) -> PrefixCache:
    """The prefix K/V copied per row (B → B·N), as public ports do at every step."""
    r = (lambda t: t.repeat_interleave(N, 1).clone()) if N > 1 else (lambda t: t.clone())
    return PrefixCache(r(cache.keys), r(cache.values), cache.prefix_mask.repeat_interleave(N, 0),
                       cache.prefix_lens.repeat_interleave(N), cache.suffix_offset.repeat_interleave(N),
                       cache.pooled.repeat_interleave(N, 0))


def rollout_fns(p: Pi0Policy, obs: Observation, N: int) -> dict:
    c = p.config
    B = obs.batch_size
    noise = torch.randn(B * N, c.action_horizon, c.action_dim, device=p.device)
    obs_rows = obs.repeat_interleave(N) if N > 1 else obs

    def cached():
        return p.sample_actions(obs, mode="ode", num_steps=K, group_size=N, noise=noise, return_chain=False).actions

    def recompute():
        return _denoise(p, noise, lambda k: (p.encode_prefix(obs_rows), 1), N)

    def clone():
        base = p.encode_prefix(obs)
        return _denoise(p, noise, lambda k: (_expand_clone(base, N), 1), N)

    return {"cached": cached, "recompute": recompute, "clone": clone}


def update_fns(p: Pi0Policy, obs: Observation, N: int) -> dict:
    c = p.config
    B, dev = obs.batch_size, p.device
    actions = torch.randn(B, c.action_horizon, c.action_dim, device=dev)
    noise = torch.randn(B, N, c.action_horizon, c.action_dim, device=dev)
    tau = torch.rand(B, N, device=dev)
    with torch.no_grad():
        chain = p.sample_actions(obs, mode="noise", num_steps=K, noise=noise[:, 0].contiguous()).chain
    grid = torch.tensor(_time_grid(K), device=dev)

    def cfm_fused():
        p.cfm_losses(obs, actions, noise, tau).sum().backward()

    def cfm_separate():
        sum(p.cfm_losses(obs, actions, noise[:, n : n + 1], tau[:, n : n + 1]).sum() for n in range(N)).backward()

    def chain_fused():
        p.chain_logprob(obs, chain, "noise").sum().backward()

    def chain_separate():
        tc = p.time_constants(grid[:K])
        vs, stds = [], []
        for k in range(K):
            cache = p.encode_prefix(obs)
            feats = p.suffix_features(cache, chain[:, k], p._select_time(tc, k), 1, p.suffix_rope(cache, 1))
            vs.append(p.velocity(feats))
            stds.append(p.noise_head(feats))
        fk.chain_logprob(chain, torch.stack(vs, 1), grid, "noise", std=torch.stack(stds, 1)).sum().backward()

    return {"cfm_losses": {"fused": cfm_fused, "separate": cfm_separate},
            "chain_logprob": {"fused": chain_fused, "separate": chain_separate}}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default=None, help="comma list (default CPU tiny,small; GPU small,pi0)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,16,64; 'small' on CPU: 1)")
    ap.add_argument("--groups", default="1,8", help="group sizes N for rollout")
    ap.add_argument("--variant", default="pi0", help="pi0 | pi05")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--no-update", action="store_true", help="skip the update (cfm_losses / chain_logprob) benchmarks")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    dev = args.device
    fk.set_value_checks(False)
    configs = (args.configs or ("tiny,small" if dev == "cpu" else "small,pi0")).split(",")
    groups = [int(g) for g in args.groups.split(",")]
    device_name = _device_name(dev)
    print(f"# device: {device_name}; K {K}")
    print(f"{'config':<7} {'bench':<14} {'B':>4} {'N':>3} {'provider':<10} {'median ms':>10} {'items/s':>10} "
          f"{'vs cached':>9}")
    rows = []
    for name in configs:
        torch.manual_seed(0)
        p = Pi0Policy(get_config(name, variant=args.variant)).to(dev)
        if dev == "cuda":
            p.set_precision()
        p.eval()
        default_b = "1" if (dev == "cpu" and name != "tiny") else "1,16,64"
        batches = [int(b) for b in (args.batches or default_b).split(",")]

        def emit(bench, B, N, prov, ts, items, ref_ms, name=name):
            med, p20, p80 = quantiles(ts)
            row = dict(config=name, bench=bench, B=B, N=N, provider=prov, median_ms=med, p20=p20, p80=p80,
                       items_per_s=items / (med * 1e-3), speedup=med / ref_ms if ref_ms else 1.0)
            rows.append(row)
            print(f"{name:<7} {bench:<14} {B:>4} {N:>3} {prov:<10} {med:>10.2f} {row['items_per_s']:>10.1f} "
                  f"{row['speedup']:>8.2f}x", flush=True)
            return med

        for B in batches:
            obs = make_obs(p, B, dev)
            for N in groups:
                with torch.no_grad():
                    fns = rollout_fns(p, obs, N)
                    ref = None
                    for prov, fn in fns.items():
                        ts = _time(fn, dev, min_reps=3, budget_s=args.budget)
                        ms = emit("rollout", B, N, prov, ts, B * N, ref)
                        ref = ms if prov == "cached" else ref
            if args.no_update:
                continue
            p.freeze("expert_and_vlm")
            p.train()
            for bench, fns in update_fns(p, obs, 8).items():
                ref = None
                for prov, fn in fns.items():
                    ts = _time(fn, dev, min_reps=3, budget_s=args.budget)
                    p.zero_grad(set_to_none=True)
                    ms = emit(bench, B, 8 if bench == "cfm_losses" else 1, prov, ts,
                              B * 8 if bench == "cfm_losses" else B, ref)
                    ref = ms if prov == "fused" else ref
            p.eval()
    if not args.no_record:
        record(rows, device_name, args.variant)
    return rows


def record(rows: list[dict], device_name: str, variant: str) -> None:
    date = _dt.date.today().isoformat()
    commit = _commit()
    lines = ["", f"## bench_policy ({date}, {commit}, {device_name}, {variant}, float32 on CPU / bf16 Gemma on GPU)",
             "",
             "rollout: action chunks/s (K 10, H 50, ODE); cfm_losses: (τ, ε) pairs/s (N 8, fwd+bwd); "
             "chain_logprob: chains/s (K 10, Flow-Noise, fwd+bwd). `time vs cached` = median time / the "
             "cached (fused) provider's.",
             "",
             "| config | bench | B | N | provider | median ms | p20 | p80 | items/s | time vs cached |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['bench']} | {r['B']} | {r['N']} | {r['provider']} | {r['median_ms']:.2f} | "
                     f"{r['p20']:.2f} | {r['p80']:.2f} | {r['items_per_s']:.1f} | {r['speedup']:.2f}x |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
