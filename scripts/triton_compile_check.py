"""Compile every Triton kernel of flowkernels for a CUDA GPU, on a machine without one.

Each launcher of ``flowkernels.ops.triton_kernels`` and ``flowkernels.ops.triton_attention`` is
called with CPU tensors at the shapes, dtypes and flags the library uses, while Triton's active
driver is replaced by a stand-in that reports a CUDA target (default sm_90: H100/H200) and that
device's limits but launches nothing. Triton's real compiler runs its whole pipeline for every
specialization (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin by the ptxas bundled with Triton), and
its own load-time checks run against the stand-in's limits: shared memory per block, and threads
per block given the registers ptxas allocated. Per compiled kernel the report gives warps,
stages, shared memory, registers, local memory and stack frame (spills) as ``cuobjdump -res-usage``
reads them from the cubin.

What it does not check: results (nothing runs; the GPU tests do that, ``pytest -m gpu``), and
anything the CUDA driver decides at load time beyond these limits.

    python scripts/triton_compile_check.py                  # everything, sm_90
    python scripts/triton_compile_check.py --arch 80,90     # A100 and H100/H200
    python scripts/triton_compile_check.py --quick          # the pi0 hot paths only (CI)

Exit status 1 when a kernel fails to compile or exceeds a limit. TRITON_INTERPRET is forced off
for this process (the kernels must be defined for compilation, not for the interpreter).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Per-block limits of the CUDA devices we target: opt-in shared memory per block (bytes) and
# registers per SM. sm_90: H100/H200 (227 KiB); sm_80: A100 (163 KiB); sm_86/sm_89: consumer
# Ampere/Ada and L4/L40 (99 KiB).
DEVICE_LIMITS = {
    80: {"max_shared_mem": 166912, "max_num_regs": 65536, "multiprocessor_count": 108},
    86: {"max_shared_mem": 101376, "max_num_regs": 65536, "multiprocessor_count": 84},
    89: {"max_shared_mem": 101376, "max_num_regs": 65536, "multiprocessor_count": 142},
    90: {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132},
}


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


@functools.cache
def resource_usage(cubin: bytes) -> dict[str, int]:
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of the single kernel in ``cubin`` (empty if unknown).

    Cached: Triton's load check (``load_binary``) and the report ask for the same cubin."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def max_threads(regs: int, warp_size: int = 32, regs_per_sm: int = 65536) -> int:
    """Largest block (threads) the registers allow: registers are allocated per warp in units of 256."""
    per_warp = max(256, math.ceil(regs * warp_size / 256) * 256)
    return min(1024, (regs_per_sm // per_warp) * warp_size)


class _Utils:
    def __init__(self, arch: int) -> None:
        self.limits = DEVICE_LIMITS[arch]

    def get_device_properties(self, device: int) -> dict[str, int]:
        return dict(self.limits, warpSize=32)

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int):
        usage = resource_usage(kernel)
        regs = usage.get("REG", 0)
        spills = usage.get("LOCAL", 0)
        return object(), object(), regs, spills, max_threads(regs, regs_per_sm=self.limits["max_num_regs"])

    def unload_module(self, module: object) -> None:
        pass


class CompileOnlyDriver:
    """Triton driver stand-in: a CUDA target and its limits; launches are no-ops."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None


# ----------------------------------------------------------------------------------------------
# The launches
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    name: str
    fn: Callable[..., object]
    args: tuple

    def run(self) -> None:
        self.fn(*self.args)


