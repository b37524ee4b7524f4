"""LIBERO env throughput: env steps/s of :class:`flowrl.envs.libero.LiberoEnv` for 1 and 2 workers,
with and without fast rendering (no shadows / reflections / multisampling).

Each configuration builds its env (one worker process per env), resets it, runs one warm-up
chunk and then ``--chunks`` timed chunk steps of zero actions (the arm holds still, so no
episode ends). Cameras are rendered once per chunk (after its last action), as the env does.
Rows are appended to benchmarks/RESULTS.md with date, commit and device.

    python benchmarks/bench_libero.py [--suite libero_spatial] [--image-size 128] [--chunk-steps 5]
                                      [--chunks 5] [--workers 1,2] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ops import _commit

from flowrl.envs.libero import LiberoEnv, libero_unavailable_reason

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "## bench_libero"


def _device_name() -> str:
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} cores"


def run_case(suite: str, workers: int, fast: bool, image_size: int, chunk_steps: int, chunks: int) -> dict:
    t0 = time.perf_counter()
    env = LiberoEnv(suite, task_ids=list(range(workers)), num_envs=workers, chunk_steps=chunk_steps,
                    image_size=image_size, fast_render=fast)
    try:
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        env.reset(seed=0)
        reset_s = time.perf_counter() - t0
        actions = torch.zeros(workers, chunk_steps, 7)
        actions[..., 6] = -1.0  # gripper open: the scene stays put
        env.step(actions)  # warm-up
        times, steps = [], 0
        for _ in range(chunks):
            t0 = time.perf_counter()
            out = env.step(actions)
            times.append(time.perf_counter() - t0)
            steps += int(out.executed.sum())
        total = sum(times)
        return {"workers": workers, "fast": fast, "build_s": build_s, "reset_s": reset_s,
                "chunk_ms": 1000 * statistics.median(times), "steps_per_s": steps / total,
                "gl": env.gl_backend}
    finally:
        env.close()


def record(rows: list[dict], suite: str, image_size: int, chunk_steps: int) -> None:
    date = _dt.date.today().isoformat()
    commit = _commit()
    lines = []
    if not RESULTS.exists() or HEADER not in RESULTS.read_text():
        lines += ["", HEADER, "",
                  "Env steps/s of `LiberoEnv` (zero actions, one worker process per env, cameras rendered once per "
                  "chunk of H' steps: agent view + wrist at S²). `build s`: constructing all workers in parallel; "
                  "`reset s`: init state + 10 settle steps.", "",
                  "| date | commit | device | suite | S | H' | workers | fast render | GL | build s | reset s "
                  "| chunk ms (median) | env steps/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {date} | {commit} | {_device_name()} | {suite} | {image_size} | {chunk_steps} | "
                     f"{r['workers']} | {'yes' if r['fast'] else 'no'} | {r['gl']} | {r['build_s']:.1f} | "
                     f"{r['reset_s']:.1f} | {r['chunk_ms']:.0f} | {r['steps_per_s']:.1f} |")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS}")


def main(argv: list[str] | None = None) -> bool:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--chunk-steps", type=int, default=5)
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    try:
        workers = [int(x) for x in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers must be comma-separated ints, got {args.workers!r}")
    if min(workers) < 1 or args.chunks < 1 or args.chunk_steps < 1 or args.image_size < 8:
        p.error(f"need --workers >= 1, --chunks >= 1, --chunk-steps >= 1, --image-size >= 8; got {workers}, "
                f"{args.chunks}, {args.chunk_steps}, {args.image_size}")
    reason = libero_unavailable_reason()
    if reason:
        print(f"bench_libero: skipped: {reason}")
        return True
    rows = []
    for w in workers:
        for fast in (False, True):
            r = run_case(args.suite, w, fast, args.image_size, args.chunk_steps, args.chunks)
            rows.append(r)
            print(f"workers {w} fast_render {fast!s:5}: build {r['build_s']:.1f} s, reset {r['reset_s']:.1f} s, "
                  f"chunk {r['chunk_ms']:.0f} ms, {r['steps_per_s']:.1f} env steps/s ({r['gl']})", flush=True)
    if not args.no_record:
        record(rows, args.suite, args.image_size, args.chunk_steps)
    return True


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
