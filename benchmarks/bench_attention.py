"""Benchmark of the shared-prefix attention at π0 shapes (P 816, S 51, Hq 8, Hkv 1, d 256).

Providers (forward, and forward + backward to q, k, v, prefix_k, prefix_v):

* ``triton`` / ``triton_split`` — flowkernels' fused kernel / split kernels + lse merge (GPU only;
  the interpreter is not a benchmark);
* ``grouped`` — flowkernels' torch path (``backend="torch"``): prefix scores per observation;
* ``sdpa_expand`` — the reference's way: the prefix repeated per row and the KV heads repeated
  to Hq, concatenated with the suffix, one SDPA call with a boolean mask;
* ``sdpa_clone`` — what public π0 ports do: the prefix cache cloned per sample and concatenated
  with the suffix keys (KV heads kept, ``enable_gqa``), one SDPA call with a boolean mask;
* ``flex`` — ``torch.nn.attention.flex_attention`` (compiled) over *all* rows flattened into
  one sequence, with a block mask that lets a query see its observation's prefix and its own
  row's suffix: no prefix copy (skipped with a reason when unavailable or failing).

Reports median time (20/80% quantiles), TFLOP/s from counted FLOPs (dense: forward
``4·(B·N)·S·Hq·d·(P + S)``; backward 2.5× forward), peak memory on a GPU, and the ratio to
``sdpa_clone``. Rows are appended to benchmarks/RESULTS.md with date, commit and device.

    python benchmarks/bench_attention.py                      # CPU default set (fp32, P 256)
    python benchmarks/bench_attention.py --groups 8 --rows 1024 --providers triton,sdpa_clone
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_ops import _commit, _device_name, _time, quantiles

import flowkernels as fk

RESULTS = Path(__file__).with_name("RESULTS.md")
S, HQ, HKV, D = 51, 8, 1, 256
PROVIDERS = ("triton", "triton_split", "grouped", "sdpa_expand", "sdpa_clone", "flex")


def pi0_suffix_mask(s: int, device: str) -> torch.Tensor:
    """π0's suffix mask: the state token (index 0) sees only itself; action tokens see all."""
    m = torch.ones(s, s, dtype=torch.bool, device=device)
    m[0, 1:] = False
    return m


def make_inputs(B: int, N: int, P: int, dtype: torch.dtype, dev: str, grad: bool) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype).requires_grad_(grad)

    return dict(q=r(B * N, S, HQ, D), k=r(B * N, S, HKV, D), v=r(B * N, S, HKV, D), pk=r(B, P, HKV, D),
                pv=r(B, P, HKV, D), smask=pi0_suffix_mask(S, dev), N=N, B=B, P=P)


def _sdpa_mask(a: dict) -> torch.Tensor:
    P = a["P"]
    pre = torch.ones(S, P, dtype=torch.bool, device=a["q"].device)
    return torch.cat([pre, a["smask"]], 1)[None, None]  # (1, 1, S, P + S)