def _elementwise_cases(quick: bool) -> Iterator[Case]:
    """The launches of the element-wise kernels (a generator: each case runs before the next is built)."""
    from flowkernels.ops import triton_kernels as tk

    dtypes = ["bf16", "fp32"] if quick else list(DTYPES)
    # (H, D): pi0's chunk (one 2048-element block, 8 warps) and a small odd one (16 lanes, 1 warp).
    shapes = [(50, 32)] if quick else [(50, 32), (5, 3)]
    B, K, N = 3, 4, 2

    for dn, (H, D) in itertools.product(dtypes, shapes):
        dt = DTYPES[dn]

        def r(*shape: int, dt: torch.dtype = dt) -> torch.Tensor:
            return torch.randn(*shape).to(dt)

        sm, dm = torch.ones(1, H), torch.ones(1, D)
        x, v, t = r(B, H, D), r(B, H, D), torch.full((B,), 0.5)
        tag = f"{dn} H{H} D{D}"
        flow_modes = [(1, False), (2, True)] if quick else [(0, False), (1, False), (1, True), (2, False), (2, True)]
        for mode, has_noise in flow_modes:
            noise = r(B, H, D) if has_noise else None
            std = r(B, H, D).abs() if mode == 2 else None
            yield Case(
                f"flow_step mode={mode} noise={has_noise} {tag}",
                tk.flow_step_fwd,
                (x, v, t, 0.1, mode, noise, std, 3, 0, 0.5, sm, dm),
            )
        chain = r(B, K + 1, H, D)
        tg = torch.linspace(1, 0, K + 1)
        steps = torch.tensor([0, 2, 3])
        variants = (
            [(1, None, False, False), (2, steps, True, True)]
            if quick
            else [
                (m, s, inc, one)
                for m in (1, 2)
                for s, one in ((None, False), (steps, False), (steps, True))
                for inc in (False, True)
            ]
        )
        for mode, st, inc, one in variants:
            vk = r(B, 1 if one else K, H, D)
            std = r(B, K, H, D).abs() if mode == 2 else None
            has = st is not None
            yield Case(
                f"chain_logprob_fwd mode={mode} steps={has} v_one={one} initial={inc} {tag}",
                tk.chain_logprob_fwd,
                (chain, vk, tg, mode, std, st, inc, 0.5, sm, dm),
            )
            if inc:  # the backward has no include_initial flag: once per (mode, steps, v_one)
                yield Case(
                    f"chain_logprob_bwd mode={mode} steps={has} v_one={one} {tag}",
                    tk.chain_logprob_bwd,
                    (torch.randn(B, K + 1), chain, vk, tg, mode, std, st, 0.5, sm, dm),
                )
        A, n, vp = r(B, H, D), r(B, N, H, D), r(B, N, H, D)
        inv = torch.full((B,), 1.0 / (H * D))
        yield Case(f"cfm_loss_fwd {tag}", tk.cfm_loss_fwd, (A, n, vp, sm, dm, inv))
        yield Case(f"cfm_loss_bwd {tag}", tk.cfm_loss_bwd, (torch.randn(B, N), A, n, vp, sm, dm, inv))
        yield Case(f"cfm_interpolate {tag}", tk.cfm_interpolate_fwd, (A, n, torch.rand(B, N)))


def _attention_cases(quick: bool) -> Iterator[Case]:
    """The launches of the attention kernels (a generator, as above)."""
    from flowkernels.ops import triton_attention as ta

    # pi0: Hq 8, Hkv 1, d 256; the other head dims take the other tile configurations.
    dims = [256] if quick else [64, 128, 256]
    dtypes = ["bf16", "fp32"] if quick else list(DTYPES)
    masks = [(True, True)] if quick else [(True, True), (False, False)]
    B, N, S, P, Hq, Hkv = 2, 4, 51, 97, 8, 1
    for d, dn, (has_valid, has_smask) in itertools.product(dims, dtypes, masks):
        dt = DTYPES[dn]
        q = torch.randn(B * N, S, Hq, d).to(dt)
        k, v = (torch.randn(B * N, S, Hkv, d).to(dt) for _ in range(2))
        pk, pv = (torch.randn(B, P, Hkv, d).to(dt) for _ in range(2))
        valid = torch.ones(B, P, dtype=torch.uint8) if has_valid else None
        smask = torch.ones(S, S, dtype=torch.uint8) if has_smask else None
        cfg = ta._config(d, dt, None, None)
        scale = d**-0.5
        tag = f"d={d} {dn} valid={has_valid} suffix_mask={has_smask}"
        impls = ["fused"] if quick else ["fused", "split"]
        for impl in impls:
            yield Case(
                f"attention fwd {impl} {tag}", ta._forward, (q, k, v, pk, pv, valid, smask, N, scale, impl, cfg, True)
            )
        # out, lse, dout, dlse of the backward: any values (nothing runs), the right shapes and dtypes.
        out, dout, lse, dlse = (
            torch.randn_like(q),
            torch.randn_like(q),
            torch.randn(q.shape[:3]),
            torch.randn(q.shape[:3]),
        )
        yield Case(
            f"attention bwd (dq, prefix dk/dv, suffix dk/dv) {tag}",
            ta._backward,
            (q, k, v, pk, pv, valid, smask, out, lse, dout, dlse, N, scale, cfg, (True,) * 5, True),
        )


def _kernels() -> list:
    from flowkernels.ops import triton_attention as ta
    from flowkernels.ops import triton_kernels as tk

    return [
        getattr(m, n)
        for m in (tk, ta)
        for n in sorted(vars(m))
        if n.endswith("_kernel") and isinstance(getattr(m, n), triton.runtime.jit.JITFunction)
    ]


def _compiled(kernel) -> list:
    out = []
    for cache in kernel.device_caches.values():
        out.extend(cache[0].values())
    return out


@dataclass
class Row:
    arch: int
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    shared: int
    regs: int
    local: int
    stack: int
    tiles: str  # the block-size constexprs, e.g. "BLOCK_M=64 BLOCK_N=32 BLOCK_D=256"
    fits: bool  # False: over the device's limits; the launcher then retried with smaller tiles


