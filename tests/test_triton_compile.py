"""The Triton kernels compile for a real GPU target (sm_90) on this CPU machine.

``scripts/triton_compile_check.py`` runs Triton's whole compiler (down to a cubin by the bundled
ptxas) for every kernel launch against a stand-in driver that reports an H100/H200 and launches
nothing; the interpreter tests check the results, this checks what the interpreter never sees:
that the kernels compile (tl.dot shapes and dtypes, layouts, constexpr branches of the compiled
path) and fit the device's shared memory and registers per block. Run in a subprocess: the
kernels of this process are defined for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "triton_compile_check.py"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_hot_path_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90", "--json", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    kernels = {r["kernel"] for r in report["rows"]}
    # every kernel of both modules, forward and backward
    assert kernels == {
        "_flow_step_kernel", "_chain_fwd_kernel", "_chain_bwd_kernel", "_cfm_fwd_kernel", "_cfm_bwd_kernel",
        "_cfm_interp_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
    }  # fmt: skip
    for r in report["rows"]:
        assert 0 <= r["shared"] <= 232448, r
        assert 0 < r["regs"] <= 255, r  # read back from the cubin by cuobjdump
        assert r["num_warps"] * 32 <= 1024


def test_resource_overflow_is_reported():
    """Tiles too large for the device's shared memory must fail the check, not pass silently."""
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("tcc", {str(SCRIPT)!r})
        tcc = sys.modules["tcc"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(tcc)
        from flowkernels.ops import triton_attention as ta
        d, N = 256, 2
        q = torch.randn(N, 17, 8, d); k = v = torch.randn(N, 17, 1, d); pk = pv = torch.randn(1, 97, 1, d)
        big = ta._config(d, torch.float32, 128, 128)  # 128x128 fp32 tiles at d = 256: over 227 KiB
        ok = ta._config(d, torch.float32, None, None)
        cases = [tcc.Case("big", ta._forward, (q, k, v, pk, pv, None, None, N, 0.0625, "fused", big, False)),
                 tcc.Case("default", ta._forward, (q, k, v, pk, pv, None, None, N, 0.0625, "fused", ok, True))]
        rows, failures, _ = tcc.run(90, cases)
        assert len(failures) == 1 and failures[0].startswith("sm_90 big:"), failures
        assert "shared memory" in failures[0] or "OutOfResources" in failures[0], failures
        assert [r.case for r in rows] == ["default"], rows
        print("OVERFLOW-REPORTED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0 and "OVERFLOW-REPORTED" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_backward_tiles_shrink_to_fit_a_99kib_gpu():
    """sm_86/sm_89 GPUs (RTX 3090/4090, A6000, L4, L40) have 99 KiB of shared memory per block:
    pi0's attention backward (d = 256) fits its H100 tiles on sm_90 but not there; the launcher
    must retry with smaller tiles that do and remember them."""
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("tcc", {str(SCRIPT)!r})
        tcc = sys.modules["tcc"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(tcc)
        from flowkernels.ops import triton_attention as ta
        cases = [c for c in tcc._attention_cases(quick=True)
                 if c.name.startswith("attention bwd") and " bf16 " in c.name]
        assert len(cases) == 1, [c.name for c in cases]
        fixed = [tcc.Case(c.name, c.fn, c.args[:-1] + (False,)) for c in cases]  # the H100 tiles, no retry
        rows, failures, _ = tcc.run(90, fixed)
        assert failures == [] and all(r.fits for r in rows), (failures, rows)
        # the same tiles on sm_89 (same device index: Triton's cached limit must not carry over)
        rows, failures, _ = tcc.run(89, fixed)
        assert len(failures) == 1 and "shared memory" in failures[0], failures
        assert not ta._FITTED
        rows, failures, _ = tcc.run(89, cases)
        assert failures == [], failures
        over = [r for r in rows if not r.fits]
        fit = [r for r in rows if r.fits and r.kernel == "_bwd_dkdv_kernel"]
        assert over and all(r.shared > 101376 for r in over), rows
        assert fit and all(r.shared <= 101376 for r in fit), rows
        assert all("BLOCK_M=64" in r.tiles for r in over) and all("BLOCK_M=32" in r.tiles for r in fit), rows
        assert ta._FITTED, "the tiles that launched are remembered"
        print("SHRUNK-TO-FIT")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0 and "SHRUNK-TO-FIT" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_smaller_tiles_sequence():
    from flowkernels.ops.triton_attention import _smaller

    seq, cfg = [], (128, 64, 64, 4, 2)
    while cfg is not None:
        seq.append(cfg)
        cfg = _smaller(cfg)
    # one stage first, then halve the larger block; 4 warps once a tile has <= 1024 elements
    assert seq == [(128, 64, 64, 4, 2), (128, 64, 64, 4, 1), (64, 64, 64, 4, 1), (32, 64, 64, 4, 1),
                   (32, 32, 64, 4, 1), (16, 32, 64, 4, 1), (16, 16, 64, 4, 1)]  # fmt: skip
    assert _smaller((64, 32, 256, 8, 1)) == (32, 32, 256, 8, 1)  # d = 256 keeps 8 warps (no stack frame)
    assert _smaller((128, 64, 128, 8, 1)) == (64, 64, 128, 8, 1)


def test_summary_table_counts_refused_variants_apart():
    """The maxima describe what launches: a variant over the limits is counted, not measured."""
    mod = load_script(SCRIPT)
    base = dict(arch=86, kernel="_bwd_dkdv_kernel", local=0)
    rows = [
        {**base, "shared": 131072, "regs": 200, "stack": 64, "fits": False},
        {**base, "shared": 81920, "regs": 180, "stack": 16, "fits": True},
        {**base, "shared": 40960, "regs": 255, "stack": 0, "fits": True},
        {**base, "arch": 90, "shared": 131072, "regs": 190, "stack": 0, "fits": True},
    ]
    lines = mod.summary_table(rows).splitlines()
    assert lines[2] == "| sm_86 | _bwd_dkdv_kernel | 3 | 1 | 80 | 255 | 1 (16) |"
    assert lines[3] == "| sm_90 | _bwd_dkdv_kernel | 1 | 0 | 128 | 190 | 0 (0) |"


def test_backward_tiles_per_kernel(monkeypatch):
    """Compiled bf16/fp16 with default tiles: the dq and dk/dv kernels get their own tiles; tiles
    the caller chose, fp32 and the interpreter keep the forward's."""
    import torch

    from flowkernels.ops import triton_attention as ta

    monkeypatch.setattr(ta, "_INTERPRET", False)
    c64 = ta._config(64, torch.bfloat16, None, None)
    assert c64 == (128, 64, 64, 4, 2)
    assert ta._bwd_configs(c64, torch.bfloat16, True) == ((128, 32, 64, 8, 2), (128, 32, 64, 8, 2))
    assert ta._bwd_configs(c64, torch.bfloat16, False) == (c64, c64)
    c128 = ta._config(96, torch.float16, None, None)
    assert ta._bwd_configs(c128, torch.float16, True) == ((64, 32, 128, 8, 2), c128)
    c256 = ta._config(256, torch.bfloat16, None, None)
    assert ta._bwd_configs(c256, torch.bfloat16, True) == (c256, c256)
    c32 = ta._config(64, torch.float32, None, None)
    assert ta._bwd_configs(c32, torch.float32, True) == (c32, c32)
    monkeypatch.setattr(ta, "_INTERPRET", True)
    assert ta._bwd_configs(c64, torch.bfloat16, True) == (c64, c64)


def test_d64_backward_has_no_stack_frame_on_sm80(tmp_path):
    """The d <= 64 backward tiles: the forward's 128x64, 4 warps gave the dk/dv kernel 2-7 KB stack
    frames per thread on sm_80 (mma.sync); its own tiles compile with (almost) none."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "80", "--json", str(out),
                           "--only", "attention bwd (dq, prefix dk/dv, suffix dk/dv) d=64 bf16"],
                          capture_output=True, text=True, env=_env(), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_bwd_dq_kernel", "_bwd_dkdv_kernel"}, rows
    assert all(r["fits"] and r["stack"] + r["local"] <= 128 for r in rows), rows


def test_results_tables_from_reports():
    """RESULTS.md's tables come from --json reports: counts per arch, launched-only maxima, pi0's hot path
    with a dagger where the first tiles were refused."""
    mod = load_script(SCRIPT)
    pi0 = "attention bwd (dq, prefix dk/dv, suffix dk/dv) d=256 bf16 valid=True suffix_mask=True"
    row = dict(arch=86, kernel="_bwd_dkdv_kernel", case=pi0, num_warps=8, num_stages=1, regs=160, local=0)
    rows = [
        {**row, "tiles": "BLOCK_M=64 BLOCK_N=32 BLOCK_D=256", "shared": 131072, "stack": 0, "fits": False},
        {**row, "tiles": "BLOCK_M=32 BLOCK_N=32 BLOCK_D=256", "shared": 81920, "stack": 8, "fits": True},
        {**row, "kernel": "_flow_step_kernel", "case": "flow_step mode=0", "tiles": "BLOCK=2048", "shared": 0,
         "stack": 32, "fits": True},
    ]  # fmt: skip
    text = mod.results_tables([{"triton": "3.6.0", "rows": rows, "failures": ["sm_86 x: boom"]}])
    assert "| 3.6.0 | sm_86 | 3 | 1 | 1 | 2 | 80 | 0 / 0 / 8 | 0 / 0 / 0 |" in text, text
    assert "| 3.6.0 | sm_86 | _bwd_dkdv_kernel | 32×32, 8, 1 † | 80 | 160 | 8 |" in text, text
