"""lerobot's π0 / π0.5 ``sample_actions`` with and without ``apply_flowkernels``, side by side.

Runs in the lerobot venv (``bash scripts/setup_lerobot_env.sh`` builds it and installs flowkernels there):

    .venv-lerobot/bin/python benchmarks/bench_lerobot.py                       # CPU: tiny + small, B 1/8/64
    .venv-lerobot/bin/python benchmarks/bench_lerobot.py --sizes small --batches 8 --variants pi05 --device cuda

Models are random (scripts/lerobot_reference.py's offline builders) at two sizes:

* ``tiny``  — lerobot_reference.TINY: VLM width 64 / expert 32, depth 2, 2 cameras of 16 tokens + 12
  language tokens (prefix P = 44);
* ``small`` — VLM width 512 / expert 256, depth 4, head_dim 64, 8 query heads / 1 KV head, MLP 1024 / 512,
  2 cameras of 64 tokens (64² images, patch 8) + 32 language tokens (P = 160).

Chunk H = 50, D = 32, K = 10 Euler steps, float32. Providers, timed alternately in one process on the
same inputs and noise: ``lerobot`` (unpatched), ``flowkernels`` (``apply_flowkernels`` defaults:
prefix reused in place + ``prefix_attention`` + ``flow_step``), ``reuse_only`` (``attention=False,
denoise=False``: only the per-step cache clone removed, eager attention). ``speed-up`` = lerobot's median /
the provider's. Rows are appended to benchmarks/RESULTS.md (date, commit, device).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import lerobot_reference as ref  # noqa: E402
from bench_ops import ResultsBlock, _commit, _device_name, _reason, release_cuda  # noqa: E402

from flowkernels.integrations.lerobot import apply_flowkernels, revert_flowkernels  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
CHUNK = 50
SIZES = {
    "tiny": {"tiny": copy.deepcopy(ref.TINY), "lang_len": 12},
    "small": {
        "tiny": {
            **copy.deepcopy(ref.TINY),
            "vlm": {"width": 512, "depth": 4, "mlp_dim": 1024, "num_heads": 8, "num_kv_heads": 1, "head_dim": 64},
            "expert": {"width": 256, "depth": 4, "mlp_dim": 512, "num_heads": 8, "num_kv_heads": 1, "head_dim": 64},
            "vision": {
                "image_size": 64,
                "patch_size": 8,
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
        },
        "lang_len": 32,
    },
}
PROVIDERS: dict[str, dict | None] = {
    "lerobot": None,
    "flowkernels": {},
    "reuse_only": {"attention": False, "denoise": False},
}


def build(size: str, variant: str, dev: str):
    ref.TINY.clear()
    ref.TINY.update(copy.deepcopy(SIZES[size]["tiny"]))
    policy = ref.build_policy(variant, CHUNK, seed=0)
    return policy.to(dev)


def make_args(policy, variant: str, size: str, B: int, dev: str) -> tuple[list, torch.Tensor]:
    g = torch.Generator().manual_seed(B)
    cfg = SIZES[size]
    res = cfg["tiny"]["vision"]["image_size"]
    L = cfg["lang_len"]
    images = [torch.rand(B, 3, res, res, generator=g).mul(2).sub(1).to(dev) for _ in ref.CAMERAS]
    masks = [torch.ones(B, dtype=torch.bool, device=dev) for _ in ref.CAMERAS]
    masks[1][1::2] = False  # every other row misses its wrist camera
    tokens = torch.randint(1, cfg["tiny"]["vocab_size"], (B, L), generator=g).to(dev)
    lang_masks = torch.ones(B, L, dtype=torch.bool, device=dev)
    lang_masks[1::2, L - 4 :] = False  # right padding on odd rows
    tokens[~lang_masks] = 0
    args = [images, masks, tokens, lang_masks]
    if variant == "pi0":
        args.append(torch.randn(B, cfg["tiny"]["max_state_dim"], generator=g).to(dev))
    noise = torch.randn(B, CHUNK, cfg["tiny"]["max_action_dim"], generator=g).to(dev)
    return args, noise


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def bench_one(policy, variant: str, size: str, B: int, dev: str, budget_s: float, min_reps: int) -> list[dict]:
    args, noise = make_args(policy, variant, size, B, dev)
    model = policy.model
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    outs: dict[str, torch.Tensor] = {}

    def make(opts: dict | None) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if opts is None:
                revert_flowkernels(policy)
            else:
                apply_flowkernels(policy, **opts)
            out = model.sample_actions(*args, noise=noise.clone())
            _sync(dev)
            return out

        return fn

    for name, opts in PROVIDERS.items():
        runs[name] = make(opts)
        outs[name] = runs[name]()  # warm-up + output for the agreement column
    times: dict[str, list[float]] = {n: [] for n in runs}
    t_end = time.perf_counter() + budget_s
    while min(len(t) for t in times.values()) < min_reps or time.perf_counter() < t_end:
        for name, opts in PROVIDERS.items():  # alternate providers: shared CPU load hits all of them alike
            if opts is None:
                revert_flowkernels(policy)
            else:
                apply_flowkernels(policy, **opts)
            t0 = time.perf_counter()
            model.sample_actions(*args, noise=noise.clone())
            _sync(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if min(len(t) for t in times.values()) >= 50:
            break
    revert_flowkernels(policy)
    base = statistics.median(times["lerobot"])
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        med = statistics.median(ts)
        rows.append(
            {
                "size": size,
                "variant": variant,
                "B": B,
                "provider": name,
                "median": med,
                "p20": q[0],
                "p80": q[3],
                "reps": len(ts),
                "chunks_s": B / med * 1e3,
                "speedup": base / med,
                "maxdiff": (outs[name] - outs["lerobot"]).abs().max().item(),
            }
        )
        print(
            f"{size:6s} {variant:5s} B={B:3d} {name:12s} {med:9.2f} ms  [{q[0]:.2f}, {q[3]:.2f}]  n={len(ts):3d}  "
            f"{B / med * 1e3:8.1f} chunks/s  speed-up {base / med:5.2f}x  max|Δ| {rows[-1]['maxdiff']:.1e}",
            flush=True,
        )
    return rows


COLUMNS = ["size", "variant", "B", "provider", "median ms", "p20", "p80", "reps", "chunks/s", "speed-up",
           "max abs diff"]


def results_block(device: str, path: Path | None) -> ResultsBlock:
    """This run's block of RESULTS.md (written with its first row; every row appended as measured)."""
    import lerobot
    import transformers

    date = _dt.date.today().isoformat()
    return ResultsBlock(
        path,
        f"## bench_lerobot ({date}, {_commit()}, {device}, lerobot {lerobot.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, float32)",
        f"lerobot's `sample_actions` (H {CHUNK}, D 32, K 10, random tiny/small models, see the script) "
        "unpatched vs `apply_flowkernels`; `speed-up` = lerobot's median / the provider's; `max|Δ|` "
        "= max abs difference of the actions from lerobot's (same noise); a shape that failed is a "
        "`skipped` row with the reason.",
        COLUMNS,
    )


