"""Benchmark of the shared-prefix attention at π0 shapes (P 816, S 51, Hq 8, Hkv 1, d 256).

Providers (forward, and forward + backward to q, k, v, prefix_k, prefix_v):

* ``triton`` / ``triton_split`` — flowkernels' fused kernel / split kernels + lse merge (GPU only;
  the interpreter is not a benchmark);
* ``grouped`` — flowkernels' torch path (``backend="torch"``): prefix scores per observation;
* ``sdpa_expand`` — the reference's way: the prefix repeated per row and the KV heads repeated
  to Hq, concatenated with the suffix, one SDPA call with a boolean mask;
* ``sdpa_clone`` — what public π0 ports do: the prefix cache cloned per sample and concatenated
  with the suffix keys (KV heads kept, ``enable_gqa``), one SDPA call with a boolean mask;
* ``sdpa_dense`` — the reference for "% dense": SDPA alone, no mask, on q ``(B·N, Hq, S, d)`` and
  contiguous K/V ``(B·N, Hq, P + S, d)`` built once outside the timing (heads expanded), i.e. dense
  attention of the same shape with FlashAttention (or cuDNN) free to run;
* ``flex`` — ``torch.nn.attention.flex_attention`` (compiled) over *all* rows flattened into
  one sequence, with a block mask that lets a query see its observation's prefix and its own
  row's suffix: no prefix copy (skipped with a reason when unavailable or failing).

Reports median time (20/80% quantiles), TFLOP/s from counted FLOPs (dense: forward
``4·(B·N)·S·Hq·d·(P + S)``; backward 2.5× forward), peak memory on a GPU, the speed-up over
``sdpa_clone``, the TFLOP/s as a percentage of ``sdpa_dense``'s at the same shape, and for the SDPA
providers the kernel SDPA picked (``torch._fused_sdp_choice``). A provider that fails at a shape
(e.g. out of memory at the largest B·N) is skipped at that shape only, with the reason. ``flex``
compiles per shape, so it runs after every other provider at every shape: a time limit cuts it
first. Each run appends its own dated block to benchmarks/RESULTS.md, row by row as measured.

Defaults: CPU fp32, P 256, N 1/4/8/16, B·N 16/64, fwd and fwdbwd, 0.5 s per measurement; GPU
bf16, P 816, N 1/8, B·N 256/1024, fwd and fwdbwd, 0.25 s per measurement (8 shapes x 7
providers: about 2-4 minutes on an H100-class GPU, most of it Triton and flex compiles).

    python benchmarks/bench_attention.py                      # CPU default set (fp32, P 256)
    python benchmarks/bench_attention.py --groups 8 --rows 1024 --providers triton,sdpa_clone,sdpa_dense
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_ops import ResultsBlock, _commit, _device_name, _fmt, _reason, release_cuda, time_and_peak

import flowkernels as fk

RESULTS = Path(__file__).with_name("RESULTS.md")
S, HQ, HKV, D = 51, 8, 1, 256
PROVIDERS = ("triton", "triton_split", "grouped", "sdpa_expand", "sdpa_clone", "sdpa_dense", "flex")
BASELINES = ("sdpa_dense", "sdpa_clone")  # measured first at every shape: the ratios refer to them
LATE = ("flex",)  # compiled per shape: measured after every other provider at every shape
# torch.nn.attention.SDPBackend values, as torch._fused_sdp_choice returns them
SDPA_KERNELS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


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


def sdpa_kernel(q, k, v, attn_mask=None, enable_gqa: bool = False) -> str:
    """The kernel SDPA picks for these inputs (``torch._fused_sdp_choice``), "?" when it cannot be asked."""
    try:
        try:
            choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)
        except TypeError:  # a torch whose _fused_sdp_choice has no enable_gqa
            if enable_gqa and q.shape[-3] != k.shape[-3]:
                return "?"
            choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask)
        return SDPA_KERNELS.get(int(choice), f"?{int(choice)}")
    except Exception:
        return "?"


def _sdpa(q, k, v, mask, gqa: bool, note: dict | None) -> torch.Tensor:
    """One SDPA call; ``note["kernel"]`` gets the kernel SDPA picks, asked once (on the untimed first call)."""
    if note is not None and "kernel" not in note:
        note["kernel"] = sdpa_kernel(q, k, v, mask, gqa)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run_sdpa_expand(a: dict, note: dict | None = None) -> torch.Tensor:
    n, rep = a["N"], HQ // HKV
    keys = torch.cat([a["pk"].repeat_interleave(n, 0), a["k"]], 1).repeat_interleave(rep, 2)
    vals = torch.cat([a["pv"].repeat_interleave(n, 0), a["v"]], 1).repeat_interleave(rep, 2)
    out = _sdpa(a["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), _sdpa_mask(a), False, note)
    return out.transpose(1, 2)


def run_sdpa_clone(a: dict, note: dict | None = None) -> torch.Tensor:
    n = a["N"]
    # per-sample copy of the prefix cache (a "cache.clone()" per row), then concatenation
    pk = a["pk"][:, None].expand(-1, n, -1, -1, -1).clone().flatten(0, 1)
    pv = a["pv"][:, None].expand(-1, n, -1, -1, -1).clone().flatten(0, 1)
    keys, vals = torch.cat([pk, a["k"]], 1), torch.cat([pv, a["v"]], 1)
    out = _sdpa(a["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), _sdpa_mask(a), HQ != HKV, note)
    return out.transpose(1, 2)


def make_dense(a: dict, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sdpa_dense's inputs, built once outside the timing: contiguous q ``(B·N, Hq, S, d)`` and K/V
    ``(B·N, Hq, P + S, d)`` (the rows' prefix and suffix keys, KV heads repeated to Hq), fresh leaves."""
    n, rep = a["N"], HQ // HKV
    with torch.no_grad():
        keys = torch.cat([a["pk"].repeat_interleave(n, 0), a["k"]], 1).repeat_interleave(rep, 2)
        vals = torch.cat([a["pv"].repeat_interleave(n, 0), a["v"]], 1).repeat_interleave(rep, 2)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (a["q"], keys, vals))
        del keys, vals
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)


