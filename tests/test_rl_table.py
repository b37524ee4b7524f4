"""benchmarks/rl_table.py's record of which weights a run ended with and started from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import save_file


def _load():
    return load_benchmark("rl_table")


def _checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], it: int = 14) -> Path:
    d = run_dir / "checkpoints" / f"iter_{it:06d}"
    (d / "policy").mkdir(parents=True)
    save_file(tensors, str(d / "policy" / "model.safetensors"))
    (run_dir / "checkpoints" / "latest").write_text(d.name)
    return d


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
            "c.scalar": torch.tensor(2.0)}


def test_weights_digest_identifies_the_weights(tmp_path):
    rt = _load()
    w = _weights()
    a = rt.weights_digest(_checkpoint(tmp_path / "a", w))
    same = rt.weights_digest(_checkpoint(tmp_path / "b", dict(reversed(list(w.items())))))
    assert a == same and len(a) == 16
    w2 = {k: v.clone() for k, v in w.items()}
    w2["a.weight"][1, 2] = torch.nextafter(w2["a.weight"][1, 2], torch.tensor(1e9))  # one ulp
    assert rt.weights_digest(_checkpoint(tmp_path / "c", w2)) != a
    w3 = {**w, "b.bias": w["b.bias"].float()}  # same values, another dtype
    assert rt.weights_digest(_checkpoint(tmp_path / "d", w3)) != a
    with pytest.raises(FileNotFoundError, match="policy"):
        rt.weights_digest(tmp_path / "nothing")


def test_reuse_checks_the_recorded_weights(tmp_path):
    rt = _load()
    ckpt = _checkpoint(tmp_path / "sft", _weights())
    digest = rt.weights_digest(ckpt)
    result = tmp_path / "sft.result.json"
    rec = {"before": 0.1, "after": 0.5, "env_steps": 0, "wall_s": 1.0, "commit": "abc", "weights": digest}
    result.write_text(json.dumps(rec))
    r = rt.run("sft", "sft", [], tmp_path, log=False, reuse=True)
    assert r["reused"] and r["after"] == 0.5
    result.write_text(json.dumps({**rec, "weights": "0" * 16}))
    with pytest.raises(RuntimeError, match="does not hold the weights"):
        rt.run("sft", "sft", [], tmp_path, log=False, reuse=True)
    # an RL result recorded from another initial checkpoint is not reused
    other = _checkpoint(tmp_path / "other", _weights(seed=1))
    (tmp_path / "fpo.result.json").write_text(json.dumps({**rec, "weights": None, "init_weights": digest}))
    assert rt.run("fpo", "fpo", [f"model.init_from={ckpt}"], tmp_path, log=False, reuse=True)["reused"]
    with pytest.raises(RuntimeError, match="started from weights"):
        rt.run("fpo", "fpo", [f"model.init_from={other}"], tmp_path, log=False, reuse=True)


def test_host_kind_names_what_decides_the_bits():
    rt = _load()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rt.host_kind()
    finally:
        torch.set_num_threads(n)
    assert one == f"{torch.backends.cpu.get_cpu_capability()} x1 threads"
    assert rt.host_kind().endswith(f"x{n} threads")