def record_rows(block: ResultsBlock, rows: list[dict]) -> None:
    for r in rows:
        block.add([r["size"], r["variant"], r["B"], r["provider"], f"{r['median']:.2f}", f"{r['p20']:.2f}",
                   f"{r['p80']:.2f}", r["reps"], f"{r['chunks_s']:.1f}", f"{r['speedup']:.2f}x",
                   f"{r['maxdiff']:.1e}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--variants", default="pi0,pi05")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per (size, variant, batch)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1: no spin on a loaded CPU)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--out", default=str(RESULTS), help="the results file to append to (default %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated ints, got {args.batches!r}")
    bad = [x for x in args.sizes.split(",") if x not in SIZES] + \
        [x for x in args.variants.split(",") if x not in ("pi0", "pi05")]
    if bad:
        p.error(f"unknown --sizes / --variants {bad} (sizes {list(SIZES)}, variants pi0, pi05)")
    if min(batches) < 1 or not args.budget > 0 or args.min_reps < 1:
        p.error(f"--batches must be >= 1 (got {batches}), --budget > 0 (got {args.budget}) and --min-reps >= 1 "
                f"(got {args.min_reps})")
    torch.manual_seed(0)
    out = None if args.no_record else Path(args.out)
    block = results_block(_device_name(args.device), out)
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            try:
                policy = build(size, variant, args.device)
            except Exception as e:  # e.g. out of memory: record it and go on with the other sizes
                release_cuda(args.device)
                print(f"# skipping {size} {variant}: {_reason(e)}", flush=True)
                block.add([size, variant, "-", f"skipped: {_reason(e)}", *[""] * (len(COLUMNS) - 4)])
                continue
            print(f"{size} {variant}: {sum(q.numel() for q in policy.parameters()) / 1e6:.2f}M params", flush=True)
            for B in batches:
                try:
                    rows = bench_one(policy, variant, size, B, args.device, args.budget, args.min_reps)
                except Exception as e:  # one shape failing (e.g. out of memory) is a skip row for that shape
                    revert_flowkernels(policy)
                    release_cuda(args.device)
                    print(f"# skipping {size} {variant} B={B}: {_reason(e)}", flush=True)
                    block.add([size, variant, B, f"skipped: {_reason(e)}", *[""] * (len(COLUMNS) - 4)])
                    continue
                record_rows(block, rows)
            del policy
    if block.n_rows:
        print(f"appended {block.n_rows} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