def run_sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, note: dict | None = None) -> torch.Tensor:
    """Dense attention, no mask: ``(B·N, Hq, S, d)`` out. Same counted FLOPs as every other provider."""
    return _sdpa(q, k, v, None, False, note)


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
    torch._dynamo.reset()  # a new shape every call: without this the recompile limit sends flex to eager
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


def _runner(prov: str, a: dict, gout: torch.Tensor, mode: str) -> tuple[Callable[[], object], dict]:
    """The timed call of one provider (fwd, or fwd + backward with ``gout``) and the note its SDPA call fills."""
    note: dict = {}
    grad = mode == "fwdbwd"
    if prov == "sdpa_dense":
        q, k, v = make_dense(a, grad)
        ins, g = (q, k, v), (gout.transpose(1, 2).contiguous() if grad else None)

        def run():
            return run_sdpa_dense(q, k, v, note)
    else:
        if prov == "flex":
            r = make_flex(a)
        elif prov in ("triton", "grouped"):
            r = run_flowkernels("triton" if prov == "triton" else "torch")
        elif prov == "triton_split":
            r = run_flowkernels("triton", "split")
        elif prov == "sdpa_expand":
            r = lambda a: run_sdpa_expand(a, note)  # noqa: E731  (looked up now: tests patch it)
        elif prov == "sdpa_clone":
            r = lambda a: run_sdpa_clone(a, note)  # noqa: E731
        else:
            raise ValueError(f"unknown provider {prov!r}")
        ins, g = tuple(a[x] for x in ("q", "k", "v", "pk", "pv")), gout

        def run():
            return r(a)
    if not grad:
        def fn():
            with torch.no_grad():
                return run()
    else:
        def fn():
            return torch.autograd.grad(run(), ins, g)
    return fn, note


def measure(prov: str, a: dict, gout: torch.Tensor, mode: str, dev: str,
            budget: float) -> tuple[float, float, float, float, str]:
    """(median, p20, p80 ms, MB allocated above the inputs on CUDA / NaN, SDPA kernel or "")."""
    fn, note = _runner(prov, a, gout, mode)
    med, p20, p80, peak = time_and_peak(fn, dev, budget)
    return med, p20, p80, peak, note.get("kernel", "")


