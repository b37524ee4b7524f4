"""Atomic checkpoints: write to a temporary directory, then rename; a ``latest`` pointer file.

A checkpoint directory ``<run_dir>/checkpoints/iter_000012/`` holds whatever the trainer
writes (DeepSpeed's engine state, the policy in safetensors, per-rank trainer state). It only
appears under its final name once complete, and ``latest`` is replaced atomically after it, so
a process killed at any moment leaves either the previous checkpoint or the new one — never a
partial one that resume would pick up.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["checkpoint_iteration", "complete_checkpoints", "finalize_checkpoint", "latest_checkpoint",
           "resolve_checkpoint", "staging_dir", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + ``os.replace``.
    ``data``: the bytes, or a function that writes the file it is given (e.g. ``safetensors``' ``save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


_ITER = re.compile(r"iter_(\d+)")


def checkpoint_iteration(path: str | Path) -> int | None:
    """The iteration of a checkpoint directory named ``iter_<N>``, else None."""
    m = _ITER.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (``iter_<N>`` directories; staged ones are not), by iteration."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("iter_*") if p.is_dir() and checkpoint_iteration(p) is not None]
    return sorted(found, key=lambda p: checkpoint_iteration(p))  # type: ignore[arg-type, return-value]


def staging_dir(run_dir: str | Path, iteration: int) -> Path:
    """The temporary directory a checkpoint of ``iteration`` is written into (cleared first)."""
    d = Path(run_dir) / "checkpoints" / f".staging_iter_{iteration:06d}"
    return d


def finalize_checkpoint(run_dir: str | Path, iteration: int, keep: int = 2) -> Path:
    """Rename the staged checkpoint to its final name, point ``latest`` at it, and prune: the new one
    and the ``keep − 1`` highest-numbered others stay (``keep=0``: all)."""
    root = Path(run_dir) / "checkpoints"
    src = staging_dir(run_dir, iteration)
    if not src.is_dir():
        raise FileNotFoundError(f"finalize_checkpoint: staged checkpoint {src} does not exist")
    dst = root / f"iter_{iteration:06d}"
    if dst.exists():  # the same iteration saved again: moved aside first, so a kill leaves a complete one
        trash = root / f".replaced_{dst.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
    write_atomic(root / "latest", dst.name.encode())
    # prune by iteration number (not by name: iter_1000000 sorts before iter_999999); never the new one
    if keep > 0:  # 0 keeps every checkpoint
        others = [p for p in complete_checkpoints(run_dir) if p != dst]
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".staging_iter_*"), *root.glob(".replaced_iter_*")]:
        if stale != src:
            shutil.rmtree(stale, ignore_errors=True)
    return dst


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None if the run has no complete checkpoint.

    ``latest`` must name an existing ``iter_<N>`` directory of this run. When it does not (a process
    killed between publishing a checkpoint and writing the pointer, or a damaged pointer), the
    newest complete checkpoint is returned, with a warning: ``iter_<N>`` directories only appear
    once complete.
    """
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    done = complete_checkpoints(run_dir)
    if ptr.is_file():
        name = ptr.read_text(errors="replace").strip()
        d = root / name
        if checkpoint_iteration(name) is not None and d.is_dir():
            return d
        if done:
            warnings.warn(f"latest_checkpoint: {ptr} names {name!r}, not a complete checkpoint of this run; "
                          f"using the newest one, {done[-1].name}", stacklevel=2)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a run directory (one holding ``checkpoints/``) or its ``checkpoints/`` folder,
    the run's latest complete checkpoint (:func:`latest_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` does not exist, or names a run without a complete checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / "checkpoints").is_dir():
        run_dir = path
    elif path.name == "checkpoints" and checkpoint_iteration(path) is None and (
            (path / "latest").is_file() or complete_checkpoints(path.parent)):
        run_dir = path.parent
    else:
        return path
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"run directory {run_dir} has no complete checkpoint yet")
    return ck