def all_cases(quick: bool) -> Iterator[Case]:
    """Every launch of the library's Triton kernels (``quick``: pi0's hot paths only)."""
    yield from _elementwise_cases(quick)
    yield from _attention_cases(quick)


def _forget_device_properties() -> None:
    """Triton caches a device's shared-memory limit by device index: drop it when the target changes."""
    from triton.compiler import compiler

    cached = getattr(compiler, "max_shared_mem", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def run(arch: int, cases: Iterable[Case]) -> tuple[list[Row], list[str], float]:
    """Compile ``cases`` for ``sm_<arch>``: ``(rows, failures, seconds)``; one row per compiled kernel."""
    from triton.runtime.driver import driver

    from flowkernels.ops import triton_attention as ta
    from flowkernels.ops import triton_kernels as tk

    previous = driver._active
    driver.set_active(CompileOnlyDriver(arch))
    _forget_device_properties()
    ta._FITTED.clear()  # tiles fitted to the previous target (the stand-in's device is always "cpu")
    check_device = tk._check_device
    # The launchers refuse CPU tensors outside the interpreter; here nothing is launched.
    tk._check_device = lambda device, **tensors: None
    rows: list[Row] = []
    failures: list[str] = []
    kernels = _kernels()
    for kern in kernels:
        kern.device_caches.clear()
    t0 = time.perf_counter()
    try:
        for case in cases:
            seen = {id(c) for kern in kernels for c in _compiled(kern)}
            try:
                case.run()
            except Exception as exc:  # a compile error or an OutOfResources from the load checks
                msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                failures.append(f"sm_{arch} {case.name}: {msg[-2000:]}")
                print(f"FAIL sm_{arch} {case.name}\n{msg[-2000:]}", flush=True)
                continue
            for kern in kernels:
                for c in _compiled(kern):
                    if id(c) in seen:
                        continue
                    usage = resource_usage(c.asm["cubin"])
                    names = c.src.fn.arg_names
                    consts = {names[k[0]]: v for k, v in c.src.constants.items() if len(k) == 1}
                    tiles = " ".join(f"{n}={v}" for n, v in consts.items() if n.startswith("BLOCK"))
                    fits = c.metadata.shared <= DEVICE_LIMITS[arch]["max_shared_mem"] and (
                        c.metadata.num_warps * 32 <= max_threads(usage.get("REG", 0))
                    )
                    row = Row(
                        arch,
                        case.name,
                        c.name,
                        c.metadata.num_warps,
                        c.metadata.num_stages,
                        c.metadata.shared,
                        usage.get("REG", -1),
                        usage.get("LOCAL", -1),
                        usage.get("STACK", -1),
                        tiles,
                        fits,
                    )
                    rows.append(row)
                    print(
                        f"{'ok  ' if fits else 'over'} sm_{arch} {row.kernel:18s} {tiles:38s} warps={row.num_warps} "
                        f"stages={row.num_stages} smem={row.shared:6d} regs={row.regs:3d} local={row.local} "
                        f"stack={row.stack} | {case.name}",
                        flush=True,
                    )
    finally:
        for kern in kernels:  # nothing was loaded: keep Triton from unloading the stand-in's handles
            for c in _compiled(kern):
                c.module = None
        tk._check_device = check_device
        _forget_device_properties()
        driver._active = previous  # (reset_active would look for a real GPU driver)
    return rows, failures, time.perf_counter() - t0


def summary_table(rows: list[dict]) -> str:
    """A markdown table per (arch, kernel): variants compiled, how many were over the device's
    limits (the launcher retries those with smaller tiles), and over the variants that launch:
    largest shared memory, most registers, and how many have local memory or a stack frame."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"]), []).append(r)
    lines = [
        "| arch | kernel | variants | over the limits | launched: max shared (KiB) | max regs "
        "| with stack/local (max B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (arch, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if r["fits"]]
        spill = [max(r["stack"], 0) + max(r["local"], 0) for r in ok if r["stack"] > 0 or r["local"] > 0]
        lines.append(
            f"| sm_{arch} | {kernel} | {len(rs)} | {len(rs) - len(ok)} | "
            f"{max((r['shared'] for r in ok), default=0) / 1024:.0f} | {max((r['regs'] for r in ok), default=0)} | "
            f"{len(spill)} ({max(spill, default=0)}) |"
        )
    return "\n".join(lines)


def results_tables(reports: list[dict]) -> str:
    """The tables of ``benchmarks/RESULTS.md`` from ``--json`` reports (one per Triton version).

    Per (Triton, arch): variants, failures, variants over the limits, variants with a stack frame,
    and over the attention variants that launch: largest shared memory and the largest stack frame
    per dtype class and head dim. Then pi0's hot path (bf16, d 256, masks on; fused forward and
    backward): the tiles that launch per kernel, with a dagger where the first tiles were refused."""
    lines = [
        "| Triton | arch | variants | failures | over the limits | with a stack frame | attention max shared (KiB) "
        "| bf16/fp16 attention max stack (B) d 64 / 128 / 256 | fp32 attention max stack (B) d 64 / 128 / 256 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    hot = []
    for rep in reports:
        by_arch: dict[int, list[dict]] = {}
        for r in rep["rows"]:
            by_arch.setdefault(r["arch"], []).append(r)
        for arch, rows in sorted(by_arch.items()):
            fails = [f for f in rep["failures"] if f.startswith(f"sm_{arch} ")]
            ok = [r for r in rows if r["fits"]]
            stack: dict[tuple[str, int], int] = {}
            smem = 0
            for r in ok:
                m = re.search(r"attention.* d=(\d+) (fp32|bf16|fp16)", r["case"])
                if m:
                    key = ("fp32" if m.group(2) == "fp32" else "lp", int(m.group(1)))
                    stack[key] = max(stack.get(key, 0), r["stack"] + r["local"])
                    smem = max(smem, r["shared"])
            with_stack = sum(r["stack"] + r["local"] > 0 for r in ok)
            lp, f32 = (" / ".join(str(stack.get((c, d), 0)) for d in (64, 128, 256)) for c in ("lp", "fp32"))
            lines.append(
                f"| {rep['triton']} | sm_{arch} | {len(rows)} | {len(fails)} | {len(rows) - len(ok)} | {with_stack} "
                f"| {smem / 1024:.0f} | {lp} | {f32} |"
            )
            pi0 = "d=256 bf16 valid=True suffix_mask=True"
            hot += [(rep["triton"], arch, r) for r in rows if pi0 in r["case"] and "split" not in r["case"]]
    lines += [
        "",
        "| Triton | arch | kernel | tiles (M×N, warps, stages) | shared (KiB) | regs | stack (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    refused, shown = set(), set()
    for tv, arch, r in hot:
        key = (tv, arch, r["kernel"])
        if not r["fits"]:
            refused.add(key)
        elif key not in shown:  # the first launched row per kernel: the prefix launch of dk/dv
            shown.add(key)
            m = re.search(r"BLOCK_M=(\d+) BLOCK_N=(\d+)", r["tiles"])
            lines.append(
                f"| {tv} | sm_{arch} | {r['kernel']} | {m.group(1)}×{m.group(2)}, {r['num_warps']}, "
                f"{r['num_stages']}{' †' if key in refused else ''} | {r['shared'] / 1024:.0f} | {r['regs']} "
                f"| {r['stack'] + r['local']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,90 (default 90)")
    p.add_argument("--quick", action="store_true", help="pi0's hot paths only: bf16/fp32, d=256, masks on")
    p.add_argument("--only", default="", help="only the cases whose name contains this text, e.g. 'attention bwd'")
    p.add_argument("--json", type=Path, help="write the rows and failures here")
    p.add_argument("--markdown", action="store_true", help="print a summary table per arch and kernel at the end")
    p.add_argument("--tables", type=Path, nargs="+", metavar="JSON",
                   help="compile nothing: print benchmarks/RESULTS.md's tables from --json reports")  # fmt: skip
    args = p.parse_args(argv)
    if args.tables:
        print(results_tables([json.loads(f.read_text()) for f in args.tables]))
        return 0
    arches = [int(a) for a in args.arch.split(",") if a]
    for a in arches:
        if a not in DEVICE_LIMITS:
            p.error(f"--arch: {a} is not one of {sorted(DEVICE_LIMITS)}")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile from scratch, not from an earlier run's cache
        all_rows, all_fail = [], []
        for a in arches:
            cases = (c for c in all_cases(args.quick) if args.only in c.name)
            rows, fails, secs = run(a, cases)
            all_rows += rows
            all_fail += fails
            spills = [r for r in rows if r.local > 0 or r.stack > 0]
            over = [r for r in rows if not r.fits]
            print(
                f"== sm_{a}: {len(rows)} kernels compiled in {secs:.0f} s, {len(fails)} failures, "
                f"{len(over)} over the device's limits (the launcher retried them with smaller tiles), "
                f"{len(spills)} with local memory (spills or a stack frame); "
                f"triton {triton.__version__}, torch {torch.__version__}",
                flush=True,
            )
    if args.markdown:
        print(summary_table([asdict(r) for r in all_rows]))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"triton": triton.__version__, "rows": [asdict(r) for r in all_rows], "failures": all_fail}, indent=1
            )
        )
    return 1 if all_fail else 0


if __name__ == "__main__":
    sys.exit(main())