COLUMNS = ["mode", "N", "B·N", "P", "provider", "median ms", "p20", "p80", "TFLOP/s", "% dense", "vs sdpa_clone",
           "peak MB", "kernel"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--groups", default=None, help="comma list of N, rows per observation (default CPU 1,4,8,16; "
                                                  "GPU 1,8)")
    p.add_argument("--rows", default=None, help="comma list of B·N (default CPU 16,64; GPU 256,1024)")
    p.add_argument("--prefix", type=int, default=None, help="P (default CPU 256, GPU 816)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default CPU float32, GPU bfloat16)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all that can run)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per measurement (default CPU 0.5, GPU 0.25)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    dev = args.device
    if dev not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    gpu = dev == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    P = args.prefix if args.prefix is not None else (816 if gpu else 256)  # 0 is an error, not the default
    budget = args.budget if args.budget is not None else (0.25 if gpu else 0.5)
    try:
        rows_list = [int(x) for x in (args.rows or ("256,1024" if gpu else "16,64")).split(",")]
        groups = [int(x) for x in (args.groups or ("1,8" if gpu else "1,4,8,16")).split(",")]
    except ValueError:
        p.error(f"--rows and --groups must be comma-separated ints, got {args.rows!r}, {args.groups!r}")
    modes = args.modes.split(",")
    providers = list(PROVIDERS) if args.providers is None else args.providers.split(",")
    problems = [f"unknown --providers {sorted(set(providers) - set(PROVIDERS))} (known: {list(PROVIDERS)})"
                for _ in [0] if set(providers) - set(PROVIDERS)]
    problems += [f"unknown --modes {sorted(set(modes) - {'fwd', 'fwdbwd'})} (known: fwd, fwdbwd)"
                 for _ in [0] if set(modes) - {"fwd", "fwdbwd"}]
    if P < 1 or min(rows_list) < 1 or min(groups) < 1 or not budget > 0:
        problems.append(f"--prefix, --rows, --groups must be >= 1 and --budget > 0 (got {P}, {rows_list}, "
                        f"{groups}, {budget})")
    elif not any(bn % n == 0 for bn in rows_list for n in groups):
        problems.append(f"no --rows value {rows_list} is a multiple of a --groups value {groups} (B·N = B x N)")
    if problems:
        p.error("; ".join(problems))
    if not gpu:
        skipped = [x for x in providers if x.startswith("triton")]
        if skipped:
            print(f"# skipping {skipped}: Triton kernels need a GPU (the interpreter is not a benchmark)")
        providers = [x for x in providers if not x.startswith("triton")]
    providers = list(dict.fromkeys(providers))
    first = [x for x in BASELINES if x in providers] + [x for x in providers if x not in BASELINES + LATE]
    late = [x for x in providers if x in LATE]
    shapes = [(mode, N, BN) for mode in modes for N in groups for BN in rows_list if BN % N == 0]
    fk.set_value_checks(False)
    device_name = _device_name(dev)
    dt = str(dtype).replace("torch.", "")
    print(f"# device: {device_name}; dtype {dt}; P {P}, S {S}, Hq {HQ}, Hkv {HKV}, d {D}; {len(shapes)} shapes; "
          f"providers {first + late}; {budget} s per measurement", flush=True)
    paragraph = (
        f"Shared-prefix attention (benchmarks/bench_attention.py): S {S}, Hq {HQ}, Hkv {HKV}, d {D}, π0 suffix "
        "mask, the full prefix of P keys shared by the N rows of an observation. `fwd` forward, `fwdbwd` forward + "
        "backward to q, k, v and the prefix K/V (sdpa_dense: to its own q, k, v). `median ms` (p20, p80) per call; "
        "TFLOP/s (4 significant digits) from dense counted FLOPs (fwd 4·B·N·S·Hq·d·(P+S), bwd 2.5× fwd), the "
        "same count for every provider; `% dense` = TFLOP/s / sdpa_dense's at the same mode, N, B·N "
        "(sdpa_dense: one unmasked SDPA call on contiguous K/V of the same shape, heads expanded, built outside "
        "the timing: the dense-attention "
        "reference); `vs sdpa_clone` = speed-up over SDPA on a per-sample prefix copy (what public π0 ports do); "
        "`peak MB`: memory a call allocates above its inputs (GPU only); `kernel`: the kernel SDPA picked "
        "(torch._fused_sdp_choice; SDPA providers only). A provider that fails at a shape has a `skipped:` row "
        "with the reason; flex (compiled per shape) is measured after every other provider at every shape.")
    block = None if args.no_record else ResultsBlock(
        RESULTS, f"### bench_attention ({_dt.date.today().isoformat()}, {_commit()}, {device_name}, {dt})",
        paragraph, COLUMNS)
    print(f"{'mode':<7} {'N':>3} {'B·N':>5} {'provider':<13} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} "
          f"{'%dense':>7} {'vs clone':>8} {'peak MB':>8} kernel")
    rows: list[dict] = []
    base: dict[tuple[str, int, int], dict[str, float]] = {}  # shape -> baseline provider -> median ms

    def skip(mode: str, N: int, BN: int, prov: str, why: str) -> None:
        print(f"{mode:<7} {N:>3} {BN:>5} {prov:<13} skipped: {why}", flush=True)
        if block is not None:
            block.add([mode, N, BN, P, prov, f"skipped: {why}", "", "", "", "", "", "", ""])

    def emit(r: dict) -> None:
        ref = base.get((r["mode"], r["N"], r["BN"]), {})
        r["vs_clone"] = ref["sdpa_clone"] / r["median_ms"] if "sdpa_clone" in ref else float("nan")
        r["pct_dense"] = (100 * r["tflops"] / (flops(r["B"], r["N"], P, r["mode"]) / (ref["sdpa_dense"] * 1e-3) / 1e12)
                          if "sdpa_dense" in ref else float("nan"))
        rows.append(r)
        print(f"{r['mode']:<7} {r['N']:>3} {r['BN']:>5} {r['provider']:<13} {r['median_ms']:>10.3f} {r['p20']:>9.3f} "
              f"{r['p80']:>9.3f} {r['tflops']:>8.3f} {_fmt(r['pct_dense'], '6.1f', '%'):>7} "
              f"{_fmt(r['vs_clone'], '7.2f', 'x'):>8} {_fmt(r['peak_mb'], '.1f'):>8} {r['kernel']}", flush=True)
        if block is not None:
            block.add([r["mode"], r["N"], r["BN"], P, r["provider"], f"{r['median_ms']:.3f}", f"{r['p20']:.3f}",
                       f"{r['p80']:.3f}", f"{r['tflops']:.4g}", _fmt(r["pct_dense"], ".1f", "%"),
                       _fmt(r["vs_clone"], ".2f", "x"), _fmt(r["peak_mb"], ".1f"), r["kernel"]])

    for phase in (first, late):
        n_base = sum(x in BASELINES for x in phase)
        for mode, N, BN in shapes if phase else []:
            B = BN // N
            why = None
            try:
                a = make_inputs(B, N, P, dtype, dev, grad=mode == "fwdbwd")
                gout = torch.randn(BN, S, HQ, D, device=dev, dtype=dtype)
            except Exception as e:  # e.g. out of memory at the largest B·N
                why = _reason(e)
            if why is not None:
                release_cuda(dev)
                for prov in phase:
                    skip(mode, N, BN, prov, why)
                continue
            pending: list[dict] = []  # rows waiting for this shape's baselines
            for i, prov in enumerate(phase):
                why = None
                try:
                    med, p20, p80, peak, kernel = measure(prov, a, gout, mode, dev, budget)
                except Exception as e:  # a provider that cannot run this shape here: recorded, not fatal
                    why = _reason(e)
                if why is not None:
                    release_cuda(dev)
                    skip(mode, N, BN, prov, why)
                else:
                    if prov in BASELINES:
                        base.setdefault((mode, N, BN), {})[prov] = med
                    pending.append(dict(mode=mode, N=N, BN=BN, B=B, P=P, provider=prov, median_ms=med, p20=p20,
                                        p80=p80, tflops=flops(B, N, P, mode) / (med * 1e-3) / 1e12, peak_mb=peak,
                                        kernel=kernel))
                if i >= n_base - 1:
                    for r in pending:
                        emit(r)
                    pending.clear()
            del a, gout
    _print_summary(rows)
    if block is not None:
        print(f"appended {block.n_rows} rows to {RESULTS}")
    return rows


def _gmean(xs: list[float]) -> float:
    return statistics.geometric_mean(xs) if xs else float("nan")


def _print_summary(rows: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r)
    print("# geometric means over the shapes where both the provider and the reference ran (n = shapes):")
    for prov, rs in by.items():
        vc = [r["vs_clone"] for r in rs if math.isfinite(r["vs_clone"]) and r["vs_clone"] > 0]
        pd = [r["pct_dense"] for r in rs if math.isfinite(r["pct_dense"]) and r["pct_dense"] > 0]
        print(f"#   {prov:<13} vs sdpa_clone {_fmt(_gmean(vc), '.2f', 'x')} (n {len(vc)}), "
              f"% dense {_fmt(_gmean(pd), '.1f', '%')} (n {len(pd)}); {len(rs)} shapes measured")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
