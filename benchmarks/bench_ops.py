"""Microbenchmarks of the fused flow ops: every backend side by side with torch eager and
torch.compile, at the shapes of real use (H 50, D 32, K 10, N 8; B 1 … 1024).

Reports median time with 20/80% quantiles, effective bandwidth from the *minimum* bytes each
op must move (every input read once, every output written once; see flowkernels/ops/reference.py)
and the fraction of the device-copy bandwidth measured in the same run, plus, on a GPU, the memory
a call allocates. On a GPU the L2 cache is flushed before every timed call (outside the timed
events), so inputs come from DRAM like the copy they are compared with. The torch.compile provider
runs after every other provider (its compiles take most of the time), so a time limit cuts it
first. Each run appends its own dated block to benchmarks/RESULTS.md, row by row as measured.

    python benchmarks/bench_ops.py                  # CPU default set (C++ vs torch eager/compile)
    python benchmarks/bench_ops.py --batches 256 --ops chain_logprob --no-compile
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
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
        # the results file itself does not count: a session's first benchmark writes to it, and every later one
        # would otherwise be labelled +dirty at a clean commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/RESULTS.md"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


_L2_FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100/H200: 50-60 MiB)
_l2_buffers: dict[str, torch.Tensor] = {}


def l2_flush_buffer(dev: str) -> torch.Tensor | None:
    """The buffer zeroed to evict the L2 cache before a timed CUDA call (allocated once); None on CPU."""
    if dev != "cuda":
        return None
    key = f"cuda:{torch.cuda.current_device()}"
    if key not in _l2_buffers:
        _l2_buffers[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    return _l2_buffers[key]


def _time(fn: Callable[[], object], dev: str, min_reps: int = 5, budget_s: float = 1.0, *,
          flush_l2: bool = False, warmup: int = 3) -> list[float]:
    """Milliseconds per call, after ``warmup`` calls; CUDA timed with events.

    ``flush_l2``: on CUDA, zero a 256 MiB buffer before every timed call, outside the event pair, so
    the call reads its inputs from DRAM rather than from an L2 left warm by the previous rep (no-op on CPU).
    """
    for _ in range(warmup):
        fn()
    if dev == "cuda":
        flush = l2_flush_buffer(dev) if flush_l2 else None
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + budget_s
        while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if flush is not None:
                flush.zero_()  # queued before s: the events time fn only
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


def _reason(e: BaseException) -> str:
    """One line saying why a measurement failed, safe inside a markdown table cell."""
    msg = str(e).splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}".replace("|", "/").strip()


def release_cuda(dev: str) -> None:
    """After a failed measurement on CUDA: give the cached blocks back (a later, smaller shape may fit)."""
    if dev != "cuda":
        return
    try:
        torch.cuda.synchronize()
    except Exception:  # a sticky CUDA error: nothing left to save, the next calls report it
        pass
    try:
        torch.cuda.empty_cache()
    except Exception:
        pass


def _cell(x: object) -> str:
    return str(x).replace("|", "/").replace("\n", " ").strip()


class ResultsBlock:
    """One run's block at the end of a results file: a dated ``###`` heading, a paragraph saying what the
    columns mean and the table header, written with the first row (a run that measures nothing leaves
    nothing), then every row appended as it is measured and the file closed, so a run killed by a time
    limit keeps what it measured. ``path=None`` records nothing."""

    def __init__(self, path: Path | None, heading: str, paragraph: str, columns: list[str]):
        self.path, self.heading, self.paragraph, self.columns = path, heading, paragraph, list(columns)
        self.n_rows = 0
        self._started = False

    def _append(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)

    def start(self) -> None:
        if self.path is None or self._started:
            return
        old = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        lead = "" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n"
        self._append(f"{lead}{self.heading}\n\n{self.paragraph}\n\n| {' | '.join(self.columns)} |\n"
                     f"|{'---|' * len(self.columns)}\n")
        self._started = True

    def add(self, cells: list[object]) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns: {cells}")
        if self.path is None:
            return
        self.start()
        self._append(f"| {' | '.join(_cell(c) for c in cells)} |\n")
        self.n_rows += 1


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:{spec}}{suffix}"


COLUMNS = ["op", "B", "provider", "median ms", "p20", "p80", "GB/s", "% copy BW", "vs torch eager", "peak MB"]


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
    providers = ["eager", *kernels]
    late = [] if args.no_compile else ["compile"]  # compiles take most of the time: after everything else
    flush_l2 = dev == "cuda"
    l2_flush_buffer(dev)  # allocated once, before any memory statistics
    bw = copy_bandwidth(dev)
    device_name = _device_name(dev)
    dt = str(dtype).replace("torch.", "")
    print(f"# device: {device_name}; copy bandwidth {bw:.1f} GB/s; dtype {dt}; providers: {providers + late}"
          f"{'; L2 flushed before every timed call' if flush_l2 else ''}", flush=True)
    date = _dt.date.today().isoformat()
    copy_mib = 256 if dev == "cuda" else 64
    paragraph = (
        f"Fused flow ops (benchmarks/bench_ops.py), H {H}, D {D}, K {K}, N {N}. `median ms` (p20, p80) per call; "
        "GB/s from the minimum bytes the op must move (each input read once, each output written once); "
        f"`% copy BW` compares that with a {copy_mib} MiB device copy timed in this run ({bw:.0f} GB/s); "
        "`vs torch eager` = eager's median / this row's. `eager` is `backend=\"torch\"` (flowkernels' readable "
        "torch path), `compile` that path under torch.compile (measured after all other providers), the "
        "others the kernels. "
        + ("The L2 cache is flushed (a 256 MiB buffer zeroed) before every timed call, outside the timed "
           "events, so inputs come from DRAM like the copy's. `peak MB`: memory a call allocates above its "
           "inputs. " if dev == "cuda" else "No L2 flush on CPU; `peak MB` is GPU-only. ")
        + "A provider that fails at a shape has a `skipped:` row giving the reason.")
    block = None if args.no_record else ResultsBlock(
        RESULTS, f"### bench_ops ({date}, {_commit()}, {device_name}, {dt})", paragraph, COLUMNS)
    rows: list[dict] = []
    eager_ms: dict[tuple[str, int], float] = {}
    print(f"{'op':<18} {'B':>5} {'provider':<8} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>8} {'%copy':>6} "
          f"{'vs eager':>8} {'peak MB':>8}")

    def skip(name: str, B: int, prov: str, why: str) -> None:
        print(f"{name:<18} {B:>5} {prov:<8} skipped: {why}", flush=True)
        if block is not None:
            block.add([name, B, prov, f"skipped: {why}", "", "", "", "", "", ""])

    for pass_providers in (providers, late):
        for name in args.ops.split(",") if pass_providers else []:
            case = CASES[name]
            for B in batches:
                try:
                    inputs = case.make(B, dtype, dev)
                except Exception as e:  # e.g. out of memory at the largest B
                    why = _reason(e)
                    release_cuda(dev)
                    for prov in pass_providers:
                        skip(name, B, prov, why)
                    continue
                nbytes = case.bytes_moved(B, torch.finfo(dtype).bits // 8)
                for prov in pass_providers:
                    why = None
                    try:
                        med, p20, p80, peak = _measure(case, inputs, prov, dev, args.budget, flush_l2)
                    except Exception as e:  # a provider that cannot run this shape here: recorded, not fatal
                        why = _reason(e)
                    if why is not None:
                        release_cuda(dev)
                        skip(name, B, prov, why)
                        continue
                    if prov == "eager":
                        eager_ms[name, B] = med
                    ref = eager_ms.get((name, B))
                    speedup = ref / med if ref else float("nan")
                    gbs = nbytes / (med * 1e-3) / 1e9
                    row = dict(op=name, B=B, provider=prov, median_ms=med, p20=p20, p80=p80, gbs=gbs,
                               frac_copy=gbs / bw, speedup=speedup, peak_mb=peak)
                    rows.append(row)
                    print(f"{name:<18} {B:>5} {prov:<8} {med:>10.4f} {p20:>8.4f} {p80:>8.4f} {gbs:>8.2f} "
                          f"{100 * gbs / bw:>5.1f}% {_fmt(speedup, '7.2f', 'x'):>8} {_fmt(peak, '.1f'):>8}", flush=True)
                    if block is not None:
                        block.add([name, B, prov, f"{med:.4f}", f"{p20:.4f}", f"{p80:.4f}", f"{gbs:.2f}",
                                   f"{100 * gbs / bw:.1f}%", _fmt(speedup, ".2f", "x"), _fmt(peak, ".1f")])
                del inputs
    if block is not None:
        print(f"appended {block.n_rows} rows to {RESULTS}")
    return rows


def _measure(case: Case, inputs: dict, prov: str, dev: str, budget: float,
             flush_l2: bool) -> tuple[float, float, float, float]:
    """(median, p20, p80 ms, MB allocated above the inputs on CUDA / NaN) of one provider on one input set."""
    run = case.run
    if prov == "eager":
        fn = lambda a=inputs, run=run: run(a, "torch")  # noqa: E731
    elif prov == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, run=run: run(a, "torch"), dynamic=False)
        fn = lambda a=inputs, c=compiled: c(a)  # noqa: E731
    else:
        fn = lambda a=inputs, be=prov, run=run: run(a, be)  # noqa: E731
    return time_and_peak(fn, dev, budget, flush_l2)


def time_and_peak(fn: Callable[[], object], dev: str, budget: float,
                  flush_l2: bool = False) -> tuple[float, float, float, float]:
    """A first call outside the measurement (compiles), then :func:`_time`: (median, p20, p80 ms, MB
    allocated above what was allocated before the timed calls on CUDA / NaN on CPU)."""
    fn()
    base = 0
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    med, p20, p80 = quantiles(_time(fn, dev, budget_s=budget, flush_l2=flush_l2))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else float("nan")
    return med, p20, p80, peak


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
