"""Write a trained policy back into the lerobot (or openpi PyTorch) checkpoint layout it started from.

    python -m flowrl.export_lerobot --checkpoint runs/pi0_libero_spatial_fpo --out exported/pi0_fpo
    python -m flowrl.export_lerobot --checkpoint runs/x/checkpoints/iter_000099 --like ckpts/pi0_libero --out DIR

``--checkpoint``: a trainer checkpoint, a run directory or its ``checkpoints/`` (the latest checkpoint), or a
policy directory. ``--like``: the lerobot / openpi checkpoint the weights came from; by default the run's
``model.init_from``, followed through runs that started from other runs' checkpoints. ``--out`` receives
that checkpoint's files (``config.json``, processor and normalization files) with its ``model.safetensors``
holding the trained weights, which lerobot's ``PI0Policy.from_pretrained`` / ``PI05Policy.from_pretrained``
load (:meth:`flowrl.models.Pi0Policy.save_lerobot`). The value heads and Flow-Noise's noise head are not
part of a lerobot model and are left out. A VLA-FPO checkpoint is refused: its trained part is the latent
actor that steers the frozen π0, which lerobot cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "source_checkpoint"]


def _is_flowrl(d: Path) -> bool:
    """Whether the checkpoint directory ``d`` (or its ``policy/``) holds a flowrl policy."""
    from flowrl.models.weights import _is_flowrl_format, _safetensors_layout

    pol = d / "policy" if (d / "policy").is_dir() else d
    meta: dict[str, Any] = {}
    if (pol / "config.json").is_file():
        try:
            meta = json.loads((pol / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    meta = meta if isinstance(meta, dict) else {}
    if _is_flowrl_format(meta, {}):
        return True
    if not (pol / "model.safetensors").is_file():
        return (d / "checkpoints").is_dir() or (d / "train_config.json").is_file()  # a run directory
    return _is_flowrl_format(meta, _safetensors_layout(pol / "model.safetensors")[1])  # the header only


def _is_vla_fpo(ck: Path) -> bool:
    """Whether the trainer checkpoint ``ck`` (or the checkpoint whose ``policy/`` it is) is a VLA-FPO run's."""
    for d in (ck, ck.parent):
        if (d / "latent_actor.safetensors").is_file():
            return True
        cfg = d / "train_config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("algo", {}).get("name") == "vla_fpo"
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return False
    return False


def source_checkpoint(checkpoint: Path, max_hops: int = 32) -> Path | None:
    """The lerobot / openpi checkpoint a trainer checkpoint's weights started from: the run's
    ``model.init_from``, followed through runs that started from other runs' checkpoints; ``None`` when the
    chain ends in a run trained from scratch, or a ``train_config.json`` is missing on the way."""
    from flowrl.checkpoint import resolve_checkpoint

    ck = checkpoint
    for _ in range(max_hops):
        found = next((d / "train_config.json" for d in (ck, ck.parent)  # a checkpoint, or its policy/
                      if (d / "train_config.json").is_file()), None)
        if found is None:
            return None
        init = json.loads(found.read_text()).get("model", {}).get("init_from")
        if not init:
            return None
        src = Path(init)
        if not src.exists():
            raise FileNotFoundError(f"the run of {ck} started from model.init_from={init}, which does not exist "
                                    "here (a path relative to where that run was started?): pass --like")
        src = resolve_checkpoint(src)  # a run directory or its checkpoints/: its latest checkpoint, as the trainer
        if not _is_flowrl(src):
            return src
        ck = src
    raise ValueError(f"model.init_from of {checkpoint} goes through more than {max_hops} runs: pass --like")


def main(argv: list[str] | None = None) -> Path:
    """The CLI (module docstring); returns the written directory."""
    from flowrl.eval import resolve_checkpoint
    from flowrl.models import from_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint, run directory or policy directory")
    p.add_argument("--out", required=True, help="the lerobot checkpoint directory to write")
    p.add_argument("--like", default=None,
                   help="the lerobot / openpi checkpoint the weights came from (default: the run's model.init_from)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    args = p.parse_args(argv)
    ck = resolve_checkpoint(Path(args.checkpoint), prog="flowrl.export_lerobot")
    if _is_vla_fpo(ck):
        raise ValueError(f"{ck} is a VLA-FPO checkpoint: its trained part is the latent actor that steers the frozen "
                         "π0, which a lerobot model cannot hold (exporting the π0 would export the untrained policy)")
    out = Path(args.out).resolve()
    if ck.resolve().is_relative_to(out):
        raise ValueError(f"--out {args.out} holds the checkpoint {ck}: writing it would delete the checkpoint")
    like: Any = Path(args.like) if args.like else source_checkpoint(ck)
    if like is None:
        raise ValueError(f"{ck}: its run did not start from a lerobot / openpi checkpoint (model.init_from), so "
                         "there is no layout to write into: pass --like DIR")
    if not like.is_dir():
        raise ValueError(f"--like {like} is not a directory")
    policy = from_pretrained(str(ck / "policy" if (ck / "policy").is_dir() else ck))
    out = policy.save_lerobot(args.out, like=like, overwrite=args.overwrite)
    print(f"flowrl.export_lerobot: {ck} -> {out} (layout and config of {like})", flush=True)
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad arguments, checkpoints that do not fit
        print(f"flowrl.export_lerobot: error: {e}", file=sys.stderr)
        sys.exit(2)