def run_sdpa_expand(a: dict) -> torch.Tensor:
    n, rep = a["N"], HQ // HKV
    keys = torch.cat([a["pk"].repeat_interleave(n, 0), a["k"]], 1).repeat_interleave(rep, 2)
    vals = torch.cat([a["pv"].repeat_interleave(n, 0), a["v"]], 1).repeat_interleave(rep, 2)
    out = F.scaled_dot_product_attention(a["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                         attn_mask=_sdpa_mask(a))
    return out.transpose(1, 2)


def run_sdpa_clone(a: dict) -> torch.Tensor:
    n = a["N"]
    # per-sample copy of the prefix cache (a "cache.clone()" per row), then concatenation
    pk = a["pk"][:, None].expand(-1, n, -1, -1, -1).clone().flatten(0, 1)
    pv = a["pv"][:, None].expand(-1, n, -1, -1, -1).clone().flatten(0, 1)
    keys, vals = torch.cat([pk, a["k"]], 1), torch.cat([pv, a["v"]], 1)
    out = F.scaled_dot_product_attention(a["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                         attn_mask=_sdpa_mask(a), enable_gqa=HQ != HKV)
    return out.transpose(1, 2)


def run_flowkernels(backend: str, impl: str = "fused") -> Callable[[dict], torch.Tensor]:
    def run(a: dict) -> torch.Tensor:
        if impl == "split":
            from flowkernels.ops.triton_attention import prefix_attention_triton

            return prefix_attention_triton(a["q"], a["k"], a["v"], a["pk"], a["pv"], None, a["smask"], a["N"],
                                           D**-0.5, "split")[0]
        return fk.prefix_attention(a["q"], a["k"], a["v"], a["pk"], a["pv"], suffix_mask=a["smask"],
                                   group_size=a["N"], backend=backend)

    return run


def make_flex(a: dict) -> Callable[[dict], torch.Tensor]:
    """flex_attention over one flattened sequence: queries (B·N·S), keys (B·P prefix ++ B·N·S)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, N, P, dev = a["B"], a["N"], a["P"], a["q"].device
    BPk = B * P
    smask = a["smask"]

    def mask_mod(b, h, q_idx, kv_idx):
        row = q_idx // S
        is_pre = kv_idx < BPk
        pre_ok = (kv_idx // P) == (row // N)
        kv2 = (kv_idx - BPk).clamp(min=0)
        suf_ok = ((kv2 // S) == row) & smask[q_idx % S, kv2 % S]
        return torch.where(is_pre, pre_ok, suf_ok)

    shape = (None, None, B * N * S, BPk + B * N * S)
    try:  # compiled mask construction (no dense Q×KV mask); some torch versions fail on it
        bm = torch.compile(create_block_mask)(mask_mod, *shape, device=dev)
    except Exception:
        bm = create_block_mask(mask_mod, *shape, device=dev)
    flex = torch.compile(flex_attention)

    def run(a: dict) -> torch.Tensor:
        q = a["q"].reshape(1, B * N * S, HQ, D).transpose(1, 2)
        k = torch.cat([a["pk"].reshape(1, BPk, HKV, D), a["k"].reshape(1, B * N * S, HKV, D)], 1).transpose(1, 2)
        v = torch.cat([a["pv"].reshape(1, BPk, HKV, D), a["v"].reshape(1, B * N * S, HKV, D)], 1).transpose(1, 2)
        out = flex(q, k, v, block_mask=bm, enable_gqa=HQ != HKV)
        return out.transpose(1, 2).reshape(B * N, S, HQ, D)

    return run


def flops(B: int, N: int, P: int, mode: str) -> float:
    fwd = 4.0 * B * N * S * HQ * D * (P + S)
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--groups", default="1,4,8,16", help="comma list of N (rows per observation)")
    p.add_argument("--rows", default=None, help="comma list of B·N (default CPU 16,64; GPU 64,256,1024)")
    p.add_argument("--prefix", type=int, default=None, help="P (default CPU 256, GPU 816)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default CPU float32, GPU bfloat16)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all that can run)")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    dev = args.device
    if dev not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    P = args.prefix if args.prefix is not None else (816 if dev == "cuda" else 256)  # 0 is an error, not the default
    try:
        rows_list = [int(x) for x in (args.rows or ("64,256,1024" if dev == "cuda" else "16,64")).split(",")]
        groups = [int(x) for x in args.groups.split(",")]
    except ValueError:
        p.error(f"--rows and --groups must be comma-separated ints, got {args.rows!r}, {args.groups!r}")
    modes = args.modes.split(",")
    providers = list(PROVIDERS) if args.providers is None else args.providers.split(",")
    problems = [f"unknown --providers {sorted(set(providers) - set(PROVIDERS))} (known: {list(PROVIDERS)})"
                for _ in [0] if set(providers) - set(PROVIDERS)]
    problems += [f"unknown --modes {sorted(set(modes) - {'fwd', 'fwdbwd'})} (known: fwd, fwdbwd)"
                 for _ in [0] if set(modes) - {"fwd", "fwdbwd"}]
    if P < 1 or min(rows_list) < 1 or min(groups) < 1 or not args.budget > 0:
        problems.append(f"--prefix, --rows, --groups must be >= 1 and --budget > 0 (got {P}, {rows_list}, "
                        f"{groups}, {args.budget})")
    elif not any(bn % n == 0 for bn in rows_list for n in groups):
        problems.append(f"no --rows value {rows_list} is a multiple of a --groups value {groups} (B·N = B x N)")
    if problems:
        p.error("; ".join(problems))
    if dev != "cuda":
        skipped = [x for x in providers if x.startswith("triton")]
        if skipped:
            print(f"# skipping {skipped}: Triton kernels need a GPU (the interpreter is not a benchmark)")
        providers = [x for x in providers if not x.startswith("triton")]
    fk.set_value_checks(False)
    device_name = _device_name(dev)
    dt = str(dtype).replace("torch.", "")
    print(f"# device: {device_name}; dtype {dt}; P {P}, S {S}, Hq {HQ}, Hkv {HKV}, d {D}; providers {providers}",
          flush=True)
    print(f"{'mode':<7} {'N':>3} {'B·N':>5} {'provider':<13} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} "
          f"{'peak MB':>8} {'vs clone':>8}")
    rows: list[dict] = []
    skip_reason: dict[tuple[str, str], str] = {}
    for mode in modes:
        for N in groups:
            for BN in rows_list:
                if BN % N:
                    continue
                B = BN // N
                a = make_inputs(B, N, P, dtype, dev, grad=mode == "fwdbwd")
                gout = torch.randn(BN, S, HQ, D, device=dev, dtype=dtype)
                base_ms = None
                for prov in sorted(providers, key=lambda x: x != "sdpa_clone"):  # baseline first
                    if (mode, prov) in skip_reason:
                        continue
                    try:
                        if prov == "flex":
                            run = make_flex(a)
                        elif prov in ("triton", "grouped"):
                            run = run_flowkernels("triton" if prov == "triton" else "torch")
                        elif prov == "triton_split":
                            run = run_flowkernels("triton", "split")
                        else:
                            run = {"sdpa_expand": run_sdpa_expand, "sdpa_clone": run_sdpa_clone}[prov]
                        if mode == "fwd":
                            def fn(run=run, a=a):
                                with torch.no_grad():
                                    return run(a)
                        else:
                            ins = [a[x] for x in ("q", "k", "v", "pk", "pv")]

                            def fn(run=run, a=a, ins=ins, gout=gout):
                                return torch.autograd.grad(run(a), ins, gout)
                        fn()  # compile / first call outside the measurement
                        if dev == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        med, p20, p80 = quantiles(_time(fn, dev, budget_s=args.budget))
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else float("nan")
                    except Exception as e:  # flex / a provider that cannot run here
                        msg = str(e).splitlines()[0][:160] if str(e) else ""
                        skip_reason[mode, prov] = f"{type(e).__name__}: {msg}".replace("|", "/")
                        print(f"# skipping {prov} ({mode}): {skip_reason[mode, prov]}", flush=True)
                        continue
                    base_ms = med if prov == "sdpa_clone" else base_ms
                    ratio = base_ms / med if base_ms else float("nan")
                    tfs = flops(B, N, P, mode) / (med * 1e-3) / 1e12
                    row = dict(mode=mode, N=N, BN=BN, P=P, provider=prov, median_ms=med, p20=p20, p80=p80, tflops=tfs,
                               peak_mb=peak, vs_clone=ratio)
                    rows.append(row)
                    print(f"{mode:<7} {N:>3} {BN:>5} {prov:<13} {med:>10.3f} {p20:>9.3f} {p80:>9.3f} {tfs:>8.3f} "
                          f"{peak:>8.1f} {ratio:>7.2f}x", flush=True)
                del a
    _print_summary(rows)
    if not args.no_record and rows:
        record(rows, device_name, dt, skip_reason)
    return rows


def _print_summary(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r["vs_clone"])
    print("# geometric-mean speed-up vs sdpa_clone: " + ", ".join(
        f"{k} {statistics.geometric_mean(v):.2f}x" for k, v in by.items() if all(x > 0 for x in v)))


def record(rows: list[dict], device_name: str, dt: str, skip_reason: dict[tuple[str, str], str]) -> None:
    date = _dt.date.today().isoformat()
    commit = _commit()
    lines = []
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if "## bench_attention" not in text:
        lines += ["", "## bench_attention", "",
                  "Shared-prefix attention (benchmarks/bench_attention.py): S 51, Hq 8, Hkv 1, d 256, π0 suffix mask,",
                  "full prefix. TFLOP/s from dense counted FLOPs (fwd 4·B·N·S·Hq·d·(P+S), bwd 2.5× fwd);",
                  "`vs sdpa_clone` is the speed-up over SDPA on a per-sample prefix copy (what public π0 ports do).",
                  "",
                  "| date | commit | device | dtype | mode | N | B·N | P | provider | median ms | p20 | p80 | TFLOP/s "
                  "| peak MB | vs sdpa_clone |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.1f}"
        lines.append(f"| {date} | {commit} | {device_name} | {dt} | {r['mode']} | {r['N']} | {r['BN']} | {r['P']} | "
                     f"{r['provider']} | {r['median_ms']:.3f} | {r['p20']:.3f} | {r['p80']:.3f} | {r['tflops']:.3f} | "
                     f"{peak} | {r['vs_clone']:.2f}x |")
    for (mode, prov), why in skip_reason.items():
        lines.append(f"| {date} | {commit} | {device_name} | {dt} | {mode} | - | - | - | {prov} | skipped: {why} "
                     "| | | | | |")
    with RESULTS.open("a") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + "\n".join(lines) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
