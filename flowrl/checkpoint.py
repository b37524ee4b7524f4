"""Atomic checkpoints: write to a temporary directory, then rename; a ``latest`` pointer file.

A checkpoint directory ``<run_dir>/checkpoints/iter_000012/`` holds whatever the trainer
writes (DeepSpeed's engine state, the policy in safetensors, per-rank trainer state). It only
appears under its final name once complete, and ``latest`` is replaced atomically after it, so
a process killed at any moment leaves either the previous checkpoint or the new one — never a
partial one that resume would pick up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["finalize_checkpoint", "latest_checkpoint", "staging_dir", "write_atomic"]


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(run_dir: str | Path, iteration: int) -> Path:
    """The temporary directory a checkpoint of ``iteration`` is written into (cleared first)."""
    d = Path(run_dir) / "checkpoints" / f".staging_iter_{iteration:06d}"
    return d


def finalize_checkpoint(run_dir: str | Path, iteration: int, keep: int = 2) -> Path:
    """Rename the staged checkpoint to its final name, point ``latest`` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    src = staging_dir(run_dir, iteration)
    if not src.is_dir():
        raise FileNotFoundError(f"finalize_checkpoint: staged checkpoint {src} does not exist")
    dst = root / f"iter_{iteration:06d}"
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
    write_atomic(root / "latest", dst.name.encode())
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".staging_iter_*"):
        if stale != src:
            shutil.rmtree(stale, ignore_errors=True)
    return dst


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None if the run has no complete checkpoint."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    d = root / ptr.read_text().strip()
    if not d.is_dir():
        raise FileNotFoundError(f"latest_checkpoint: {ptr} points at {d}, which does not exist")
    return d
