"""Microbenchmarks of the fused flow ops: every backend side by side with torch eager and
torch.compile, at the shapes of real use (H 50, D 32, K 10, N 8; B 1 … 1024).

Reports median time with 20/80% quantiles, effective bandwidth from the *minimum* bytes each
op must move (every input read once, every output written once; see flowkernels/ops/reference.py)
and, on a GPU, the fraction of the device-copy bandwidth measured in the same run, plus peak
memory. Rows are appended to benchmarks/RESULTS.md with device, commit and date.

    python benchmarks/bench_ops.py                  # CPU default set (C++ vs torch eager/compile)
    python benchmarks/bench_ops.py --batches 256 --ops chain_logprob --no-compile
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import flowkernels as fk

H, D, K, N = 50, 32, 10, 8
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Case:
    name: str
    make: Callable[[int, torch.dtype, str], dict]
    run: Callable[[dict, str], object]
    bytes_moved: Callable[[int, int], int]  # (B, element size) -> bytes


def _flow_step_inputs(B, dtype, dev):
    return dict(x=torch.randn(B, H, D, device=dev, dtype=dtype), v=torch.randn(B, H, D, device=dev, dtype=dtype),
                noise=torch.randn(B, H, D, device=dev, dtype=dtype))


def _chain_inputs(B, dtype, dev):
    chain = torch.randn(B, K + 1, H, D, device=dev, dtype=dtype)
    v = torch.randn(B, K, H, D, device=dev, dtype=dtype, requires_grad=True)
    std = (0.1 + 0.05 * torch.rand(B, K, H, D, device=dev)).to(dtype).requires_grad_(True)
    return dict(chain=chain, v=v, std=std, t_grid=torch.linspace(1, 0, K + 1, device=dev),
                g=torch.randn(B, device=dev), step_mask=(torch.arange(H, device=dev) < 5),
                dim_mask=(torch.arange(D, device=dev) < 7))


def _cfm_inputs(B, dtype, dev):
    return dict(actions=torch.randn(B, H, D, device=dev, dtype=dtype),
                noise=torch.randn(B, N, H, D, device=dev, dtype=dtype),
                tau=torch.rand(B, N, device=dev),
                v=torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=True),
                g=torch.randn(B, N, device=dev), dim_mask=(torch.arange(D, device=dev) < 7))


def _chain_fwd_bwd(a, be):
    lp = fk.chain_logprob(a["chain"], a["v"], a["t_grid"], "noise", std=a["std"], dim_mask=a["dim_mask"],
                          step_mask=a["step_mask"], backend=be)
    return torch.autograd.grad(lp, (a["v"], a["std"]), a["g"])


def _cfm_fwd_bwd(a, be):
    loss = fk.cfm_loss(a["actions"], a["noise"], a["tau"], a["v"], dim_mask=a["dim_mask"], backend=be)
    return torch.autograd.grad(loss, a["v"], a["g"])


CASES = {
    # read x, v, ε; write mean, x_next (+ 4 bytes of logp per sample)
    "flow_step_sde": Case("flow_step_sde", _flow_step_inputs,
                          lambda a, be: fk.flow_step(a["x"], a["v"], 0.6, 0.1, "sde", noise=a["noise"], backend=be),
                          lambda B, e: 5 * B * H * D * e + 4 * B),
    # in-kernel Philox noise: read x, v; write mean, x_next
    "flow_step_sde_rng": Case("flow_step_sde_rng", _flow_step_inputs,
                              lambda a, be: fk.flow_step(a["x"], a["v"], 0.6, 0.1, "sde", seed=1, backend=be),
                              lambda B, e: 4 * B * H * D * e + 4 * B),
    "flow_step_ode": Case("flow_step_ode", _flow_step_inputs,
                          lambda a, be: fk.flow_step(a["x"], a["v"], 0.6, 0.1, "ode", backend=be),
                          lambda B, e: 3 * B * H * D * e),
    # fwd reads chain (K+1), v, std (K each); bwd reads them again and writes dv, dstd (K each)
    "chain_logprob": Case("chain_logprob", _chain_inputs, _chain_fwd_bwd,
                          lambda B, e: ((K + 1) + 2 * K) * B * H * D * e * 2 + 2 * K * B * H * D * e),
    # fwd reads A, ε, v; bwd reads them again and writes dv
    "cfm_loss": Case("cfm_loss", _cfm_inputs, _cfm_fwd_bwd,
                     lambda B, e: 2 * (B * H * D + 2 * B * N * H * D) * e + B * N * H * D * e),
    "cfm_interpolate": Case("cfm_interpolate", _cfm_inputs,
                            lambda a, be: fk.cfm_interpolate(a["actions"], a["noise"], a["tau"], backend=be),
                            lambda B, e: (B * H * D + 2 * B * N * H * D) * e),
}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _time(fn: Callable[[], object], dev: str, min_reps: int = 5, budget_s: float = 1.0) -> list[float]:
    """Milliseconds per call, after warm-up; CUDA timed with events."""
    for _ in range(3):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + budget_s
        while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return times
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(dev: str) -> float:
    """Device copy bandwidth in GB/s (bytes read + written), measured now."""
    n = (256 << 20) // 4 if dev == "cuda" else (64 << 20) // 4
    a = torch.empty(n, device=dev)
    b = torch.empty_like(a)
    a.normal_()
    t = statistics.median(_time(lambda: b.copy_(a), dev, budget_s=0.5))
    return 2 * a.numel() * 4 / (t * 1e-3) / 1e9


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    ts = sorted(ts)
    q = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default=None, help="comma list (default CPU 1,16,256; GPU 1,64,256,1024)")
    p.add_argument("--ops", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    dev = args.device
    if dev not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device")
    if args.dtype not in (None, "float32", "bfloat16"):
        p.error(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    try:
        batches = [int(b) for b in (args.batches or ("1,64,256,1024" if dev == "cuda" else "1,16,256")).split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated ints, got {args.batches!r}")
    unknown = [o for o in args.ops.split(",") if o not in CASES]
    if unknown or min(batches) < 1 or not args.budget > 0:
        p.error(f"unknown --ops {unknown} (known: {list(CASES)})" if unknown else
                f"--batches must be >= 1 (got {batches}) and --budget > 0 (got {args.budget})")
    fk.set_value_checks(False)  # production setting: no host syncs for value checks
    kernels = [b for b in fk.available_backends(dev) if b not in ("torch",) and not (b == "triton" and dev == "cpu")]
    providers = ["eager", *([] if args.no_compile else ["compile"]), *kernels]
    bw = copy_bandwidth(dev)
    device_name = _device_name(dev)
    print(f"# device: {device_name}; copy bandwidth {bw:.1f} GB/s; dtype {str(dtype).replace('torch.', '')}; "
          f"providers: {providers}", flush=True)
    rows = []
    hdr = f"{'op':<18} {'B':>5} {'provider':<8} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>8} {'%copy':>6} " \
          f"{'vs eager':>8} {'peak MB':>8}"
    print(hdr)
    for name in args.ops.split(","):
        case = CASES[name]
        for B in batches:
            inputs = case.make(B, dtype, dev)
            nbytes = case.bytes_moved(B, torch.finfo(dtype).bits // 8)
            eager_ms = None
            for prov in providers:
                run = case.run
                if prov == "eager":
                    fn = lambda a=inputs, run=run: run(a, "torch")  # noqa: E731
                elif prov == "compile":
                    torch._dynamo.reset()
                    compiled = torch.compile(lambda a, run=run: run(a, "torch"), dynamic=False)
                    fn = lambda a=inputs, c=compiled: c(a)  # noqa: E731
                else:
                    fn = lambda a=inputs, be=prov, run=run: run(a, be)  # noqa: E731
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                med, p20, p80 = quantiles(_time(fn, dev, budget_s=args.budget))
                peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
                eager_ms = med if prov == "eager" else eager_ms
                gbs = nbytes / (med * 1e-3) / 1e9
                row = dict(op=name, B=B, provider=prov, median_ms=med, p20=p20, p80=p80, gbs=gbs,
                           frac_copy=gbs / bw, speedup=eager_ms / med, peak_mb=peak)
                rows.append(row)
                print(f"{name:<18} {B:>5} {prov:<8} {med:>10.4f} {p20:>8.4f} {p80:>8.4f} {gbs:>8.2f} "
                      f"{100 * gbs / bw:>5.1f}% {eager_ms / med:>7.2f}x {peak:>8.1f}", flush=True)
    if not args.no_record:
        record(rows, device_name, bw, dtype)
    return rows


def record(rows: list[dict], device_name: str, bw: float, dtype: torch.dtype) -> None:
    date = _dt.date.today().isoformat()
    commit = _commit()
    lines = []
    if not RESULTS.exists() or "## bench_ops" not in RESULTS.read_text():
        lines += ["", "## bench_ops", "",
                  "| date | commit | device | dtype | op | B | provider | median ms | p20 | p80 | GB/s | % copy BW "
                  "| vs torch eager |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dt = str(dtype).replace("torch.", "")
    for r in rows:
        lines.append(f"| {date} | {commit} | {device_name} (copy {bw:.0f} GB/s) | {dt} | {r['op']} | {r['B']} | "
                     f"{r['provider']} | {r['median_ms']:.4f} | {r['p20']:.4f} | {r['p80']:.4f} | {r['gbs']:.2f} | "
                     f"{100 * r['frac_copy']:.1f}% | {r['speedup']:.2f}x |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
